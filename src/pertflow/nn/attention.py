"""Attention blocks of the gene-space flow models, through PyTorch's scaled-dot-product attention.

Differential attention (Ye et al. 2024, "Differential Transformer"), as scDFM uses it: two
softmax attention maps are formed and the second, scaled by a learnt lambda, is subtracted::

    out = (softmax(Q1 K1^T / sqrt(d)) - lambda * softmax(Q2 K2^T / sqrt(d))) V

Subtracting a second map cancels attention that both maps share (common-mode "noise") and
sharpens what is specific to the first. In scDFM's cross step the two maps come from different
cells: ``Q1 K1`` from the noisy perturbed state and ``Q2 K2`` from the control cell, over the same
genes. The update then follows the gene-gene attention of the perturbed state *minus* that of
the control cell: what the perturbation changed in how genes attend to each other, with the
control cell as the stable reference. Because the output is linear in V, it is computed as two
fused SDPA calls, ``sdpa(Q1, K1, V) - lambda * sdpa(Q2, K2, V)``, never materialising the maps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pertflow.nn.conditioning import modulate


def lambda_init(depth: int) -> float:
    """Initial lambda of layer ``depth`` (0-based), as in the Differential Transformer."""
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


class DifferenceOfMaps(nn.Module):
    """The differential step: ``RMSNorm(first - lambda * second) * (1 - lambda_init)`` per head,
    with the learnt ``lambda = exp(q1.k1) - exp(q2.k2) + lambda_init`` of the Differential
    Transformer (re-parametrised so that it starts near ``lambda_init``)."""

    def __init__(self, head_dim: int, depth: int) -> None:
        super().__init__()
        self.lambda_init = lambda_init(depth)
        self.lambda_q1 = nn.Parameter(torch.randn(head_dim) * 0.1)
        self.lambda_k1 = nn.Parameter(torch.randn(head_dim) * 0.1)
        self.lambda_q2 = nn.Parameter(torch.randn(head_dim) * 0.1)
        self.lambda_k2 = nn.Parameter(torch.randn(head_dim) * 0.1)
        self.head_norm = nn.RMSNorm(head_dim, eps=1e-5)

    def lam(self) -> Tensor:
        """The current lambda."""
        return (
            torch.exp((self.lambda_q1 * self.lambda_k1).sum())
            - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
            + self.lambda_init
        )

    def forward(self, first: Tensor, second: Tensor) -> Tensor:
        """(B, H, L, head_dim) outputs of the two maps (same values) -> their normalised difference."""
        return self.head_norm(first - self.lam().to(first.dtype) * second) * (1 - self.lambda_init)


class DifferentialAttention(nn.Module):
    """Multi-head differential attention (see the module docstring).

    Parameters
    ----------
    d_model, n_heads
        Width and heads; ``d_model`` must divide by ``n_heads``.
    depth
        Layer index, sets the initial lambda.
    differential
        False gives plain softmax attention (``Q1 K1`` only), for ablations.
    """

    def __init__(self, d_model: int, n_heads: int, depth: int, differential: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.differential = differential
        self.q1 = nn.Linear(d_model, d_model, bias=False)
        self.k1 = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        if differential:
            self.q2 = nn.Linear(d_model, d_model, bias=False)
            self.k2 = nn.Linear(d_model, d_model, bias=False)
            self.difference = DifferenceOfMaps(self.head_dim, depth)

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, reference: Tensor | None = None) -> Tensor:
        """Attend over the tokens of ``x``.

        Parameters
        ----------
        x
            (B, L, d) tokens; queries, keys and values of the first map, and the values.
        reference
            (B, L, d) tokens of a reference cell over the same L genes, giving the subtracted map;
            None: both maps come from ``x`` (differential self-attention).

        Returns
        -------
        Tensor
            (B, L, d).
        """
        B, L, d = x.shape
        v = self._heads(self.v(x))
        out = F.scaled_dot_product_attention(self._heads(self.q1(x)), self._heads(self.k1(x)), v)
        if self.differential:
            ref = x if reference is None else reference
            if ref.shape != x.shape:
                raise ValueError(f"the reference tokens {tuple(ref.shape)} must match the tokens {tuple(x.shape)}")
            second = F.scaled_dot_product_attention(self._heads(self.q2(ref)), self._heads(self.k2(ref)), v)
            out = self.difference(out, second)
        return self.out(out.transpose(1, 2).reshape(B, L, d))


class AdaLNAttentionBlock(nn.Module):
    """DiT block: AdaLN-modulated (differential) attention and MLP, gated, conditioned on ``c``."""

    def __init__(self, d_model: int, n_heads: int, depth: int, mlp_ratio: float = 4.0,
                 differential: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.attn = DifferentialAttention(d_model, n_heads, depth, differential)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        hidden = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d_model))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 6 * d_model))
        # Zero-initialised modulation: every block starts as the identity (DiT's adaLN-Zero).
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: Tensor, c: Tensor, reference: Tensor | None = None) -> Tensor:
        """(B, L, d) tokens, (B, d) condition, optional (B, L, d) reference -> (B, L, d)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c).chunk(6, dim=-1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a), reference)
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class DiffPerceiverBlock(nn.Module):
    """scDFM's block: differential self-attention, then attention referenced on the control cell."""

    def __init__(self, d_model: int, n_heads: int, depth: int, mlp_ratio: float = 4.0,
                 differential: bool = True) -> None:
        super().__init__()
        self.self_block = AdaLNAttentionBlock(d_model, n_heads, depth, mlp_ratio, differential)
        self.reference_block = AdaLNAttentionBlock(d_model, n_heads, depth, mlp_ratio, differential)

    def forward(self, x: Tensor, control_tokens: Tensor, c: Tensor) -> Tensor:
        """
        Parameters
        ----------
        x
            (B, G, d) tokens of the state being generated.
        control_tokens
            (B, G, d) tokens of the control cells (the stable reference).
        c
            (B, d) condition (time + perturbation).
        """
        x = self.self_block(x, c)
        return self.reference_block(x, c, control_tokens)
