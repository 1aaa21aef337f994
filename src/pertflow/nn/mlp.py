"""The one builder of plain multilayer perceptrons (the networks of CFM-VC's VAE and flow trunk,
latent-shift's predictors and its decoder's non-linear part)."""

from __future__ import annotations

from torch import nn


def mlp(d_in: int, hidden: int, n_layers: int, d_out: int | None = None, *, layer_norm: bool = False,
        dropout: float | None = None, xavier: bool = False) -> nn.Sequential:
    """``n_layers`` hidden blocks ``Linear -> [LayerNorm] -> SiLU -> [Dropout]`` of width ``hidden``,
    then, with ``d_out``, a last ``Linear`` to ``d_out`` that starts at zero (a network added to
    something, a residual or a correction, then starts by adding nothing).

    ``dropout``: a Dropout module in every block (even at 0: the layers' positions, and so a saved
    network's parameter names, do not depend on its value); None: none. ``xavier``: the hidden
    layers' weights Xavier-uniform and their biases zero (PyTorch's default otherwise).
    """
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(n_layers):
        linear = nn.Linear(width, hidden)
        if xavier:
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if layer_norm:
            layers.append(nn.LayerNorm(hidden))
        layers.append(nn.SiLU())
        if dropout is not None:
            layers.append(nn.Dropout(dropout))
        width = hidden
    if d_out is not None:
        last = nn.Linear(width, d_out)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
    return nn.Sequential(*layers)
