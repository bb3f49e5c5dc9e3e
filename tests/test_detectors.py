"""The detectors of PVTv2 Table 4 and PVT Table 6 (Cascade Mask R-CNN, ATSS, GFL, Sparse R-CNN, DETR):
they learn, their parts agree with naive references, their sizes with the papers, their tasks run
end to end from the command line, and bad input is named."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import box_iou

from support import REPO, TINY_PVT
from vitlab.api import backbone_config
from vitlab.data.base import DatasetInfo
from vitlab.heads.cascade import CascadeMaskRCNNDetector
from vitlab.heads.detector_utils import hungarian_match
from vitlab.heads.detr import DETRDetector, sine_positions
from vitlab.heads.one_stage import ATSSDetector, GFLDetector, atss_assign, distribution_focal_loss, quality_focal_loss
from vitlab.heads.sparse_rcnn import SparseRCNNDetector
from vitlab.runtime.build import build_backbone
from vitlab.runtime.flops import count_gmacs, count_params
from vitlab.tools.zoo import build_for_count

TINY = [o.removeprefix("backbone.") for o in TINY_PVT[1:]]  # a one-block-per-stage PVTv2-B0
# Test-sized heads: same code paths, narrow layers, few RoIs / proposals / queries.
SMALL = {
    ATSSDetector: dict(fpn_channels=32),
    GFLDetector: dict(fpn_channels=32),
    CascadeMaskRCNNDetector: dict(fpn_channels=32, box_fc_channels=64, mask_channels=16, box_batch_size_per_image=64,
                                  rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
                                  rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
                                  anchor_sizes=[16, 32, 64, 128, 256]),
    SparseRCNNDetector: dict(fpn_channels=32, num_heads=2, ffn_channels=64, dynamic_channels=8, num_proposals=20,
                             num_stages=2),
    DETRDetector: dict(hidden_dim=32, num_heads=2, ffn_dim=64, num_encoder_layers=1, num_decoder_layers=2,
                       num_queries=10, dropout=0.0),
}
COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]])


def scenes(n: int = 2, size: int = 64, seed: int = 0):
    """Grey noisy images with two solid rectangles each, the colour giving the class (3 classes)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n):
        image = 0.5 + 0.05 * torch.randn(3, size, size, generator=g)
        boxes, labels, masks = [], [], []
        for k in range(2):
            w, h = torch.randint(14, 28, (2,), generator=g).tolist()
            x, y = (int(torch.randint(0, size - s, (1,), generator=g)) for s in (w, h))
            c = (i + k) % 3
            image[:, y:y + h, x:x + w] = COLOURS[c][:, None, None]
            mask = torch.zeros(size, size, dtype=torch.uint8)
            mask[y:y + h, x:x + w] = 1
            boxes.append([x, y, x + w, y + h])
            labels.append(c)
            masks.append(mask)
        images.append(image.clamp(0, 1))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "masks": torch.stack(masks)})
    return images, targets


def box_ap(detector, images, targets) -> float:
    detector.eval()
    metric = MeanAveragePrecision(iou_type="bbox")
    with torch.no_grad():
        detections = detector(images)
    detector.train()
    metric.update([{k: d[k] for k in ("boxes", "scores", "labels")} for d in detections],
                  [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    return float(metric.compute()["map"])


@pytest.mark.parametrize("cls", list(SMALL), ids=lambda c: c.__name__)
def test_detector_learns_and_keeps_the_contract(cls):
    torch.manual_seed(0)
    detector = cls(build_backbone(backbone_config("pvt_v2_b0", TINY)), 3, **SMALL[cls])
    images, targets = scenes()
    untrained = box_ap(detector, images, targets)
    optimiser = torch.optim.AdamW(detector.parameters(), 2e-3)
    history = []
    for _ in range(30):
        losses = detector(images, targets)
        assert set(losses) == set(detector.loss_names) and all(torch.isfinite(v) for v in losses.values()), losses
        loss = sum(losses.values())
        optimiser.zero_grad()
        loss.backward()
        if not history:  # DDP (trainer=ddp, no find_unused_parameters) needs a gradient for every parameter
            assert not [k for k, p in detector.named_parameters() if p.grad is None]
        optimiser.step()
        history.append(loss.item())
    assert sum(history[-5:]) / 5 < 0.8 * max(history[:10]), history
    assert box_ap(detector, images, targets) > untrained + 0.1
    detector.eval()
    image = torch.rand(3, 50, 70)
    with torch.no_grad():  # any size; outputs on the input image, labels 0..K-1
        (det,) = detector([image])
    assert det["boxes"].shape[1] == 4 and (det["boxes"][:, 2] <= 70).all() and (det["boxes"][:, 3] <= 50).all()
    assert ((det["labels"] >= 0) & (det["labels"] < 3)).all() and len(det["scores"]) == len(det["labels"])
    if cls is CascadeMaskRCNNDetector:
        assert det["masks"].shape[1:] == (1, 50, 70) and len(det["masks"])
        with torch.no_grad(), detector.roi_masks():  # the RoI masks, which torchvision's paste turns into those
            (roi,) = detector([image])
        assert roi["masks"].shape[1:] == (1, 28, 28) and torch.equal(roi["boxes"], det["boxes"])
        assert torch.equal(paste_masks_in_image(roi["masks"], roi["boxes"], (50, 70)), det["masks"])
        with torch.no_grad():  # pasted again once the context is left
            assert detector([image])[0]["masks"].shape[1:] == (1, 50, 70)


@pytest.mark.parametrize("cls", list(SMALL), ids=lambda c: c.__name__)
def test_bf16_autocast_trains_and_returns_float32_detections(cls):
    """Mixed precision (trainer=gpu/ddp: bf16) takes the same path on the CPU: losses, boxes and
    scores stay float32 (bf16 scores would tie in COCO's ranking, bf16 boxes move in pixel steps)."""
    torch.manual_seed(0)
    detector = cls(build_backbone(backbone_config("pvt_v2_b0", TINY)), 3, **SMALL[cls])
    images, targets = scenes()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = detector(images, targets)
    sum(losses.values()).backward()
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    detector.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (det, _) = detector(images)
    assert det["boxes"].dtype == det["scores"].dtype == torch.float32


def test_detr_detections_and_losses_from_one_pass():
    """Validation loss for DETR: one evaluation-mode pass gives the detections and the training losses."""
    torch.manual_seed(0)
    detector = DETRDetector(build_backbone(backbone_config("pvt_v2_b0", TINY)), 3, **SMALL[DETRDetector])
    images, targets = scenes()
    plain = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    train_losses = detector(images, plain)  # dropout 0: training mode computes the same network
    detector.eval()
    with torch.no_grad():
        detections, losses = detector.detect_and_losses(images, plain)
        expected = detector(images)
    assert set(losses) == set(detector.loss_names)
    assert all(torch.allclose(losses[k], train_losses[k], atol=1e-5) for k in losses)
    assert all(torch.equal(d["boxes"], e["boxes"]) and torch.equal(d["labels"], e["labels"])
               for d, e in zip(detections, expected))


def naive_atss(anchors, num_per_level, gt, topk):
    """ATSS written out box by box, level by level (the paper's Algorithm 1)."""
    ious = box_iou(anchors, gt)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assigned = torch.full((len(anchors),), -1)
    best = torch.full((len(anchors),), -1.0)
    for g in range(len(gt)):
        gc = (gt[g, :2] + gt[g, 2:]) / 2
        candidates, start = [], 0
        for n in num_per_level:
            d = ((centres[start:start + n] - gc) ** 2).sum(1).sqrt()
            candidates += [start + int(i) for i in d.argsort()[: min(topk, n)]]
            start += n
        values = ious[candidates, g]
        threshold = values.mean() + values.std()
        for a in candidates:
            x, y = centres[a]
            inside = min(x - gt[g, 0], y - gt[g, 1], gt[g, 2] - x, gt[g, 3] - y) > 0.01
            if ious[a, g] >= threshold and inside and ious[a, g] > best[a]:
                assigned[a], best[a] = g, ious[a, g]
    return assigned


def test_atss_assignment_matches_the_algorithm():
    g = torch.Generator().manual_seed(1)
    levels = []
    for stride, size in ((8, 64), (16, 128), (32, 256)):
        ys, xs = torch.meshgrid(torch.arange(0, 96, stride), torch.arange(0, 128, stride), indexing="ij")
        c = torch.stack([xs.flatten(), ys.flatten()], 1).float()
        levels.append(torch.cat([c - size / 2, c + size / 2], 1))
    anchors = torch.cat(levels)
    xy = torch.rand(6, 2, generator=g) * torch.tensor([100.0, 70.0])
    gt = torch.cat([xy, xy + 8 + torch.rand(6, 2, generator=g) * 40], 1)
    ours = atss_assign(anchors, [len(level) for level in levels], gt, topk=9)
    assert torch.equal(ours, naive_atss(anchors, [len(level) for level in levels], gt, 9))
    assert (ours >= 0).sum() >= len(gt)  # every box got positives
    assert torch.equal(atss_assign(anchors, [len(level) for level in levels], gt[:0], 9), torch.full((len(anchors),), -1))


def test_gfl_losses_reduce_to_cross_entropies():
    logits, target = torch.randn(5, 4), (torch.rand(5, 4) > 0.7).float() * torch.rand(5, 4)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    assert torch.allclose(quality_focal_loss(logits, target, beta=0.0), bce)  # beta 0: plain BCE
    assert quality_focal_loss(logits, target) < bce  # beta 2 down-weights what is already right
    bins = torch.randn(3, 17)
    whole = torch.tensor([2.0, 0.0, 15.0])  # integer distances: cross-entropy of that bin
    assert torch.allclose(distribution_focal_loss(bins, whole), F.cross_entropy(bins, whole.long(), reduction="none"))
    half = torch.tensor([2.5, 7.5, 15.5])
    both = (F.cross_entropy(bins, half.long(), reduction="none") + F.cross_entropy(bins, half.long() + 1, reduction="none")) / 2
    assert torch.allclose(distribution_focal_loss(bins, half), both)


def test_hungarian_match_is_the_cheapest_assignment():
    cost = torch.rand(5, 3, generator=torch.Generator().manual_seed(2))
    rows, cols = hungarian_match(cost)
    brute = min(sum(float(cost[r, c]) for r, c in zip(perm, range(3))) for perm in itertools.permutations(range(5), 3))
    assert float(cost[rows, cols].sum()) == pytest.approx(brute)
    assert len(set(rows.tolist())) == 3 and sorted(cols.tolist()) == [0, 1, 2]


def test_sine_positions_match_detr_formula():
    mask = torch.zeros(1, 3, 5, dtype=torch.bool)
    mask[:, :, 4:] = True  # padded column
    pos = sine_positions(mask, num_feats=4)
    for y, x, k in itertools.product(range(3), range(4), range(4)):
        dim = 10000 ** (2 * (k // 2) / 4)
        ey, ex = (y + 1) / 3 * 2 * math.pi, (x + 1) / 4 * 2 * math.pi  # normalised over the valid area
        fy, fx = (math.sin, math.cos)[k % 2](ey / dim), (math.sin, math.cos)[k % 2](ex / dim)
        assert pos[0, k, y, x] == pytest.approx(fy, abs=1e-4) and pos[0, 4 + k, y, x] == pytest.approx(fx, abs=1e-4)


def test_cascade_stages_follow_the_recipe():
    model = CascadeMaskRCNNDetector(build_backbone(backbone_config("pvt_v2_b0", TINY)), 80)
    stages = model.model.roi_heads.stages
    assert [s.proposal_matcher.high_threshold for s in stages] == [0.5, 0.6, 0.7]
    assert [s.proposal_matcher.low_threshold for s in stages] == [0.5, 0.6, 0.7]
    assert [round(s.box_coder.weights[0], 1) for s in stages] == [10.0, 20.0, 30.3]
    assert model.model.roi_heads.stage_loss_weights == [1.0, 0.5, 0.25]
    head = stages[0].box_head  # 4 x (conv, BN, ReLU), flatten, FC 1024
    assert sum(isinstance(m, nn.Conv2d) for m in head.modules()) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in head.modules()) == 4
    assert [m.out_features for m in head.modules() if isinstance(m, nn.Linear)] == [1024]
    assert stages[0].box_predictor.bbox_pred.out_features == 81 * 4  # class-specific deltas
    assert model.model.rpn._post_nms_top_n == {"training": 2000, "testing": 1000}
    # sampling keeps track of the ground truths it adds, so refinement can drop them
    proposals = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [5.0, 5.0, 30.0, 40.0]])]
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([3])}
    sampled, matched, labels, is_gt = model.model.roi_heads.sample(stages[1], proposals, [target])
    assert torch.equal(sampled[0][is_gt[0]], target["boxes"]) and labels[0][is_gt[0]].tolist() == [3]
    assert labels[0][(sampled[0] == proposals[0][1]).all(1)].tolist() == [3]  # IoU 0.96 >= 0.6
    assert labels[0][(sampled[0] == proposals[0][0]).all(1)].tolist() == [0]


def test_set_predictors_start_from_the_papers_settings():
    sparse = SparseRCNNDetector(build_backbone(backbone_config("pvt_v2_b0", TINY)), 80).model
    assert len(sparse.stages) == 6 and sparse.proposal_boxes.num_embeddings == 100
    boxes = sparse.proposal_boxes.weight  # cx, cy, w, h: the whole image
    assert torch.equal(boxes, torch.tensor([[0.5, 0.5, 1.0, 1.0]]).expand(100, 4))
    prior = -math.log(99)
    assert torch.allclose(sparse.stages[0].fc_cls.bias, torch.full((80,), prior))
    detr = DETRDetector(build_backbone(backbone_config("pvt_v2_b0", TINY)), 80).model
    assert len(detr.encoder) == len(detr.decoder) == 6 and detr.query_embed.num_embeddings == 100
    assert detr.class_embed.out_features == 81 and float(detr.class_weights[-1]) == pytest.approx(0.1)
    assert detr.input_proj.in_channels == 64  # the stride-32 map of the tiny PVTv2 (embed_dims [..., 64])


TABLE_TASKS = ("coco_cascade_maskrcnn", "coco_atss", "coco_gfl", "coco_sparse_rcnn", "coco_detr")
ROWS = [r for r in yaml.safe_load((REPO / "src" / "vitlab" / "tools" / "paper_tables" / "dense.yaml").read_text())
        if r["task"] in TABLE_TASKS and r.get("paper_gflops")]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['name']}-{r['task']}")
def test_model_size_matches_the_paper(row):
    """PVTv2 Table 4 (and DETR's published size): params and GFLOPs (``flops_forward`` on the meta device)."""
    model = build_for_count(row["name"], row["set"], row["task"], "classifier")
    params, gflops = count_params(model) / 1e6, count_gmacs(model, tuple(row["input"]))
    assert abs(params - row["paper_params_m"]) <= row.get("params_tol", 0.03) * row["paper_params_m"], params
    assert abs(gflops - row["paper_gflops"]) <= row.get("gflops_tol", 0.10) * row["paper_gflops"], gflops


@pytest.mark.parametrize("task", TABLE_TASKS)
def test_every_backbone_family_composes_with_the_task(task):
    for name in ("pvt_tiny", "pvt_v2_b0", "pale_t", "scalablevit_s", "gpvit_l1_adapter", "resnet50", "swin_tiny"):
        model = build_for_count(name, [], task, "classifier")
        assert count_gmacs(model, (256, 320)) > 0, name


TASK_HEADS = {"coco_cascade_maskrcnn": CascadeMaskRCNNDetector, "coco_atss": ATSSDetector, "coco_gfl": GFLDetector,
              "coco_sparse_rcnn": SparseRCNNDetector, "coco_detr": DETRDetector}


def head_overrides(cls) -> list[str]:
    """The test-sized head (``SMALL``) as command-line overrides."""
    return [f"module.head.{k}={json.dumps(v, separators=(',', ':'))}" for k, v in SMALL[cls].items()]


@pytest.mark.parametrize("task", TABLE_TASKS)
def test_task_runs_from_the_command_line(task, tmp_path, train_run):
    """The task's config end to end on generated COCO data (src/train.py in this process), with the
    test-sized head: at the papers' sizes Sparse R-CNN's and DETR's checkpoints are about 1 GB each
    (the paper-size models are built and counted above)."""
    summary = train_run(tmp_path, *TINY_PVT, f"task={task}", "debug=smoke", "data.synthetic=true", "logger=csv",
                        *head_overrides(TASK_HEADS[task]))
    assert summary["status"] == "finished" and summary["task"] == task and summary["gflops"] > 0
    assert "val/map" in summary and ("val/mask_map" in summary) == (task == "coco_cascade_maskrcnn")
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_bad_input_is_named():
    backbone = build_backbone(backbone_config("pvt_v2_b0", TINY))
    with pytest.raises(ValueError, match=r"module.head.box_norm='group': expected one of \['batch', 'none'\]"):
        CascadeMaskRCNNDetector(backbone, 5, box_norm="group")
    with pytest.raises(ValueError, match=r"module.head.box_loss='l2'"):
        CascadeMaskRCNNDetector(backbone, 5, box_loss="l2")
    with pytest.raises(ValueError, match=r"strides \[4, 8, 16, 32\], but this head needs \[64\]"):
        DETRDetector(backbone, 5, in_stride=64)
    from vitlab.tasks.detection import DetectionTask

    info = DatasetInfo(class_names=("a", "b"), input_size=(64, 64), with_masks=False)
    schedule = {"optimizer": {"lr": 1e-4}, "lr_policy": {"name": "multistep", "milestones": [1]}}
    with pytest.raises(ValueError, match=r"data.with_masks=False does not match module.head \(CascadeMaskRCNNDetector\)"):
        DetectionTask(backbone_config("pvt_v2_b0", TINY), schedule, info,
                      head={"_target_": "vitlab.heads.cascade.CascadeMaskRCNNDetector", "fpn_channels": 32})
