"""Names of the arrays in a training batch: one home for the keys every model reads.

As scvi-tools' ``REGISTRY_KEYS``: a model reads ``batch[BATCH_KEYS.TARGET]``, never a string
spelled again somewhere else. Per-cell arrays a model asks for beyond expression (a cached
latent, counts) and per-group arrays (a baseline's predicted shift) go into the batch under the
names the model gave them (see :class:`pertflow.data.batches.PairedBatches`).
"""

from __future__ import annotations

from typing import NamedTuple


class _BatchKeys(NamedTuple):
    TARGET: str = "target"  # (B, G) log1p expression of the perturbed cells
    CONTROL: str = "control"  # (B, G) log1p expression of control cells of the same context
    PERT_IDS: str = "pert_ids"  # (B, K) perturbation token ids, padded
    DOSE: str = "dose"  # (B,) each target cell's dose (only with a dose column; 0: none)
    PRIOR_DELTA: str = "prior_delta"  # (B, G) a baseline's predicted shift, where a flow starts (flow models)


BATCH_KEYS = _BatchKeys()
