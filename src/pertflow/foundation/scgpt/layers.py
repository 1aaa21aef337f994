"""scGPT's encoder parts: fused self-attention, the encoder layer and stack, domain-specific batch
norm, gradient reversal. Tensors in, tensors out; attribute names are scGPT's, so that a public
checkpoint maps onto ``state_dict()`` by name (see :mod:`pertflow.foundation.scgpt.checkpoint`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pertflow.foundation.scgpt.config import ScGPTConfig

class ScGPTSelfAttention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection, run by PyTorch's fused SDPA kernel.

    Parameters
    ----------
    d_model
        Width ``d``.
    nhead
        Number of heads ``H``; ``d % H == 0``.
    dropout
        Dropout on the attention weights (training only), as flash-attn's ``attention_dropout``.

    Notes
    -----
    ``in_proj_weight`` (3d, d) stacks the q, k and v projections in that order, and within each block
    the rows of head ``h`` are ``h * d/H : (h + 1) * d/H``. This is both torch's
    ``nn.MultiheadAttention.in_proj_weight`` and flash-attn's ``Wqkv.weight`` (flash-attn reshapes the
    output as ``b s (three h d) -> b s three h d``), so converting between them is a rename.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.d_model = d_model
        self.nhead = nhead
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        # Same initialisation as torch.nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Attend.

        Parameters
        ----------
        x
            ``(B, L, d)``.
        key_padding_mask
            ``(B, L)`` bool, True at padding positions (PyTorch's convention; flash-attn's is the
            opposite). Padding keys receive no attention. Outputs at padding positions are defined
            but meaningless (flash-attn returns the projection bias there instead).

        Returns
        -------
        Tensor
            ``(B, L, d)``.
        """
        batch, length, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # (B, L, 3d) -> (3, B, H, L, d/H): the "b s (three h d)" split of flash-attn.
        qkv = qkv.view(batch, length, 3, self.nhead, self.d_model // self.nhead).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn_mask = None
        if key_padding_mask is not None and bool(key_padding_mask.any()):
            pad = key_padding_mask.bool()
            # A row that is all padding would softmax over nothing (NaN); let it attend freely instead,
            # its outputs are ignored anyway.
            pad = pad & ~pad.all(dim=1, keepdim=True)
            attn_mask = ~pad[:, None, None, :]  # True = may attend
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        context = context.transpose(1, 2).reshape(batch, length, self.d_model)
        return self.out_proj(context)


class ScGPTEncoderLayer(nn.Module):
    """One transformer encoder layer, post-norm or scGPT's pre-norm.

    Parameters
    ----------
    d_model, nhead, d_hid, dropout
        Width, heads, feed-forward width, dropout.
    norm_scheme
        ``"post"``: ``x = norm1(x + attn(x)); x = norm2(x + ffn(x))`` (torch's default layer, and all
        public scGPT checkpoints). ``"pre"``: scGPT's own pre-norm, which normalises the residual
        stream itself: ``x = norm1(x); x = x + attn(x); x = norm2(x); x = x + ffn(x)``. This differs
        from the textbook pre-LN (``x + attn(norm(x))``); it is kept so that scGPT models trained
        with ``pre_norm=True`` compute the same function here.

    Notes
    -----
    Parameter names (scGPT and torch alike): ``self_attn.*``, ``linear1`` (d_hid, d), ``linear2``
    (d, d_hid), ``norm1``, ``norm2``. Activation ReLU, LayerNorm eps 1e-5.
    """

    def __init__(self, d_model: int, nhead: int, d_hid: int, dropout: float, norm_scheme: str = "post") -> None:
        super().__init__()
        if norm_scheme not in ("pre", "post"):
            raise ValueError(f"norm_scheme must be 'pre' or 'post', got {norm_scheme!r}")
        self.norm_scheme = norm_scheme
        self.self_attn = ScGPTSelfAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Apply the layer.

        Parameters
        ----------
        x
            ``(B, L, d)``.
        key_padding_mask
            ``(B, L)`` bool, True at padding.

        Returns
        -------
        Tensor
            ``(B, L, d)``.
        """
        if self.norm_scheme == "pre":
            x = self.norm1(x)
            x = x + self.dropout1(self.self_attn(x, key_padding_mask))
            x = self.norm2(x)
            return x + self.dropout2(self._ffn(x))
        x = self.norm1(x + self.dropout1(self.self_attn(x, key_padding_mask)))
        return self.norm2(x + self.dropout2(self._ffn(x)))


class ScGPTTransformerEncoder(nn.Module):
    """A stack of :class:`ScGPTEncoderLayer` under the name ``layers`` (as ``nn.TransformerEncoder``)."""

    def __init__(self, config: ScGPTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            ScGPTEncoderLayer(config.d_model, config.nhead, config.d_hid, config.dropout, config.norm_scheme)
            for _ in range(config.nlayers)
        )

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``(B, L, d)`` -> ``(B, L, d)``; ``key_padding_mask`` ``(B, L)`` bool, True at padding."""
        for layer in self.layers:
            x = layer(x, key_padding_mask)
        return x


class DomainSpecificBatchNorm1d(nn.Module):
    """One ``BatchNorm1d`` per domain (batch label); scGPT names them ``bns.0``, ``bns.1``, ...

    Parameters
    ----------
    num_features
        Channels ``C`` (``d_model``).
    num_domains
        Number of domains.
    eps, momentum, affine
        BatchNorm settings; scGPT uses eps 6.1e-5 and ``affine`` only for ``"do_affine"``.
    """

    def __init__(self, num_features: int, num_domains: int, eps: float = 6.1e-5, momentum: float = 0.1,
                 affine: bool = False) -> None:
        super().__init__()
        self.num_domains = num_domains
        self.bns = nn.ModuleList(
            nn.BatchNorm1d(num_features, eps=eps, momentum=momentum, affine=affine) for _ in range(num_domains)
        )

    def forward(self, x: Tensor, domain_labels: Tensor) -> Tensor:
        """Normalise each cell with its own domain's statistics.

        Parameters
        ----------
        x
            ``(B, C, L)``.
        domain_labels
            ``(B,)`` long.

        Returns
        -------
        Tensor
            ``(B, C, L)``.

        Notes
        -----
        scGPT applies the BatchNorm of ``domain_labels[0]`` to the whole batch (its loaders build
        single-domain batches). Here each domain present in the batch is normalised separately, which
        is the same on single-domain batches and correct on mixed ones.
        """
        labels = domain_labels.long()
        if int(labels.max()) >= self.num_domains or int(labels.min()) < 0:
            raise ValueError(f"domain label outside [0, {self.num_domains})")
        if bool((labels == labels[0]).all()):
            return self.bns[int(labels[0])](x)
        out = torch.empty_like(x)
        for domain in labels.unique().tolist():
            rows = labels == domain
            out[rows] = self.bns[int(domain)](x[rows])
        return out


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lambd: float) -> Tensor:  # noqa: D102
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad_output.neg() * ctx.lambd, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    """Identity forward; multiplies the gradient by ``-lambd`` backward (domain-adversarial training).

    Parameters
    ----------
    x
        Any tensor.
    lambd
        Scale of the reversed gradient.

    Returns
    -------
    Tensor
        ``x`` (a view).
    """
    return _GradReverse.apply(x, lambd)


class GradReverse(nn.Module):
    """Module form of :func:`grad_reverse`."""

    def __init__(self, lambd: float = 1.0) -> None:
        super().__init__()
        self.lambd = lambd

    def forward(self, x: Tensor) -> Tensor:
        """Identity forward, reversed and scaled gradient backward."""
        return grad_reverse(x, self.lambd)
