"""The package list, which pyproject.toml cannot express: every engine* and planner* package found
on disk (namespace packages included, as `[tool.setuptools.packages.find]` would find them), plus
the data packages that `[tool.setuptools.package-dir]` maps onto the top-level search_spaces/ and
profiles/ folders. Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

DATA_PACKAGES = ["planner.data.search_spaces", "planner.data.profiles", "planner.data.profiles.hardware"]

setup(packages=[*find_namespace_packages(include=["engine*", "planner*"]), *DATA_PACKAGES])
