"""The stage registry of `python -m ezsd_jax.main`: stage name -> the function that runs it.

Importable without flags (tests and tools list the stages from here). Modules are imported
lazily, so a stage's heavy dependencies load only when it runs.
"""
from __future__ import annotations

import importlib

from ezsd_jax.core.cli import UsageError

# stage name -> "module:function(cfg, workdir)"
STAGES = {
    "toy": "ezsd_jax.toy:run",
    "synth_data": "ezsd_jax.data.synthetic_stage:run",
    "train": "ezsd_jax.train:run",
    "eval": "ezsd_jax.evaluate:run",
    "demo_data": "ezsd_jax.demo.stages:demo_data",
    "clip_pretrain": "ezsd_jax.demo.stages:clip_pretrain",
    "renorm": "ezsd_jax.clip.stages:renorm",
    "proposals": "ezsd_jax.clip.stages:proposals",
    "ezsd_train": "ezsd_jax.ezsd.stages:ezsd_train",
    "ezsd_eval": "ezsd_jax.ezsd.stages:ezsd_eval",
    "ablation": "ezsd_jax.demo.stages:ablation",
    "demo_report": "ezsd_jax.demo.stages:demo_report",
}


def resolve_stage(name: str):
    """The function of stage `name`; an unknown name is a UsageError listing the known ones."""
    if name not in STAGES:
        raise UsageError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    module, fn = STAGES[name].split(":")
    return getattr(importlib.import_module(module), fn)
