"""The MMD domain adapter (SPEC 2.6): carry a trained model to another lab's, line's or
chemistry's cells by a per-gene shift of their expression, learnt on control cells only.

:mod:`pertflow.adapt.shift` is the mathematics (tensors only); :mod:`pertflow.adapt.adapter`
reads the control cells, learns the shift with the model's control embedding and saves or loads
the adapter folder.
"""

from pertflow.adapt.adapter import ADAPTER_FILES, Adapter, learn_adapter
from pertflow.adapt.shift import AdapterConfig, fit_shift

__all__ = ["ADAPTER_FILES", "Adapter", "AdapterConfig", "fit_shift", "learn_adapter"]
