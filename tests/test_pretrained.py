"""``backbone.pretrained=`` reads any vitlab checkpoint: a classifier's, a detector's and a
segmenter's (their EMA weights too), as a file or as its run directory."""
from __future__ import annotations

import pytest
import torch

import vitlab
from support import TINY_PVT

TINY = [o.removeprefix("backbone.") for o in TINY_PVT if o.startswith("backbone.")]
RUNS = {
    "classification": ["experiment=demo", "module.ema_decay=0.5"],
    "detection": ["task=coco_retinanet", "module.head.fpn_channels=16", "module.ema_decay=0.5"],
    "segmentation": ["task=ade20k_fpn", "module.head.fpn_channels=16", "module.head.channels=16"],
}
# where each task's Lightning checkpoint keeps the backbone
PREFIX = {"classification": "model.backbone.", "detection": "model.model.backbone.body.",
          "segmentation": "model.backbone."}


@pytest.mark.parametrize("task", list(RUNS))
def test_backbone_weights_from_any_task_checkpoint(task, tmp_path, train_run):
    summary = train_run(tmp_path / "run", *TINY_PVT, *RUNS[task], "debug=smoke", "data.synthetic=true")
    state = torch.load(summary["last_ckpt"], weights_only=True)["state_dict"]
    for source in (summary["last_ckpt"], str(tmp_path / "run")):  # a file, or the run directory
        backbone = vitlab.create_backbone("pvt_v2_b0", pretrained=source, overrides=TINY)
        for key, value in backbone.state_dict().items():
            assert torch.equal(value, state[PREFIX[task] + key]), key
    if "module.ema_decay=0.5" in RUNS[task]:  # the EMA copy differs from the trained weights after a step
        ema = vitlab.create_backbone("pvt_v2_b0", pretrained=summary["last_ckpt"], overrides=[*TINY, "pretrained_ema=true"])
        key = "stages.0.patch_embed.proj.weight"
        ema_key = "ema.module." + PREFIX[task].removeprefix("model.") + key
        assert torch.equal(ema.state_dict()[key], state[ema_key])
        assert not torch.equal(state[ema_key], state[PREFIX[task] + key])
    else:  # a run without module.ema_decay has no EMA copy: said plainly
        with pytest.raises(Exception, match="has no EMA weights"):
            vitlab.create_backbone("pvt_v2_b0", pretrained=summary["last_ckpt"],
                                   overrides=[*TINY, "pretrained_ema=true"])


V1 = ["depths=[1,1,1,1]", "embed_dims=[16,32,40,64]"]


def test_pvt_v1_dense_backbone_drops_classifier_parts_and_trades_weights_with_a_classifier(tmp_path):
    """PVT v1's class token, its position slot and the final norm serve the classifier only: a dense
    backbone drops them (the official detection backbone has none), takes a classifier's file without
    them, and its own weights load back into a classifier (those parts keep their initialisation)."""
    from vitlab.api import backbone_config
    from vitlab.runtime.build import build_backbone

    classifier = vitlab.create_model("pvt_tiny", 5, overrides=V1)
    torch.save(classifier.state_dict(), tmp_path / "classifier.pt")
    cfg = backbone_config("pvt_tiny", [*V1, f"pretrained={tmp_path / 'classifier.pt'}"])
    dense = build_backbone(cfg, dense=True)
    assert dense.pruned_keys == {"cls_token", "cls_pos_embed", "norm.weight", "norm.bias"}
    assert not dense.pruned_keys & set(dense.state_dict())
    for key, value in dense.state_dict().items():
        assert torch.equal(value, classifier.backbone.state_dict()[key]), key
    torch.save({f"backbone.{k}": v for k, v in dense.state_dict().items()}, tmp_path / "dense.pt")
    back = vitlab.create_model("pvt_tiny", 5, pretrained=tmp_path / "dense.pt", overrides=V1)
    assert torch.equal(back.backbone.stages[3].blocks[0].attn.q.weight, dense.stages[3].blocks[0].attn.q.weight)


# each family's default variant (shrunk where big), PVT v1, and the timm baselines
DENSE_FAMILIES = {
    "pvt_tiny": V1,
    "pvt_v2_b0": ["depths=[1,1,1,1]"],
    "pale_t": ["depths=[1,1,2,1]", "embed_dims=[16,32,48,64]", "num_heads=[2,2,4,4]"],
    "gpvit_l1": ["embed_dims=48", "depths=4", "num_heads=4", "gp_layers=[1,3]", "group_tokens=[8,4]",
                 "num_group_heads=2", "num_ungroup_heads=2", "propagation_heads=2", "neck_heads=2"],
    "scalablevit_s": ["depths=[2,2,2,2]", "embed_dims=[16,32,32,64]", "num_heads=[1,2,2,4]"],
    "resnet18": [],
    "vit_small_p32": [],
    "swin_tiny": [],
}


@pytest.mark.parametrize("name", list(DENSE_FAMILIES))
def test_every_parameter_of_a_dense_backbone_gets_a_gradient(name):
    """DDP (without find_unused_parameters, as trainer=ddp runs) stops on a parameter that gets no
    gradient: a dense backbone's forward must use every parameter it holds."""
    from vitlab.api import backbone_config
    from vitlab.runtime.build import build_backbone

    backbone = build_backbone(backbone_config(name, [*DENSE_FAMILIES[name], "pretrained=null"]), dense=True)
    sum(level.float().mean() for level in backbone(torch.randn(1, 3, 128, 128))).backward()
    unused = [k for k, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused
