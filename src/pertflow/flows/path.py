"""The conditional optimal-transport (CondOT) affine probability path.

Convention used by every flow model of pertflow: t = 0 is the source (noise, or control cells),
t = 1 is data::

    x_t  = (1 - t) * x_0 + t * x_1
    dx_t = x_1 - x_0                 (the velocity that moves x_t along the straight line)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PathSample:
    """A point on the path and its target velocity.

    Attributes
    ----------
    t
        (B,) times in [0, 1].
    x_t
        Points on the path, same shape as the data (B, ...).
    dx_t
        Target velocities, same shape as ``x_t``.
    x_1
        The targets (data) the path leads to, same shape as ``x_t``.
    """

    t: torch.Tensor
    x_t: torch.Tensor
    dx_t: torch.Tensor
    x_1: torch.Tensor


def _broadcast_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class CondOTPath:
    """``x_t = (1 - t) x_0 + t x_1`` with ``x_0`` the source and ``x_1`` data."""

    def sample(self, t: torch.Tensor, x_0: torch.Tensor, x_1: torch.Tensor) -> PathSample:
        """Interpolate between the source ``x_0`` (t = 0) and the data ``x_1`` (t = 1).

        Parameters
        ----------
        t
            (B,) times; broadcast over the trailing dimensions of the data.
        x_0, x_1
            (B, ...) tensors of the same shape.
        """
        if x_0.shape != x_1.shape:
            raise ValueError(f"x_0 {tuple(x_0.shape)} and x_1 {tuple(x_1.shape)} must have the same shape")
        t_b = _broadcast_time(t, x_1)
        return PathSample(t=t, x_t=(1 - t_b) * x_0 + t_b * x_1, dx_t=x_1 - x_0, x_1=x_1)

    @staticmethod
    def target_estimate(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One-step estimate of the data point: ``x1_hat = x_t + (1 - t) * v``, exact on the path."""
        return x_t + (1 - _broadcast_time(t, x_t)) * velocity
