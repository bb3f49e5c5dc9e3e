"""Detectors around our backbones: torchvision's ``RetinaNet`` and ``MaskRCNN``.

    backbone -> OrderedDict of the chosen strides -> torchvision FPN (+ extra levels) -> torchvision head

Both detectors take a list of float images in [0, 1] (any sizes) and, in training,
targets with ``boxes`` (XYXY), ``labels`` in ``0..num_classes-1`` (and ``masks``).
Evaluation returns torchvision's detections (``boxes``, ``scores``, ``labels`` in the
same ``0..num_classes-1`` range, Mask R-CNN also ``masks`` N x 1 x H x W probabilities),
in the coordinates of the image that was passed in.

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
  torchvision applies a ReLU between P6 and P7 (as the RetinaNet paper); mmdet does not.
* Initialisation as RECIPES.md: Xavier-uniform for FPN convs (torchvision uses
  Kaiming); torchvision's RetinaNet and RPN heads already use normal(std 0.01)
  (+ the focal-loss prior bias); the box predictor gets mmdet's normal 0.01 / 0.001.
* Focal loss (alpha 0.25, gamma 2) and 9 anchors per location (3 scales x 3 ratios)
  are torchvision's RetinaNet defaults; they match the recipe.
* FLOPs are counted through ``flops_forward`` (``vitlab.flops``): the network as mmdetection's
  ``get_flops`` runs it, without data-dependent steps, so it runs on the meta device
  (``MaskRCNNDetector.flops_forward`` says what is counted).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from vitlab.data.base import IMAGENET_MEAN, IMAGENET_STD



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

    def __init__(self, backbone: nn.Module, in_strides: list[int], out_channels: int, extra_blocks=None):
        super().__init__()
        self.body = backbone
        self.levels = select_levels(backbone, in_strides)
        in_channels = [backbone.out_channels[i] for i in self.levels]
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels  # read by torchvision's detectors
        for m in self.fpn.modules():  # RECIPES: Xavier for the FPN (torchvision initialises Kaiming)
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(images)
        return self.fpn(OrderedDict((str(k), feats[i]) for k, i in enumerate(self.levels)))


class PreResizedTransform(GeneralizedRCNNTransform):
    """Normalise and pad only: the DataModule has already resized images, boxes and masks."""

    def resize(self, image, target=None):
        return image, target


class _Detector(nn.Module):
    """Shared wrapper: label offset in and out, plain tensors for torchvision."""

    label_offset = 0

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


def _transform(size_divisible: int, image_mean, image_std) -> PreResizedTransform:
    return PreResizedTransform(1, 1, list(image_mean), list(image_std), size_divisible=size_divisible)


class RetinaNetDetector(_Detector):
    """RetinaNet (Lin et al.): FPN over strides 8-32 + P6/P7, 4-conv class and box subnets."""

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
        image_mean: list[float] = IMAGENET_MEAN,
        image_std: list[float] = IMAGENET_STD,
    ):
        super().__init__()
        if p6_from not in ("input", "output"):
            raise ValueError(f"p6_from={p6_from!r}: 'input' (C5, mmdet on_input) or 'output' (P5)")
        c5 = backbone.out_channels[select_levels(backbone, in_strides)[-1]]
        extra = LastLevelP6P7(c5 if p6_from == "input" else fpn_channels, fpn_channels)
        extra.use_P5 = p6_from == "output"  # torchvision infers it from channel counts; we say it
        body = BackboneWithFPN(backbone, in_strides, fpn_channels, extra)
        sizes = tuple(tuple(int(s * 2 ** (k / scales_per_octave)) for k in range(scales_per_octave)) for s in anchor_sizes)
        anchors = AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))
        self.model = RetinaNet(
            body, num_classes, anchor_generator=anchors, fg_iou_thresh=fg_iou_thresh, bg_iou_thresh=bg_iou_thresh,
            score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
            topk_candidates=topk_candidates,
        )
        self.model.transform = _transform(size_divisible, image_mean, image_std)

    def flops_forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backbone, FPN and the class and box subnets on every level (mmdet's ``forward_dummy``)."""
        return self.model.head(list(self.model.backbone(images).values()))


class MaskRCNNDetector(_Detector):
    """Mask R-CNN (He et al.): FPN over strides 4-32 + max-pooled P6, RPN, RoIAlign, 2-FC box head, 4-conv mask head."""

    label_offset = 1  # torchvision's class 0 is the background
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
        image_mean: list[float] = IMAGENET_MEAN,
        image_std: list[float] = IMAGENET_STD,
    ):
        super().__init__()
        body = BackboneWithFPN(backbone, in_strides, fpn_channels, LastLevelMaxPool())
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes))
        self.model = MaskRCNN(
            body, num_classes + 1, rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train, rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            rpn_nms_thresh=rpn_nms_thresh, rpn_batch_size_per_image=rpn_batch_size_per_image,
            box_batch_size_per_image=box_batch_size_per_image, box_score_thresh=box_score_thresh,
            box_nms_thresh=box_nms_thresh, box_detections_per_img=box_detections_per_img,
        )
        self.model.transform = _transform(size_divisible, image_mean, image_std)
        predictor = self.model.roi_heads.box_predictor  # mmdet's init of the box classifier / regressor
        nn.init.normal_(predictor.cls_score.weight, std=0.01)
        nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
        nn.init.zeros_(predictor.cls_score.bias)
        nn.init.zeros_(predictor.bbox_pred.bias)

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
        (attention: see ``vitlab.flops``), and ``get_flops --shape 1280 800`` feeds a 1280-high,
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
