"""Model names -> classes.

:data:`MODELS` names every model and the module that defines it: a command imports only the
module of the model it needs (and ``pertflow --help`` none). The class declares the same name as
its ``name`` attribute; defining it registers it, and a class whose name :data:`MODELS` does not
hold, or holds for another module, is refused at its definition. A variant of a model (a class
that a value of the model's config selects, under the model's name) is declared
``class X(Base, variant=True)`` and is not registered itself. Adding a model is adding its name
and module to :data:`MODELS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from pertflow.errors import InputError

MODELS: dict[str, str] = {
    "no-change": "pertflow.models.baselines",
    "mean": "pertflow.models.baselines",
    "additive": "pertflow.models.baselines",
    "additive-mean": "pertflow.models.baselines",
    "linear": "pertflow.models.baselines",
    "context-shift": "pertflow.models.baselines",
    "target-effect": "pertflow.models.target_effect",
    "cfm": "pertflow.models.cfm.model",
    "ccfm": "pertflow.models.ccfm.model",
    "latent-shift": "pertflow.models.latent_shift.model",
    "cfmvc": "pertflow.models.cfmvc.model",
    "scgpt-generator": "pertflow.models.scgpt_generator.model",
}
BASELINES = ("no-change", "mean", "additive", "linear", "context-shift")

_REGISTERED: dict[str, type] = {}


def register(cls: type) -> None:
    """Record a model class under its ``name`` (called when a model class is defined)."""
    if MODELS.get(cls.name) != cls.__module__:
        raise TypeError(f"model class {cls.__qualname__} is named '{cls.name}' in {cls.__module__}, but "
                        f"pertflow.models.registry.MODELS says {MODELS.get(cls.name)!r} for that name: add "
                        f"'{cls.name}': '{cls.__module__}' there.")
    other = _REGISTERED.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise TypeError(f"two model classes are named '{cls.name}': {other.__qualname__} and {cls.__qualname__}")
    _REGISTERED[cls.name] = cls


def model_names() -> list[str]:
    """Every model name, sorted (nothing is imported)."""
    return sorted(MODELS)


def model_class(name: str, config: Mapping[str, Any] | None = None) -> type:
    """The class registered under ``name`` (its module imported on first use); with ``config``
    (the ``model`` section, a mapping), the class of the variant that section selects (e.g.
    ``ccfm`` with ``latent_stream: cell``), see
    :meth:`~pertflow.models.base.PerturbationModel.variant_for`."""
    if name not in MODELS:
        import difflib

        close = difflib.get_close_matches(str(name), list(MODELS), n=1, cutoff=0.6)
        hint = f", did you mean '{close[0]}'?" if close else ";"
        raise InputError(f"unknown model '{name}'{hint} models: {model_names()}.")
    if name not in _REGISTERED:
        importlib.import_module(MODELS[name])
    cls = _REGISTERED[name]
    return cls if config is None else cls.variant_for(config)
