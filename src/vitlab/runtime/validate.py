"""Config values checked before anything is built: the key, the value and what is allowed.

Hydra checks the structure (unknown keys, missing groups); the values it cannot know about
are checked here for the run-level groups (data, schedule, trainer, the run's own keys).
Architecture fields are checked by each backbone's constructor, heads' by theirs; those
errors name ``backbone.<field>`` / ``module.head.<field>`` the same way.
"""
from __future__ import annotations

from numbers import Number
from typing import Any

from omegaconf import DictConfig, OmegaConf

# the allowed values are their owners' (the code that acts on them)
from vitlab.data.base import VERIFY_MODES
from vitlab.errors import VitlabUserError
from vitlab.tasks.base import LR_POLICIES
from vitlab.tasks.segmentation import TEST_MODES


class ConfigValueError(VitlabUserError, ValueError):
    """A config value of the wrong type or out of range; the message names the key."""


def _int(minimum: int | None = None, optional: bool = False):
    def check(value):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer{f' >= {minimum}' if minimum is not None else ''}"
        if minimum is not None and value < minimum:
            return f"expected an integer >= {minimum}"
        return None

    return check


def _number(minimum: float | None = None, strict: bool = False, optional: bool = False):
    def check(value):
        if value is None and optional:
            return None
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        if isinstance(value, bool) or not isinstance(value, Number):
            return f"expected a number{bound}"
        if minimum is not None and (value <= minimum if strict else value < minimum):
            return f"expected a number{bound}"
        return None

    return check


def _bool(value):
    return None if isinstance(value, bool) else "expected true or false"


def _choice(*allowed):
    def check(value):
        return None if value in allowed else f"expected one of {', '.join(map(str, allowed))}"

    return check


def _fraction(value):
    if isinstance(value, bool) or not isinstance(value, Number) or not 0 <= value <= 1:
        return "expected a number between 0 and 1"
    return None


def _compile(value):
    if isinstance(value, bool):
        return None
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if value in backends:
        return None
    return f"expected true, false or a torch.compile backend ({', '.join(backends)})"


def _auto_augment(value):
    """timm's policy strings (create_transform's dispatch): rand-..., augmix-..., else AutoAugment's
    original / originalr / v0 / v0r / 3a. timm answers a malformed one with a bare assert."""
    if value is None:
        return None
    expected = "expected null or a timm augmentation string: rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0 or 3a"
    if not isinstance(value, str):
        return expected
    from timm.data import auto_augment as aa

    build = (aa.rand_augment_transform if value.startswith("rand") else
             aa.augment_and_mix_transform if value.startswith("augmix") else aa.auto_augment_transform)
    try:
        build(value, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except (AssertionError, ValueError, KeyError, IndexError) as error:
        return f"{expected} ({error})" if str(error) else expected
    return None


# key (as the user types it) -> check; keys absent from a config are skipped.
RULES: dict[str, Any] = {
    "seed": _int(0),
    "resume": _choice("auto", "never"),
    "requeue_lock_wait_s": _number(0),
    "callbacks.last_checkpoint.max_requeues": _int(0, optional=True),
    "data.batch_size": _int(1),
    "data.val_batch_size": _int(1),
    "data.num_workers": _int(0),
    "data.read_threads": _int(0),
    "data.shuffle_window": _int(1),
    "data.synthetic": _bool,
    "data.smoke": _bool,
    "data.skip_corrupt": _bool,
    "data.verify": _choice(*VERIFY_MODES),
    "data.auto_augment": _auto_augment,
    "data.img_size": _int(1),
    "data.max_size": _int(1),
    "data.flip_prob": _fraction,
    "data.hflip": _fraction,
    "data.reprob": _fraction,
    "data.crop_pct": _number(0, strict=True),
    "data.color_jitter": _number(0, optional=True),
    "data.cat_max_ratio": _number(0, strict=True),
    "schedule.epochs": _int(1, optional=True),
    "schedule.max_steps": _int(-1),
    "schedule.base_batch_size": _int(1, optional=True),
    "schedule.scale_lr": _bool,
    "schedule.clip_grad": _number(0, strict=True, optional=True),
    "schedule.checkpoint_every_n_steps": _int(1, optional=True),
    "schedule.optimizer.lr": _number(0, strict=True),
    "schedule.optimizer.weight_decay": _number(0),
    "schedule.optimizer.eps": _number(0, strict=True, optional=True),
    "schedule.lr_policy.name": _choice(*LR_POLICIES),
    "schedule.lr_policy.warmup_epochs": _number(0, optional=True),
    "schedule.lr_policy.warmup_iters": _int(0, optional=True),
    "schedule.lr_policy.warmup_lr": _number(0, optional=True),
    "schedule.lr_policy.min_lr": _number(0, optional=True),
    "schedule.lr_policy.gamma": _number(0, strict=True, optional=True),
    "schedule.lr_policy.power": _number(0, strict=True, optional=True),
    "module.mixup": _number(0, optional=True),
    "module.cutmix": _number(0, optional=True),
    "module.label_smoothing": _fraction,
    "module.aux_weight": _number(0),
    "module.test_mode": _choice(*TEST_MODES),
    "module.compile": _compile,
    "trainer.num_nodes": _int(1),
    "trainer.accumulate_grad_batches": _int(1),
    "trainer.check_val_every_n_epoch": _int(1, optional=True),
}


def _get(cfg: dict, key: str):
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return KeyError
        node = node[part]
    return node


def check_run_config(cfg: DictConfig | dict) -> None:
    """Raise ``ConfigValueError`` listing every value that breaks a rule, before anything is built."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    problems = []
    for key, rule in RULES.items():
        value = _get(plain, key)
        if value is KeyError:
            continue
        problem = rule(value)
        if problem:
            problems.append(f"{key}={value!r}: {problem}")
    milestones = _get(plain, "schedule.lr_policy.milestones")
    if milestones is not KeyError and milestones is not None and (
            not isinstance(milestones, list) or any(_int(0)(m) for m in milestones)):
        problems.append(f"schedule.lr_policy.milestones={milestones!r}: expected a list of epochs (integers >= 0)")
    if problems:
        raise ConfigValueError("invalid config values:\n  " + "\n  ".join(problems))
