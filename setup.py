"""Packaging beyond what pyproject.toml can declare: ``conf/`` at the repository's top level (the
source Hydra and users see) ships inside the package as ``vitlab/conf``, so an installed vitlab
composes the same configs (``vitlab.runtime.resources.conf_dir``). Everything else is in pyproject.toml.

setuptools treats every directory of package data as a package; the documented way to ship such
directories without "Package would be ignored" warnings is to list them as (namespace) packages,
hence ``find_namespace_packages`` for ``src/vitlab`` (``tools/paper_tables``) and for each config
group under ``conf/``, and one ``package_data`` glob: every package's YAML files."""
from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages("src", include=["vitlab", "vitlab.*"]),
              "vitlab.conf", *(f"vitlab.conf.{group}" for group in find_namespace_packages("conf"))],
    package_dir={"": "src", "vitlab.conf": "conf"},
    package_data={"": ["*.yaml"]},
)
