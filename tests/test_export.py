"""vitlab.tools.export: checkpoints of real runs to ONNX (run by onnxruntime) and TorchScript, against PyTorch."""
from __future__ import annotations

import json

import pytest
import torch

from support import TINY_PVT

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True)


@pytest.fixture
def classifier_ckpt(smoke_sweep):
    """The first job of conftest's smoke sweep: the tiny PVTv2 trained on 10 generated classes."""
    return smoke_sweep / "0" / "checkpoints" / "last.ckpt"


def independent_reference(ckpt, part: str, images: torch.Tensor) -> torch.Tensor:
    """The trained classifier rebuilt through the public API and its weights, not through vitlab.tools.export."""
    import vitlab

    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    overrides = json.loads((ckpt.parents[1] / "summary.json").read_text())["overrides"]
    model = vitlab.create_model("pvt_v2_b0", num_classes=10,
                                overrides=[o.removeprefix("backbone.") for o in overrides if o.startswith("backbone.")])
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    model.eval()
    with torch.no_grad():
        return model(images) if part == "model" else model.backbone(images)[-1]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("part", ["model", "backbone"])
def test_classifier_exports_match_pytorch(classifier_ckpt, tmp_path, fmt, part, capsys):
    from vitlab.tools.export import main

    out = tmp_path / f"model.{fmt}"
    result = main([f"ckpt_path={classifier_ckpt}", "--format", fmt, "--part", part, "--input", "48", "64", "--out", str(out)])
    assert result["ok"] and result["max_abs_diff"] < 1e-4 and out.stat().st_size > 10_000
    assert "max |exported - PyTorch|" in capsys.readouterr().out
    # the exported file on a new input, against the model rebuilt independently from the checkpoint's weights
    images = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    expected = independent_reference(classifier_ckpt, part, images)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[-1])
    else:
        got = torch.jit.load(str(out))(images)
        got = got if part == "model" else got[-1]
    assert got.shape == expected.shape == ((1, 10) if part == "model" else (1, 64, 2, 2))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_export_fails_when_outputs_differ(classifier_ckpt, tmp_path):
    """The check can fail: a tolerance below float32 rounding of the ONNX run is refused."""
    from vitlab.tools.export import main

    with pytest.raises(SystemExit) as exit_info:
        main([f"ckpt_path={classifier_ckpt}", "--format", "onnx", "--input", "48", "64", "--tol", "0",
              "--out", str(tmp_path / "m.onnx")])
    assert exit_info.value.code == 1


def test_segmenter_from_a_smoke_run_exports_to_both_formats(tmp_path, segmentation_run):
    from vitlab.tools.export import export

    for fmt in ("onnx", "torchscript"):
        result = export(str(segmentation_run / "checkpoints" / "last.ckpt"), fmt, input_size=(64, 64),
                        out=str(tmp_path / f"seg.{fmt}"))
        assert result["ok"] and result["outputs"] == [[1, 150, 64, 64]]


def test_detector_exports_to_onnx_with_its_detections(tmp_path):
    """Mask R-CNN (torchvision) through the legacy ONNX exporter: 100 boxes, labels, scores and masks
    from onnxruntime equal PyTorch's. The checkpoint is written from a composed config (score
    threshold 0, so an untrained detector keeps 100 detections to compare; generated COCO's
    categories, so no dataset is read)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from vitlab.runtime.resources import conf_dir
    from vitlab.runtime.run import build_data_and_module
    from vitlab.tools.export import export, main

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", [*TINY_PVT, "task=coco_maskrcnn", "data.synthetic=true", "backbone.pretrained=null",
                                f"paths.output_dir={tmp_path}",
                                "module.head.box_score_thresh=0.0"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # the ${hydra:...} resolver, as in a run
        config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    torch.manual_seed(0)
    module = build_data_and_module(config)[1]
    ckpt = tmp_path / "det.ckpt"
    torch.save({"state_dict": module.state_dict(), "vitlab_config": config,
                "hyper_parameters": {"info": module.hparams["info"]}}, ckpt)  # what a run stores

    result = export(str(ckpt), "onnx", input_size=(96, 128), out=str(tmp_path / "det.onnx"))
    assert result["outputs"] == [[100, 4], [100], [100], [100, 1, 96, 128]]
    assert result["ok"] and result["max_abs_diff"] < 1e-3
    with pytest.raises(SystemExit):  # TorchScript cannot trace a detector: a clear refusal
        main([f"ckpt_path={ckpt}", "--format", "torchscript"])
