"""The MMD domain adapter (SPEC 2.6): carry a trained model to another lab's, line's or
chemistry's cells by a per-gene transport of their expression (a shift, an affine map or a
quantile map), learnt on control cells only.

:mod:`pertflow.adapt.transports` are the maps (fit, apply, save, load); :mod:`pertflow.adapt.shift`
is the MMD fit with best-state keeping on held-out cells (tensors only);
:mod:`pertflow.adapt.adapter` reads the control cells, fits the transport with the model's control
embedding and saves or loads the adapter folder.
"""

from pertflow.adapt.adapter import ADAPTER_FILES, ADAPTER_FORMAT_VERSION, Adapter, learn_adapter
from pertflow.adapt.shift import AdapterConfig, TransportFit, fit_shift, fit_transport
from pertflow.adapt.transports import TRANSPORTS, AffineTransport, QuantileTransport, ShiftTransport, Transport

__all__ = ["ADAPTER_FILES", "ADAPTER_FORMAT_VERSION", "Adapter", "AdapterConfig", "AffineTransport", "QuantileTransport",
           "ShiftTransport", "TRANSPORTS", "Transport", "TransportFit", "fit_shift", "fit_transport", "learn_adapter"]
