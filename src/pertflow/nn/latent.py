"""A Perceiver-IO backbone over per-gene tokens: M latents read the genes, think, and write back.

Dense attention over G gene tokens (scDFM's backbone, :mod:`pertflow.nn.backbone`) costs
O(G^2 d) per cell and layer, and every layer runs its d x d projections and MLP on all B * G
tokens. Here the genes are read once by M << G learnt latent vectors (cross-attention, linear in
G), L AdaLN transformer blocks run on the latents only, and every gene reads the result back once
(Jaegle et al. 2022, "Perceiver IO"). Gene tokens may be narrower than the latents (``d_token``):
a token carries a gene's identity and two values, the latents carry the cell.

The read keeps scDFM's control reference: it is differential, the latents' attention over the
state's genes minus lambda times their attention with keys from the control cell's tokens over
the same genes, values from the state (see :mod:`pertflow.nn.attention`). The control cell's keys
do not depend on the state or the time, so an ODE solver computes them once per sample
(:meth:`LatentFlowBackbone.control_keys`).

Shapes: B cells, G genes, M latents, d latent width, d_t token width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pertflow.nn.attention import AdaLNAttentionBlock, DifferenceOfMaps
from pertflow.nn.checkpointing import run_layer
from pertflow.nn.conditioning import modulate


def _split_heads(x: Tensor, n_heads: int) -> Tensor:
    B, L, d = x.shape
    return x.view(B, L, n_heads, d // n_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    B, H, L, dh = x.shape
    return x.transpose(1, 2).reshape(B, L, H * dh)


class LatentRead(nn.Module):
    """Latents (B, M, d) attend to gene tokens (B, G, d_t), differentially w.r.t. the control cell.

    ``out = sdpa(Q1, K_state, V) - lambda * sdpa(Q2, K_control, V)``, both maps over the same genes
    and values, normalised per head; AdaLN on the condition before the queries, gated residual.
    The attention runs at ``d_cross`` (as Perceiver IO's narrower cross-attention channels): the
    per-gene keys and values are the large tensors of the whole network.
    """

    def __init__(self, d_model: int, d_token: int, n_heads: int, d_cross: int, differential: bool = True) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.differential = differential
        self.norm_latents = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.norm_tokens = nn.LayerNorm(d_token)
        self.q1 = nn.Linear(d_model, d_cross, bias=False)
        self.k1 = nn.Linear(d_token, d_cross, bias=False)
        self.v = nn.Linear(d_token, d_cross, bias=False)
        self.out = nn.Linear(d_cross, d_model, bias=False)
        if differential:
            self.q2 = nn.Linear(d_model, d_cross, bias=False)
            self.k2 = nn.Linear(d_token, d_cross, bias=False)
            self.difference = DifferenceOfMaps(d_cross // n_heads, depth=0)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 3 * d_model))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def control_keys(self, control_tokens: Tensor) -> Tensor | None:
        """(B, H, G, d / H) keys of the control cell's tokens (None without the differential map)."""
        if not self.differential:
            return None
        return _split_heads(self.k2(self.norm_tokens(control_tokens)), self.n_heads)

    def forward(self, latents: Tensor, tokens: Tensor, control_keys: Tensor | None, c: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        h = modulate(self.norm_latents(latents), shift, scale)
        t = self.norm_tokens(tokens)
        v = _split_heads(self.v(t), self.n_heads)
        out = F.scaled_dot_product_attention(_split_heads(self.q1(h), self.n_heads),
                                             _split_heads(self.k1(t), self.n_heads), v)
        if self.differential:
            second = F.scaled_dot_product_attention(_split_heads(self.q2(h), self.n_heads), control_keys, v)
            out = self.difference(out, second)
        return latents + gate.unsqueeze(1) * self.out(_merge_heads(out))


class LatentWrite(nn.Module):
    """Every gene token reads the latents back (cross-attention), then a per-token MLP."""

    def __init__(self, d_model: int, d_token: int, n_heads: int, d_cross: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm_tokens = nn.LayerNorm(d_token)
        self.norm_latents = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_token, d_cross, bias=False)
        self.k = nn.Linear(d_model, d_cross, bias=False)
        self.v = nn.Linear(d_model, d_cross, bias=False)
        self.out = nn.Linear(d_cross, d_token, bias=False)
        hidden = int(d_token * mlp_ratio)
        self.norm_mlp = nn.LayerNorm(d_token)
        self.mlp = nn.Sequential(nn.Linear(d_token, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d_token))

    def forward(self, tokens: Tensor, latents: Tensor) -> Tensor:
        z = self.norm_latents(latents)
        q = _split_heads(self.q(self.norm_tokens(tokens)), self.n_heads)
        out = F.scaled_dot_product_attention(q, _split_heads(self.k(z), self.n_heads),
                                             _split_heads(self.v(z), self.n_heads))
        tokens = tokens + self.out(_merge_heads(out))
        return tokens + self.mlp(self.norm_mlp(tokens))


class LatentFlowBackbone(nn.Module):
    """Read (differential, on the control reference) -> ``n_layers`` AdaLN blocks on the latents -> write.

    Parameters
    ----------
    d_model
        Width of the latents (where attention and the MLPs run).
    d_token
        Width of the gene tokens. The cross-attention between genes and latents runs at
        ``d_model / 2``.
    n_heads, n_layers, n_latents, mlp_ratio
        Heads, latent blocks, latent vectors M, MLP width ratio of the latent blocks.
    differential
        The differential read (True) or a plain one (an ablation).
    """

    def __init__(self, d_model: int, d_token: int, n_heads: int, n_layers: int, n_latents: int = 64,
                 mlp_ratio: float = 4.0, differential: bool = True):
        super().__init__()
        d_cross = max(n_heads, d_model // 2) // n_heads * n_heads
        self.latents = nn.Parameter(torch.randn(n_latents, d_model) * 0.02)
        self.read = LatentRead(d_model, d_token, n_heads, d_cross, differential)
        self.blocks = nn.ModuleList(AdaLNAttentionBlock(d_model, n_heads, i, mlp_ratio, differential=False)
                                    for i in range(n_layers))
        self.write = LatentWrite(d_model, d_token, n_heads, d_cross)
        self.pert_to_tokens = nn.Linear(d_token, d_token)
        self.grad_checkpointing = False  # see pertflow.nn.checkpointing

    def control_keys(self, control_tokens: Tensor) -> Tensor | None:
        """What the read needs of the control cell: computed once per sample by an ODE solver."""
        return self.read.control_keys(control_tokens)

    def forward(self, x: Tensor, control_keys: Tensor | None, pert: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """
        Parameters
        ----------
        x
            (B, G, d_t) gene tokens of the state.
        control_keys
            From :meth:`control_keys` of the control cells' tokens.
        pert
            (B, d_t) perturbation embedding.
        c
            (B, d) condition of the AdaLN blocks (time + perturbation).

        Returns
        -------
        x, pert_tokens
            (B, G, d_t) tokens, and the perturbation tokens (B, G, d_t) for a decoder.
        """
        ckpt = self.grad_checkpointing
        latents = run_layer(self.read, self.latents.unsqueeze(0).expand(x.shape[0], -1, -1), x, control_keys, c,
                            checkpointed=ckpt)
        for block in self.blocks:
            latents = run_layer(block, latents, c, checkpointed=ckpt)
        x = run_layer(self.write, x, latents, checkpointed=ckpt)
        return x, self.pert_to_tokens(pert).unsqueeze(1).expand(-1, x.shape[1], -1)
