"""The models compared: ours, timm's twin, a reference factory (the authors' code), compiled and checkpointed
variants, and their forward FLOPs.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import vitlab
from vitlab.api import backbone_config
from vitlab.backbones.base import Backbone
from vitlab.runtime.flops import count_gmacs
from vitlab.tools.bench.measure import Result
from vitlab.tools.bench.workloads import Workload


def build_ours(name: str, workload: Workload, device: torch.device, overrides=()) -> nn.Module:
    """``overrides``: relative to the backbone config, and with a task ``module.*`` ones (the zoo's rows' convention)."""
    if workload.task is None:
        return vitlab.create_model(name, overrides=list(overrides)).to(device)
    from vitlab.tools.zoo import build_task_model

    return build_task_model(name, list(overrides), workload.task).to(device)


def _timm_twin(name: str, device: torch.device) -> nn.Module | None:
    import timm

    if not timm.is_model(name):
        return None
    cfg = backbone_config(name)
    kwargs = {k: cfg[k] for k in ("drop_path_rate",) if k in cfg}  # identical regularisation cost
    return timm.create_model(name, pretrained=False, **kwargs).to(device)


@contextlib.contextmanager
def _inert_timm_registry():
    """Authors' model files decorate their factories with timm's ``@register_model``, which
    would replace timm's own models of the same name (``pvt_v2_b0``, ...) in this process."""
    import timm.models
    import timm.models._registry as registry

    holders = [m for m in (timm.models, registry, sys.modules.get("timm.models.registry")) if m is not None]
    saved = [m.register_model for m in holders]
    for m in holders:
        m.register_model = lambda fn: fn
    try:
        yield
    finally:
        for m, fn in zip(holders, saved):
            m.register_model = fn


def load_reference(spec: str) -> Callable[..., nn.Module]:
    """``path/to/file.py:function`` -> the function (the file executed as a module of its own)."""
    path, sep, func = spec.rpartition(":")
    if not sep or not path or not func:
        raise SystemExit(f"--reference {spec!r}: expected FILE.py:FUNCTION, e.g. PVT/classification/pvt_v2.py:pvt_v2_b2")
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"--reference {spec!r}: {file} is not a file")
    spec_ = importlib.util.spec_from_file_location(f"vitlab_bench_reference_{file.stem}", file)
    module = importlib.util.module_from_spec(spec_)
    folder = str(file.parent.resolve())
    sys.path.insert(0, folder)  # the file's own sibling imports
    try:
        with _inert_timm_registry(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # authors' files import timm's deprecated paths
            spec_.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    fn = getattr(module, func, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise SystemExit(f"--reference {spec!r}: {file} has no function {func!r}; it defines: {', '.join(names)}")
    return fn


def build_reference(spec: str, name: str, device: torch.device) -> nn.Module:
    fn = load_reference(spec)
    params = inspect.signature(fn).parameters
    takes = "drop_path_rate" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    cfg = backbone_config(name)
    kwargs = {"drop_path_rate": cfg.drop_path_rate} if takes and "drop_path_rate" in cfg else {}
    return fn(**kwargs).to(device)


def with_grad_checkpointing(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose backbone(s) recompute activations in the backward pass."""
    model = copy.deepcopy(model)
    found = [m for m in model.modules() if isinstance(m, Backbone)]
    if not found:
        raise SystemExit("--grad-checkpointing: the model has no vitlab backbone")
    for m in found:
        m.set_grad_checkpointing(True)
    return model


def forward_gflops(model: nn.Module, workload: Workload) -> float:
    """Forward GFLOPs per image (2 x MACs), counted on a meta-device copy where the model allows it
    (no compute), else on a CPU copy with one image (detectors' post-processing is data-dependent).
    The copy's parameters need no gradient: torch's module tracker (inside the FLOP counter) fails on
    views of such parameters made under no_grad (e.g. the official GPViT's expanded group tokens)."""
    try:
        return 2 * count_gmacs(copy.deepcopy(model).to("meta").requires_grad_(False), workload.input_size)
    except Exception:  # noqa: BLE001 -- whatever fails on meta is counted for real
        pass
    try:
        return 2 * count_gmacs(copy.deepcopy(model).cpu().requires_grad_(False), workload.input_size)
    except Exception as err:  # noqa: BLE001 -- a model the counter cannot run: no FLOP columns
        print(f"(FLOPs not counted for {type(model).__name__}: {type(err).__name__}: {err})", file=sys.stderr)
        return float("nan")


def candidates(name: str, workload: Workload, device: torch.device, compare_timm: bool, reference: str | None,
               compile_backend: str | None, grad_checkpointing: bool, overrides=(),
               count_flops: bool = True) -> list[tuple[Result, nn.Module]]:
    ours = build_ours(name, workload, device, overrides)
    models = [(Result(name, 0.0, "ours"), ours)]
    if compare_timm and workload.task is None:
        twin = _timm_twin(name, device)
        if twin is not None:
            models.append((Result(f"timm:{name}", 0.0, "timm"), twin))
    if reference:
        models.append((Result(f"ref:{reference.rpartition(':')[2]}", 0.0, "ref"), build_reference(reference, name, device)))
    if compile_backend:
        models.append((Result(f"{name} compiled", 0.0, "compiled"), torch.compile(ours, backend=compile_backend)))
    if grad_checkpointing:
        models.append((Result(f"{name} checkpointed", 0.0, "checkpointed"), with_grad_checkpointing(ours)))
    for result, model in models:
        result.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        # compiled / checkpointed: the same network as ours, the same FLOPs
        if count_flops:
            result.gflops_per_image = (forward_gflops(model, workload) if result.kind in ("ours", "timm", "ref")
                                       else models[0][0].gflops_per_image)
    return models
