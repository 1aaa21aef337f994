"""Things that know AnnData: the data spec, its detection and the check of the values, loading,
vocabulary, pairing, splits, split views, synthetic data."""

from __future__ import annotations

from pertflow.lazy import lazy_exports

#: where each public name lives: imported on first use (the command line reads
#: :data:`~pertflow.data.kinds.SPLIT_KINDS` without importing anndata)
_HOMES = {"DataSpec": "spec", "PerturbationData": "dataset", "Split": "split_file", "SplitView": "view",
          "detect_spec": "detect", "make_split": "splits", "make_synthetic": "synthetic"}
__all__ = sorted(_HOMES)
__getattr__ = lazy_exports(__name__, _HOMES)
