"""Which step registry a config's steps come from (its kind: a detector / EZSD config, or
an ISAL one): the deviceless AOT check (ezsd_jax.aot.cli) and the full-size CPU smoke
benchmark (benchmarks/smoke_full_size.py) build their steps here. No flags are defined
here, so any tool can import it.
"""
from __future__ import annotations

import importlib

# config kind -> "module:function(cfg, mesh, num_classes) -> [StepSpec]" (imported lazily: the ISAL
# registry lives in isal_jax, which may import ezsd_jax, never the reverse)
REGISTRIES = {"detector": "ezsd_jax.aot.steps:step_specs",
              "isal": "isal_jax.aot_steps:step_specs"}


def config_kind(cfg) -> str:
    """'isal' for an active-learning config (it has config.task), else 'detector'."""
    return "isal" if "task" in cfg else "detector"


def step_specs(cfg, mesh, num_classes: int | None = None) -> list:
    """Every jitted hot step of the config's stages, as StepSpecs (core/aot/program.py)."""
    module, fn = REGISTRIES[config_kind(cfg)].split(":")
    return getattr(importlib.import_module(module), fn)(cfg, mesh, num_classes)
