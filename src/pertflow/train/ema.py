"""An exponential moving average of a network's weights, the usual way to read a flow or diffusion
network after training: the averaged weights smooth out the noise of the last updates, which is
what limits how precisely a velocity field learns a mean shift."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class ExponentialMovingAverage:
    """``shadow = d * shadow + (1 - d) * weights`` after every optimizer step.

    ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that the average is not
    dominated by the initial weights early in a run. Floating-point tensors are averaged, others
    (integer buffers) copied.
    """

    def __init__(self, network: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in network.state_dict().items()}

    @torch.no_grad()
    def update(self, network: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, value in network.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[name].lerp_(value.detach(), 1.0 - d)
            else:
                self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def applied(self, network: torch.nn.Module) -> Iterator[None]:
        """The averaged weights in ``network`` for the duration of the block, then its own again."""
        own = {k: v.detach().clone() for k, v in network.state_dict().items()}
        network.load_state_dict(self.shadow)
        try:
            yield
        finally:
            network.load_state_dict(own)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.shadow.items()}

    def load(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        for name, value in tensors.items():
            self.shadow[name].copy_(value)
        self.updates = updates
