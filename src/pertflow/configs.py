"""One config channel: frozen dataclasses, filled from YAML files and ``--set key=value`` flags.

A run's configuration has three sections: ``model`` (the model family's frozen dataclass: the
architecture and the loss), ``train`` (:class:`pertflow.train.TrainConfig`) and ``predict``
(:class:`pertflow.models.config.PredictConfig`: how cells are generated). A YAML file holds them::

    model: {d_model: 64, n_layers: 2}
    train: {max_steps: 2000, lr: 3.0e-4}
    predict: {ode_steps: 4}

and ``--set model.d_model=32 --set train.max_steps=10`` overrides single keys. Unknown keys
fail with the list of valid ones; values are checked against the field types.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from pertflow.errors import InputError
from pertflow.io import read_yaml, yaml_problem

T = TypeVar("T")
SECTIONS = ("model", "train", "predict")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check (and gently convert) a value against a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except InputError as err:
                errors.append(str(err))
        raise InputError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise InputError(f"{where} must be one of {list(args)}, got {value!r}.")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where} must be a list, got {value!r}.")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value] if inner is not Any else list(value)
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise InputError(f"{where} must be true or false, got {value!r}.")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise InputError(f"{where} must be an integer, got {value!r}.")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where} must be a number, got {value!r}.")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise InputError(f"{where} must be a string, got {value!r}.")
        return value
    return value


def require_at_least_one(config: Any, *names: str) -> None:
    """Raise ValueError naming the first of the config's integer fields ``names`` below 1 (a
    config's ``__post_init__`` check of its counts: steps, sizes, layers)."""
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")


def build(cls: type[T], values: Mapping[str, Any] | None = None, section: str = "") -> T:
    """An instance of the frozen dataclass ``cls`` from a mapping; unknown keys are refused."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    prefix = f"{section}." if section else ""
    if unknown:
        raise InputError(
            f"unknown {section or cls.__name__} config keys {[prefix + k for k in unknown]}; "
            f"valid keys are {sorted(fields)}."
        )
    hints = typing.get_type_hints(cls)
    checked = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**checked)
    except (TypeError, ValueError) as err:
        raise InputError(f"invalid {section or cls.__name__} config: {err}") from err


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-ready dict (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def parse_sets(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["model.d_model=64", "train.lr=1e-3"]`` -> ``{"model": {"d_model": 64}, "train": {"lr": 0.001}}``.

    Values are read as YAML scalars (``64`` is an int, ``1e-3`` a float, ``true`` a bool,
    ``[1, 2]`` a list).
    """
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for item in items or []:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in SECTIONS or not name:
            raise InputError(f"--set {item}: write SECTION.KEY=VALUE with SECTION one of {list(SECTIONS)}, e.g. "
                             "train.max_steps=100.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise InputError(f"--set {item}: the value is not valid YAML ({yaml_problem(err, where=False)}); quote it "
                             "or fix it.") from err
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
        out[section][name] = value
    return out


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_sections(path: str | Path | None, sets: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Merge a YAML config file and ``--set`` overrides into ``{"model": {...}, "train": {...}, "predict": {...}}``."""
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    if path is not None:
        path = Path(path)
        data = read_yaml(path, "config file") or {}
        if not isinstance(data, dict):
            raise InputError(f"{path} must hold a mapping with sections {list(SECTIONS)}.")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise InputError(f"{path}: unknown sections {unknown}; a config has the sections {list(SECTIONS)}.")
        for section in SECTIONS:
            values = data.get(section) or {}
            if not isinstance(values, dict):
                raise InputError(f"{path}: the section '{section}' must be a mapping (key: value lines), got "
                                 f"{values!r}.")
            for k, v in values.items():
                if isinstance(v, str) and _looks_numeric(v):
                    v = float(v)
                merged[section][k] = v
    for section, values in parse_sets(sets).items():
        merged[section].update(values)
    return merged
