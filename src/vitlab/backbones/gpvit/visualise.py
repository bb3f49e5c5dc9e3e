"""GPViT Fig. 6: where each group token looks (the grouping attention of every GP block)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitlab.backbones.gpvit.adapter import GPViTAdapter
from vitlab.backbones.gpvit.trunk import GPBlock, GPViT


@torch.no_grad()
def group_attention_maps(backbone: GPViT | GPViTAdapter, image: torch.Tensor) -> list[torch.Tensor]:
    """Per GP block, the grouping attention (averaged over heads) as one map per group
    token, upsampled to the image resolution: a list of (B, M, H, W) tensors (GPViT Fig. 6).

    ``backbone``: a GPViT, or a ViT-Adapter (its trunk is read). ``image``: (B, 3, H, W) or (3, H, W).
    """
    if image.dim() == 3:
        image = image[None]
    backbone = backbone.trunk if isinstance(backbone, GPViTAdapter) else backbone
    groupings = [m.group for m in backbone.layers if isinstance(m, GPBlock)]
    inputs: list[torch.Tensor] = []
    hooks = [g.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for g in groupings]
    was_training = backbone.training
    backbone.eval()
    try:
        x, hw = backbone._embed(image)
        for layer in backbone.layers:
            x = layer(x, hw)
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was_training)
    b, _, height, width = image.shape
    maps = []
    for g, tokens in zip(groupings, inputs):
        attn = g.attention_weights(tokens).mean(1).view(b, -1, *hw)  # (B, M, h, w)
        up = F.interpolate(attn, size=(hw[0] * backbone.patch_size, hw[1] * backbone.patch_size), mode="bilinear",
                           align_corners=False)
        maps.append(up[:, :, :height, :width])
    return maps


