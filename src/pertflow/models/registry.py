"""Model names -> classes. Adding a model is adding a line here, not editing a switch."""

from __future__ import annotations

import importlib

from pertflow.errors import InputError

MODELS = {
    "no-change": "pertflow.models.baselines:NoChange",
    "mean": "pertflow.models.baselines:TrainingMean",
    "additive": "pertflow.models.baselines:Additive",
    "linear": "pertflow.models.baselines:Linear",
    "context-shift": "pertflow.models.baselines:ContextShift",
    "cfm": "pertflow.models.cfm.model:CFM",
    "scgpt-generator": "pertflow.models.scgpt.generator:ScGPTGenerator",
}
BASELINES = ("no-change", "mean", "additive", "linear", "context-shift")


def model_class(name: str) -> type:
    """The class registered under ``name`` (imported on first use)."""
    if name not in MODELS:
        raise InputError(f"unknown model '{name}'; models: {sorted(MODELS)}.")
    module, _, attr = MODELS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
