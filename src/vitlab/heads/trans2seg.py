"""Trans2Seg (Xie et al. 2021): a transformer segmentation head with one learned query per class.

    last map -> linear to 256 + class token + position embedding -> 4 ViT encoder blocks
    -> 4 decoder blocks: class queries attend the encoded map; their attention logits (one map per
       class and head) are the decoder's output
    -> per class: [encoded map, its attention maps] -> separable convs -> up to stride 4
       + the stride-4 map (1x1 conv) -> separable conv -> 1x1 conv = that class's logit map

PVT v1 Sec. 5.4 / Table 7 put it on PVT-Small (Trans2Seg-Medium's head: embed 256, depth 4,
8 heads, MLP ratio 3, hidden 64; xieenze/Trans2Seg ``configs/trans10kv2/trans2seg/trans2seg_medium.yaml``,
``segmentron/models/trans2seg.py``, ``segmentron/modules/transformer.py``). As there:

* Encoder blocks are timm's ViT ``Block`` (pre-norm, no qkv bias, GELU MLP), then a LayerNorm.
* Each decoder block: LayerNorm'd class queries attend the LayerNorm'd encoded tokens (no qkv
  bias); it returns the attention logits (scaled q.k, before the softmax) and the attended
  queries; residual MLPs (ratio 3) update queries, tokens, and the attention logits along their
  token axis (so that MLP is as wide as the token grid of the training crop: ``img_size`` /
  stride). The next block's queries are the previous block's plus the class embeddings again.
* The last block's attention logits go to the convolutional head: ``SeparableConv2d`` as in
  SegmenTron (3x3 depthwise, BN, ReLU, 1x1, BN, ReLU), BN layers throughout.
* Trunc-normal(0.02) init of the transformer's linears, position embedding, tokens and queries.

Differences from the official code: its decoder block doubles queries, tokens and attention
logits before each MLP (``x = x + drop_path(x)``, a slip for a residual) and merges the heads'
outputs with a reshape that mixes classes and heads; we add each MLP as a plain residual and merge
heads per class. The official model only runs at the training size (its
attention MLP is tied to the token count); here other sizes resize the attention logits to the
training grid around that MLP and the position embedding to the input's grid (bilinear), so
whole-image inference also works; the task config still evaluates on 512 x 512 windows
(``test_mode: slide``), the size the model was trained at. The decoder's map and the logits are
upsampled with ``align_corners=True``, as the official code does. The auxiliary FCN head of the official code is off by
default there and not included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from vitlab.heads.segmentation import check_index, conv_bn_relu


def separable_conv(cin: int, cout: int) -> nn.Sequential:
    """SegmenTron's ``SeparableConv2d(relu_first=False)``: depthwise 3x3, BN, ReLU, pointwise, BN, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                         nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def resize_tokens(x: torch.Tensor, grid: tuple[int, int], to: tuple[int, int]) -> torch.Tensor:
    """``... x (grid_h * grid_w)`` -> ``... x (to_h * to_w)`` by bilinear resizing of the grid."""
    if tuple(grid) == tuple(to):
        return x
    lead = x.shape[:-1]
    x = F.interpolate(x.reshape(-1, 1, *grid), size=to, mode="bilinear", align_corners=False)
    return x.reshape(*lead, to[0] * to[1])


class DecoderBlock(nn.Module):
    """Class queries attend the tokens; the attention logits are an output (no library returns them
    before the softmax, so the attention is written out)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, grid: tuple[int, int]):
        super().__init__()
        self.num_heads, self.scale, self.grid = num_heads, (dim // num_heads) ** -0.5, tuple(grid)
        tokens = grid[0] * grid[1]
        self.norm_query, self.norm_tokens = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, dim)
        self.norm2, self.norm3, self.norm4 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(tokens)
        hidden = int(dim * mlp_ratio)
        self.mlp_query, self.mlp_tokens = Mlp(dim, hidden), Mlp(dim, hidden)
        self.mlp_attn = Mlp(tokens, int(tokens * mlp_ratio))

    def forward(self, query, tokens, grid):
        b, n, c = tokens.shape
        h = self.num_heads
        q = self.q(self.norm_query(query)).view(b, -1, h, c // h).transpose(1, 2)  # B x h x K x c/h
        k, v = self.kv(self.norm_tokens(tokens)).view(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale  # B x h x K x N: the output
        query = self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, c))
        query = query + self.mlp_query(self.norm2(query))
        tokens = tokens + self.mlp_tokens(self.norm3(tokens))
        attn = resize_tokens(attn.transpose(1, 2), grid, self.grid)  # B x K x h x (training grid)
        attn = resize_tokens(attn + self.mlp_attn(self.norm4(attn)), self.grid, grid)
        return query, tokens, attn


class Trans2SegHead(nn.Module):
    """Trans2Seg on two backbone maps (``in_index``: the stride-4 map for detail, the last for the
    transformer): ``embed_dim``, ``depth`` encoder and decoder blocks, ``num_heads``, ``mlp_ratio``,
    ``hidden_channels`` of the convolutional head; ``img_size``: the training crop, which fixes the
    token grid of the position embedding and of the attention MLP. Returns logits at the stride of
    the first map read.
    """

    align_corners = True  # the official upsamplings (the decoder map, and the logits in ``Segmentor``)

    def __init__(self, in_channels: list[int], strides: list[int], num_classes: int, in_index: list[int] = (0, 3),
                 embed_dim: int = 256, depth: int = 4, num_heads: int = 8, mlp_ratio: float = 3.0,
                 hidden_channels: int = 64, img_size: list[int] = (512, 512)):
        super().__init__()
        self.low, self.high = check_index(in_index, strides, "Trans2Seg")
        stride = strides[self.high]
        self.grid = (-(-img_size[0] // stride), -(-img_size[1] // stride))  # ceil: maps of padded inputs
        self.embed = nn.Linear(in_channels[self.high], embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, embed_dim))
        self.encoder = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim)
        self.class_queries = nn.Parameter(torch.zeros(1, num_classes, embed_dim))
        self.decoder = nn.ModuleList(DecoderBlock(embed_dim, num_heads, mlp_ratio, self.grid) for _ in range(depth))
        for p in (self.pos_embed, self.cls_token, self.class_queries):
            trunc_normal_(p, std=0.02)
        for m in [*self.embed.modules(), *self.encoder.modules(), *self.decoder.modules()]:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.conv_low = conv_bn_relu(in_channels[self.low], hidden_channels, 1, mmcv_init=False)  # SegmenTron's
        self.lay1 = separable_conv(embed_dim + num_heads, hidden_channels)
        self.lay2 = separable_conv(hidden_channels, hidden_channels)
        self.lay3 = separable_conv(hidden_channels, hidden_channels)
        self.pred = nn.Conv2d(hidden_channels, 1, 1)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "class_queries"}

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        cls_pos, pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        pos = resize_tokens(pos.transpose(1, 2), self.grid, grid).transpose(1, 2)
        return torch.cat([cls_pos, pos], 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        low, high = feats[self.low], feats[self.high]
        b, _, h, w = high.shape
        tokens = self.embed(high.flatten(2).transpose(1, 2))
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], 1) + self.positions((h, w))
        tokens = self.norm(self.encoder(tokens))[:, 1:]  # the class token only takes part in the attention
        encoded = tokens.transpose(1, 2).reshape(b, -1, h, w)
        query = torch.zeros_like(self.class_queries).expand(b, -1, -1)
        for block in self.decoder:  # each block's queries: the previous block's + the class embeddings
            query, tokens, attn = block(query + self.class_queries, tokens, (h, w))
        k = self.class_queries.shape[1]
        x = torch.cat([encoded[:, None].expand(-1, k, -1, -1, -1), attn.reshape(b, k, -1, h, w)], 2).flatten(0, 1)
        x = self.lay2(self.lay1(x))
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        x = x + self.conv_low(low)[:, None].expand(-1, k, -1, -1, -1).flatten(0, 1)
        return self.pred(self.lay3(x)).view(b, k, *low.shape[-2:])
