"""Per-token expression decoders shared by the per-gene models.

Parameter names follow scGPT's ``ExprDecoder`` (``fc.0``, ``fc.2``, ``fc.4``, ``zero_logit.*``) so that
public scGPT checkpoints load by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ExprPrediction:
    """What an :class:`ExprDecoder` returns.

    Attributes
    ----------
    pred
        ``(B, L)`` predicted value per token.
    zero_probs
        ``(B, L)`` sigmoid of the zero head, or ``None`` without ``explicit_zero_prob``. Despite
        scGPT's name it is used, and trained, as the probability that the value is **non-zero**
        (scGPT multiplies predictions by a Bernoulli draw of it); the name is kept for checkpoints.
    """

    pred: Tensor
    zero_probs: Tensor | None = None


def _three_layer_mlp(d_in: int, d_hidden: int) -> nn.Sequential:
    # Indices 0, 2, 4 are the Linear layers; scGPT checkpoints name them fc.0 / fc.2 / fc.4.
    return nn.Sequential(
        nn.Linear(d_in, d_hidden),
        nn.LeakyReLU(),
        nn.Linear(d_hidden, d_hidden),
        nn.LeakyReLU(),
        nn.Linear(d_hidden, 1),
    )


class ExprDecoder(nn.Module):
    """Three-layer MLP from token features to one value per token, with an optional zero head.

    Parameters
    ----------
    d_in
        Input width. scGPT feeds ``d_model`` (or ``2 * d_model`` when the batch-label embedding is
        concatenated); other families may feed any concatenation of features.
    d_hidden
        Hidden width; defaults to ``d_in`` (scGPT uses ``d_model``, which differs from ``d_in`` only
        when features are concatenated, so pass it explicitly there).
    explicit_zero_prob
        Add a second MLP (``zero_logit``) whose sigmoid is the probability that a value is non-zero
        (scGPT's ``zero_probs``; see :class:`ExprPrediction`).

    Notes
    -----
    scGPT parameter names: ``fc.0.weight`` (d_hidden, d_in), ``fc.2.weight`` (d_hidden, d_hidden),
    ``fc.4.weight`` (1, d_hidden) and biases; ``zero_logit.{0,2,4}.*`` likewise.
    """

    def __init__(self, d_in: int, d_hidden: int | None = None, explicit_zero_prob: bool = False) -> None:
        super().__init__()
        d_hidden = d_in if d_hidden is None else d_hidden
        self.fc = _three_layer_mlp(d_in, d_hidden)
        self.explicit_zero_prob = explicit_zero_prob
        if explicit_zero_prob:
            self.zero_logit = _three_layer_mlp(d_in, d_hidden)

    def forward(self, x: Tensor) -> ExprPrediction:
        """Decode.

        Parameters
        ----------
        x
            ``(B, L, d_in)`` token features.

        Returns
        -------
        ExprPrediction
            ``pred`` ``(B, L)`` and, with ``explicit_zero_prob``, ``zero_probs`` ``(B, L)``.
        """
        pred = self.fc(x).squeeze(-1)
        if not self.explicit_zero_prob:
            return ExprPrediction(pred=pred)
        zero_probs = torch.sigmoid(self.zero_logit(x).squeeze(-1))
        return ExprPrediction(pred=pred, zero_probs=zero_probs)
