"""Packaging beyond what pyproject.toml can declare: the configs at the repository's top level
(``conf/``, the source) ship inside the package as ``vitlab/conf`` so an installed vitlab finds them
(``vitlab.runtime.resources.conf_dir``). Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

setup(
    packages=[*find_packages("src"), "vitlab.conf"],
    package_dir={"": "src", "vitlab.conf": "conf"},
    package_data={"vitlab.tools": ["paper_tables/*.yaml"], "vitlab.runtime": ["weights.yaml"], "vitlab.tools.recipes": ["*.yaml"],
                  "vitlab.conf": ["*.yaml", "**/*.yaml"]},
)
