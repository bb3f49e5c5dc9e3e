"""Export a trained model: to ONNX or TorchScript (checked against PyTorch on the same input), or
its weights in the key layout other code reads (the authors' repositories, timm, mmdet / mmseg).

    python -m vitlab.tools.export ckpt_path=outputs/imagenet_cls/RUN/checkpoints/best.ckpt --format onnx
    python -m vitlab.tools.export ckpt_path=FILE --format torchscript --part backbone --input 512 512
    python -m vitlab.tools.export ckpt_path=FILE --format onnx --out model.onnx
    python -m vitlab.tools.export ckpt_path=FILE --format timm --out DIR [--push USER/REPO]

Weight layouts (``--format official|timm|mmdet``) write ``model.pth`` and ``model.safetensors``
(the same tensors) and a Hugging Face model card ``README.md`` into ``--out DIR`` (default:
``<run dir>/export/<format>[-backbone]``):

* ``official``: the authors' release layout (``Backbone.to_official``, the inverse of the
  ``convert_official`` that reads their releases): whai362/PVT (v1 and v2), Yangr116/ScalableViT,
  ChenhongyiYang/GPViT (mmcls ``{"state_dict": ...}``); timm's for the timm baselines. Pale has
  no official code: refused with a message.
* ``timm``: ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``
  loads it: PVTv2 (``pvt_v2_*``) and the timm baselines (ResNet / ResNeXt, Swin, ViT). A whole
  classifier also gets timm's ``config.json`` (``timm.models.save_for_hf``: architecture and
  arguments), so the folder is a timm model: ``timm.create_model('local-dir:DIR', pretrained=True)``,
  or ``'hf-hub:USER/REPO'`` after ``--push``.
* ``mmdet``: the backbone for an mmdetection / mmsegmentation config, ``{"state_dict":
  {"backbone.<key>": ...}}`` with the official key names (vitlab's where a family has none):
  ``init_cfg=dict(type='Pretrained', prefix='backbone.', checkpoint=FILE)`` (mmengine's
  ``PretrainedInit`` keeps the keys under ``prefix`` and strips it) loads it into the backbone.

``--part model`` (default) writes the classifier (backbone + head; classification runs only),
``--part backbone`` the backbone alone; ``mmdet`` is always the backbone. ``--push REPO_ID``
uploads the folder to the Hugging Face Hub (``vitlab.tools.model_card``).

Any vitlab checkpoint is rebuilt from itself (``vitlab.runtime.run.module_from_checkpoint``: its stored
config and the dataset's description, weights loaded with ``weights_only=True``). The weights exported
are those validation ran: the EMA copy when the run kept one (``module.ema_decay``).
``--part model`` (default) exports what the task runs at inference:

* classification: the classifier, images (N, 3, H, W) normalised -> logits (N, classes);
* segmentation: the segmentor, normalised images -> logits (N, classes, H, W) at the input
  size (whole-image mode; sliding-window and TTA stay in Python);
* detection (ONNX only): the torchvision detector, one image (3, H, W) in [0, 1] -> boxes,
  labels, scores (and masks), through the legacy TorchScript-based ONNX exporter as
  torchvision supports it (``--dynamo false``, the default for detectors). TorchScript
  cannot trace a detector (it returns a list of dicts); its backbone exports either way.

``--part backbone`` exports the backbone alone: normalised images -> its feature maps.

The exported model runs once on a random input of ``--input H W`` (default: the input size
the run evaluated at: the classifier's image size, the ADE20K crop, COCO's 800x1333) beside
the PyTorch model: onnxruntime for ONNX, ``torch.jit.load`` for TorchScript. The largest
absolute difference of all outputs is printed and must stay below ``--tol`` x max(1,
largest output); otherwise the command fails and removes nothing, so the file can be
inspected. Shapes are fixed at export (windowed and pale attention pad
to the input size, which tracing freezes): export at the size you deploy.

ONNX uses ``torch.onnx.export(dynamo=True)`` (torch.export) by default: on torch 2.14 the
legacy exporter (``dynamo=False``) mistranslates Pale's attention (differences of 0.2 in
logits), while the dynamo exporter matches PyTorch to 1e-6 for every family. TorchScript
uses ``torch.jit.trace`` (the backbones are not scriptable).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from vitlab.runtime.extras import require


def task_kind(module) -> str:
    from vitlab.tasks.classification import ClassificationTask
    from vitlab.tasks.detection import DetectionTask
    from vitlab.tasks.segmentation import SegmentationTask

    for cls, kind in ((ClassificationTask, "classification"), (SegmentationTask, "segmentation"),
                      (DetectionTask, "detection")):
        if isinstance(module, cls):
            return kind
    raise ValueError(f"cannot export task {type(module).__name__}: classification, segmentation and detection only")


def select_part(module, part: str) -> nn.Module:
    """The network validation ran and selected the checkpoint by (``eval_model``: the EMA copy when
    the run kept one, ``module.ema_decay``), or its backbone."""
    model = module.eval_model
    if part == "model":
        return model.eval()
    from vitlab.backbones.base import Backbone

    backbone = next((m for m in model.modules() if isinstance(m, Backbone)), None)
    if backbone is None:
        raise ValueError(f"--part backbone: {type(model).__name__} holds no vitlab Backbone")
    return backbone.eval()


def example_input(kind: str, part: str, size: tuple[int, int]):
    """A fixed random input: normalised images, or for a detector one image in [0, 1]."""
    gen = torch.Generator().manual_seed(0)
    if kind == "detection" and part == "model":
        return [torch.rand(3, *size, generator=gen)]
    return torch.randn(1, 3, *size, generator=gen)


def leaves(out) -> list[torch.Tensor]:
    """Every tensor of a nested output, in the order the exporters flatten it (dicts by insertion)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for item in out for t in leaves(item)]


def export_onnx(model: nn.Module, example, out: Path, dynamo: bool) -> None:
    kwargs = {"dynamo": dynamo, "input_names": ["images"]}
    if not dynamo:
        kwargs["opset_version"] = 17  # torchvision detection needs >= 11; 17 has LayerNormalization
    torch.onnx.export(model, (example,), str(out), **kwargs)


def run_onnx(path: Path, example) -> list[torch.Tensor]:
    onnxruntime = require("onnxruntime", "export", "--format onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = example[0] if isinstance(example, list) else example
    return [torch.from_numpy(o) for o in session.run(None, {session.get_inputs()[0].name: images.numpy()})]


def export(ckpt_path: str, fmt: str, part: str = "model", input_size=None, out: str | None = None,
           dynamo: bool | None = None, tol: float = 1e-3) -> dict:
    """Export, run both models on the same input, and return the file and the largest difference."""
    from vitlab.runtime.run import module_from_checkpoint

    if fmt == "onnx":  # torch.onnx.export needs onnx (+ onnxscript with dynamo=True): say so before the work
        for name in ("onnx", "onnxscript", "onnxruntime"):
            require(name, "export", "--format onnx")
    module = module_from_checkpoint(ckpt_path, with_data=False)[1].eval()  # the dataset need not exist
    kind = task_kind(module)
    if fmt == "torchscript" and kind == "detection" and part == "model":
        raise ValueError("--format torchscript: detectors cannot be traced (torchvision returns a list of dicts, "
                         "and the backbones are not scriptable); use --format onnx, or --part backbone")
    model = select_part(module, part)
    size = tuple(input_size or module.info.input_size)
    example = example_input(kind, part, size)
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    out_path = Path(out) if out else Path(ckpt_path).with_name(
        Path(ckpt_path).stem + ("" if part == "model" else f".{part}") + suffix)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        reference = leaves(model(example))
        if fmt == "onnx":
            dynamo = (kind != "detection" or part != "model") if dynamo is None else dynamo
            export_onnx(model, example, out_path, dynamo)
            exported = run_onnx(out_path, example)
        else:
            traced = torch.jit.trace(model, (example,), strict=False, check_trace=False)
            traced.save(str(out_path))
            exported = leaves(torch.jit.load(str(out_path))(example))
    if len(exported) != len(reference) or any(a.shape != b.shape for a, b in zip(exported, reference)):
        raise RuntimeError(f"{out_path}: the exported model's outputs {[tuple(t.shape) for t in exported]} differ in "
                           f"shape from PyTorch's {[tuple(t.shape) for t in reference]}")
    diff = max(((a.float() - b.float()).abs().max().item() for a, b in zip(exported, reference) if a.numel()), default=0.0)
    scale = max([1.0] + [b.float().abs().max().item() for b in reference if b.numel()])
    return {"path": str(out_path), "format": fmt, "part": part, "task": kind, "input": list(size),
            "outputs": [list(t.shape) for t in reference], "max_abs_diff": diff, "ok": diff <= tol * scale}


WEIGHT_FORMATS = ("official", "timm", "mmdet")


def weights_in_layout(module, fmt: str, part: str) -> dict[str, torch.Tensor]:
    """The model's (or its backbone's) weights, renamed to ``fmt``'s layout by the backbone's family."""
    backbone = select_part(module, "backbone")
    family = type(backbone)
    if part == "model":
        if task_kind(module) != "classification":
            raise ValueError(f"--format {fmt} --part model: only a classifier goes out whole (the authors' "
                             "classification code and timm hold classifiers); use --part backbone")
        ours = select_part(module, "model").state_dict()  # backbone.* + head.*
    else:
        ours = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    if fmt == "timm":
        return family.to_timm(ours)
    if fmt == "official":
        return family.to_official(ours)
    try:  # mmdet: the official names where the family has them (what the authors' mmdet backbones load)
        keys = family.to_official(ours)
    except ValueError:  # no official code (Pale): vitlab's own names
        keys = {k.removeprefix("backbone."): v for k, v in ours.items()}
    return {k if k.startswith("backbone.") else f"backbone.{k}": v for k, v in keys.items()}


def timm_config(backbone, config: dict, weights: dict[str, torch.Tensor], num_classes: int, out_dir: Path) -> None:
    """timm's ``config.json`` beside the weights (``timm.create_model('hf-hub:USER/REPO')`` after
    ``--push``, ``'local-dir:DIR'`` before), written by timm's ``save_for_hf`` from its own model
    with the weights loaded strictly: a check that the layout is timm's. It rewrites
    ``model.safetensors`` with the same tensors."""
    import timm

    arch, args = backbone.timm_architecture(config)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **args)
    model.load_state_dict(weights, strict=True)
    timm.models.save_for_hf(model, str(out_dir), model_args=args, safe_serialization=True)


def export_weights(ckpt_path: str, fmt: str, part: str = "model", out: str | None = None) -> dict:
    """Write ``model.pth`` + ``model.safetensors`` (+ the model card) in ``fmt``'s layout into ``out``."""
    from safetensors.torch import save_file

    from vitlab.runtime.run import module_from_checkpoint
    from vitlab.tools.model_card import write_model_card

    part = "backbone" if fmt == "mmdet" else part
    _, module, ckpt = module_from_checkpoint(ckpt_path, with_data=False)
    module.eval()
    # own storage, contiguous: safetensors refuses tensors that share memory
    weights = {k: v.detach().contiguous().clone() for k, v in weights_in_layout(module, fmt, part).items()}
    run_dir = Path(ckpt_path).resolve().parent.parent
    out_dir = Path(out) if out else run_dir / "export" / (fmt if part == "model" else f"{fmt}-backbone")
    out_dir.mkdir(parents=True, exist_ok=True)
    family = type(select_part(module, "backbone"))
    container = {"mmdet": "state_dict", "official": family.official_container}.get(fmt)  # as their files hold it
    torch.save({container: weights, "meta": {"vitlab_layout": fmt}} if container else weights, out_dir / "model.pth")
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt", "vitlab_layout": fmt})
    files = ["model.pth", "model.safetensors", "README.md"]
    if fmt == "timm" and part == "model":
        timm_config(select_part(module, "backbone"), ckpt["vitlab_config"]["backbone"], weights,
                    module.info.num_classes, out_dir)
        files.append("config.json")
    result = {"dir": str(out_dir), "files": files, "format": fmt,
              "part": part, "task": task_kind(module), "tensors": len(weights),
              "family": family.__name__, "container": container}
    write_model_card(out_dir, module, ckpt["vitlab_config"], ckpt_path, result)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m vitlab.tools.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_path", help="ckpt_path=FILE: a vitlab checkpoint (or the file itself)")
    parser.add_argument("--format", required=True, choices=["onnx", "torchscript", *WEIGHT_FORMATS])
    parser.add_argument("--part", default="model", choices=["model", "backbone"])
    parser.add_argument("--input", nargs=2, type=int, metavar=("H", "W"), help="input size (default: the run's evaluation size)")
    parser.add_argument("--out", help="output file (default: next to the checkpoint, .onnx or .pt); "
                                      "for official / timm / mmdet: a folder (default: <run dir>/export/<format>)")
    parser.add_argument("--push", metavar="REPO_ID", help="official / timm / mmdet: upload the folder to the "
                                                          "Hugging Face Hub (needs a token: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--dynamo", choices=["true", "false"], help="ONNX exporter (default: true; false for detectors)")
    parser.add_argument("--tol", type=float, default=1e-3, help="largest allowed difference, relative to max(1, |output|)")
    args = parser.parse_args(argv)
    ckpt = args.ckpt_path.removeprefix("ckpt_path=")
    if not Path(ckpt).is_file():
        parser.error(f"ckpt_path={ckpt}: no such checkpoint file")
    if args.format in WEIGHT_FORMATS:
        try:
            result = export_weights(ckpt, args.format, args.part, args.out)
        except ValueError as err:
            parser.error(str(err))
        print(f"wrote {result['dir']}/{{{','.join(result['files'])}}} ({result['format']} layout, {result['family']} "
              f"{result['part']}, {result['tensors']} tensors)")
        if args.push:
            from vitlab.tools.model_card import push

            try:
                result["url"] = push(result["dir"], args.push)
            except RuntimeError as err:
                print(f"--push {args.push}: {err}", file=sys.stderr)
                sys.exit(1)
            print(f"pushed to {result['url']}")
        return result
    if args.push:
        parser.error("--push: only with --format official, timm or mmdet")
    dynamo = None if args.dynamo is None else args.dynamo == "true"
    try:
        result = export(ckpt, args.format, args.part, args.input, args.out, dynamo, args.tol)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {result['path']} ({result['format']}, {result['task']} {result['part']}, input "
          f"{'x'.join(map(str, result['input']))}, outputs {result['outputs']}); "
          f"max |exported - PyTorch| = {result['max_abs_diff']:.3g}")
    if not result["ok"]:
        print(f"FAILED: the difference exceeds --tol {args.tol} x max(1, |output|)", file=sys.stderr)
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
