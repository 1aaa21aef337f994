"""The gene-space flow backbone (scDFM's), shared by the flow models that work on per-gene tokens.

Shapes: B cells, G genes, d width.

* :class:`ExpressionTokens`: ``fusion(cat[enc_state(x_t), enc_control(control)]) + gene_emb`` (B, G, d),
  and the control cell's own tokens, the reference of the attention blocks;
* :class:`BackboneLayer`: GeneAdaLN -> concat perturbation -> adapter -> DiffPerceiverBlock;
* :class:`GeneFlowBackbone`: L such layers;
* :class:`ContextSummary`: a context's control mean per gene -> one condition vector (1, d).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pertflow.nn.attention import DiffPerceiverBlock
from pertflow.nn.checkpointing import run_layer
from pertflow.nn.conditioning import GeneAdaLN
from pertflow.nn.embeddings import ContinuousValueEncoder


class ExpressionTokens(nn.Module):
    """Per-gene tokens of a state being generated, read beside a control cell.

    Two value encoders, one for the state ``x_t`` and one for the control cell, fused and added
    to the gene embedding (added once, after the fusion).
    """

    def __init__(self, d_model: int, dropout: float = 0.0):
        super().__init__()
        d = d_model
        self.state_encoder = ContinuousValueEncoder(d, dropout)
        self.control_encoder = ContinuousValueEncoder(d, dropout)
        self.fusion = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d))

    def control(self, control: Tensor) -> Tensor:
        """(B, G) control cells -> (B, G, d) their tokens (independent of the state: an ODE solver
        computes them once per sample)."""
        return self.control_encoder(control)

    def forward(self, x_t: Tensor, control_tokens: Tensor, gene_emb: Tensor) -> Tensor:
        """
        Parameters
        ----------
        x_t
            (B, G) state on the genes.
        control_tokens
            (B, G, d) from :meth:`control`.
        gene_emb
            (1, G, d) or (B, G, d) gene embeddings.

        Returns
        -------
        Tensor
            (B, G, d) tokens.
        """
        return self.fusion(torch.cat([self.state_encoder(x_t), control_tokens], dim=-1)) + gene_emb


class ContextSummary(nn.Module):
    """What context the cells are in, as a condition: the context's control mean per gene, each
    gene's value encoded with its gene embedding, mean-pooled over the genes (any subset of them:
    a training step sees a random one), then an MLP to the condition's width. Its last layer starts
    at zero, so a network with it starts as the one without.
    """

    def __init__(self, d_token: int, d_model: int):
        super().__init__()
        self.value_encoder = ContinuousValueEncoder(d_token, dropout=0.0)
        self.per_gene = nn.Sequential(nn.Linear(d_token, d_token), nn.GELU())
        self.out = nn.Sequential(nn.Linear(d_token, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, control_mean: Tensor, gene_emb: Tensor) -> Tensor:
        """(1, G) control mean, (1, G, d_token) gene embeddings -> (1, d_model)."""
        return self.out(self.per_gene(self.value_encoder(control_mean) + gene_emb).mean(dim=1))


class BackboneLayer(nn.Module):
    """GeneAdaLN -> concat perturbation -> adapter -> DiffPerceiverBlock."""

    def __init__(self, d_model: int, n_heads: int, depth: int, mlp_ratio: float, differential: bool):
        super().__init__()
        self.gene_adaln = GeneAdaLN(d_model)
        self.adapter = nn.Sequential(nn.Linear(2 * d_model, d_model), nn.LeakyReLU(), nn.Linear(d_model, d_model),
                                     nn.LeakyReLU())
        self.block = DiffPerceiverBlock(d_model, n_heads, depth, mlp_ratio, differential)

    def forward(self, x: Tensor, gene_emb: Tensor, control_tokens: Tensor, pert_tokens: Tensor, c: Tensor) -> Tensor:
        x = self.gene_adaln(gene_emb, x)
        x = self.adapter(torch.cat([x, pert_tokens], dim=-1))
        return self.block(x, control_tokens, c)


class GeneFlowBackbone(nn.Module):
    """``n_layers`` :class:`BackboneLayer` s over per-gene tokens.

    Parameters
    ----------
    d_model, n_heads, n_layers, mlp_ratio
        Width, attention heads, layers, MLP width ratio.
    differential
        scDFM's differential attention (True) or plain attention (an ablation).
    """

    def __init__(self, d_model: int, n_heads: int, n_layers: int, mlp_ratio: float = 4.0, differential: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(BackboneLayer(d_model, n_heads, i, mlp_ratio, differential)
                                    for i in range(n_layers))
        self.grad_checkpointing = False  # see pertflow.nn.checkpointing

    def forward(self, x: Tensor, gene_emb: Tensor, control_tokens: Tensor, pert: Tensor,
                c: Tensor) -> tuple[Tensor, Tensor]:
        """
        Parameters
        ----------
        x
            (B, G, d) tokens.
        gene_emb
            (1, G, d) or (B, G, d) gene embeddings.
        control_tokens
            (B, G, d) the control cells' tokens.
        pert
            (B, d) perturbation embedding, concatenated to every token.
        c
            (B, d) condition of the AdaLN blocks.

        Returns
        -------
        x, pert_tokens
            (B, G, d) tokens, and the perturbation tokens (B, G, d) the layers read (for a decoder).
        """
        pert_tokens = pert.unsqueeze(1).expand(-1, x.shape[1], -1)
        for layer in self.layers:
            x = run_layer(layer, x, gene_emb, control_tokens, pert_tokens, c, checkpointed=self.grad_checkpointing)
        return x, pert_tokens
