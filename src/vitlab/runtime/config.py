"""One way to compose vitlab's configs outside ``@hydra.main``: the API, ``backbone.pretrained=imagenet``
and the tools (recipes, zoo, plan, check_data) all go through ``compose`` / ``hydra_app``.

Composition always reads vitlab's own ``conf/`` (``vitlab.runtime.resources.conf_dir``), also when
called from inside a user's Hydra application: that application's Hydra instance is put aside for
the call and given back afterwards, so its config search path (and its configs) never mix with
vitlab's. Nothing happens at import: the resolvers the configs name are registered by
``register_resolvers()``, which ``compose`` and the entry points (``vitlab.runtime.cli``) call.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from omegaconf import DictConfig, OmegaConf

VERSION_BASE = "1.3"


def register_resolvers() -> None:
    """The OmegaConf resolvers vitlab's configs use (``conf/hydra/default.yaml``: the run directory)."""
    from vitlab.runtime.rundir import run_dir, sweep_dir

    for name, fn in (("vitlab.run_dir", run_dir), ("vitlab.sweep_dir", sweep_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


@contextlib.contextmanager
def hydra_app(job_name: str = "app") -> Iterator:
    """A Hydra instance on vitlab's ``conf/`` only (``Hydra``: ``compose_config``, ``config_loader``),
    for the duration of the block. Hydra keeps one global instance; a running application's (the
    user's ``@hydra.main``, or a caller's ``initialize``) is set aside and restored on exit."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.singleton import Singleton

    from vitlab.runtime.resources import conf_dir

    register_resolvers()
    outer = Singleton._instances.pop(GlobalHydra, None)  # Hydra's own initialize_* refuse a second instance
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=VERSION_BASE, job_name=job_name):
            yield GlobalHydra.instance().hydra
    finally:
        Singleton._instances.pop(GlobalHydra, None)
        if outer is not None:
            Singleton._instances[GlobalHydra] = outer


def compose(config_name: str | None = "train", overrides: Iterable[str] = (),
            return_hydra_config: bool = False) -> DictConfig:
    """``conf/<config_name>.yaml`` with Hydra overrides, as the command line composes it
    (``config_name=None``: only what the overrides add, e.g. ``+backbone=pvt_v2_b2``)."""
    from hydra import compose as hydra_compose

    with hydra_app():
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


@contextlib.contextmanager
def hydra_interpolations(cfg: DictConfig) -> Iterator[DictConfig]:
    """``${hydra:...}`` in ``cfg`` (composed with ``return_hydra_config=True``) resolves against its own
    ``hydra`` node inside the block, as in a run; a running application's HydraConfig is restored after."""
    from hydra.core.hydra_config import HydraConfig

    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        yield cfg
    finally:
        HydraConfig.instance().cfg = saved
