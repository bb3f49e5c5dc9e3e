"""Load weights from our own files or a family's official release files.

Accepted files: ``.safetensors``; ``torch.save`` files read with
``weights_only=True`` (checkpoints from the internet are untrusted, so no
pickled code is ever executed); Lightning checkpoints of this project
(``state_dict`` with a ``model.`` prefix); mmcls-style ``{"state_dict": ...}``
and ``{"model": ...}`` wrappers. Our layout is ``backbone.*`` + ``head.*``
(``ImageClassifier``): a file whose keys are all in it is used as it is, anything
else goes through ``type(backbone).convert_official``. Then the backbone's
``adapt_state_dict`` resizes size-dependent tensors (position embeddings, relative
position bias tables) to the model's shapes (logged), and the load is strict.
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from vitlab.errors import VitlabUserError
from vitlab.backbones.base import Backbone, ImageClassifier

log = logging.getLogger(__name__)  # a child of "vitlab": same handlers


class CheckpointMismatchError(VitlabUserError, RuntimeError):
    """A file that is not a (readable, trusted) checkpoint, or one that does not fit the model."""


class CheckpointNotFoundError(VitlabUserError, FileNotFoundError):
    pass


def read_checkpoint(path: str | Path, key: str = "checkpoint") -> dict:
    """A ``torch.save`` file read with ``weights_only=True`` (no pickled code runs), or a
    ``.safetensors`` file; ``key`` names the option the path came from in error messages."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{key}={path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise CheckpointMismatchError(f"{key}={path}: not a readable safetensors file ({err})") from None
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CheckpointMismatchError(
            f"{key}={path}: not a checkpoint: expected a file written by torch.save (a vitlab .ckpt, a state "
            f"dict .pth/.pt) or a .safetensors file"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refuses pickled objects: say so plainly
        raise CheckpointMismatchError(
            f"{key}={path}: refused: the file holds pickled objects other than tensors and plain containers, "
            f"and checkpoints are read weights-only, so no code in them can run ({str(err).splitlines()[0]})"
        ) from None
    except Exception as err:  # not a torch.save file at all (a text file, an image, a truncated write)
        raise CheckpointMismatchError(
            f"{key}={path}: not a checkpoint: expected a file written by torch.save (a vitlab .ckpt, a state "
            f"dict .pth/.pt) or a .safetensors file ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointMismatchError(f"{key}={path}: expected a dict (a checkpoint or a state dict), "
                                      f"got {type(ckpt).__name__}")
    return ckpt


# Where a vitlab Lightning checkpoint keeps the backbone, per task (classification and
# segmentation: ``model.backbone``; detection: torchvision's ``backbone.body`` inside the detector).
_VITLAB_BACKBONE_PREFIXES = ("backbone.", "model.backbone.body.")


def _from_vitlab_checkpoint(sd: dict[str, torch.Tensor], ema: bool, path: Path) -> dict | None:
    """A vitlab checkpoint's weights in our ``backbone.*`` (+ ``head.*`` for classifiers) layout;
    None if ``sd`` is not one. ``ema``: the EMA copy a task keeps (``module.ema_decay``)."""
    root = "ema.module." if ema else "model."
    if not any(k.startswith("model.") for k in sd):
        return None
    if ema and not any(k.startswith(root) for k in sd):
        raise CheckpointMismatchError(f"{path}: has no EMA weights (train with module.ema_decay=...); "
                                      f"use backbone.pretrained_ema=false")
    inner = {k[len(root):]: v for k, v in sd.items() if k.startswith(root)}
    out = {}
    for prefix in _VITLAB_BACKBONE_PREFIXES:
        out.update({"backbone." + k[len(prefix):]: v for k, v in inner.items() if k.startswith(prefix)})
    out.update({k: v for k, v in inner.items() if k.startswith("head.")})  # a classifier's head
    return out or None


def read_state_dict(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """Weights from any file ``load_pretrained`` accepts: a vitlab checkpoint of any task (its
    backbone, and a classifier's head), a state dict, or a family's official release file."""
    path = Path(path)
    sd = read_checkpoint(path, "pretrained")
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointMismatchError(f"{path}: expected a state dict of tensors")
    ours = _from_vitlab_checkpoint(sd, ema, path)
    if ema and ours is None:
        raise CheckpointMismatchError(f"{path}: pretrained_ema=true needs a vitlab checkpoint with EMA weights")
    return ours if ours is not None else sd


def to_our_layout(sd: dict[str, torch.Tensor], backbone: Backbone, expected: set[str], bare: bool) -> dict:
    """``sd`` in our ``backbone.*``/``head.*`` layout: as it is when every key is one of the model's
    (``head.*`` keys too when loading a bare backbone, which drops them), else converted by the family."""
    if all(k in expected or (bare and k.startswith("head.")) for k in sd):
        return sd
    return type(backbone).convert_official(dict(sd))


def _adapt(sd: dict[str, torch.Tensor], backbone: Backbone, source: str) -> dict[str, torch.Tensor]:
    """Resize the ``backbone.*`` tensors whose shape depends on the input size to the model's."""
    part = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    part, messages = backbone.adapt_state_dict(part)
    for message in messages:
        log.info("%s: resized %s", source, message)
    return {**{k: v for k, v in sd.items() if not k.startswith("backbone.")}, **{f"backbone.{k}": v for k, v in part.items()}}


def _keep_classifier_parts(sd: dict[str, torch.Tensor], backbone: Backbone, source: str) -> dict[str, torch.Tensor]:
    """A detector's or segmenter's file has no classifier-only parts (``Backbone.prune_for_dense``,
    e.g. PVT v1's class token): loaded into a whole backbone, those keep the model's initialisation."""
    own = backbone.state_dict()
    missing = {k for k in own if f"backbone.{k}" not in sd}
    if not missing or backbone.pruned_keys or not missing <= backbone.classification_only_keys():
        return sd  # nothing to keep, or a real mismatch that the strict check names
    log.info("%s has no %s (a dense model's weights): they keep their initialisation", source, ", ".join(sorted(missing)))
    return {**sd, **{f"backbone.{k}": own[k] for k in missing}}


def _check_and_load(model: nn.Module, sd: dict, source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(sd) & set(own)
        if sd[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:

        def show(items):
            return ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")

        raise CheckpointMismatchError(
            f"{source} does not match {type(model).__name__} "
            f"({type(getattr(model, 'backbone', model)).__name__}): "
            f"missing keys [{show(missing)}]; unexpected keys [{show(unexpected)}]; "
            f"shape mismatches [{show(shapes)}]"
        )
    model.load_state_dict(sd, strict=True)


def load_pretrained(model: nn.Module, path: str | Path, ema: bool = False) -> nn.Module:
    """Load ``path`` strictly into an ``ImageClassifier`` or a bare ``Backbone`` (head dropped).

    A classifier whose head does not fit the file (another class count, or a file without a head:
    a detection or segmentation checkpoint) gets the backbone only, and the log says so."""
    sd = read_state_dict(path, ema=ema)
    if isinstance(model, ImageClassifier):
        sd = _adapt(to_our_layout(sd, model.backbone, set(model.state_dict()), bare=False), model.backbone, str(path))
        sd = _keep_classifier_parts(sd, model.backbone, str(path))
        own = model.state_dict()
        head = {k: v for k, v in sd.items() if k.startswith("head.")}
        if {k for k in own if k.startswith("head.")} != set(head) or any(
                own[k].shape != v.shape for k, v in head.items()):
            log.info("%s: loading the backbone only; the classification head keeps its initialisation "
                     "(the file's head does not fit %d classes)", path, model.num_classes)
            backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
            _check_and_load(model.backbone, backbone_sd, str(path))
            return model
        _check_and_load(model, sd, str(path))
    elif isinstance(model, Backbone):
        sd = to_our_layout(sd, model, {f"backbone.{k}" for k in [*model.state_dict(), *model.pruned_keys]}, bare=True)
        sd = {k: v for k, v in sd.items() if k[len("backbone."):] not in model.pruned_keys}  # classifier-only parts
        sd = _keep_classifier_parts(_adapt(sd, model, str(path)), model, str(path))
        _check_and_load(model, {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}, str(path))
    else:
        _check_and_load(model, sd, str(path))
    return model


class CheckpointWriteError(VitlabUserError, OSError):
    """A checkpoint could not be written (a full disk, a quota): the previous file is intact."""


def write_atomically(path: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path`` (``os.replace`` is atomic on POSIX): a kill at
    any instant leaves the old file or the new one, never half of one. A failed write (``ENOSPC``,
    quota) removes ``tmp``, leaves ``path`` as it was and raises ``CheckpointWriteError``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(
            f"could not write {path}: {err.strerror or err} (errno {err.errno}); the previous {path.name} is "
            f"intact. Free space in {path.parent} (or point VITLAB_OUTPUT elsewhere) and run the same command "
            f"again to resume") from err
    os.replace(tmp, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that a kill cannot break (``write_atomically``). For the files named in
    ``keep_previous`` (``last.ckpt``), the file being replaced is kept as ``<stem>.prev.ckpt``
    (a hard link made before the new file goes in), so a ``last.ckpt`` damaged after it was written
    (a disk fault, a copy that was cut short) still leaves one good checkpoint to resume from.

    A checkpoint equal to the one this object wrote just before to another file (``best.ckpt`` and
    ``last.ckpt`` at the end of an improving epoch: both written in the same epoch-end hook) is a copy
    of that file (``copy_file``: in the kernel, no pickling, no device-to-host copies) instead of a
    second serialisation. "Equal" is ``checkpoint_fingerprint``'s: the same structure and values, the
    same tensors unmodified since. A copy, not a hard link: a file written in place later (``cp`` over
    ``last.ckpt``, a disk fault) must not change the best checkpoint with it."""

    def __init__(self, keep_previous: tuple[str, ...] = ("last.ckpt",)):
        super().__init__()
        self.keep_previous = tuple(keep_previous)
        self._written: tuple[Path, bytes, tuple] | None = None  # path, fingerprint, file identity

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        if path.name in self.keep_previous and path.is_file():
            prev, link = previous_of(path), path.with_name(path.name + ".link")
            link.unlink(missing_ok=True)
            try:
                os.link(path, link)  # then renamed over prev: prev is always a whole file
            except OSError:  # a filesystem without hard links
                shutil.copyfile(path, link)
            os.replace(link, prev)
        fingerprint = checkpoint_fingerprint(checkpoint)
        twin = self._twin(path, fingerprint)
        if twin is not None:
            write_atomically(path, lambda tmp: copy_file(twin, tmp))
        else:
            write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))
        self._written = (path, fingerprint, _identity(path)) if fingerprint else None

    def _twin(self, path: Path, fingerprint: bytes | None) -> Path | None:
        """The file written last, when it holds this very checkpoint and is still as it was written."""
        if fingerprint is None or self._written is None:
            return None
        written, its_fingerprint, identity = self._written
        if written == path or its_fingerprint != fingerprint:
            return None
        return written if _identity(written) == identity else None


def _identity(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def copy_file(source: Path, target: Path) -> None:
    """``source``'s bytes into ``target`` by ``os.copy_file_range``: the kernel copies (a reflink on
    copy-on-write filesystems such as XFS and btrfs, a server-side copy on NFS 4.2), where
    ``shutil.copyfile`` would use ``sendfile``; ``shutil.copyfile`` where the call is not supported."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        remaining = os.fstat(src.fileno()).st_size
        try:
            while remaining > 0:
                copied = os.copy_file_range(src.fileno(), dst.fileno(), remaining)
                if copied == 0:
                    break
                remaining -= copied
            return
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
    shutil.copyfile(source, target)


SMALL_TENSOR_BYTES = 1 << 16


def checkpoint_fingerprint(checkpoint: dict) -> bytes | None:
    """A digest that is equal for two checkpoints only when they would serialise the same: the
    structure and every value pickled, tensors of up to 64 KB by their bytes (RNG states, step counts:
    often fresh copies), larger ones by identity (storage, offset, shape, strides, dtype, device) and
    version counter (bumped by every in-place change: an optimiser step, an EMA update). None when it
    cannot be taken (an inference-mode tensor has no version counter): the checkpoint is written."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if not isinstance(obj, torch.Tensor):
                return None
            t = obj.detach()
            if t.numel() * t.element_size() <= SMALL_TENSOR_BYTES:
                raw = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                return ("bytes", str(t.dtype), tuple(t.shape), raw)
            return ("tensor", t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
                    str(t.dtype), str(t.device), obj._version)

    buffer = io.BytesIO()
    try:
        Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(checkpoint)
    except Exception:  # noqa: BLE001 - no fingerprint: the checkpoint is written, as always
        return None
    return hashlib.blake2b(buffer.getvalue(), digest_size=32).digest()


def previous_of(path: Path) -> Path:
    """``last.ckpt`` -> ``last.prev.ckpt``: the checkpoint ``path`` replaced (``AtomicCheckpointIO``)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")
