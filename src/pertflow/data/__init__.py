"""Things that know AnnData: the data spec, loading, vocabulary, pairing, splits, split views,
synthetic data."""

from __future__ import annotations

import importlib
from typing import Any

#: where each public name lives: imported on first use (the command line reads
#: :data:`~pertflow.data.kinds.SPLIT_KINDS` without importing anndata)
_HOMES = {"DataSpec": "spec", "PerturbationData": "dataset", "Split": "splits", "SplitView": "view",
          "detect_spec": "spec", "make_split": "splits", "make_synthetic": "synthetic"}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'pertflow.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pertflow.data.{_HOMES[name]}"), name)
