"""Recipes are checked data: every recipe experiment against the official values in src/vitlab/tools/recipes/*.yaml."""
from __future__ import annotations

import pytest
import torch

from support import REPO
from vitlab.tools import recipes
from vitlab.tools.recipes import Row, check, compose_recipe, load, ours, recipe_experiments
from vitlab.tools.recipes.__main__ import main as recipes_main

RECIPES = sorted(load())


def test_every_recipe_experiment_names_what_it_follows():
    assert set(recipe_experiments()) == set(RECIPES)
    for name, recipe in load().items():
        assert len(recipe["follows"]) > 20 and recipe["backbones"], name
        text = (REPO / "conf" / "experiment" / f"{name}.yaml").read_text()
        assert f"python -m vitlab.tools.recipes {name}" in text, f"{name}.yaml: its header should say how it is checked"
        for other in recipe["other"]:  # a row limited to some backbones names backbones of the recipe
            assert set(other.get("backbones", [])) <= set(recipe["backbones"]), (name, other["setting"])


@pytest.mark.parametrize("name", RECIPES)
def test_no_difference_without_a_reason(name):
    rows = check(name)
    unexplained = [r for r in rows if r.differs and not r.note]
    assert not unexplained, "\n".join(f"{r.setting} {r.backbones}: official {r.official!r}, ours {r.ours!r}"
                                      for r in unexplained)
    differing = {r.setting for r in rows if r.differs}
    stale = sorted(set(load()[name].get("notes") or {}) - differing)
    assert not stale, f"notes for settings that no longer differ: {stale}"


@pytest.mark.parametrize("name", RECIPES)
def test_the_official_global_batch_fits_one_node(name):
    """data.batch_size is per device: the official global batch is 8 of it (one 8-GPU node), so the
    linear lr scaling leaves the official lr on such a node."""
    for backbone in load()[name]["backbones"][:2]:
        cfg = compose_recipe(name, backbone)
        assert 8 * ours(cfg, "data.batch_size") == ours(cfg, "schedule.base_batch_size"), (name, backbone)


def test_variant_files_belong_to_a_recipe_and_its_backbones():
    for path in (REPO / "conf" / "recipe_variant").glob("*/*.yaml"):
        experiment, backbone = path.parent.name, path.stem
        assert experiment in RECIPES and backbone in load()[experiment]["backbones"], path


def test_a_difference_without_a_note_is_reported(monkeypatch):
    data = {k: dict(v) for k, v in load().items()}
    data["pvtv2_fpn_40k"] = {**data["pvtv2_fpn_40k"], "backbones": ["pvt_v2_b0"],
                             "official": {**data["pvtv2_fpn_40k"]["official"], "schedule.optimizer.lr": 1.0e-4}}
    monkeypatch.setattr(recipes, "load", lambda: data)
    (row,) = [r for r in check("pvtv2_fpn_40k") if r.setting == "schedule.optimizer.lr"]
    assert row.differs and row.note is None and row.ours == pytest.approx(2e-4)
    assert recipes_main(["pvtv2_fpn_40k"]) == 1


def test_same_compares_like_config_values():
    assert recipes.same(1.4286e-4, 2e-4 / 1.4) and not recipes.same(1e-4, 2e-4)
    assert recipes.same({"a": [1, 2.0]}, {"a": [1.0, 2]}) and not recipes.same(True, 1)
    assert Row("x", [], None, "<absent>", None).differs  # absent vs null: a difference


def test_translated_paramwise_keys_select_gpvit_parameters():
    """The official GPViT key .dw_norm is .dw.1. here: it must select the depth-wise BatchNorms."""
    from vitlab.api import create_backbone

    with torch.device("meta"):
        names = [n for n, _ in create_backbone("gpvit_l1").named_parameters()]
    selected = [n for n in names if ".dw.1." in n]
    assert selected and all(n.endswith((".weight", ".bias")) for n in selected)
    cfg = compose_recipe("gpvit_segformer_160k", "gpvit_l1")
    assert ".dw.1." in ours(cfg, "schedule.optimizer.paramwise")["custom_keys"]


def test_detr_paramwise_puts_exactly_the_backbone_at_a_tenth_of_the_lr():
    """detr_pvt_s_8x2_50ep_coco.py: custom_keys {backbone: lr_mult 0.1}; everything decays (wd 1e-4)."""
    from vitlab.data.base import DatasetInfo
    from vitlab.tasks.base import paramwise_groups
    from vitlab.tasks.detection import DetectionTask

    cfg = compose_recipe("pvt_detr_50e", "pvt_small")
    backbone = {**ours(cfg, "backbone"), "pretrained": None}
    info = DatasetInfo(class_names=tuple(f"c{i}" for i in range(80)), input_size=(800, 1333))
    with torch.device("meta"):
        model = DetectionTask.build_model(backbone, {"head": ours(cfg, "module.head")}, info)
    groups = paramwise_groups(model, 1e-4, 1e-4, ours(cfg, "schedule.optimizer.paramwise"))
    slow = [g for g in groups if g["lr_mult"] == 0.1]
    assert len(slow) == 1 and slow[0]["lr"] == pytest.approx(1e-5)
    assert {id(p) for p in slow[0]["params"]} == {id(p) for p in model.model.backbone.parameters()}
    assert all(g["weight_decay"] == pytest.approx(1e-4) for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_other_rows_can_be_limited_to_some_backbones():
    rows = {r.setting: r for r in check("pvt_detr_50e")}
    assert rows["ResNet BatchNorm weights"].backbones == ["resnet50"]
    assert rows["schedule.epochs"].backbones == ["pvt_small", "resnet50"]


def test_cli_prints_the_table(capsys):
    assert recipes_main(["pvt_large_fpn_320k"]) == 0
    out = capsys.readouterr().out
    assert "follows PVT v1 paper Table 5" in out and "schedule.max_steps" in out and "320000" in out
    with pytest.raises(SystemExit):
        recipes_main(["no_such_recipe"])


def test_docs_tables_are_the_generated_ones():
    """docs/recipes.md shows what python -m vitlab.tools.recipes --markdown prints (regenerate it when a recipe changes)."""
    doc = (REPO / "docs" / "recipes.md").read_text()
    region = doc.split("<!-- recipes:begin -->")[1].split("<!-- recipes:end -->")[0]
    assert [l for l in region.splitlines() if l.startswith("|")] == \
        [l for l in recipes.markdown().splitlines() if l.startswith("|")]
