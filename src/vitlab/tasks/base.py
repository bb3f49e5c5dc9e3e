"""What every vitlab LightningModule shares: optimiser, LR policy, checkpoint contents.

A task is built from plain configs and the dataset's description::

    Task(backbone=<backbone config>, schedule=<schedule config>, info=DatasetInfo, **module fields)

Subclasses implement the classmethod ``build_model(backbone, module, info)`` (the whole
network, also used by ``vitlab.tools.zoo`` to count parameters and FLOPs without data) and own
their losses and metrics. The optimiser and schedule come from the ``schedule`` config group
(see ``conf/schedule/``), so the papers' recipes are data, not code.
"""
from __future__ import annotations

import copy
import inspect
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from timm.optim import create_optimizer_v2, get_optimizer_info, param_groups_weight_decay
from timm.utils import ModelEmaV3
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from vitlab.backbones.base import Backbone, ImageClassifier
from vitlab.data.base import DatasetInfo, PredictBatch
from vitlab.runtime.targets import plain


# The per-step LR policies ``configure_optimizers`` builds (timm's schedulers).
LR_POLICIES = ("cosine", "poly", "multistep")
# What mmengine counts as a normalisation layer (its ``norm_decay_mult`` applies to their parameters).
NORM_LAYERS = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that modules inside ``model`` exempt from weight decay
    (backbones' position embeddings and tokens, heads' query tokens, timm models' own lists)."""
    names = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{n}" if prefix else n for n in listed()}
    return names


PARAMWISE_KEYS = ("custom_keys", "norm_decay_mult", "bias_decay_mult")


def paramwise_groups(model: nn.Module, weight_decay: float, lr: float | None, paramwise: dict) -> list[dict]:
    """Optimiser groups as mmengine's ``paramwise_cfg`` builds them (the official dense configs are
    written in it: GPViT's, PVTv2's 3x, and mmdetection's default of decay on everything), so
    recipes copy them as data:

    * ``custom_keys: {substring: {lr_mult, decay_mult}}``: a parameter whose full name contains the
      substring gets ``lr x lr_mult`` and ``weight_decay x decay_mult`` (a missing multiplier is 1);
      the longest matching key wins (ties: alphabetical), and no other rule applies to it.
    * other parameters of normalisation layers: ``weight_decay x norm_decay_mult`` (default 1);
      other biases: ``x bias_decay_mult`` (default 1); everything else: the full weight decay.
      (So ``paramwise: {custom_keys: {}}`` decays every parameter, as mmdetection does by default;
      without ``paramwise`` vitlab exempts 1-D parameters and ``no_weight_decay()`` names: timm's rule.)

    One group per distinct (lr_mult, decay_mult); each records its ``lr_mult``, and its ``lr`` is
    ``lr x lr_mult``, so timm's schedulers move every group in proportion.
    """
    unknown = sorted(set(paramwise) - set(PARAMWISE_KEYS))
    if unknown:
        raise ValueError(f"schedule.optimizer.paramwise: unknown key(s) {unknown}; allowed: {', '.join(PARAMWISE_KEYS)}")
    custom = dict(paramwise.get("custom_keys") or {})
    for key, mults in custom.items():
        bad = sorted(set(mults or {}) - {"lr_mult", "decay_mult"})
        if bad:
            raise ValueError(f"schedule.optimizer.paramwise.custom_keys.{key}: unknown key(s) {bad}; "
                             f"allowed: lr_mult, decay_mult")
    keys = sorted(sorted(custom), key=len, reverse=True)  # mmengine's order: longest first, then alphabetical
    norm_mult, bias_mult = float(paramwise.get("norm_decay_mult", 1.0)), float(paramwise.get("bias_decay_mult", 1.0))
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}

    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = next((k for k in keys if k in name), None)
        if key is not None:
            mults = custom[key] or {}
            lr_mult, decay_mult = float(mults.get("lr_mult", 1.0)), float(mults.get("decay_mult", 1.0))
        elif id(param) in norm_params:
            lr_mult, decay_mult = 1.0, norm_mult
        elif name.endswith(".bias"):
            lr_mult, decay_mult = 1.0, bias_mult
        else:
            lr_mult, decay_mult = 1.0, 1.0
        groups.setdefault((lr_mult, decay_mult), []).append(param)
    out = []
    for (lr_mult, decay_mult), params in groups.items():
        group = {"params": params, "weight_decay": weight_decay * decay_mult, "lr_mult": lr_mult}
        if lr is not None:
            group["lr"] = lr * lr_mult
        out.append(group)
    return sorted(out, key=lambda g: g["lr_mult"] != 1.0)  # group 0 (the logged train/lr) runs at the base lr


def kernel_options(opt_name: str, kernels: str) -> dict:
    """``fused=True`` when ``kernels`` is "fused" and torch's class behind timm's ``opt_name`` has a fused
    implementation (AdamW, Adam, SGD, ...), else {} (timm's default: the multi-tensor ``foreach`` kernels)."""
    if kernels not in ("fused", "foreach"):
        raise ValueError(f"optimizer kernels {kernels!r}: expected fused or foreach")
    opt_class = get_optimizer_info(opt_name.lower().split("_")[-1]).opt_class
    takes_fused = isinstance(opt_class, type) and "fused" in inspect.signature(opt_class.__init__).parameters
    return {"fused": True} if kernels == "fused" and takes_fused else {}


class VitlabTask(L.LightningModule):
    #: training inputs all of one size (cuDNN's autotuner pays off: ``callbacks.fast_paths.cudnn_benchmark=auto``)
    fixed_input_size = False
    #: "fused" (set by ``vitlab.runtime.callbacks.FastPaths`` on CUDA) or "foreach"
    optimizer_kernels = "foreach"

    def __init__(self, backbone: dict, schedule: dict, info: DatasetInfo | dict, compile: bool | str = False):
        super().__init__()
        self.backbone_cfg = plain(backbone)
        self.schedule = plain(schedule)
        self.info = DatasetInfo.from_dict(info)
        # module.compile: true (inductor) or a torch.compile backend name; see configure_model
        self.compile_backend = None if compile is False else "inductor" if compile is True else compile

    def save_plain_hyperparameters(self, ignore: list[str] = ()) -> None:
        """Lightning's ``save_hyperparameters`` for the subclass's constructor, as plain containers
        (the dataset description as a dict) so that checkpoints load with ``weights_only=True``."""
        self.save_hyperparameters(ignore=list(ignore), frame=inspect.currentframe().f_back)
        for key in list(self.hparams):
            self.hparams[key] = plain(self.hparams[key])
        # What Lightning logs to the loggers: the module's own fields. The backbone and schedule reach
        # them as top-level keys and the whole run config (vitlab.runtime.run), so "backbone" stays its name.
        self._hparams_initial = copy.deepcopy(
            type(self._hparams)({k: v for k, v in self._hparams.items() if k not in ("backbone", "schedule", "info")}))

    def configure_model(self) -> None:
        """``module.compile``: the network's backbone part is compiled in place (``nn.Module.compile``),
        so state-dict keys, checkpoints and ``backbone.pretrained`` stay those of the eager model:
        each classifier (backbone + head; the EMA copy's too), or each dense model's backbone. Only
        that part: the detectors' and heads' per-image Python control flow (lists of boxes and masks)
        would break the graph every step for little gain. Lightning calls this hook before fit,
        validate, test and predict; compiling twice changes nothing."""
        if not self.compile_backend:
            return
        compiled: list[str] = []
        for name, module in self.named_modules():
            inside = any(name.startswith(f"{outer}.") for outer in compiled)
            if isinstance(module, (ImageClassifier, Backbone)) and not inside:
                module.compile(backend=self.compile_backend)
                compiled.append(name)

    # ---- EMA (module.ema_decay) --------------------------------------------------------
    def init_ema(self, decay: float | None) -> None:
        """``module.ema_decay``: timm's ``ModelEmaV3`` copy of ``self.model`` (checkpoint keys
        ``ema.module.*``, which ``backbone.pretrained_ema`` reads), updated once per optimiser step
        (``optimizer_step``) and used for validation, testing and prediction (``eval_model``).
        Not Lightning's ``WeightAveraging`` callback: it keeps the average in the callback's state and
        swaps it into ``model`` to validate, so checkpoints would change layout."""
        self.ema = None
        if decay:
            if not 0 < decay < 1:
                raise ValueError(f"module.ema_decay={decay}: expected a number in (0, 1), e.g. 0.99996, or null")
            self.ema = ModelEmaV3(self.model, decay=decay)
            self.ema.requires_grad_(False)

    @property
    def eval_model(self) -> nn.Module:
        """The network validation, testing and prediction run: the EMA copy when there is one."""
        return self.ema.module if getattr(self, "ema", None) is not None else self.model

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning calls this once per optimiser step, not for the micro-batches that
        ``trainer.accumulate_grad_batches`` accumulates: the EMA moves once per step, as in timm's
        train loop (per micro-batch, decay d would act as d^k)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if getattr(self, "ema", None) is not None:
            self.ema.update(self.model)

    @classmethod
    def build_model(cls, backbone: dict, module: dict, info: DatasetInfo) -> nn.Module:
        """The task's whole network from the backbone config, the task's ``module:`` fields and the
        dataset's description (no data needed: the zoo counts models with it)."""
        raise NotImplementedError

    @property
    def flops_input_size(self) -> tuple[int, int]:
        """The input size FLOPs are counted at: what the network sees at evaluation."""
        return tuple(self.info.input_size)

    # ---- optimisation ---------------------------------------------------------------
    def global_batch_size(self) -> int:
        trainer = self.trainer
        per_device = trainer.datamodule.batch_size if trainer.datamodule is not None else 1
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    def scaled_lr(self) -> float:
        opt = self.schedule["optimizer"]
        base = self.schedule.get("base_batch_size")
        if not self.schedule.get("scale_lr", True) or not base:
            return opt["lr"]
        return opt["lr"] * self.global_batch_size() / base  # linear scaling rule (Goyal et al.)

    def param_groups(self, weight_decay: float, lr: float | None = None) -> list[dict]:
        """timm's weight-decay groups: no decay for 1-D parameters (norms, biases) and for the names
        the modules list in ``no_weight_decay()`` (position embeddings, tokens); with
        ``schedule.optimizer.paramwise``, per-parameter multipliers on top (``paramwise_groups``)."""
        paramwise = self.schedule["optimizer"].get("paramwise")
        if paramwise:
            return paramwise_groups(self.model, weight_decay, lr, paramwise)
        return param_groups_weight_decay(self.model, weight_decay, no_weight_decay_list=no_weight_decay_names(self.model))

    def configure_optimizers(self):
        opt = self.schedule["optimizer"]
        extra = {k: tuple(v) if isinstance(v, list) else v for k, v in opt.items()  # null: the optimiser's default
                 if k not in ("name", "lr", "weight_decay", "paramwise") and v is not None}
        weight_decay, lr, name = opt.get("weight_decay", 0.0), self.scaled_lr(), opt.get("name", "adamw")
        extra = {**kernel_options(name, self.optimizer_kernels), **extra}  # the schedule's own fused/foreach wins
        optimizer = create_optimizer_v2(
            self.param_groups(weight_decay, lr), opt=name, lr=lr, weight_decay=weight_decay, **extra,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self._scheduler(optimizer), "interval": "step"}}

    def _scheduler(self, optimizer):
        policy = dict(self.schedule["lr_policy"])
        total = int(self.trainer.estimated_stepping_batches)
        # Lightning builds (and starts iterating) the training loader to estimate the steps, before it
        # restores a checkpoint's loop state; dropping that loader makes the fit loop build it again
        # after the restore, with the saved position in the epoch (exact mid-epoch resume).
        if hasattr(self.trainer, "fit_loop"):
            self.trainer.fit_loop._combined_loader = None
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1)) if self.schedule.get("epochs") else 1
        warmup = int(policy.get("warmup_iters") or round(policy.get("warmup_epochs", 0) * steps_per_epoch))
        common = dict(
            warmup_t=min(warmup, max(total - 1, 0)),
            warmup_lr_init=policy.get("warmup_lr", 1e-6),
            t_in_epochs=False,  # every schedule is stepped per iteration
            warmup_prefix=False,  # warm-up is part of the timeline (DeiT, mmdet, mmseg), not added before it
        )
        name = policy["name"]
        if name == "cosine":
            return CosineLRScheduler(optimizer, t_initial=total, lr_min=policy.get("min_lr", 0.0), **common)
        if name == "poly":
            return PolyLRScheduler(
                optimizer, t_initial=total, power=policy.get("power", 1.0), lr_min=policy.get("min_lr", 0.0), **common
            )
        if name == "multistep":
            milestones = [int(m * steps_per_epoch) for m in policy["milestones"]]
            return MultiStepLRScheduler(optimizer, decay_t=milestones, decay_rate=policy.get("gamma", 0.1), **common)
        raise ValueError(f"schedule.lr_policy.name={name!r}: expected one of {', '.join(LR_POLICIES)}")

    def lr_scheduler_step(self, scheduler, metric=None) -> None:
        scheduler.step_update(num_updates=self.global_step)  # timm schedulers are step-indexed

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = self.schedule.get("clip_grad")
        self.clip_gradients(optimizer, gradient_clip_val=clip or gradient_clip_val, gradient_clip_algorithm="norm")

    # ---- shared by the tasks ----------------------------------------------------------
    def log_lr(self, batch_size: int | None = None) -> None:
        """``train/lr``: the first group's learning rate, as a device tensor filled in place. Logged as a
        Python number, Lightning would copy it to the GPU with a blocking copy, which waits for the GPU."""
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("train/lr", torch.full((), lr, device=self.device), batch_size=batch_size)

    def log_skipped(self, skipped: torch.Tensor) -> None:
        """``data/skipped_corrupt``: the files the loaders skipped (``data.skip_corrupt``) this epoch, over
        all processes. Logged every step as the tensor it is: testing its value (``.item()``) would make
        each training step wait for the GPU."""
        self.log("data/skipped_corrupt", skipped.float(), on_step=False, on_epoch=True, reduce_fx="sum",
                 sync_dist=True, batch_size=1)

    def log_images(self, tag: str, images: list[np.ndarray]) -> None:
        """H x W x 3 uint8 figures (``vitlab.tasks.visualize``) -> W&B, MLflow, TensorBoard
        (``vitlab.runtime.loggers.log_images``) or, with none of them, PNGs under ``<run dir>/predictions/epoch_XXX/``."""
        from vitlab.runtime.loggers import log_images

        trainer = self.trainer
        if not images or not trainer.is_global_zero or trainer.sanity_checking:
            return
        logged = [log_images(logger, tag, images, self.global_step) for logger in self.loggers]
        if any(logged):
            return
        out = Path(trainer.default_root_dir) / "predictions" / f"epoch_{self.current_epoch:03d}"
        out.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            Image.fromarray(im).save(out / f"{tag.replace('/', '_')}_{i}.png")

    def log_table(self, tag: str, columns: list[str], rows: list[list]) -> None:
        """A table (e.g. per-class results) for W&B, MLflow and TensorBoard (``vitlab.runtime.loggers.log_table``);
        the CSV logger's runs have it in summary.json."""
        from vitlab.runtime.loggers import log_table

        trainer = self.trainer
        if not rows or not trainer.is_global_zero or trainer.sanity_checking:
            return
        for logger in self.loggers:
            log_table(logger, tag, columns, rows, self.global_step)

    def extra_summary(self) -> dict:
        """Per-class results of the last validation for summary.json's ``extra`` (by class name)."""
        return {}

    def predict_step(self, batch: PredictBatch, batch_idx: int) -> list[dict]:
        """``predict.py``: one JSON-ready record per image, plus ``figure`` (H x W x 3 uint8, drawn by
        ``vitlab.tasks.visualize``) and optionally ``label_map`` (H x W class ids), which are written as PNGs."""
        raise NotImplementedError(f"{type(self).__name__} has no prediction for image files")

    def test_step(self, batch, batch_idx):  # testing = validating on the test loader
        return self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    # ---- checkpoints: plain hyper-parameters + RNG, so runs resume exactly -------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["hyper_parameters"] = plain(dict(checkpoint.get("hyper_parameters", {})))
        checkpoint["vitlab_rng"] = {
            "python": list(random.getstate()[1]),
            "numpy": [int(v) for v in np.random.get_state()[1]],
            "numpy_tail": list(np.random.get_state()[2:]),  # position, has_gauss, cached_gaussian
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Restore RNG as early as Lightning allows: it builds the training iterator (whose
        # first batches draw augmentations) before on_train_start, so a resumed run then draws
        # the same augmentations, mixup and drop-path masks as an uninterrupted one.
        rng = checkpoint.get("vitlab_rng")
        if rng:
            random.setstate((3, tuple(rng["python"]), None))
            np.random.set_state(("MT19937", np.array(rng["numpy"], dtype=np.uint32), *rng["numpy_tail"]))
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
