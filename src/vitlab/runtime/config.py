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
import copy
import os
from collections.abc import Iterable, Iterator

from omegaconf import DictConfig, OmegaConf

VERSION_BASE = "1.3"


def register_resolvers() -> None:
    """The OmegaConf resolvers vitlab's configs use (``conf/hydra/default.yaml``: the run directory)."""
    from vitlab.runtime.rundir import run_dir, sweep_dir

    for name, fn in (("vitlab.run_dir", run_dir), ("vitlab.sweep_dir", sweep_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# (source class, source path, config path) -> (file stamp, Hydra's ConfigResult of the file as parsed)
_PARSED: dict[tuple[str, str, str], tuple] = {}


@contextlib.contextmanager
def files_parsed_once() -> Iterator[None]:
    """Hydra parses every YAML file again on every compose (its own ``hydra/*`` configs too: ~25 files
    and ~70% of a small compose, in pure-Python YAML): the tools compose hundreds of times (a zoo row,
    a sweep's job each). Inside the block each file is parsed once per process and handed out as a
    deep copy (Hydra edits what it loads); a file of vitlab's ``conf/`` that changed on disk (its
    mtime or size) is parsed again. Hydra has no option for this (its ``CachingConfigRepository``
    lives for one compose), so its two YAML sources' ``load_config`` are wrapped for the block.
    The entry points (``vitlab.runtime.cli``) run inside it too: a ``-m`` sweep composes each job twice."""
    from hydra._internal.sources_registry import SourcesRegistry
    from hydra.core.plugins import Plugins
    from hydra.plugins.config_source import ConfigResult

    # the classes Hydra will use: its first plugin scan executes its modules again (new class objects)
    Plugins.instance()
    FileConfigSource, ImportlibResourcesConfigSource = map(SourcesRegistry.instance().resolve, ("file", "pkg"))

    def cached(original, stamped: bool):
        def load_config(source, config_path: str) -> ConfigResult:
            stamp = None
            if stamped:
                try:
                    stat = os.stat(os.path.join(source.path, source._normalize_file_name(config_path)))
                except OSError:  # not there: Hydra's own error
                    return original(source, config_path)
                stamp = (stat.st_mtime_ns, stat.st_size)
            key = (type(source).__name__, source.path, config_path)
            if key not in _PARSED or _PARSED[key][0] != stamp:
                _PARSED[key] = (stamp, original(source, config_path))
            parsed = _PARSED[key][1]
            return ConfigResult(provider=parsed.provider, path=parsed.path, config=copy.deepcopy(parsed.config),
                                header=dict(parsed.header), is_schema_source=parsed.is_schema_source)
        load_config.parsed_once = True
        return load_config

    if getattr(FileConfigSource.load_config, "parsed_once", False):  # inside such a block already
        yield
        return
    originals = {cls: cls.__dict__["load_config"] for cls in (FileConfigSource, ImportlibResourcesConfigSource)}
    for cls, original in originals.items():
        cls.load_config = cached(original, stamped=cls is FileConfigSource)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.load_config = original


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
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=VERSION_BASE, job_name=job_name), \
                files_parsed_once():
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
