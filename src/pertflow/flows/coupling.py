"""Couplings: how a batch's sources (t = 0) are paired with its targets (t = 1). No weights.

A coupling is a callable ``coupling(x_0, x_1) -> perm`` that returns, for each row of ``x_0``, the
row of ``x_1`` it is paired with (CellFlow's ``match_fn``, torchcfm's OT plan samplers): a model
indexes its targets, and whatever else belongs to them (a second stream), with it. A model is
given one; :data:`COUPLINGS` maps the names a config may use to them.
"""

from __future__ import annotations

from typing import Callable

import torch
from scipy.optimize import linear_sum_assignment

Coupling = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ot_permutation(x_0: torch.Tensor, x_1: torch.Tensor) -> torch.Tensor:
    """The permutation of ``x_1`` that pairs it with ``x_0`` at least total squared distance.

    Minibatch optimal transport with uniform weights is an assignment problem (Tong et al. 2023,
    "Improving and generalizing flow-based generative models with minibatch optimal transport");
    solved exactly with the Hungarian algorithm on the (B, B) cost matrix.

    Parameters
    ----------
    x_0, x_1
        (B, D) sources and targets.

    Returns
    -------
    torch.Tensor
        (B,) long: ``x_1[perm]`` is the target paired with each row of ``x_0``.
    """
    if x_0.shape != x_1.shape:
        raise ValueError(f"sources {tuple(x_0.shape)} and targets {tuple(x_1.shape)} must have the same shape")
    cost = torch.cdist(x_0.detach().float().flatten(1), x_1.detach().float().flatten(1)).pow(2).cpu().numpy()
    _, cols = linear_sum_assignment(cost)
    return torch.as_tensor(cols, dtype=torch.long, device=x_1.device)


def independent_coupling(x_0: torch.Tensor, x_1: torch.Tensor) -> torch.Tensor:
    """The pairs as drawn: row i with row i."""
    return torch.arange(x_1.shape[0], device=x_1.device)


def ot_coupling(x_0: torch.Tensor, x_1: torch.Tensor) -> torch.Tensor:
    """Minibatch optimal transport: :func:`ot_permutation` (straighter paths)."""
    return ot_permutation(x_0, x_1)


COUPLINGS: dict[str, Coupling] = {"independent": independent_coupling, "ot": ot_coupling}
