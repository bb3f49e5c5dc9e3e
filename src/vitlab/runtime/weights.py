"""``backbone.pretrained``: a file, a vitlab run directory, or ``imagenet`` (the variant's official release).

    backbone.pretrained=imagenet              # the official ImageNet-1K weights of this architecture
    backbone.pretrained=outputs/imagenet_cls/pale_t/pale_in1k   # our own ImageNet run (best, else last)
    backbone.pretrained=path/to/file.pth      # any checkpoint vitlab.runtime.checkpoints reads
    backbone.pretrained=null                  # from scratch

``imagenet`` looks the backbone config's ``variant`` (the ``conf/backbone/<name>`` it is) up in
``weights.yaml`` (next to this file), timm's way; the strict load checks the file against the
built backbone, so an architecture ablation never loads another architecture's weights. The file
lives in the weights folder (``paths.weights_dir``: env ``VITLAB_WEIGHTS``, else
``<project>/weights``); when it is missing it is downloaded with a progress bar and checked
against the published sha256 (torch.hub's downloader). Offline (no network, or ``VITLAB_OFFLINE=1``)
the error names the URL and the path to put the file at. Families without a release (Pale) name
what to give instead.
"""
from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import torch
import yaml

from vitlab.data.packing import sha256
from vitlab.errors import VitlabUserError


log = logging.getLogger("vitlab")

REGISTRY_FILE = Path(__file__).with_name("weights.yaml")
# torchvision / torch.hub file names carry the first hex digits of the file's sha256
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.[a-z]+$")
DOWNLOAD_TIMEOUT_S = 60
# Keys of a backbone config that say which weights to load, not constructor arguments
# (``variant``: the conf/backbone/<name> it was composed from, the key of its release).
WEIGHT_KEYS = ("pretrained", "pretrained_ema", "variant")


class WeightsUnavailable(VitlabUserError, RuntimeError):
    """``backbone.pretrained`` cannot be resolved to a file: the message says what to do."""


@dataclass(frozen=True)
class Release:
    name: str                       # the backbone config it belongs to
    file: str | None = None
    url: str | None = None
    sha256: str | None = None
    manual: bool = False
    source: str | None = None
    note: str | None = None         # families without a release: what to give instead


def weights_dir() -> Path:
    """The weights folder outside a run (a run passes its ``paths.weights_dir``): the same rule as that
    setting's default: ``VITLAB_WEIGHTS``, else ``<PROJECT_ROOT or the working dir>/weights``."""
    env = os.environ.get("VITLAB_WEIGHTS")
    return Path(env) if env else Path(os.environ.get("PROJECT_ROOT", os.getcwd())) / "weights"


def registry() -> dict[str, Release]:
    raw = yaml.safe_load(REGISTRY_FILE.read_text())
    out = {}
    for name, entry in raw.items():
        entry = dict(entry)
        if "same" in entry:
            entry = dict(raw[entry["same"]])
        if "timm" in entry:
            entry = _from_timm(entry["timm"])
        out[name] = Release(name=name, **entry)
    return out


def _from_timm(tag: str) -> dict:
    """File, URL and hash of a timm pretrained tag from timm's table (no network): the original
    ``.pth`` where timm lists one (torchvision's carry their hash prefix), else timm's Hugging Face copy."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(tag)
    if cfg is None:
        raise ValueError(f"{REGISTRY_FILE}: timm has no pretrained tag {tag!r}")
    url = cfg.url if cfg.url and cfg.url.endswith(".pth") else (
        f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors")
    prefix = HASH_IN_NAME.search(url)
    suffix = ".pth" if url.endswith(".pth") else ".safetensors"
    return {"file": f"{tag}{suffix}", "url": url, "sha256": prefix.group(1) if prefix else None,
            "source": f"timm pretrained tag {tag}"}


# ---- which release a backbone config names -----------------------------------------------
def release_for(cfg: dict) -> Release:
    """The registry entry of the config's ``variant`` (the ``conf/backbone/<name>`` it was composed
    from), as timm keys its pretrained tags by model name. Nothing is built here: an architecture
    ablation of a variant (``backbone.depths=...``) gets that variant's file and the strict load
    (``vitlab.runtime.checkpoints.load_pretrained``) refuses it, naming the keys and shapes."""
    variant = cfg.get("variant")
    releases = registry()
    if variant not in releases:
        what = (f"backbone.variant={variant} has no official ImageNet release" if variant else
                "the backbone config names no variant (backbone.variant: the conf/backbone/<name> it is)")
        raise WeightsUnavailable(
            f"backbone.pretrained=imagenet: {what}; releases: {', '.join(sorted(releases))} "
            f"(src/vitlab/runtime/weights.yaml). Pre-train it first and pass backbone.pretrained=<its run directory "
            f"or checkpoint> (backbone.pretrained_ema=true for its EMA weights), or backbone.pretrained=null to "
            f"train from scratch")
    return releases[variant]


# ---- the file ---------------------------------------------------------------------------
def _offline_message(release: Release, path: Path, why: str) -> str:
    how = "open it in a browser, download the file" if release.manual else "download it"
    return (f"backbone.pretrained=imagenet needs {release.name}'s ImageNet weights ({release.source}) and {why}: "
            f"{how} from {release.url} and place it at {path} (or point VITLAB_WEIGHTS / paths.weights_dir at the "
            f"folder that holds {release.file}); backbone.pretrained=null trains from scratch")


def fetch(release: Release, folder: Path | None = None) -> Path:
    """``release``'s file in ``folder`` (the weights folder): used when present (and its published hash
    matches), else downloaded (progress bar, sha256 checked, written atomically)."""
    if release.url is None:
        raise WeightsUnavailable(
            f"backbone.pretrained=imagenet: {release.name} has no official ImageNet weights ({release.note}); "
            f"pass backbone.pretrained=<that run's directory or checkpoint> (backbone.pretrained_ema=true for its "
            f"EMA weights), or backbone.pretrained=null to train from scratch")
    path = (folder or weights_dir()) / release.file
    if path.is_file():
        if release.sha256 and not sha256(path).startswith(release.sha256):
            raise WeightsUnavailable(f"{path}: its sha256 is not the published {release.sha256} ({release.url}); "
                                     f"delete it and run again to download it anew")
        return path
    if release.manual:
        raise WeightsUnavailable(_offline_message(release, path, "it is a web-page link vitlab cannot fetch"))
    if os.environ.get("VITLAB_OFFLINE", "0") not in ("", "0"):
        raise WeightsUnavailable(_offline_message(release, path, "VITLAB_OFFLINE is set"))
    path.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock  # a torch dependency: DDP ranks wait for the first one's download

    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return path
        log.info("downloading %s's ImageNet weights: %s -> %s", release.name, release.url, path)
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torch.hub.download_url_to_file(release.url, str(path), hash_prefix=release.sha256, progress=True)
        except (URLError, OSError) as err:
            raise WeightsUnavailable(_offline_message(release, path, f"the download failed ({err})")) from None
        except RuntimeError as err:  # torch.hub: "invalid hash value (expected ..., got ...)"; nothing is kept
            raise WeightsUnavailable(f"downloaded {release.url} but {err}: not saved to {path}; the registry "
                                     f"(src/vitlab/runtime/weights.yaml) or the file at the URL changed") from None
        finally:
            socket.setdefaulttimeout(old_timeout)
    return path


def from_run_dir(path: Path) -> Path:
    """A vitlab run directory -> its best checkpoint, else its last."""
    for name in ("best.ckpt", "last.ckpt"):
        if (path / "checkpoints" / name).is_file():
            return path / "checkpoints" / name
    raise WeightsUnavailable(f"backbone.pretrained={path}: a directory without checkpoints/best.ckpt or "
                             f"checkpoints/last.ckpt (expected a vitlab run directory or a checkpoint file)")


def resolve(pretrained: str | None, cfg: dict | None = None, folder: Path | None = None) -> Path | None:
    """``backbone.pretrained`` -> the file to load (None: from scratch). ``imagenet``: the release of
    the backbone config ``cfg``'s variant, in ``folder`` (``paths.weights_dir``; default ``weights_dir()``)."""
    if pretrained in (None, "", "null", "none"):
        return None
    if str(pretrained) == "imagenet":
        release = release_for(cfg or {})
        path = fetch(release, folder)
        log.info("backbone.pretrained=imagenet: %s (%s)", path, release.name)
        return path
    path = Path(pretrained)
    return from_run_dir(path) if path.is_dir() else path


def loaded_file(model: torch.nn.Module) -> str | None:
    """The file ``model``'s backbone was initialised from (``vitlab.runtime.build`` records it); None: random."""
    return next((m.pretrained_file for m in model.modules() if getattr(m, "pretrained_file", None)), None)
