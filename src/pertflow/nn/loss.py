"""The contract every trainable module returns from its loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """A scalar loss to minimise, plus named float metrics for the log.

    Attributes
    ----------
    loss
        0-d tensor with gradient.
    metrics
        Detached values worth logging (loss parts, norms); floats.
    """

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
