"""pertflow: predict single-cell perturbation responses and measure them against baselines."""

from pertflow.errors import InputError

__version__ = "0.1.0"
__all__ = ["InputError", "__version__"]
