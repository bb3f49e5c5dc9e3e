"""``backbone.pretrained=`` reads any vitlab checkpoint: a classifier's (its EMA weights too), a
detector's and a segmenter's, as a file or as its run directory."""
from __future__ import annotations

import pytest
import torch

import vitlab
from support import TINY_PVT

TINY = [o.removeprefix("backbone.") for o in TINY_PVT if o.startswith("backbone.")]
RUNS = {
    "classification": ["experiment=demo", "module.ema_decay=0.5"],
    "detection": ["task=coco_retinanet", "module.head.fpn_channels=16"],
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
    if task == "classification":  # the EMA copy differs from the trained weights after a step
        ema = vitlab.create_backbone("pvt_v2_b0", pretrained=summary["last_ckpt"], overrides=[*TINY, "pretrained_ema=true"])
        key = "stages.0.patch_embed.proj.weight"
        assert torch.equal(ema.state_dict()[key], state[f"ema.module.backbone.{key}"])
        assert not torch.equal(state[f"ema.module.backbone.{key}"], state[f"model.backbone.{key}"])
    else:  # a dense checkpoint has no EMA copy: said plainly
        with pytest.raises(Exception, match="has no EMA weights"):
            vitlab.create_backbone("pvt_v2_b0", pretrained=summary["last_ckpt"],
                                   overrides=[*TINY, "pretrained_ema=true"])
