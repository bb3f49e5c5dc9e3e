"""Backbone configs across families: family bases + variants, one name per concept, old names.

Run metadata logs every field of the composed backbone config as a top-level W&B key, so
the composed config must hold every constructor argument, and the same concept must have
the same key in every family.
"""
from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import hydra
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import vitlab
from vitlab.api import available_backbones, backbone_config
from vitlab.backbones.gpvit import GPViT, GPViTAdapter
from vitlab.runtime.weights import WEIGHT_KEYS

CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone"
FAMILIES = sorted(p.stem for p in (CONF / "family").glob("*.yaml"))
OLD_NAMES = {"mlp_ratio", "ffn_ratio", "peg", "ape_size", "num_layers", "window_size"}


def _target(cfg):
    return hydra.utils.get_class(cfg._target_)


def _constructor_args(cls) -> set[str]:
    params = inspect.signature(cls).parameters
    args = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    if cls is GPViTAdapter:  # the rest of its keywords are its trunk's (minus what the adapter fixes)
        args |= _constructor_args(GPViT) - {"out_indices", "head_pool", "neck_heads", "final_norm"}
    return args


def test_family_bases_are_not_backbones():
    assert FAMILIES and not set(FAMILIES) & set(available_backbones())
    assert not [n for n in available_backbones() if n.startswith("family")]


@pytest.mark.parametrize("name", available_backbones())
def test_composed_config_holds_every_constructor_argument(name):
    cfg = backbone_config(name)
    assert not OmegaConf.missing_keys(cfg), f"{name} leaves {OmegaConf.missing_keys(cfg)} unset"
    assert set(cfg) - {"_target_", *WEIGHT_KEYS} == _constructor_args(_target(cfg)) - {"final_norm"}
    assert not set(cfg) & OLD_NAMES


@pytest.mark.parametrize("name", available_backbones())
def test_variant_states_only_what_differs_from_its_family(name):
    raw = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    (base,) = [d.removesuffix("@_here_") for d in raw.pop("defaults") if d != "_self_"]
    assert raw.pop("variant") == name  # its release's key (backbone.pretrained=imagenet)
    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        family = compose(overrides=[f"+backbone={base}"]).backbone  # a family base composes (??? fields unset)
    same = [k for k, v in raw.items() if k in family and not OmegaConf.is_missing(family, k) and family[k] == v]
    assert not same, f"{name} restates {same} of {base}"
    assert 0 < len(raw) <= 5


def test_one_name_per_concept_across_families():
    # pos_embed is a string where a family has position encodings; ratios and sizes share names
    seen: dict[str, set[str]] = {}
    for name in available_backbones():
        cfg = backbone_config(name)
        for key in ("pos_embed", "mlp_ratios", "depths", "img_size", "window_sizes"):
            if key in cfg:
                seen.setdefault(key, set()).add(_target(cfg).__name__)
        if "pos_embed" in cfg:
            assert isinstance(cfg.pos_embed, str), name
    assert seen["pos_embed"] == {"PyramidVisionTransformer", "PaleTransformer", "ScalableViT", "GPViT", "GPViTAdapter"}
    assert seen["mlp_ratios"] == seen["pos_embed"]
    assert {"PyramidVisionTransformer", "PaleTransformer", "GPViT", "TimmColumnarViT"} <= seen["img_size"]


def test_an_old_argument_name_is_refused_naming_the_config():
    """vitlab 0.1.0 is the first release: the argument names of its development never shipped and
    have no compatibility path (only moved classes do: vitlab.runtime.aliases)."""
    with pytest.raises(TypeError, match=r"backbone \(vitlab\.backbones\.pale\.\w+\): .*'mlp_ratio'"):
        vitlab.create_backbone("pale_t", overrides=["+mlp_ratio=2.0"])


def test_current_names_warn_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        with torch.device("meta"):
            for name in ("pvt_v2_b0", "pale_t", "scalablevit_s", "gpvit_l1"):
                vitlab.create_backbone(name)


# --------------------------------------------------------------------------- bad values fail early and clearly
BAD = [
    ("pale_t", "pale_size=0", r"backbone\.pale_size=0: must be a positive int s"),
    ("pale_t", "pale_size=-3", r"backbone\.pale_size=-3: must be a positive int s"),
    ("pale_t", "pale_size=[7,7,7,7,7]", r"backbone\.pale_size=\[7,7,7,7,7\] has 5 entries but the model has 4 stages"),
    ("pale_t", "pale_size=[7,[3,2,1],7,7]", r"backbone\.pale_size=\[7,\[3,2,1\],7,7\]: must be a positive int"),
    ("pvt_v2_b0", "depths=[1,1]",
     r"backbone\.depths=\[1,1\] has 2 entries but the model has 4 stages \(embed_dims, num_heads, patch_sizes"),
    ("pvt_tiny", "sr_ratios=[8,4,2]", r"backbone\.sr_ratios=\[8,4,2\] has 3 entries but the model has 4 stages"),
    ("pale_t", "num_heads=[2,4,8]", r"backbone\.num_heads=\[2,4,8\] has 3 entries"),
    ("scalablevit_s", "mlp_ratios=[4,4]", r"backbone\.mlp_ratios=\[4,4\] has 2 entries but the model has 4 stages"),
    ("pvt_v2_b0", "embed_dims=[32,64,160,250]",
     r"backbone\.embed_dims=\[32,64,160,250\]: 250 channels do not split over backbone\.num_heads=\[1,2,5,8\]"),
    ("gpvit_l1", "embed_dims=200", r"backbone\.embed_dims=200: 200 channels do not split over backbone\.num_heads=12"),
    ("pvt_v2_b0", "depths=[2,0,2,2]", r"backbone\.depths=\[2,0,2,2\]: must be positive integers"),
    ("scalablevit_s", "window_sizes=0", r"backbone\.window_sizes=0: must be positive integers"),
    ("pale_t", "depths=[a,b,c,d]", r"backbone\.depths=\['a','b','c','d'\]: must be positive integers"),
    ("gpvit_l1", "depths=[6,6]", r"backbone\.depths=\[6,6\]: GPViT has one stage"),
    ("gpvit_l1", "gp_layers=[1,4,7,12]", r"backbone\.gp_layers=\[1,4,7,12\]: layer indices must be in \[-12, 11\]"),
    ("pale_t", "attn_mode=diagonal", r"backbone\.attn_mode='diagonal': must be one of pale_parallel, "),
    ("pvt_tiny", "pos_embed=sincos", r"backbone\.pos_embed='sincos': must be one of ape, none"),
    ("gpvit_l1", "local_attn=swin", r"backbone\.local_attn='swin': must be one of lepe, window, global"),
    ("scalablevit_s", "block_pattern=wsa_foo", r"backbone\.block_pattern='wsa_foo': use one or two of iwsa"),
    ("pale_t", "drop_path_rate=1.5", r"backbone\.drop_path_rate=1\.5: must be a rate in \[0, 1\)"),
    ("pale_t", "num_heads=[1,4,8,16]", r"backbone\.num_heads=\[1,4,8,16\]: must be even: attn_mode=pale_parallel"),
    ("gpvit_l1_adapter", "out_strides=[8,16]", r"backbone\.out_strides=\[8,16\]: \[4,8,16,32\] \(Mask R-CNN\)"),
]


@pytest.mark.parametrize("name,override,message", BAD, ids=[f"{n}-{o}" for n, o, _ in BAD])
def test_bad_values_are_rejected_before_anything_is_built(name, override, message, monkeypatch):
    def built(*args, **kwargs):
        raise AssertionError("a layer was built before the arguments were checked")

    monkeypatch.setattr(torch.nn.Conv2d, "__init__", built)  # every family's first module is a conv
    with pytest.raises(Exception, match=message) as err:
        vitlab.create_backbone(name, overrides=[override])
    assert err.type.__name__ == "BackboneConfigError"  # ours, not an error from deep inside
