"""scGPT's output heads: cell-type classifier, adversarial batch discriminator, MVC decoder and the
generator's affine expression decoder. Attribute names are scGPT's (checkpoint compatibility).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pertflow.foundation.scgpt.layers import grad_reverse
from pertflow.nn.decoders import ExprDecoder, ExprPrediction

def _mlp_stack(d_model: int, nlayers: int, activation: type[nn.Module]) -> nn.ModuleList:
    # scGPT's layout: [Linear, act, LayerNorm] * (nlayers - 1), checkpoint names _decoder.0/.2/.3/.5...
    layers = nn.ModuleList()
    for _ in range(nlayers - 1):
        layers.append(nn.Linear(d_model, d_model))
        layers.append(activation())
        layers.append(nn.LayerNorm(d_model))
    return layers


class ClsDecoder(nn.Module):
    """Cell-type classification head on the cell embedding.

    Parameters
    ----------
    d_model
        Width of the cell embedding.
    n_cls
        Number of classes.
    nlayers
        Layers including the output layer.
    activation
        Hidden activation class (scGPT: ReLU).
    """

    def __init__(self, d_model: int, n_cls: int, nlayers: int = 3, activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self._decoder = _mlp_stack(d_model, nlayers, activation)
        self.out_layer = nn.Linear(d_model, n_cls)

    def forward(self, cell_emb: Tensor) -> Tensor:
        """``(B, d)`` -> logits ``(B, n_cls)``."""
        x = cell_emb
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class AdversarialDiscriminator(nn.Module):
    """Batch discriminator on the cell embedding, optionally behind a gradient-reversal layer.

    Parameters
    ----------
    d_model
        Width of the cell embedding.
    n_cls
        Number of batch labels.
    nlayers
        Layers including the output layer.
    activation
        Hidden activation class (scGPT: LeakyReLU).
    reverse_grad
        Put :func:`grad_reverse` (lambda 1) in front, so minimising the discriminator's loss pushes
        the encoder to remove batch information (scGPT's DAB objective).
    """

    def __init__(self, d_model: int, n_cls: int, nlayers: int = 3, activation: type[nn.Module] = nn.LeakyReLU,
                 reverse_grad: bool = False) -> None:
        super().__init__()
        self._decoder = _mlp_stack(d_model, nlayers, activation)
        self.out_layer = nn.Linear(d_model, n_cls)
        self.reverse_grad = reverse_grad

    def forward(self, cell_emb: Tensor) -> Tensor:
        """``(B, d)`` -> logits ``(B, n_cls)``."""
        x = grad_reverse(cell_emb, 1.0) if self.reverse_grad else cell_emb
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class MVCDecoder(nn.Module):
    """Predicts each gene's value from the cell embedding and the gene's embedding (scGPT's GEPC/MVC).

    Parameters
    ----------
    d_gene
        Width of the gene (query) embeddings.
    d_cell
        Width of the cell embedding (``2 * d`` when scGPT concatenates a batch embedding).
    arch_style
        ``"inner product"`` (optionally ``", detach"``: no gradient into the gene embeddings),
        ``"concat query"`` or ``"sum query"``.
    explicit_zero_prob
        Also predict the non-zero probability (inner-product styles only, as in scGPT).

    Notes
    -----
    scGPT parameter names and shapes: inner product -- ``gene2query`` (d_gene, d_gene), ``W``
    (d_cell, d_gene, no bias), ``W_zero_logit`` (d_cell, d_gene); concat query -- ``gene2query``
    (64, d_gene), ``fc1`` (64, d_cell + 64), ``hidden_activation.weight`` (PReLU, (1,)), ``fc2`` (1, 64);
    sum query -- ``gene2query`` (d_gene, d_gene), ``fc1`` (64, d_gene), ``hidden_activation``, ``fc2``.
    """

    def __init__(self, d_gene: int, d_cell: int | None = None, arch_style: str = "inner product",
                 explicit_zero_prob: bool = False) -> None:
        super().__init__()
        d_cell = d_gene if d_cell is None else d_cell
        self.arch_style = arch_style
        self.do_detach = arch_style.endswith("detach")
        self.explicit_zero_prob = explicit_zero_prob
        if arch_style in ("inner product", "inner product, detach"):
            self.gene2query = nn.Linear(d_gene, d_gene)
            self.query_activation = nn.Sigmoid()
            self.W = nn.Linear(d_gene, d_cell, bias=False)
            if explicit_zero_prob:
                self.W_zero_logit = nn.Linear(d_gene, d_cell)
        elif arch_style == "concat query":
            self.gene2query = nn.Linear(d_gene, 64)
            self.query_activation = nn.Sigmoid()
            self.fc1 = nn.Linear(d_cell + 64, 64)
            self.hidden_activation = nn.PReLU()
            self.fc2 = nn.Linear(64, 1)
        elif arch_style == "sum query":
            if d_cell != d_gene:
                raise ValueError("'sum query' needs d_cell == d_gene")
            self.gene2query = nn.Linear(d_gene, d_gene)
            self.query_activation = nn.Sigmoid()
            self.fc1 = nn.Linear(d_gene, 64)
            self.hidden_activation = nn.PReLU()
            self.fc2 = nn.Linear(64, 1)
        else:
            raise ValueError(f"Unknown MVC arch_style {arch_style!r}")
        if explicit_zero_prob and not arch_style.startswith("inner product"):
            raise ValueError("explicit_zero_prob is only available for the inner-product MVC styles")

    def forward(self, cell_emb: Tensor, gene_embs: Tensor) -> ExprPrediction:
        """Predict.

        Parameters
        ----------
        cell_emb
            ``(B, d_cell)``.
        gene_embs
            ``(B, L, d_gene)`` gene-token embeddings (the GeneEncoder output, not the encoder output).

        Returns
        -------
        ExprPrediction
            ``pred`` ``(B, L)``; ``zero_probs`` ``(B, L)`` with ``explicit_zero_prob``.
        """
        if self.do_detach:
            gene_embs = gene_embs.detach()
        query = self.query_activation(self.gene2query(gene_embs))
        if self.arch_style.startswith("inner product"):
            cell = cell_emb.unsqueeze(2)  # (B, d_cell, 1)
            pred = torch.bmm(self.W(query), cell).squeeze(2)
            if not self.explicit_zero_prob:
                return ExprPrediction(pred=pred)
            zero_probs = torch.sigmoid(torch.bmm(self.W_zero_logit(query), cell).squeeze(2))
            return ExprPrediction(pred=pred, zero_probs=zero_probs)
        if self.arch_style == "concat query":
            cell = cell_emb.unsqueeze(1).expand(-1, gene_embs.shape[1], -1)
            hidden = self.hidden_activation(self.fc1(torch.cat([cell, query], dim=2)))
        else:  # sum query
            hidden = self.hidden_activation(self.fc1(cell_emb.unsqueeze(1) + query))
        return ExprPrediction(pred=self.fc2(hidden).squeeze(2))


class AffineExprDecoder(nn.Module):
    """Predicts a perturbed value as ``A * x + b`` with per-token ``A`` and ``b`` (scGPT's generator head).

    Parameters
    ----------
    d_model
        Width of the token features.
    explicit_zero_prob
        The coefficient decoder also predicts the non-zero probability.
    activation
        Optional ``torch.nn`` activation class name (e.g. ``"ReLU"``) applied to A and b.
    adaptive_bias
        Scale ``b`` by each cell's mean over its non-zero input values.

    Notes
    -----
    Parameter names: ``coeff_decoder.fc.{0,2,4}.*`` and ``bias_decoder.fc.{0,2,4}.*`` (each an
    :class:`~pertflow.nn.ExprDecoder`).
    """

    def __init__(self, d_model: int, explicit_zero_prob: bool = False, activation: str | None = None,
                 adaptive_bias: bool = False) -> None:
        super().__init__()
        self.coeff_decoder = ExprDecoder(d_model, explicit_zero_prob=explicit_zero_prob)
        self.bias_decoder = ExprDecoder(d_model, explicit_zero_prob=explicit_zero_prob)
        if activation is not None and not hasattr(nn, activation):
            raise ValueError(f"Unknown torch.nn activation {activation!r}")
        self.activation = getattr(nn, activation)() if activation is not None else None
        self.adaptive_bias = adaptive_bias

    def forward(self, x: Tensor, values: Tensor) -> ExprPrediction:
        """Decode.

        Parameters
        ----------
        x
            ``(B, L, d)`` token features.
        values
            ``(B, L)`` input (control) values ``x`` of the affine map.

        Returns
        -------
        ExprPrediction
            ``pred = A * values + b`` ``(B, L)``; ``zero_probs`` from the coefficient decoder.
        """
        coeff = self.coeff_decoder(x)
        bias = self.bias_decoder(x)
        a, b = coeff.pred, bias.pred
        if self.activation is not None:
            a, b = self.activation(a), self.activation(b)
        if self.adaptive_bias:
            nonzero = (values != 0).sum(dim=1, keepdim=True).clamp(min=1)
            b = b * (values.sum(dim=1, keepdim=True) / nonzero)
        return ExprPrediction(pred=a * values + b, zero_probs=coeff.zero_probs)
