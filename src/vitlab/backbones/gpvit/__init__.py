"""GPViT (Yang et al., ICLR 2023; seed 003), one module per concern:

* ``trunk``: the GPViT backbone (stem, local / GP blocks, dense outputs, classifier head);
* ``adapter``: ViT-Adapter around a trunk, the paper's COCO backbone;
* ``convert``: official checkpoints -> our layout (``GPViT.convert_official``,
  ``GPViTAdapter.convert_official``);
* ``visualise``: group attention maps (Fig. 6).

Configs name ``vitlab.backbones.gpvit.GPViT`` / ``.GPViTAdapter``.
"""
from vitlab.backbones.gpvit.adapter import GPViTAdapter, ms_deform_attn
from vitlab.backbones.gpvit.trunk import GPViT, LocalAttention
from vitlab.backbones.gpvit.visualise import group_attention_maps

__all__ = ["GPViT", "GPViTAdapter", "LocalAttention", "group_attention_maps", "ms_deform_attn"]
