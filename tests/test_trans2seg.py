"""Trans2Seg (PVT Table 7): shapes at any size, learning on generated ADE20K data, the model size of
the paper, the task from the command line, bad input."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from support import TINY_PVT, run_script
from vitlab.api import backbone_config
from vitlab.data.ade20k import ADE20KDataModule
from vitlab.data.synthetic_dense import make_ade20k
from vitlab.heads.segmentation import Segmentor
from vitlab.heads.trans2seg import Trans2SegHead
from vitlab.runtime.build import build_backbone
from vitlab.tasks.segmentation import iou_from_confmat

TINY = [o.removeprefix("backbone.") for o in TINY_PVT[1:]]
SMALL = dict(embed_dim=32, depth=2, num_heads=2, hidden_channels=16, img_size=[64, 64])


def tiny_model(num_classes: int, **kw) -> Segmentor:
    backbone = build_backbone(backbone_config("pvt_v2_b0", TINY))
    return Segmentor(backbone, Trans2SegHead(backbone.out_channels, backbone.strides, num_classes, **{**SMALL, **kw}))


def test_shapes_at_the_training_size_and_others():
    model = tiny_model(7)
    head = model.decode_head
    assert head.grid == (2, 2) and head.pos_embed.shape == (1, 5, 32)  # 64 px / stride 32, + class token
    assert head.decoder[0].mlp_attn.fc1.in_features == 4  # the attention MLP spans the training grid
    logits, aux = model(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 7, 64, 64) and aux is None
    feats = model.backbone(torch.rand(1, 3, 64, 64))
    assert head(feats).shape == (1, 7, 16, 16)  # at the detail map's stride: 4 (Trans2Seg's code) ...
    assert tiny_model(7, in_index=[1, 3]).decode_head(feats).shape == (1, 7, 8, 8)  # ... or 8 (the task config)
    model.eval()
    with torch.no_grad():  # other sizes: position embedding and attention logits resized to / from the grid
        assert model(torch.rand(1, 3, 96, 160)).shape == (1, 7, 96, 160)
    assert head.no_weight_decay() == {"pos_embed", "cls_token", "class_queries"}


def test_learns_on_generated_ade20k(tmp_path):
    torch.manual_seed(0)  # the crops' augmentation draws: independent of the tests run before
    root = make_ade20k(tmp_path, seed=0, num_train=8, num_val=2, size=96)
    dm = ADE20KDataModule(root=str(root), batch_size=4, num_workers=0, img_scale=[256, 64], crop_size=[64, 64],
                          test_scale=[256, 64])
    dm.setup("fit")
    batches = [(b.images, b.labels) for b, _ in zip(dm.train_dataloader(), range(2))]
    torch.manual_seed(0)
    model = tiny_model(dm.info.num_classes, in_index=[1, 3])

    def scores() -> tuple[float, float]:
        """mIoU and pixel accuracy on the training crops (BatchNorm in evaluation mode)."""
        model.eval()
        confmat = torch.zeros(150, 150, dtype=torch.int64)
        with torch.no_grad():
            for images, labels in batches:
                pred, keep = model(images).argmax(1), labels != 255
                confmat += torch.bincount(labels[keep] * 150 + pred[keep], minlength=150 * 150).view(150, 150)
        model.train()
        iou, acc = iou_from_confmat(confmat)
        return float(iou.nanmean()), float(acc)

    untrained = scores()
    optimiser = torch.optim.AdamW(model.parameters(), 2e-3)
    history = []
    for step in range(30):
        images, labels = batches[step % 2]
        loss = F.cross_entropy(model(images)[0], labels, ignore_index=255)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    assert sum(history[-4:]) / 4 < 0.6 * sum(history[:4]) / 4, history
    trained = scores()
    assert trained[0] > untrained[0] and trained[1] > untrained[1] + 0.3, (untrained, trained)


def test_model_size_matches_pvt_table_7():
    """PVT-Small + Trans2Seg at 512x512: 31.6 GFLOPs in the paper's text; the stride-4 detail map of
    Trans2Seg's ResNet code would cost 8.7 more."""
    from vitlab.runtime.flops import count_gmacs
    from vitlab.tools.zoo import build_for_count

    model = build_for_count("pvt_small", [], "ade20k_trans2seg", "classifier")
    assert count_gmacs(model, (512, 512)) == pytest.approx(31.6, rel=0.05)
    assert model.decode_head.grid == (16, 16) and len(model.decode_head.class_queries[0]) == 150


def test_task_runs_from_the_command_line(tmp_path, data_dir):
    run_script("train.py", [*TINY_PVT, "task=ade20k_trans2seg", "debug=smoke", "data.synthetic=true", "logger=csv",
                            f"hydra.run.dir={tmp_path}"], data_dir)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished" and "val/miou" in summary and summary["gflops"] > 0
    assert len(summary["extra"]["per_class_iou"]) == 150


def test_bad_in_index_is_named():
    backbone = build_backbone(backbone_config("pvt_v2_b0", TINY))
    with pytest.raises(ValueError, match=r"Trans2Seg: in_index \[1, 5\] but the backbone returns 4 maps"):
        Trans2SegHead(backbone.out_channels, backbone.strides, 5, in_index=[1, 5])
