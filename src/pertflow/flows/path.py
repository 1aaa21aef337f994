"""The conditional optimal-transport (CondOT) affine probability path.

Convention used by every flow model of pertflow: t = 0 is noise, t = 1 is data::

    x_t  = (1 - t) * noise + t * target
    dx_t = target - noise            (the velocity that moves x_t along the straight line)
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
    """

    t: torch.Tensor
    x_t: torch.Tensor
    dx_t: torch.Tensor


class CondOTPath:
    """``x_t = (1 - t) x_0 + t x_1`` with ``x_0`` noise and ``x_1`` data."""

    def sample(self, t: torch.Tensor, noise: torch.Tensor, target: torch.Tensor) -> PathSample:
        """Interpolate between ``noise`` (t=0) and ``target`` (t=1).

        Parameters
        ----------
        t
            (B,) times; broadcast over the trailing dimensions of the data.
        noise, target
            (B, ...) tensors of the same shape.
        """
        if noise.shape != target.shape:
            raise ValueError(f"noise {tuple(noise.shape)} and target {tuple(target.shape)} must have the same shape")
        t_b = t.reshape(-1, *([1] * (target.ndim - 1))).to(target.dtype)
        return PathSample(t=t, x_t=(1 - t_b) * noise + t_b * target, dx_t=target - noise)

    @staticmethod
    def target_estimate(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One-step estimate of the data point: ``x1_hat = x_t + (1 - t) * v``, exact on the path."""
        t_b = t.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        return x_t + (1 - t_b) * velocity
