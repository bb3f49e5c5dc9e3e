"""Where vitlab's configs live: ``conf/`` of a source checkout, or the installed package's copy.

``conf/`` at the repository's top level is the source; a wheel carries it as the package
data ``vitlab/conf`` (see pyproject.toml), so an installed vitlab composes the same configs.
"""
from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path


@cache
def conf_dir() -> Path:
    checkout = Path(__file__).resolve().parents[3] / "conf"
    if (checkout / "train.yaml").is_file():
        return checkout
    installed = Path(str(resources.files("vitlab") / "conf"))
    if (installed / "train.yaml").is_file():
        return installed
    raise FileNotFoundError(
        f"vitlab's configs are missing: neither {checkout} (source checkout) nor {installed} (installed "
        f"package data) holds train.yaml; reinstall vitlab"
    )
