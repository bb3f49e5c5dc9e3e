"""Weights out of vitlab in the layouts other code reads (``vitlab.tools.export --format official|timm|mmdet``).

References, none of them vitlab's own output:
* official: the authors' state dicts in tests/fixtures (made by running their code; see
  test_pvt.py, test_scalablevit.py, test_gpvit.py): our model loads one, and the file the
  export writes must be that state dict again, key for key and value for value;
* timm: ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``
  loads the written file and must reproduce the authors' logits (PVTv2) or our model's (baselines);
* mmdet: mmengine's own ``_load_checkpoint_with_prefix`` (what ``init_cfg=dict(type='Pretrained',
  prefix='backbone.', checkpoint=...)`` runs) must hand the backbone the authors' key names.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.backbones.gpvit import GPViT, GPViTAdapter
from vitlab.backbones.pale import PaleTransformer
from vitlab.backbones.pvt import PyramidVisionTransformer
from vitlab.backbones.scalablevit import ScalableViT

FIXTURES = Path(__file__).parent / "fixtures"
LIST = lambda v: "[" + ",".join(map(str, v)) + "]"  # noqa: E731


def pvt_overrides(cfg: dict, v1: bool = False) -> list[str]:
    keys = ["embed_dims", "depths", "mlp_ratios", "num_heads", "sr_ratios"]
    return [f"{k}={LIST(cfg[k])}" for k in keys] + ([f"img_size={cfg['img_size']}"] if v1 else [])


def _official(name: str):
    """(vitlab name, overrides, classes, the authors' state dict, family) of each fixture."""
    if name.startswith("pvt"):
        v1 = name == "pvt_v1"
        fix = torch.load(FIXTURES / f"pvt_v{1 if v1 else 2}_official_tiny.pt", weights_only=True)
        fix = fix if v1 else fix[name]
        model = {"pvt_v1": "pvt_tiny", "pvt_v2": "pvt_v2_b0", "pvt_v2_li": "pvt_v2_b2_li"}[name]
        return model, pvt_overrides(fix["config"], v1), 10, fix["state_dict"], PyramidVisionTransformer
    if name == "scalablevit":
        from test_scalablevit import TINY

        sd = torch.load(FIXTURES / "scalablevit_tiny_official.pt", weights_only=True)["state_dict"]
        return "scalablevit_s", TINY, 8, {k: v.float() for k, v in sd.items()}, ScalableViT
    from test_gpvit import TINY

    sd = torch.load(FIXTURES / "gpvit_tiny_official.pt", weights_only=True)["state_dict"]
    return "gpvit_l1", [*TINY, "out_indices=[2,3]", "out_strides=[8,8]"], 10, \
        {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, GPViT


def assert_same_state(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value.to(got[key].dtype)), key


@pytest.mark.parametrize("name", ["pvt_v1", "pvt_v2", "pvt_v2_li", "scalablevit", "gpvit"])
def test_to_official_gives_back_the_authors_state_dict(name):
    model_name, overrides, classes, official, family = _official(name)
    model = vitlab.create_model(model_name, num_classes=classes, overrides=overrides)
    model.load_state_dict(family.convert_official(official), strict=True)
    assert type(model.backbone) is family
    assert_same_state(family.to_official(model.state_dict()), official)


def test_gpvit_l1_every_official_key_comes_back():
    """Every key of the authors' full L1 classifier (tests/fixtures/gpvit_l1_official_keys.json, from their code)."""
    shapes = json.loads((FIXTURES / "gpvit_l1_official_keys.json").read_text())
    with torch.device("meta"):
        model = vitlab.create_model("gpvit_l1", num_classes=1000)
    model.load_state_dict(GPViT.convert_official({k: torch.empty(s, device="meta") for k, s in shapes.items()}),
                          strict=True, assign=True)
    assert {k: list(v.shape) for k, v in GPViT.to_official(model.state_dict()).items()} == shapes


@pytest.mark.parametrize("variant,strides", [("maskrcnn", [4, 8, 16, 32]), ("retinanet", [8, 16, 32])])
def test_gpvit_adapter_to_official_mmdet_layout(variant, strides):
    from test_gpvit import ADAPTER_TINY

    fix = torch.load(FIXTURES / "gpvit_adapter_tiny_official.pt", weights_only=True)
    official = {k: v.float() if v.is_floating_point() else v for k, v in fix["maskrcnn_state_dict"].items()}
    if variant == "retinanet":  # no stride-4 parts; its norms are numbered from 2
        official = {k: v for k, v in official.items() if not k.startswith(("backbone.spm.fc1", "backbone.up.", "backbone.ad_norm1."))}
    official = {k: v for k, v in official.items() if k.startswith("backbone.")}
    model = vitlab.create_backbone("gpvit_l1_adapter", overrides=[*ADAPTER_TINY, f"out_strides={LIST(strides)}"])
    model.load_state_dict({k.removeprefix("backbone."): v for k, v in GPViTAdapter.convert_official(official).items()})
    ours = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    assert_same_state(GPViTAdapter.to_official(ours), official)


def test_pale_says_it_has_no_official_code():
    for convert in (PaleTransformer.to_official, PaleTransformer.to_timm):
        with pytest.raises(ValueError, match="released no code"):
            convert({})
    with pytest.raises(ValueError, match="timm has PVTv2 only"):
        PyramidVisionTransformer.to_timm(_official_model_state("pvt_v1"))


def _official_model_state(name):
    model_name, overrides, classes, official, family = _official(name)
    return family.convert_official(official)


# ---- the command, on a checkpoint holding the authors' PVTv2 weights ------------------------------
@pytest.fixture(scope="module")
def pvt_v2_checkpoint(tmp_path_factory):
    """A vitlab checkpoint (and summary.json) of the tiny PVTv2 classifier holding the authors' fixture weights."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from vitlab.runtime.resources import conf_dir
    from vitlab.runtime.run import build_data_and_module

    fix = torch.load(FIXTURES / "pvt_v2_official_tiny.pt", weights_only=True)["pvt_v2"]
    run = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", ["backbone=pvt_v2_b0", *(f"backbone.{o}" for o in pvt_overrides(fix["config"])),
                                "experiment=demo", "data.img_size=32", "backbone.pretrained=null",
                                f"paths.output_dir={run}"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    module = build_data_and_module(config)[1]
    module.model.load_state_dict(PyramidVisionTransformer.convert_official(fix["state_dict"]), strict=True)
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": module.state_dict(), "vitlab_config": config,
                "hyper_parameters": {"info": module.info.to_dict()}}, run / "checkpoints" / "last.ckpt")
    (run / "summary.json").write_text(json.dumps({
        "val/top1": 0.625, "val/top5": 0.9, "params": 123, "gflops": 0.01, "backbone": "pvt_v2_b0",
        "overrides": ["backbone=pvt_v2_b0", "experiment=demo"], "status": "finished"}))
    return run / "checkpoints" / "last.ckpt", fix


def test_export_official_files_are_the_authors_state_dict(pvt_v2_checkpoint, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from vitlab.tools.export import main

    ckpt, fix = pvt_v2_checkpoint
    result = main([f"ckpt_path={ckpt}", "--format", "official", "--out", str(tmp_path)])
    assert result["family"] == "PyramidVisionTransformer" and "official layout" in capsys.readouterr().out
    assert_same_state(torch.load(tmp_path / "model.pth", weights_only=True), fix["state_dict"])  # plain, as whai362's
    assert_same_state(load_file(tmp_path / "model.safetensors"), fix["state_dict"])
    # the model card: Hugging Face's own parser reads its metadata; the body has the run's numbers
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "pytorch" and card.data.pipeline_tag == "image-classification"
    assert {"vitlab", "pvt_v2_b0", "PyramidVisionTransformer"} <= set(card.data.tags)
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [("Top-1 accuracy", 0.625), ("Top-5 accuracy", 0.9)]
    assert "| val/top1 | 0.625 |" in card.text and "python src/train.py backbone=pvt_v2_b0 experiment=demo" in card.text
    assert "depths:\n- 1\n- 1" in card.text  # the backbone config


def test_export_timm_loads_into_timm_and_gives_the_authors_logits(pvt_v2_checkpoint, tmp_path):
    from vitlab.tools.export import export_weights

    ckpt, fix = pvt_v2_checkpoint
    result = export_weights(str(ckpt), "timm", out=str(tmp_path))
    cfg = fix["config"]
    arch = {k: cfg[k] for k in ("embed_dims", "depths", "num_heads", "mlp_ratios", "sr_ratios")}
    for name in ("model.safetensors", "model.pth"):
        model = timm.create_model("pvt_v2_b0", pretrained=True, num_classes=10, **arch,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / name), num_classes=10)).eval()
        assert sorted(load_file(tmp_path / "model.safetensors")) == sorted(model.state_dict())  # timm's names, not a filter's
        with torch.no_grad():
            for x, y in zip(fix["inputs"], fix["logits"]):
                torch.testing.assert_close(model(x.float()), y, rtol=1e-4, atol=1e-5)
    assert result["tensors"] == len(fix["state_dict"])
    assert "library_name: timm" in (tmp_path / "README.md").read_text()
    # timm's config.json: the folder is a timm model as the Hub serves one (hf-hub:USER/REPO after --push)
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(fix["inputs"][0].float()), fix["logits"][0], rtol=1e-4, atol=1e-5)


def test_export_mmdet_is_what_mmengine_pretrained_init_loads(pvt_v2_checkpoint, tmp_path):
    pytest.importorskip("mmengine")
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))  # mmengine-lite's runner imports cv2 for a hook it never runs here
    from mmengine.runner.checkpoint import _load_checkpoint_with_prefix

    from vitlab.tools.export import main

    ckpt, fix = pvt_v2_checkpoint
    result = main([f"ckpt_path={ckpt}", "--format", "mmdet", "--out", str(tmp_path)])
    assert result["part"] == "backbone"
    backbone = {k: v for k, v in fix["state_dict"].items() if not k.startswith("head.")}
    for name in ("model.pth", "model.safetensors"):
        if name.endswith(".pth"):
            assert_same_state(_load_checkpoint_with_prefix("backbone.", str(tmp_path / name), "cpu"), backbone)
        else:  # the safetensors file holds the same flat backbone.* dict
            assert_same_state({k.removeprefix("backbone."): v for k, v in load_file(tmp_path / name).items()}, backbone)


def test_export_refuses_what_a_layout_cannot_hold(pvt_v2_checkpoint, segmentation_run, capsys, tmp_path):
    from vitlab.tools.export import main

    ckpt, _ = pvt_v2_checkpoint
    with pytest.raises(SystemExit):
        main([f"ckpt_path={ckpt}", "--format", "onnx", "--push", "me/model"])
    assert "--push: only with --format official, timm or mmdet" in capsys.readouterr().err
    seg = segmentation_run / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit):
        main([f"ckpt_path={seg}", "--format", "official"])
    assert "only a classifier goes out whole" in capsys.readouterr().err
    # its backbone goes out: the official names, which the official converter brings back to the trained weights
    main([f"ckpt_path={seg}", "--format", "official", "--part", "backbone", "--out", str(tmp_path)])
    trained = {k.split("backbone.", 1)[1]: v for k, v in torch.load(seg, weights_only=True)["state_dict"].items()
               if ".backbone." in k}
    official = torch.load(tmp_path / "model.pth", weights_only=True)
    assert all(k.startswith(("patch_embed", "block", "norm")) for k in official)
    assert_same_state({k.removeprefix("backbone."): v for k, v in PyramidVisionTransformer.convert_official(official).items()},
                      trained)


# ---- the timm baselines: ours -> timm's layout -> timm's own model ---------------------------------
@pytest.mark.parametrize("name", ["resnet18", "swin_tiny", "vit_small_p32"])
def test_timm_baselines_round_trip_through_timm(name, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = vitlab.create_model(name, num_classes=10).eval()
    with torch.no_grad():  # every 1-D parameter random, so that no norm is an identity
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    state = type(model.backbone).to_timm(model.state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    ref = timm.create_model(model.backbone.body.pretrained_cfg["architecture"], pretrained=True, num_classes=10,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"), num_classes=10)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), model(x), rtol=1e-4, atol=1e-4)
    # the export's timm config.json: the folder as a timm model (local-dir:, as hf-hub: after --push)
    from omegaconf import OmegaConf

    from vitlab.api import backbone_config
    from vitlab.tools.export import timm_config

    config = OmegaConf.to_container(backbone_config(name), resolve=True)
    timm_config(model.backbone, config, state, 10, tmp_path / "hub")
    with torch.no_grad():
        torch.testing.assert_close(timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()(x),
                                   model(x), rtol=1e-4, atol=1e-4)


# ---- --push: the Hub's HTTP API recorded (httpx MockTransport under huggingface_hub's client) ----
class RecordedHub:
    """Answers the Hub endpoints an upload calls, as the Hub documents them, and keeps every request."""

    def __init__(self):
        self.requests = []

    def __call__(self, request):
        import httpx

        path = request.url.path
        if path == "/api/agent-harnesses":  # huggingface_hub's own once-a-day registry fetch, not the upload's
            return httpx.Response(404)
        self.requests.append(request)
        if path == "/api/repos/create":
            return httpx.Response(200, json={"url": "https://huggingface.co/me/pvt", "name": "me/pvt"})
        if path == "/api/validate-yaml":  # the Hub checks the card's metadata before a commit
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if path.startswith("/api/models/me/pvt/preupload/"):
            files = json.loads(request.content)["files"]
            return httpx.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                       for f in files]})
        if path.startswith("/api/models/me/pvt/commit/"):
            return httpx.Response(200, json={"commitUrl": "https://huggingface.co/me/pvt/commit/abc123",
                                             "commitOid": "abc123", "pullRequestUrl": None})
        return httpx.Response(404, json={"error": f"not recorded: {request.method} {path}"})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import httpx
    import huggingface_hub
    from huggingface_hub import constants

    recorded = RecordedHub()
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no login on this machine
    monkeypatch.delenv("HF_TOKEN", raising=False)
    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(recorded)))
    yield recorded
    huggingface_hub.set_client_factory(httpx.Client)
    huggingface_hub.close_session()


def test_push_uploads_the_export_folder(pvt_v2_checkpoint, tmp_path, hub, monkeypatch, capsys):
    import base64

    from vitlab.tools.export import main

    monkeypatch.setenv("HF_TOKEN", "hf_recorded")
    out = tmp_path / "export"
    result = main([f"ckpt_path={pvt_v2_checkpoint[0]}", "--format", "timm", "--out", str(out), "--push", "me/pvt"])
    assert result["url"] == "https://huggingface.co/me/pvt/commit/abc123"
    assert "pushed to https://huggingface.co/me/pvt/commit/abc123" in capsys.readouterr().out
    api = hub.requests
    assert [r.url.path for r in api] == ["/api/repos/create", "/api/validate-yaml", "/api/models/me/pvt/preupload/main",
                                         "/api/models/me/pvt/commit/main"]
    assert all(r.headers["authorization"] == "Bearer hf_recorded" for r in api)
    assert json.loads(api[0].content) == {"name": "pvt", "organization": "me", "type": "model"}
    lines = [json.loads(line) for line in api[-1].content.decode().splitlines()]
    sent = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
    assert sent == {name: (out / name).read_bytes() for name in ("README.md", "model.pth", "model.safetensors", "config.json")}


def test_push_without_token_or_network_says_so(pvt_v2_checkpoint, tmp_path, hub, monkeypatch, capsys):
    import httpx
    import huggingface_hub
    from huggingface_hub import constants

    from vitlab.tools.export import main

    args = [f"ckpt_path={pvt_v2_checkpoint[0]}", "--format", "official", "--out", str(tmp_path), "--push", "me/pvt"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1 and "no Hugging Face token: set HF_TOKEN" in capsys.readouterr().err
    assert not hub.requests and (tmp_path / "model.safetensors").is_file()  # nothing sent, the files kept

    monkeypatch.setenv("HF_TOKEN", "hf_recorded")

    def unreachable(request):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)

    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(unreachable)))
    huggingface_hub.close_session()
    with pytest.raises(SystemExit):
        main(args)
    assert "cannot reach the Hugging Face Hub (ConnectError" in capsys.readouterr().err

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit):
        main(args)
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
