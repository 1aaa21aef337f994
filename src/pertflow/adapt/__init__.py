"""The MMD domain adapter (SPEC 2.6): carry a trained model to another lab's, line's or
chemistry's cells by a per-gene transport of their expression (a shift, an affine map or a
quantile map), learnt on control cells only.

:mod:`pertflow.adapt.transports` are the maps (fit, apply, save, load); :mod:`pertflow.adapt.shift`
is the MMD fit with best-state keeping on held-out cells (tensors only);
:mod:`pertflow.adapt.adapter` reads the control cells, fits the transport with the model's control
embedding and saves or loads the adapter folder.
"""

from __future__ import annotations

from pertflow.lazy import lazy_exports

#: where each public name lives: imported on first use, so that the command line reads
#: :class:`AdapterConfig` (:mod:`pertflow.adapt.config`) without importing torch
_HOMES = {
    "ADAPTER_FILES": "adapter", "ADAPTER_FORMAT_VERSION": "adapter", "Adapter": "adapter", "learn_adapter": "adapter",
    "context_folders": "adapter",
    "AdapterConfig": "config", "TransportFit": "shift", "fit_shift": "shift", "fit_transport": "shift",
    "TRANSPORTS": "transports", "AffineTransport": "transports", "QuantileTransport": "transports",
    "ShiftTransport": "transports", "Transport": "transports",
}
__all__ = sorted(_HOMES)
__getattr__ = lazy_exports(__name__, _HOMES)
