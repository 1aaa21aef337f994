"""Source distributions: where a flow starts (t = 0). No weights.

A source is a callable ``source(anchor, generator) -> x_0`` with ``x_0`` of the shape of
``anchor``. The anchor is what the model would predict without the flow (the control cells, or
the control cells shifted by a baseline's prediction); a Gaussian source ignores it. The noise
comes from ``generator`` when one is given (sampling), else from torch's global generator
(training, which the engine seeds and checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(like)
    return torch.randn(like.shape, generator=generator).to(like.device, like.dtype)


@dataclass(frozen=True)
class GaussianSource:
    """x_0 ~ N(0, I): the SPEC's flow from noise."""

    def __call__(self, anchor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return _noise(anchor, generator)


@dataclass(frozen=True)
class AnchoredSource:
    """x_0 = anchor + ``noise_scale`` * N(0, I): the flow transports the anchor's cells."""

    noise_scale: float = 0.1

    def __call__(self, anchor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return anchor + self.noise_scale * _noise(anchor, generator)
