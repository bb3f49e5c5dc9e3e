"""Detectors around our backbones: torchvision's ``RetinaNet`` and ``MaskRCNN``.

    backbone -> OrderedDict of the chosen strides -> torchvision FPN (+ extra levels) -> torchvision head

Both detectors take a list of float images in [0, 1] (any sizes) and, in training,
targets with ``boxes`` (XYXY), ``labels`` in ``0..num_classes-1`` (and ``masks``).
Evaluation returns torchvision's detections (``boxes``, ``scores``, ``labels`` in the
same ``0..num_classes-1`` range, Mask R-CNN also ``masks`` N x 1 x H x W probabilities),
in the coordinates of the image that was passed in; inside ``roi_masks()`` the masks stay
Mask R-CNN's N x 1 x 28 x 28 RoI masks over their boxes (the COCO evaluation pastes them itself).

Decisions:

* Resizing is the DataModule's job (tv_tensors keep boxes and masks in step);
  torchvision's internal transform is replaced by ``PreResizedTransform``, which
  only normalises (ImageNet mean/std, the backbones' pre-training statistics)
  and pads the batch to a multiple of ``size_divisible`` (32) with zeros after
  normalisation, as mmdetection does.
* Mask R-CNN reserves class 0 for the background; the wrapper shifts labels by
  one on the way in and out so both detectors speak ``0..K-1``.
* RetinaNet's P6 is computed from C5 (mmdetection's ``add_extra_convs='on_input'``,
  used by the PVT/ScalableViT/GPViT configs); torchvision picks P5 whenever C5 has
  256 channels (e.g. PVTv2-B0), so the choice is set explicitly (``p6_from``).
  P7 is a conv of P6 itself, as mmdet's FPN (``relu_before_extra_convs=False``); torchvision's
  block puts a ReLU between them (as the RetinaNet paper).
* Anchors as mmdet's: base anchors not rounded (RetinaNet's octave scales 32, 40.3, 50.8 ... at
  stride 8; torchvision rounds every corner), placed at the levels' fixed strides (torchvision
  infers P6 / P7's from rounded-up grid sizes), and training ignores the anchors in the batch padding
  beyond each image's own padded shape (mmdet ``valid_flags``: RetinaNet and RPN). Low-quality
  matches (RetinaNet, RPN) follow mmdet's ``MaxIoUAssigner`` (``MaxIoUMatcher``).
* Initialisation as the papers (PVT Section 5.2): Xavier-uniform for FPN convs (torchvision uses
  Kaiming); torchvision's RetinaNet and RPN heads already use normal(std 0.01)
  (+ the focal-loss prior bias); the box predictor gets mmdet's normal 0.01 / 0.001.
* Focal loss (alpha 0.25, gamma 2) and 9 anchors per location (3 scales x 3 ratios)
  are torchvision's RetinaNet defaults; they match the recipe.
* Mixed precision: the box-regression and classification outputs of every head are cast to
  float32 (forward hooks) and anchors are made in float32 whatever the feature dtype
  (``FloatAnchorGenerator``), so anchor/proposal decoding, IoU matching, the RoIAlign boxes and
  the losses run in float32 under bf16/fp16 autocast and the returned boxes are float32 (as
  mmdetection keeps them); the convolutions themselves stay in the autocast dtype.
* mmdetection options the official configs use (defaults: torchvision's behaviour):
  ``roi_aligned`` / ``roi_sampling_ratio`` (mmcv's RoIAlign: aligned, adaptive sampling 0),
  ``rpn_box_loss`` / ``box_loss`` (``l1``: mmdet's L1Loss; torchvision: smooth L1, beta 1/9),
  ``box_head`` (``4conv1fc``: Shared4Conv1FCBBoxHead), ``fpn_norm`` / ``box_head_norm``
  (BN | SyncBN | GN | none), ``rpn_min_pos_iou`` (mmdet: a ground truth's best anchors are RPN
  positives from IoU 0.3; torchvision: at any IoU), ``rpn_allowed_border`` (mmdet's cascade: 0,
  anchors crossing the image border out of RPN training; -1: all in), ``mask_target`` (``mmdet``:
  an aligned crop-and-resize of the ground-truth mask binarised at 0.5; torchvision: the soft
  values of an unaligned RoIAlign).
* FLOPs are counted through ``flops_forward`` (``vitlab.runtime.flops``): the network as mmdetection's
  ``get_flops`` runs it, without data-dependent steps, so it runs on the meta device
  (``MaskRCNNDetector.flops_forward`` says what is counted).
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, box_iou, roi_align
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from vitlab.data.base import IMAGENET_MEAN, IMAGENET_STD
from vitlab.heads.norm import norm_layer

BOX_LOSSES = ("smooth_l1", "l1")
BOX_HEADS = ("2fc", "4conv1fc")
MASK_TARGETS = ("torchvision", "mmdet")



def select_levels(backbone: nn.Module, strides: list[int]) -> list[int]:
    """Indices of ``strides`` among the backbone's outputs; a clear error if one is missing."""
    have = list(backbone.strides)
    missing = [s for s in strides if s not in have]
    if missing:
        raise ValueError(
            f"{type(backbone).__name__} returns feature maps at strides {have}, but this head needs {list(strides)}. "
            f"Backbones with a single stride-8 output (GPViT) need backbone.out_strides=[4,8,16,32] "
            f"(multi-scale adapter)."
        )
    return [have.index(s) for s in strides]


class BackboneWithFPN(nn.Module):
    """Our backbone's chosen levels as an OrderedDict ('0', '1', ...) through torchvision's FPN.

    torchvision's own ``BackboneWithFPN`` needs a backbone with named children to tap
    (IntermediateLayerGetter); ours return their levels directly.
    """

    def __init__(self, backbone: nn.Module, in_strides: list[int], out_channels: int, extra_blocks=None,
                 norm: str = "none"):
        super().__init__()
        self.body = backbone
        self.levels = select_levels(backbone, in_strides)
        in_channels = [backbone.out_channels[i] for i in self.levels]
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_blocks,
                                         norm_layer=norm_layer(norm, "module.head.fpn_norm"))
        self.out_channels = out_channels  # read by torchvision's detectors
        self._reuse, self._features = False, None
        for m in self.fpn.modules():  # the papers: Xavier for the FPN (torchvision initialises Kaiming)
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:  # no bias before a norm layer
                    nn.init.zeros_(m.bias)

    @contextmanager
    def features_reused(self):
        """Inside: calls after the first return the first call's features (same images, computed once)."""
        self._reuse, self._features = True, None
        try:
            yield
        finally:
            self._reuse, self._features = False, None

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if self._features is not None:
            return self._features
        feats = self.body(images)
        out = self.fpn(OrderedDict((str(k), feats[i]) for k, i in enumerate(self.levels)))
        if self._reuse:
            self._features = out
        return out


def to_float(x):
    """Tensors (in tensors, lists, tuples, dicts) as float32."""
    if isinstance(x, torch.Tensor):
        return x.float()
    if isinstance(x, dict):
        return type(x)((k, to_float(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return type(x)(to_float(v) for v in x)
    return x


def float_outputs(module: nn.Module) -> nn.Module:
    """Cast ``module``'s outputs to float32 (a forward hook: parameters and state-dict keys unchanged).

    Under autocast a head's convolutions / linears return bf16 or fp16; torchvision then decodes boxes
    in that dtype (a coordinate past 512 px moves in 4 px steps in bf16). Everything computed from
    float32 outputs (decoding, matching, losses: element-wise ops autocast leaves alone) is float32."""
    module.register_forward_hook(lambda _module, _args, output: to_float(output))
    return module


def valid_flags(grid_sizes, strides, anchors_per_location: list[int], image_sizes, size_divisible: int,
                device) -> torch.Tensor:
    """N x A: whether each anchor lies inside its image's own padded shape (mmdet's ``valid_flags``).

    mmdet pads each image to a multiple of ``size_divisible`` (its ``pad_shape``); at a level of stride s
    the locations beyond ceil(pad / s) lie in the batch's extra padding and take no part in training.
    Anchors are ordered location-major (torchvision's and mmdet's order)."""
    d = max(int(size_divisible), 1)
    sizes = torch.as_tensor([list(s) for s in image_sizes], device=device)
    padded = (sizes + d - 1) // d * d  # N x 2 (h, w)
    flags = []
    for (gh, gw), (sh, sw), k in zip(grid_sizes, strides, anchors_per_location):
        vh = ((padded[:, 0] + int(sh) - 1) // int(sh)).clamp(max=int(gh))
        vw = ((padded[:, 1] + int(sw) - 1) // int(sw)).clamp(max=int(gw))
        ys, xs = torch.arange(int(gh), device=device), torch.arange(int(gw), device=device)
        ok = (ys[None, :, None] < vh[:, None, None]) & (xs[None, None, :] < vw[:, None, None])  # N x H x W
        flags.append(ok.flatten(1).repeat_interleave(k, dim=1))
    return torch.cat(flags, 1)


class FloatAnchorGenerator(AnchorGenerator):
    """torchvision's anchors, always in float32 (its generator takes the dtype of the feature maps: bf16
    under autocast, and it then keeps its cell anchors in that dtype for good), with mmdet's base anchors
    (torchvision rounds their corners to integers: 40.3 x 40.3 becomes 40 x 40, mmdet keeps them).

    ``strides``: the levels' strides (mmdet's, fixed); torchvision infers them as padded size // grid
    size, which puts the anchors of P6 / P7 off their grid when a level's size was rounded up (13 P6
    cells on an 800-pixel side: stride 61, not 64). Each call also keeps, for the training targets,
    ``valid`` (N x A, ``valid_flags`` for padding to ``size_divisible``) and ``image_sizes``."""

    size_divisible = 32
    strides: list[int] | None = None

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device).sqrt()
        ws, hs = ((1 / h_ratios)[:, None] * scales).flatten(), (h_ratios[:, None] * scales).flatten()
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # ratio-major, as torchvision and mmdet; not rounded

    def forward(self, image_list, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        # only the maps' shapes, dtype and device are read: zero-stride float32 stand-ins cost no memory
        grids = [f.shape[-2:] for f in feature_maps]
        if self.strides is None:
            stand_ins = [torch.zeros((), device=f.device).expand(f.shape) for f in feature_maps]
            anchors = super().forward(image_list, stand_ins)
            size = image_list.tensors.shape[-2:]
            strides = [(size[0] // g[0], size[1] // g[1]) for g in grids]  # as torchvision places the anchors
        else:
            device = feature_maps[0].device
            strides = [(s, s) for s in self.strides]
            self.set_cell_anchors(torch.float32, device)
            per_level = self.grid_anchors([list(g) for g in grids],
                                          [[torch.tensor(s, device=device)] * 2 for s in self.strides])
            anchors = [torch.cat(per_level)] * len(image_list.image_sizes)
        self.image_sizes = list(image_list.image_sizes)
        self.valid = valid_flags(grids, strides, self.num_anchors_per_location(), self.image_sizes,
                                 self.size_divisible, anchors[0].device)
        return anchors


class MaxIoUMatcher(Matcher):
    """torchvision's ``Matcher`` with mmdet's ``MaxIoUAssigner`` rule for low-quality matches: a ground
    truth's best anchors (ties included) become its positives only if that IoU is at least
    ``min_pos_iou`` (torchvision: at any IoU), and an anchor that is the best of several ground truths
    goes to the last of them (mmdet's loop; torchvision: to the one it overlaps most)."""

    def __init__(self, high: float, low: float, min_pos_iou: float = 0.0):
        super().__init__(high, low, allow_low_quality_matches=True)
        self.min_pos_iou = min_pos_iou

    def set_low_quality_matches_(self, matches, all_matches, match_quality_matrix) -> None:
        best = match_quality_matrix.amax(1, keepdim=True)  # G x 1
        is_best = (match_quality_matrix == best) & (best >= self.min_pos_iou)  # G x A
        gt = torch.arange(len(best), device=matches.device)[:, None].expand_as(is_best)
        last = torch.where(is_best, gt, -1).amax(0)
        matches[last >= 0] = last[last >= 0]


def inside_flags(anchors: torch.Tensor, valid: torch.Tensor, image_size, allowed_border: int) -> torch.Tensor:
    """mmdet's ``anchor_inside_flags``: valid anchors, and with ``allowed_border`` >= 0 only those within
    that many pixels of the (unpadded) image; -1: every valid anchor."""
    if allowed_border < 0:
        return valid
    h, w = image_size
    return (valid & (anchors[:, 0] >= -allowed_border) & (anchors[:, 1] >= -allowed_border)
            & (anchors[:, 2] < w + allowed_border) & (anchors[:, 3] < h + allowed_border))


class LastLevelP6P7NoReLU(LastLevelP6P7):
    """P6 and P7 by stride-2 convs, P7 from P6 itself: mmdet's FPN (``relu_before_extra_convs=False``, the
    RetinaNet / ATSS / GFL configs); torchvision's block puts a ReLU between them (the RetinaNet paper)."""

    def forward(self, p, c, names):
        x = p[-1] if self.use_P5 else c[-1]
        p6 = self.p6(x)
        p.extend([p6, self.p7(p6)])
        names.extend(["p6", "p7"])
        return p, names


class LevelRoIAlign(MultiScaleRoIAlign):
    """torchvision's multi-level RoIAlign with ``aligned`` exposed (its pooler hard-codes False;
    mmcv's RoIAlign, used by every mmdetection config, defaults to True: the half-pixel shift).

    torchvision's level rule (k0 4, canonical 224) equals mmdet's SingleRoIExtractor's
    (finest scale 56), so only the per-level call changes."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int, aligned: bool):
        super().__init__(featmap_names, output_size, sampling_ratio)
        self.aligned = aligned

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes) -> torch.Tensor:
        if not self.aligned:
            return super().forward(x, boxes, image_shapes)
        feats = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):  # one RoIAlign call per pyramid level
            idx = torch.where(levels == level)[0]
            out[idx] = roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio,
                                 aligned=True).to(out.dtype)
        return out


def box_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed box-regression loss: torchvision's smooth L1 (beta 1/9) or mmdetection's L1."""
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="sum")
    return F.smooth_l1_loss(pred, target, beta=1 / 9, reduction="sum")


class RPN(RegionProposalNetwork):
    """torchvision's RPN with a choice of box loss (``box_loss_kind``; the same sampling and
    normalisation, by the sampled anchors, as torchvision's ``compute_loss``) and mmdet's anchor
    targets: anchors in the batch padding beyond an image's own padded shape are ignored (mmdet
    ``valid_flags``), and with ``allowed_border`` >= 0 those crossing the image border by more
    (mmdet ``allowed_border``: 0 in the cascade configs, -1 in Mask R-CNN's)."""

    box_loss_kind = "smooth_l1"
    allowed_border = -1

    def assign_targets_to_anchors(self, anchors, targets):
        generator = self.anchor_generator
        labels, matched_gt_boxes = [], []
        for anchors_per_image, target, valid, size in zip(anchors, targets, generator.valid, generator.image_sizes):
            inside = inside_flags(anchors_per_image, valid, size, self.allowed_border)
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:  # every anchor a negative
                matched = torch.full((len(anchors_per_image),), Matcher.BELOW_LOW_THRESHOLD, device=inside.device)
                gt_boxes = anchors_per_image.new_zeros((1, 4))
            else:  # outside anchors neither match nor win a ground truth's low-quality match
                quality = box_iou(gt_boxes, anchors_per_image).masked_fill(~inside, -1.0)
                matched = self.proposal_matcher(quality)
            label = (matched >= 0).float()
            label[matched == Matcher.BETWEEN_THRESHOLDS] = -1.0
            label[~inside] = -1.0
            labels.append(label)
            matched_gt_boxes.append(gt_boxes[matched.clamp(min=0)])
        return labels, matched_gt_boxes

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        pos, neg = torch.where(torch.cat(pos))[0], torch.where(torch.cat(neg))[0]
        sampled = torch.cat([pos, neg])
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        loss_box = box_loss(pred_bbox_deltas[pos], regression_targets[pos], self.box_loss_kind) / sampled.numel()
        loss_objectness = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return loss_objectness, loss_box


def fastrcnn_l1_loss(class_logits, box_regression, labels, regression_targets):
    """torchvision's ``fastrcnn_loss`` with mmdet's L1 box loss (same normalisation: all sampled RoIs)."""
    labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
    loss_classifier = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    per_class = box_regression.reshape(len(labels), -1, 4)
    loss_box = box_loss(per_class[pos, labels[pos]], regression_targets[pos], "l1") / labels.numel()
    return loss_classifier, loss_box


def binary_mask_targets(gt_masks: torch.Tensor, boxes: torch.Tensor, matched_idxs: torch.Tensor,
                        size: int) -> torch.Tensor:
    """mmdet's mask targets (``BitmapMasks.crop_and_resize``): each RoI's ground-truth mask cropped and
    resized by an aligned RoIAlign (adaptive sampling), binarised at 0.5. torchvision's
    ``project_masks_on_boxes`` (whose place this takes) keeps the soft values of an unaligned RoIAlign."""
    rois = torch.cat([matched_idxs[:, None].to(boxes), boxes], dim=1)
    soft = roi_align(gt_masks[:, None].to(rois), rois, (size, size), 1.0, sampling_ratio=0, aligned=True)[:, 0]
    return (soft >= 0.5).to(soft.dtype)


@contextmanager
def mask_targets_of(kind: str):
    """Inside: torchvision's ``maskrcnn_loss`` makes ``kind`` mask targets (torchvision | mmdet)."""
    if kind == "torchvision":
        yield
    else:
        with _swapped(tv_roi_heads, "project_masks_on_boxes", binary_mask_targets):
            yield


class BoxLossRoIHeads(RoIHeads):
    """torchvision's RoIHeads; for the duration of the call ``box_loss_kind="l1"`` swaps the module-level
    ``fastrcnn_loss`` that its ``forward`` calls (smooth L1, beta 1/9, hard-coded) for mmdet's L1, and
    ``mask_target="mmdet"`` its mask targets for mmdet's (``binary_mask_targets``)."""

    box_loss_kind = "smooth_l1"
    mask_target = "torchvision"

    def forward(self, *args, **kwargs):
        with mask_targets_of(self.mask_target):
            if self.box_loss_kind == "smooth_l1":
                return super().forward(*args, **kwargs)
            with _swapped(tv_roi_heads, "fastrcnn_loss", fastrcnn_l1_loss):
                return super().forward(*args, **kwargs)


@contextmanager
def _swapped(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _check_choice(value: str, allowed: tuple[str, ...], key: str) -> str:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    return value


class PreResizedTransform(GeneralizedRCNNTransform):
    """Normalise and pad only: the DataModule has already resized images, boxes and masks.
    ``paste_masks = False`` (``_Detector.roi_masks``) leaves Mask R-CNN's RoI masks unpasted."""

    paste_masks = True

    def resize(self, image, target=None):
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.paste_masks or self.training:
            return super().postprocess(result, image_shapes, original_image_sizes)
        masks = [pred.pop("masks", None) for pred in result]
        result = super().postprocess(result, image_shapes, original_image_sizes)
        for pred, m in zip(result, masks):
            if m is not None:
                pred["masks"] = m
        return result


class _Detector(nn.Module):
    """Shared wrapper: label offset in and out, plain tensors for torchvision."""

    label_offset = 0
    loss_names: tuple[str, ...] = ()  # the keys of torchvision's loss dict
    with_masks = False  # whether detections carry instance masks (the task evaluates mask AP then)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        if targets is not None:
            targets = [
                {
                    k: (v.as_subclass(torch.Tensor) + self.label_offset if k == "labels" else v.as_subclass(torch.Tensor))
                    for k, v in t.items()
                    if k in ("boxes", "labels", "masks")
                }
                for t in targets
            ]
        out = self.model(list(images), targets if self.training else None)
        if self.training:
            return out  # dict of losses
        for det in out:
            det["labels"] = det["labels"] - self.label_offset
        return out

    @contextmanager
    def roi_masks(self):
        """Detections carry Mask R-CNN's RoI masks (N x 1 x M x M probabilities, each over its box)
        instead of masks pasted on the whole image: the caller pastes them at the size it needs (the
        COCO evaluation straight at the original image size, box by box)."""
        transforms = [m for m in self.modules() if isinstance(m, PreResizedTransform)]
        for t in transforms:
            t.paste_masks = False
        try:
            yield self
        finally:
            for t in transforms:
                t.paste_masks = True

    def detect_and_losses(self, images: list[torch.Tensor], targets: list[dict]) -> tuple[list[dict], dict]:
        """Detections (evaluation mode) and the training losses of the same images, for validation.

        torchvision computes losses in training mode only. The second, training-mode pass reuses the
        first pass's backbone + FPN features (run once, in evaluation mode: no drop-path), and only the
        detector's heads, anchor / proposal sampling and loss terms run again: the exact training loss
        of an evaluation-mode backbone. The sampling draws from a fixed seed in a forked RNG, so the
        loss is repeatable and training's random stream is untouched. ``targets``: boxes (and masks)
        in the coordinates of ``images``, crowd regions removed.
        """
        was_training = self.training
        devices = [images[0].device.index] if images[0].is_cuda else []
        with self.model.backbone.features_reused():
            detections = self(images)
            self.train()  # the backbone + FPN do not run again: their features are reused
            try:
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(0)
                    losses = self(images, targets)
            finally:
                self.train(was_training)
        return detections, losses


def init_box_predictor(predictor: nn.Module) -> None:
    """mmdet's init of a torchvision ``FastRCNNPredictor``: classifier normal(0.01), regressor normal(0.001)."""
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)


class _RetinaNet(RetinaNet):
    """torchvision's RetinaNet whose training ignores the anchors in the batch padding beyond each image's
    own padded shape (mmdet ``valid_flags``; its RetinaNet config has ``allowed_border=-1``)."""

    def compute_loss(self, targets, head_outputs, anchors):
        matched_idxs = []
        for anchors_per_image, target, valid in zip(anchors, targets, self.anchor_generator.valid):
            if target["boxes"].numel() == 0:
                matched = torch.full((len(anchors_per_image),), -1, dtype=torch.int64, device=valid.device)
            else:  # invalid anchors neither match nor win a ground truth's low-quality match
                matched = self.proposal_matcher(box_iou(target["boxes"], anchors_per_image).masked_fill(~valid, -1.0))
            matched_idxs.append(matched.masked_fill(~valid, Matcher.BETWEEN_THRESHOLDS))  # out of both losses
        return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)


def _transform(size_divisible: int, image_mean, image_std) -> PreResizedTransform:
    return PreResizedTransform(1, 1, list(image_mean), list(image_std), size_divisible=size_divisible)


class RetinaNetDetector(_Detector):
    """RetinaNet (Lin et al.): FPN over strides 8-32 + P6/P7, 4-conv class and box subnets."""

    loss_names = ("classification", "bbox_regression")

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        in_strides: list[int] = (8, 16, 32),
        fpn_channels: int = 256,
        p6_from: str = "input",
        anchor_sizes: list[int] = (32, 64, 128, 256, 512),
        scales_per_octave: int = 3,
        aspect_ratios: list[float] = (0.5, 1.0, 2.0),
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.4,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
        size_divisible: int = 32,
        fpn_norm: str = "none",
        image_mean: list[float] = IMAGENET_MEAN,
        image_std: list[float] = IMAGENET_STD,
    ):
        super().__init__()
        if p6_from not in ("input", "output"):
            raise ValueError(f"module.head.p6_from={p6_from!r}: 'input' (C5, mmdet on_input) or 'output' "
                             f"(P5, mmdet on_output)")
        c5 = backbone.out_channels[select_levels(backbone, in_strides)[-1]]
        extra = LastLevelP6P7NoReLU(c5 if p6_from == "input" else fpn_channels, fpn_channels)
        extra.use_P5 = p6_from == "output"  # torchvision infers it from channel counts; we say it
        body = BackboneWithFPN(backbone, in_strides, fpn_channels, extra, norm=fpn_norm)
        # mmdet's octave scales, not truncated: 32, 40.3, 50.8 at stride 8
        sizes = tuple(tuple(s * 2 ** (k / scales_per_octave) for k in range(scales_per_octave)) for s in anchor_sizes)
        anchors = FloatAnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))
        anchors.size_divisible, anchors.strides = size_divisible, [*in_strides, in_strides[-1] * 2, in_strides[-1] * 4]
        self.model = _RetinaNet(
            body, num_classes, anchor_generator=anchors, fg_iou_thresh=fg_iou_thresh, bg_iou_thresh=bg_iou_thresh,
            score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
            topk_candidates=topk_candidates,
        )
        self.model.proposal_matcher = MaxIoUMatcher(fg_iou_thresh, bg_iou_thresh, min_pos_iou=0.0)  # mmdet's config
        self.model.transform = _transform(size_divisible, image_mean, image_std)
        float_outputs(self.model.head)  # class logits and box regression in float32 (mixed precision)

    def flops_forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backbone, FPN and the class and box subnets on every level (mmdet's ``forward_dummy``)."""
        return self.model.head(list(self.model.backbone(images).values()))


class MaskRCNNDetector(_Detector):
    """Mask R-CNN (He et al.): FPN over strides 4-32 + max-pooled P6, RPN, RoIAlign, 2-FC box head
    (or mmdet's Shared4Conv1FC: ``box_head="4conv1fc"``), 4-conv mask head."""

    label_offset = 1  # torchvision's class 0 is the background
    loss_names = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
    with_masks = True
    # mmdet's dummy forward for FLOPs: the box head on 1000 proposals, the mask head on the first 100
    flops_proposals = 1000
    flops_mask_rois = 100

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        in_strides: list[int] = (4, 8, 16, 32),
        fpn_channels: int = 256,
        anchor_sizes: list[int] = (32, 64, 128, 256, 512),
        aspect_ratios: list[float] = (0.5, 1.0, 2.0),
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 1000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_batch_size_per_image: int = 256,
        box_batch_size_per_image: int = 512,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        size_divisible: int = 32,
        fpn_norm: str = "none",
        box_head: str = "2fc",
        box_head_norm: str = "none",
        roi_aligned: bool = False,
        roi_sampling_ratio: int = 2,
        rpn_box_loss: str = "smooth_l1",
        box_loss: str = "smooth_l1",
        rpn_min_pos_iou: float = 0.0,
        rpn_allowed_border: int = -1,
        mask_target: str = "torchvision",
        image_mean: list[float] = IMAGENET_MEAN,
        image_std: list[float] = IMAGENET_STD,
    ):
        super().__init__()
        _check_choice(box_head, BOX_HEADS, "module.head.box_head")
        _check_choice(mask_target, MASK_TARGETS, "module.head.mask_target")
        body = BackboneWithFPN(backbone, in_strides, fpn_channels, LastLevelMaxPool(), norm=fpn_norm)
        anchors = FloatAnchorGenerator(tuple((s,) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes))
        anchors.size_divisible, anchors.strides = size_divisible, [*in_strides, in_strides[-1] * 2]  # P6: max-pool
        levels = [str(k) for k in range(len(in_strides))]
        heads = {}
        if box_head == "4conv1fc":  # mmdet's Shared4Conv1FCBBoxHead: 4 x (3x3 conv 256 + norm + ReLU), FC 1024
            heads["box_head"] = FastRCNNConvFCHead((fpn_channels, 7, 7), [256] * 4, [1024],
                                                   norm_layer=norm_layer(box_head_norm, "module.head.box_head_norm"))
        elif box_head_norm != "none":
            raise ValueError(f"module.head.box_head_norm={box_head_norm!r} needs box_head=4conv1fc (the 2-FC head "
                             f"has no norm layers)")
        self.model = MaskRCNN(
            body, num_classes + 1, rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train, rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            rpn_nms_thresh=rpn_nms_thresh, rpn_batch_size_per_image=rpn_batch_size_per_image,
            box_batch_size_per_image=box_batch_size_per_image, box_score_thresh=box_score_thresh,
            box_nms_thresh=box_nms_thresh, box_detections_per_img=box_detections_per_img,
            box_roi_pool=LevelRoIAlign(levels, 7, roi_sampling_ratio, roi_aligned),
            mask_roi_pool=LevelRoIAlign(levels, 14, roi_sampling_ratio, roi_aligned), **heads,
        )
        self.model.transform = _transform(size_divisible, image_mean, image_std)
        # torchvision builds its RPN and RoI heads inside MaskRCNN: retype them to the subclasses above,
        # which add only the choice of box loss
        self.model.rpn.__class__, self.model.roi_heads.__class__ = RPN, BoxLossRoIHeads
        self.model.rpn.box_loss_kind = _check_choice(rpn_box_loss, BOX_LOSSES, "module.head.rpn_box_loss")
        self.model.roi_heads.box_loss_kind = _check_choice(box_loss, BOX_LOSSES, "module.head.box_loss")
        self.model.roi_heads.mask_target = mask_target
        rpn = self.model.rpn  # torchvision's thresholds (0.7 / 0.3) with mmdet's low-quality rule
        rpn.proposal_matcher = MaxIoUMatcher(rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold,
                                             rpn_min_pos_iou)
        rpn.allowed_border = int(rpn_allowed_border)
        for head in (self.model.rpn.head, self.model.roi_heads.box_predictor, self.model.roi_heads.mask_predictor):
            float_outputs(head)  # deltas, logits and mask logits in float32 (mixed precision)
        init_box_predictor(self.model.roi_heads.box_predictor)

    def flops_forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The network for FLOP counting, as mmdetection's ``tools/analysis_tools/get_flops.py``
        counts it (``forward_dummy``): backbone, FPN, the RPN head on every level, and the RoI heads
        on a fixed number of proposals per image: the box head on 1000 (mmdet: ``torch.randn(1000,
        4)`` boxes), the mask head on the first 100 (``rois[:100]``). Anchors, proposal selection,
        box decoding, NMS and mask pasting are left out, as there. RoI features are zeros: RoIAlign
        is no multiply-add layer (neither counter counts it) and its level assignment depends on
        the boxes, which the meta device cannot run.

        What mmdet's numbers count differently: mmcv's module hooks add bias adds, norms,
        activations, pooling and upsampling (0.3% of the ResNet-50 models), miss functional matmuls
        (attention: see ``vitlab.runtime.flops``), and ``get_flops --shape 1280 800`` feeds a 1280-high,
        800-wide image where the papers' rows say 800x1280 (the same count for convolutions).
        """
        features = self.model.backbone(images)
        heads, channels = self.model.roi_heads, self.model.backbone.out_channels
        box_features = images.new_zeros(len(images) * self.flops_proposals, channels, *heads.box_roi_pool.output_size)
        mask_features = images.new_zeros(len(images) * self.flops_mask_rois, channels,
                                          *heads.mask_roi_pool.output_size)
        objectness, box_deltas = self.model.rpn.head(list(features.values()))
        return [*objectness, *box_deltas, *heads.box_predictor(heads.box_head(box_features)),
                heads.mask_predictor(heads.mask_head(mask_features))]
