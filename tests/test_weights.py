"""backbone.pretrained=imagenet: the registry, the download (against an HTTP server on 127.0.0.1), the
cache, hash checks, the offline message, run directories, and the run summary."""
from __future__ import annotations

import hashlib
import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from support import REPO, run_script
from vitlab.api import available_backbones, backbone_config
from vitlab.runtime import weights
from vitlab.runtime.build import build_backbone
from vitlab.runtime.weights import Release, WeightsUnavailable, fetch


@pytest.fixture
def server(tmp_path):
    """Files under ``<tmp>/served`` at http://127.0.0.1:<port>/; ``requests`` lists the paths asked for."""
    root = tmp_path / "served"
    root.mkdir()
    requests = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def online(monkeypatch):
    monkeypatch.delenv("VITLAB_OFFLINE", raising=False)


def _served_file(root: Path, name: str = "toy.pth") -> tuple[bytes, str]:
    torch.save({"w": torch.arange(10.0)}, root / name)
    data = (root / name).read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def test_download_then_cache_hit(server, tmp_path):
    root, url, requests = server
    data, sha = _served_file(root)
    release = Release(name="toy", file="toy.pth", url=f"{url}/toy.pth", sha256=sha, source="test")
    path = fetch(release, tmp_path / "weights")
    assert path == tmp_path / "weights" / "toy.pth" and path.read_bytes() == data
    assert fetch(release, tmp_path / "weights") == path  # present: no second request
    assert requests == ["/toy.pth"]
    # a published hash prefix (torchvision's file names) is enough
    assert fetch(Release(name="toy", file="toy2.pth", url=f"{url}/toy.pth", sha256=sha[:8]), tmp_path / "w2").is_file()


def test_hash_mismatch_keeps_nothing(server, tmp_path):
    root, url, _ = server
    _served_file(root)
    release = Release(name="toy", file="toy.pth", url=f"{url}/toy.pth", sha256="0" * 64)
    with pytest.raises(WeightsUnavailable, match="invalid hash value.*not saved"):
        fetch(release, tmp_path / "weights")
    assert not (tmp_path / "weights" / "toy.pth").exists()
    (tmp_path / "weights" / "toy.pth").write_bytes(b"a file someone placed by hand")
    with pytest.raises(WeightsUnavailable, match="not the published 0000.*delete it"):
        fetch(release, tmp_path / "weights")


def test_offline_names_the_url_and_the_path(server, tmp_path, monkeypatch):
    root, url, requests = server
    _served_file(root)
    release = Release(name="pvt_v2_b2", file="pvt_v2_b2.pth", url=f"{url}/toy.pth", source="whai362/PVT")
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable) as err:
        fetch(release, tmp_path / "weights")
    assert f"download it from {url}/toy.pth and place it at {tmp_path / 'weights' / 'pvt_v2_b2.pth'}" in str(err.value)
    assert requests == []
    monkeypatch.delenv("VITLAB_OFFLINE")  # no network: a refused connection says the same
    dead = Release(name="pvt_v2_b2", file="pvt_v2_b2.pth", url="http://127.0.0.1:9/pvt_v2_b2.pth")
    with pytest.raises(WeightsUnavailable, match=r"download failed.*download it from http://127.0.0.1:9/pvt_v2_b2.pth "
                                                 r"and place it at .*pvt_v2_b2.pth"):
        fetch(dead, tmp_path / "weights")


def test_releases_without_a_download():
    reg = weights.registry()
    with pytest.raises(WeightsUnavailable, match=r"pale_t has no official ImageNet weights.*experiment=pale_in1k.*"
                                                 r"pretrained_ema=true"):
        fetch(reg["pale_t"])
    with pytest.raises(WeightsUnavailable, match=r"open it in a browser.*drive.google.com.*scalablevit_s.pth"):
        fetch(reg["scalablevit_s"], Path("/nonexistent"))


def test_registry_covers_the_backbone_configs():
    reg = weights.registry()
    assert set(reg) <= set(available_backbones())
    assert set(available_backbones()) - set(reg) == {"pvt_small_wide", "vit_small_p4"}  # ablation-only shapes
    for name, release in reg.items():
        assert release.note or (release.url and release.file), name
        assert release.url is None or release.url.startswith("https://"), name
    assert reg["gpvit_l2_adapter"].url == reg["gpvit_l2"].url
    assert reg["resnet50"].url == "https://download.pytorch.org/models/resnet50-0676ba61.pth"  # timm's table, offline
    assert reg["resnet50"].sha256 == "0676ba61"


@pytest.fixture
def constructions(monkeypatch):
    """How many backbones of each class get built (their ``__init__`` calls)."""
    from vitlab.backbones.pvt import PyramidVisionTransformer

    calls = []
    init = PyramidVisionTransformer.__init__

    def counted(self, *args, **kwargs):
        calls.append(type(self).__name__)
        init(self, *args, **kwargs)

    monkeypatch.setattr(PyramidVisionTransformer, "__init__", counted)
    return calls


def test_imagenet_is_the_variants_release_and_builds_no_other_variant(monkeypatch, constructions):
    """Keyed by the config's variant (timm's way): the backbone being built is the only one built."""
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    for name in ("pvt_v2_b2", "pvt_v2_b2_li", "pvt_small"):
        with pytest.raises(WeightsUnavailable, match=rf"{name}'s ImageNet weights.*{name}.pth"):
            build_backbone({**backbone_config(name), "pretrained": "imagenet"}, dense=True)
    assert constructions == ["PyramidVisionTransformer"] * 3
    ablation = backbone_config("pvt_v2_b2", ["linear_sra=true"])  # still pvt_v2_b2: the strict load decides
    with pytest.raises(WeightsUnavailable, match=r"pvt_v2_b2's ImageNet weights.*pvt_v2_b2.pth"):
        build_backbone({**ablation, "pretrained": "imagenet"})
    for cfg, message in ((backbone_config("pvt_small_wide"), r"backbone.variant=pvt_small_wide has no official"),
                         ({**backbone_config("pvt_tiny"), "variant": None}, r"names no variant")):
        with pytest.raises(WeightsUnavailable, match=message + r".*backbone.pretrained=null"):
            build_backbone({**cfg, "pretrained": "imagenet"})


def _serve_b0(server, tmp_path, monkeypatch):
    """pvt_v2_b0's release: a random PVTv2-B0's weights, served by the test server."""
    root, url, _ = server
    torch.manual_seed(0)
    source = build_backbone({**backbone_config("pvt_v2_b0"), "pretrained": None})
    torch.save({f"backbone.{k}": v for k, v in source.state_dict().items()}, root / "b0.pth")
    registry_file = tmp_path / "weights.yaml"
    registry_file.write_text(yaml.safe_dump({"pvt_v2_b0": {"file": "pvt_v2_b0.pth", "url": f"{url}/b0.pth",
                                                            "sha256": None, "source": "test"}}))
    monkeypatch.setattr(weights, "REGISTRY_FILE", registry_file)
    monkeypatch.setenv("VITLAB_WEIGHTS", str(tmp_path / "weights"))
    return source


def test_imagenet_downloads_and_loads(server, tmp_path, monkeypatch, constructions):
    """End to end: registry -> download from the server -> strict load into the backbone."""
    source = _serve_b0(server, tmp_path, monkeypatch)
    constructions.clear()
    loaded = build_backbone({**backbone_config("pvt_v2_b0"), "pretrained": "imagenet"})
    assert constructions == ["PyramidVisionTransformer"]  # no other variant built to find the release
    assert loaded.pretrained_file == str(tmp_path / "weights" / "pvt_v2_b0.pth")
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_architecture_ablation_is_refused_by_the_strict_load(server, tmp_path, monkeypatch):
    from vitlab.runtime.checkpoints import CheckpointMismatchError

    _serve_b0(server, tmp_path, monkeypatch)
    ablation = backbone_config("pvt_v2_b0", ["mlp_ratios=[4,4,4,4]"])
    with pytest.raises(CheckpointMismatchError, match=r"pvt_v2_b0.pth does not match.*shape mismatches \[.*mlp"):
        build_backbone({**ablation, "pretrained": "imagenet"})


def test_run_directory_means_its_best_then_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(WeightsUnavailable, match="without checkpoints/best.ckpt or checkpoints/last.ckpt"):
        weights.resolve(str(tmp_path))
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").touch()
    assert weights.resolve(str(run)) == run / "checkpoints" / "last.ckpt"
    (run / "checkpoints" / "best.ckpt").touch()
    assert weights.resolve(str(run)) == run / "checkpoints" / "best.ckpt"
    assert weights.resolve(None) is None and weights.resolve("null") is None


def test_dense_tasks_start_from_imagenet_unless_smoke_or_demo():
    from hydra import compose, initialize_config_dir

    dense = sorted(p.stem for p in (REPO / "conf" / "task").glob("*.yaml") if p.stem != "imagenet_cls")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for task in dense:
            assert compose("train", overrides=[f"task={task}"]).backbone.pretrained == "imagenet", task
            assert compose("train", overrides=[f"task={task}", "debug=smoke"]).backbone.pretrained is None, task
        for demo in ("demo_coco", "demo_ade20k"):
            assert compose("train", overrides=[f"experiment={demo}"]).backbone.pretrained is None
        assert compose("train", overrides=["task=imagenet_cls"]).backbone.pretrained is None


def test_dense_run_summary_names_the_imagenet_file(tmp_path, data_dir):
    """A real run (paths.weights_dir -> VITLAB_WEIGHTS for the run, the file already there, offline)."""
    torch.manual_seed(0)
    backbone = build_backbone({**backbone_config("pvt_v2_b0"), "pretrained": None})
    (tmp_path / "weights").mkdir()
    torch.save({f"backbone.{k}": v for k, v in backbone.state_dict().items()}, tmp_path / "weights" / "pvt_v2_b0.pth")
    run_script("train.py", ["task=ade20k_fpn", "backbone=pvt_v2_b0", "debug=smoke", "data.synthetic=true",
                            "backbone.pretrained=imagenet", f"paths.weights_dir={tmp_path / 'weights'}",
                            f"hydra.run.dir={tmp_path / 'run'}"], data_dir, env={"VITLAB_OFFLINE": "1"})
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pretrained"] == str(tmp_path / "weights" / "pvt_v2_b0.pth")
