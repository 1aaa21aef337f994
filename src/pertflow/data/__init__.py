"""Things that know AnnData: the data spec, loading, vocabulary, pairing, splits, split views,
synthetic data."""

from pertflow.data.dataset import PerturbationData
from pertflow.data.spec import DataSpec, detect_spec
from pertflow.data.splits import Split, make_split
from pertflow.data.synthetic import make_synthetic
from pertflow.data.view import SplitView

__all__ = ["DataSpec", "PerturbationData", "Split", "SplitView", "detect_spec", "make_split", "make_synthetic"]
