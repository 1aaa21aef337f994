"""Things that know AnnData: the data spec, loading, vocabulary, pairing, splits, synthetic data."""

from pertflow.data.dataset import PerturbationData
from pertflow.data.spec import DataSpec, detect_spec
from pertflow.data.splits import Split, make_split
from pertflow.data.synthetic import make_synthetic
