"""Couplings: how a batch's sources (t = 0) are paired with its targets (t = 1). No weights."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

COUPLINGS = ("independent", "ot")


def ot_permutation(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The permutation of ``x1`` that pairs it with ``x0`` at least total squared distance.

    Minibatch optimal transport with uniform weights is an assignment problem (Tong et al. 2023,
    "Improving and generalizing flow-based generative models with minibatch optimal transport");
    solved exactly with the Hungarian algorithm on the (B, B) cost matrix.

    Parameters
    ----------
    x0, x1
        (B, D) sources and targets.

    Returns
    -------
    torch.Tensor
        (B,) long: ``x1[perm]`` is the target paired with each row of ``x0``.
    """
    if x0.shape != x1.shape:
        raise ValueError(f"sources {tuple(x0.shape)} and targets {tuple(x1.shape)} must have the same shape")
    cost = torch.cdist(x0.detach().float(), x1.detach().float()).pow(2).cpu().numpy()
    _, cols = linear_sum_assignment(cost)
    return torch.as_tensor(cols, dtype=torch.long, device=x1.device)


def couple(x0: torch.Tensor, x1: torch.Tensor, coupling: str) -> torch.Tensor:
    """``x1`` reordered to pair with ``x0`` under ``coupling`` (``independent``: unchanged)."""
    if coupling == "independent":
        return x1
    if coupling == "ot":
        return x1[ot_permutation(x0, x1)]
    raise ValueError(f"unknown coupling '{coupling}'; choose one of {list(COUPLINGS)}")
