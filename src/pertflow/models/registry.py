"""Model names -> classes.

A model class declares its name once, as its ``name`` attribute; defining the class registers
it. A variant of a model (a class that a value of the model's config selects, under the model's
name) is declared ``class X(Base, variant=True)`` and is not registered itself. Adding a model is adding its module to :data:`MODEL_MODULES` (imported on first use, so that
a command that needs one model does not import every family).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from pertflow.errors import InputError

MODEL_MODULES = (
    "pertflow.models.baselines",
    "pertflow.models.target_effect",
    "pertflow.models.cfm.model",
    "pertflow.models.ccfm.model",
    "pertflow.models.latent_shift.model",
    "pertflow.models.cfmvc.model",
    "pertflow.models.scgpt.generator",
)
BASELINES = ("no-change", "mean", "additive", "linear", "context-shift")

_REGISTERED: dict[str, type] = {}


def register(cls: type) -> None:
    """Record a model class under its ``name`` (called when a model class is defined)."""
    other = _REGISTERED.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise TypeError(f"two model classes are named '{cls.name}': {other.__qualname__} and {cls.__qualname__}")
    _REGISTERED[cls.name] = cls


def _import_all() -> None:
    for module in MODEL_MODULES:
        importlib.import_module(module)


def model_names() -> list[str]:
    """Every registered model name, sorted."""
    _import_all()
    return sorted(_REGISTERED)


def model_class(name: str, config: Mapping[str, Any] | None = None) -> type:
    """The class registered under ``name``; with ``config`` (the ``model`` section, a mapping),
    the class of the variant that section selects (e.g. ``ccfm`` with ``latent_stream: cell``),
    see :meth:`~pertflow.models.base.PerturbationModel.variant_for`."""
    if name not in _REGISTERED:
        _import_all()
    if name not in _REGISTERED:
        import difflib

        close = difflib.get_close_matches(str(name), list(_REGISTERED), n=1, cutoff=0.6)
        hint = f", did you mean '{close[0]}'?" if close else ";"
        raise InputError(f"unknown model '{name}'{hint} models: {sorted(_REGISTERED)}.")
    cls = _REGISTERED[name]
    return cls if config is None else cls.variant_for(config)
