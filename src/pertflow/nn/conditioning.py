"""Conditioning layers of the flow models: time embedding and adaptive layer norms (DiT style)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN modulation ``x * (1 + scale) + shift`` with (B, d) parameters broadcast over tokens.

    Parameters
    ----------
    x
        (B, L, d) normalised tokens.
    shift, scale
        (B, d).
    """
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features -> MLP -> (B, d).

    The sinusoid uses ``t * 1000`` so that the frequencies (up to 1/10000) resolve the unit
    interval as they resolve DiT's integer diffusion steps.
    """

    def __init__(self, d_model: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def sinusoid(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.freq_dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        """(B,) times -> (B, d)."""
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


class GeneAdaLN(nn.Module):
    """Per-gene adaptive layer norm: each gene's own embedding sets its shift, scale and gate.

    ``x + gate * (LayerNorm(x) * scale + shift)`` with ``(shift, gate, scale)`` a linear function
    of the gene embedding, so that the same value means different things for different genes.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 3 * d_model))

    def forward(self, gene_emb: Tensor, x: Tensor) -> Tensor:
        """
        Parameters
        ----------
        gene_emb
            (B, G, d) or (G, d) gene embeddings.
        x
            (B, G, d) tokens.
        """
        shift, gate, scale = self.modulation(gene_emb).chunk(3, dim=-1)
        return x + gate * (self.norm(x) * scale + shift)
