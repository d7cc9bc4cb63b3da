"""Training configs: one small file each, ``get_config() -> TrainConfig``; the docstring holds the
exact command and the result it gave."""

import importlib

from unetpp_jax.train import TrainConfig

NAMES = ("unetzoo", "strong", "tiny", "dsb3class")


def get_config(name: str) -> TrainConfig:
    if name not in NAMES:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(NAMES)}")
    return importlib.import_module(f"experiments.configs.{name}").get_config()
