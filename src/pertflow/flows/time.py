"""Time samplers: where on the path each training sample is taken. No weights.

A time sampler is a callable ``sampler(n, device) -> (n,) tensor in [0, 1]`` drawn from torch's
global generator (which the training engine seeds and checkpoints). :data:`TIME_SAMPLERS` maps
the names a config may use to them.
"""

from __future__ import annotations

from typing import Callable

import torch

TimeSampler = Callable[[int, torch.device], torch.Tensor]


def uniform_time(n: int, device: torch.device) -> torch.Tensor:
    """t ~ U(0, 1), the flow-matching default."""
    return torch.rand(n, device=device)


def logit_normal_time(n: int, device: torch.device) -> torch.Tensor:
    """t = sigmoid(z), z ~ N(0, 1): more samples mid-path, where the velocity is hardest to learn
    (Esser et al. 2024, "Scaling rectified flow transformers")."""
    return torch.sigmoid(torch.randn(n, device=device))


TIME_SAMPLERS: dict[str, TimeSampler] = {"uniform": uniform_time, "logit-normal": logit_normal_time}
