"""scGPT-compatible networks: TransformerModel, TransformerGenerator, MultiOmicTransformerModel.

Tensors in, small dataclasses out; no AnnData. Attribute names match scGPT's so that a public
checkpoint maps onto ``state_dict()`` by name, with one rename: flash-attn's fused projection
``self_attn.Wqkv.{weight,bias}`` is stored here as ``self_attn.in_proj_{weight,bias}`` (the layout of
``torch.nn.MultiheadAttention``, identical tensors). See :mod:`pertflow.models.scgpt.checkpoint`.

Read top-down: attention -> encoder layer -> heads -> TransformerModel -> Generator -> MultiOmic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pertflow.models.scgpt.config import ScGPTConfig
from pertflow.models.scgpt.losses import (
    ScGPTLossWeights,
    contrastive_cell_loss,
    elastic_cell_similarity_loss,
    perturbation_loss,
    scgpt_loss,
)
from pertflow.nn.decoders import ExprDecoder, ExprPrediction
from pertflow.nn.embeddings import (
    BatchLabelEncoder,
    CategoryValueEncoder,
    ContinuousValueEncoder,
    GeneEncoder,
)
from pertflow.nn.loss import LossOutput

# ============================================================================ attention and layers


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


# ============================================================================ heads


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


# ============================================================================ outputs


@dataclass
class ScGPTOutput:
    """What the scGPT models' ``forward`` returns; heads that were not asked for are ``None``.

    Attributes
    ----------
    mlm_output
        ``(B, L)`` expression predicted at every position (masked-value objective, or the
        perturbed expression for the generator).
    mlm_zero_probs
        ``(B, L)`` with ``explicit_zero_prob``. scGPT's name; the value is the probability that the
        expression is **non-zero** (its Bernoulli loss targets ``value > 0`` and its sampler
        multiplies the prediction by a draw from it).
    cell_emb
        ``(B, d)`` cell embedding (``cell_emb_style``).
    cls_output
        ``(B, n_cls)`` cell-type logits (``CLS=True``).
    mvc_output, mvc_zero_probs
        ``(B, L)`` values (and non-zero probabilities) from the cell embedding (``MVC=True``).
    loss_cce
        Scalar contrastive loss between two dropout views (``CCE=True``).
    loss_ecs
        Scalar elastic cell similarity loss (``ECS=True``).
    dab_output
        ``(B, num_batch_labels)`` batch logits behind gradient reversal (``do_dab``).
    """

    mlm_output: Tensor
    mlm_zero_probs: Tensor | None = None
    cell_emb: Tensor | None = None
    cls_output: Tensor | None = None
    mvc_output: Tensor | None = None
    mvc_zero_probs: Tensor | None = None
    loss_cce: Tensor | None = None
    loss_ecs: Tensor | None = None
    dab_output: Tensor | None = None


def _sample_or_mean(prediction: ExprPrediction, do_sample: bool) -> tuple[Tensor, Tensor | None]:
    # scGPT's sampling: keep each prediction with probability zero_probs (the non-zero probability).
    if do_sample and prediction.zero_probs is not None:
        keep = torch.bernoulli(prediction.zero_probs)
        return keep * prediction.pred, prediction.zero_probs
    return prediction.pred, prediction.zero_probs


def _apply_cell_heads(
    model: nn.Module, out: ScGPTOutput, cell_input: Tensor, gene_embs: Tensor, *, CLS: bool, MVC: bool, ECS: bool,  # noqa: N803
    do_sample: bool,
) -> None:
    """The heads that read the cell embedding (CLS, MVC, ECS), shared by the model and the generator.

    ``cell_input`` is the cell embedding, with the batch embedding concatenated where the model
    uses batch labels (what the MVC decoder reads); CLS and ECS read ``out.cell_emb``.
    """
    if CLS:
        if not hasattr(model, "cls_decoder"):
            raise ValueError("CLS=True needs a model built with n_cls > 1")
        out.cls_output = model.cls_decoder(out.cell_emb)
    if MVC:
        if not hasattr(model, "mvc_decoder"):
            raise ValueError("MVC=True needs a model built with do_mvc=True")
        out.mvc_output, out.mvc_zero_probs = _sample_or_mean(model.mvc_decoder(cell_input, gene_embs), do_sample)
    if ECS:
        out.loss_ecs = elastic_cell_similarity_loss(out.cell_emb, model.config.ecs_threshold)


def pool_cell_embedding(
    layer_output: Tensor,
    style: str,
    key_padding_mask: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Reduce per-token encoder outputs to one vector per cell.

    Parameters
    ----------
    layer_output
        ``(B, L, d)``.
    style
        ``"cls"`` (position 0), ``"avg-pool"`` (mean over non-padding positions) or ``"w-pool"``
        (``weights``-weighted sum over non-padding positions, L2-normalised).
    key_padding_mask
        ``(B, L)`` bool, True at padding. scGPT averages over padding too; excluding it makes the
        embedding independent of how much padding a batch happened to need.
    weights
        ``(B, L)`` for ``"w-pool"`` (the models pass the input values).

    Returns
    -------
    Tensor
        ``(B, d)``.
    """
    if style == "cls":
        return layer_output[:, 0, :]
    keep = torch.ones(layer_output.shape[:2], dtype=layer_output.dtype, device=layer_output.device)
    if key_padding_mask is not None:
        keep = keep * (~key_padding_mask.bool()).to(layer_output.dtype)
    if style == "avg-pool":
        return (layer_output * keep.unsqueeze(2)).sum(1) / keep.sum(1, keepdim=True).clamp(min=1.0)
    if style == "w-pool":
        if weights is None or weights.dim() != 2:
            raise ValueError("w-pool needs 2-D weights (B, L)")
        pooled = (layer_output * (weights * keep).unsqueeze(2)).sum(1)
        return F.normalize(pooled, p=2, dim=1)
    raise ValueError(f"Unknown cell_emb_style {style!r}")


# ============================================================================ TransformerModel


class TransformerModel(nn.Module):
    """scGPT's foundation model: gene + value embeddings, transformer encoder, pretraining heads.

    Parameters
    ----------
    config
        Architecture; see :class:`~pertflow.models.scgpt.config.ScGPTConfig`.

    Notes
    -----
    Submodules, named as in scGPT: ``encoder`` (GeneEncoder), ``flag_encoder`` (only with
    ``use_generative_training``), ``value_encoder`` (continuous/category; none for scaling),
    ``batch_encoder``, ``dsbn`` or ``bn``, ``transformer_encoder.layers.N``, ``decoder``
    (ExprDecoder), ``cls_decoder`` (``n_cls > 1``), ``mvc_decoder`` (``do_mvc``),
    ``grad_reverse_discriminator`` (``do_dab``).
    """

    def __init__(self, config: ScGPTConfig, loss_weights: ScGPTLossWeights | None = None) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.encoder = GeneEncoder(config.ntoken, d, padding_idx=config.pad_token_id)
        if config.use_generative_training:
            self.flag_encoder = nn.Embedding(2, d)
        self._build_value_encoder()
        if config.use_batch_labels:
            self.batch_encoder = BatchLabelEncoder(config.num_batch_labels, d)
        if config.uses_dsbn:
            self.dsbn = DomainSpecificBatchNorm1d(
                d, config.num_batch_labels, eps=6.1e-5, affine=config.domain_spec_batchnorm == "do_affine"
            )
        elif config.domain_spec_batchnorm == "batchnorm":
            self.bn = nn.BatchNorm1d(d, eps=6.1e-5)
        self.transformer_encoder = ScGPTTransformerEncoder(config)
        self._build_heads()
        self._init_weights()
        # Objective weights used by :meth:`loss`: a training setting, given once at construction.
        self.loss_weights = loss_weights or ScGPTLossWeights()

    # ---------------------------------------------------------------- construction helpers
    def _build_value_encoder(self) -> None:
        c = self.config
        if c.input_emb_style == "continuous":
            self.value_encoder = ContinuousValueEncoder(c.d_model, c.dropout)
        elif c.input_emb_style == "category":
            self.value_encoder = CategoryValueEncoder(c.n_input_bins, c.d_model, padding_idx=int(c.pad_value))
        # "scaling": the value multiplies the gene embedding; no parameters.

    def _context_width(self) -> int:
        # Width of the per-cell context concatenated to decoder inputs (batch embedding here).
        return self.config.d_model if self.config.use_batch_labels else 0

    def _build_heads(self) -> None:
        c = self.config
        extra = self._context_width()
        self.decoder = ExprDecoder(c.d_model + extra, d_hidden=c.d_model, explicit_zero_prob=c.explicit_zero_prob)
        if c.n_cls > 1:
            self.cls_decoder = ClsDecoder(c.d_model, c.n_cls, nlayers=c.nlayers_cls)
        if c.do_mvc:
            self.mvc_decoder = MVCDecoder(c.d_model, c.d_model + extra, c.mvc_decoder_style, c.explicit_zero_prob)
        if c.do_dab:
            self.grad_reverse_discriminator = AdversarialDiscriminator(
                c.d_model, c.num_batch_labels, reverse_grad=True
            )

    def _init_weights(self) -> None:
        # scGPT initialises the gene table uniformly in [-0.1, 0.1]; the pad row is kept at zero.
        with torch.no_grad():
            self.encoder.embedding.weight.uniform_(-0.1, 0.1)
            self.encoder.embedding.weight[self.config.pad_token_id].zero_()

    # ---------------------------------------------------------------- encoding
    def _check_batch_labels(self, batch_labels: Tensor | None) -> None:
        needs = self.config.use_batch_labels or self.config.uses_dsbn
        if needs and batch_labels is None:
            raise ValueError("batch_labels (B,) are required: the model uses batch labels or DSBN")
        if not needs and batch_labels is not None and not self.config.do_dab:
            raise ValueError("batch_labels given, but the model neither uses batch labels nor DSBN")

    def padding_mask(self, gene_ids: Tensor) -> Tensor:
        """``(B, L)`` bool, True where ``gene_ids`` is the pad token."""
        return gene_ids.eq(self.config.pad_token_id)

    def _embed(self, gene_ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        gene_embs = self.encoder(gene_ids)  # (B, L, d)
        if self.config.input_emb_style == "scaling":
            total = gene_embs * values.unsqueeze(2).to(gene_embs.dtype)
        else:
            total = gene_embs + self.value_encoder(values)
        return total, gene_embs

    def _batch_norm(self, total: Tensor, batch_labels: Tensor | None) -> Tensor:
        # BatchNorm1d normalises dim 1, so the (B, L, d) embeddings are permuted to (B, d, L).
        if self.config.uses_dsbn:
            return self.dsbn(total.permute(0, 2, 1), batch_labels).permute(0, 2, 1)
        if self.config.domain_spec_batchnorm == "batchnorm":
            return self.bn(total.permute(0, 2, 1)).permute(0, 2, 1)
        return total

    def _encode(
        self, gene_ids: Tensor, values: Tensor, key_padding_mask: Tensor, batch_labels: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        total, gene_embs = self._embed(gene_ids, values)
        total = self._batch_norm(total, batch_labels)
        return self.transformer_encoder(total, key_padding_mask), gene_embs

    def encode(
        self,
        gene_ids: Tensor,
        values: Tensor,
        src_key_padding_mask: Tensor | None = None,
        batch_labels: Tensor | None = None,
    ) -> Tensor:
        """Run the encoder (scGPT's ``_encode``).

        Parameters
        ----------
        gene_ids
            ``(B, L)`` long vocabulary ids (``<cls>`` first when a cell embedding is wanted).
        values
            ``(B, L)`` expression values (bins for the category style), ``pad_value`` at padding.
        src_key_padding_mask
            ``(B, L)`` bool, True at padding; defaults to ``gene_ids == pad_token_id``.
        batch_labels
            ``(B,)`` long; required with ``use_batch_labels`` or DSBN.

        Returns
        -------
        Tensor
            ``(B, L, d_model)`` contextual token features.
        """
        self._check_batch_labels(batch_labels)
        mask = self.padding_mask(gene_ids) if src_key_padding_mask is None else src_key_padding_mask.bool()
        return self._encode(gene_ids, values, mask, batch_labels)[0]

    def cell_embedding(self, layer_output: Tensor, src_key_padding_mask: Tensor | None = None,
                       values: Tensor | None = None) -> Tensor:
        """Pool encoder outputs ``(B, L, d)`` into ``(B, d)`` per ``cell_emb_style``."""
        return pool_cell_embedding(layer_output, self.config.cell_emb_style, src_key_padding_mask, values)

    # ---------------------------------------------------------------- forward
    def _token_context(self, batch_emb: Tensor | None, length: int) -> Tensor | None:
        if batch_emb is None:
            return None
        return batch_emb.unsqueeze(1).expand(-1, length, -1)

    def forward(
        self,
        gene_ids: Tensor,
        values: Tensor,
        src_key_padding_mask: Tensor | None = None,
        batch_labels: Tensor | None = None,
        *,
        CLS: bool = False,  # noqa: N803 - scGPT's flag names
        CCE: bool = False,  # noqa: N803
        MVC: bool = False,  # noqa: N803
        ECS: bool = False,  # noqa: N803
        do_sample: bool = False,
    ) -> ScGPTOutput:
        """Encode and apply the requested heads.

        Parameters
        ----------
        gene_ids, values, src_key_padding_mask, batch_labels
            As in :meth:`encode`.
        CLS, CCE, MVC, ECS
            Compute the classification logits, the contrastive loss (a second pass under a new
            dropout draw), the masked-value-from-cell-embedding prediction, the elastic cell
            similarity loss. ``dab_output`` is always computed when the model has ``do_dab``.
        do_sample
            With ``explicit_zero_prob``, multiply predictions by a Bernoulli draw of the non-zero
            probability (inference-time sampling, as in scGPT).

        Returns
        -------
        ScGPTOutput
        """
        c = self.config
        self._check_batch_labels(batch_labels)
        mask = self.padding_mask(gene_ids) if src_key_padding_mask is None else src_key_padding_mask.bool()
        transformer_output, gene_embs = self._encode(gene_ids, values, mask, batch_labels)
        batch_emb = self.batch_encoder(batch_labels) if c.use_batch_labels else None

        context = self._token_context(batch_emb, transformer_output.shape[1])
        dec_in = transformer_output if context is None else torch.cat([transformer_output, context], dim=2)
        mlm_output, mlm_zero = _sample_or_mean(self.decoder(dec_in), do_sample)

        cell_emb = self.cell_embedding(transformer_output, mask, values)
        out = ScGPTOutput(mlm_output=mlm_output, mlm_zero_probs=mlm_zero, cell_emb=cell_emb)
        if CCE:
            second = self._encode(gene_ids, values, mask, batch_labels)[0]
            out.loss_cce = contrastive_cell_loss(
                cell_emb, self.cell_embedding(second, mask, values), c.cce_temperature
            )
        cell_in = cell_emb if batch_emb is None else torch.cat([cell_emb, batch_emb], dim=1)
        _apply_cell_heads(self, out, cell_in, gene_embs, CLS=CLS, MVC=MVC, ECS=ECS, do_sample=do_sample)
        if c.do_dab:
            out.dab_output = self.grad_reverse_discriminator(cell_emb)
        return out

    def loss(self, batch: dict[str, Tensor]) -> LossOutput:
        """Pretraining / fine-tuning loss for the shared trainer (``loss(batch) -> LossOutput``).

        Parameters
        ----------
        batch
            ``gene_ids`` (B, L); ``values`` (B, L) true values; ``masked_values`` (B, L) the input,
            with ``mask_value`` at the positions to predict (see :func:`random_mask_value`; the data
            pipeline masks, as scGPT's collator does, so that runs resume exactly); optional
            ``src_key_padding_mask``, ``batch_labels`` (B,), ``cls_labels`` (B,), ``mod_types``.
            Heads run when the model has them and their weight in :attr:`loss_weights` is non-zero.

        Returns
        -------
        LossOutput
        """
        w = self.loss_weights
        masked_values = batch["masked_values"]
        kwargs = {"mod_types": batch["mod_types"]} if "mod_types" in batch else {}
        out = self(
            batch["gene_ids"],
            masked_values,
            batch.get("src_key_padding_mask"),
            batch.get("batch_labels") if (self.config.use_batch_labels or self.config.uses_dsbn) else None,
            CLS=bool(w.cls) and hasattr(self, "cls_decoder") and "cls_labels" in batch,
            CCE=bool(w.cce),
            MVC=bool(w.mvc) and hasattr(self, "mvc_decoder"),
            ECS=bool(w.ecs),
            **kwargs,
        )
        return scgpt_loss(out, batch["values"], masked_values.eq(self.config.mask_value),
                          batch.get("cls_labels"), batch.get("batch_labels"), w)


# ============================================================================ TransformerGenerator


class TransformerGenerator(nn.Module):
    """scGPT's perturbation model: control expression + per-gene perturbation flags -> perturbed expression.

    Parameters
    ----------
    config
        Architecture. Uses ``n_pert_flags`` / ``pert_pad_id`` for the flag table (scGPT: 3 rows,
        padding row 2), ``generator_decoder`` (``affine``: ``A * x + b``; ``expr``: plain
        ExprDecoder), ``generator_batchnorm`` (``bn`` on the input embeddings).

    Notes
    -----
    Submodules: ``encoder``, ``value_encoder`` (continuous), ``pert_encoder`` (Embedding
    (n_pert_flags, d), padding_idx ``pert_pad_id``), ``bn`` (optional), ``transformer_encoder``,
    ``decoder``, ``cls_decoder`` (``n_cls > 1``), ``mvc_decoder`` (``do_mvc``). The encoder part
    has the same names as :class:`TransformerModel`, so a pretrained foundation checkpoint loads
    into it (scGPT's tutorial loads the prefixes ``encoder``, ``value_encoder``,
    ``transformer_encoder``).
    """

    def __init__(self, config: ScGPTConfig) -> None:
        super().__init__()
        if config.input_emb_style != "continuous":
            raise ValueError("TransformerGenerator uses the continuous value encoder")
        self.config = config
        d = config.d_model
        self.encoder = GeneEncoder(config.ntoken, d, padding_idx=config.pad_token_id)
        self.value_encoder = ContinuousValueEncoder(d, config.dropout)
        self.pert_encoder = nn.Embedding(config.n_pert_flags, d, padding_idx=config.pert_pad_id)
        if config.generator_batchnorm:
            self.bn = nn.BatchNorm1d(d, eps=6.1e-5)
        self.transformer_encoder = ScGPTTransformerEncoder(config)
        if config.generator_decoder == "affine":
            self.decoder = AffineExprDecoder(
                d, config.explicit_zero_prob, config.decoder_activation, config.decoder_adaptive_bias
            )
        else:
            self.decoder = ExprDecoder(d, explicit_zero_prob=config.explicit_zero_prob)
        if config.n_cls > 1:
            self.cls_decoder = ClsDecoder(d, config.n_cls, nlayers=config.nlayers_cls)
        if config.do_mvc:
            self.mvc_decoder = MVCDecoder(d, d, config.mvc_decoder_style, config.explicit_zero_prob)
        with torch.no_grad():
            self.encoder.embedding.weight.uniform_(-0.1, 0.1)
            self.encoder.embedding.weight[config.pad_token_id].zero_()

    def _encode(self, gene_ids: Tensor, values: Tensor, pert_flags: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        gene_embs = self.encoder(gene_ids)
        total = gene_embs + self.value_encoder(values) + self.pert_encoder(pert_flags.long())
        if self.config.generator_batchnorm:
            total = self.bn(total.permute(0, 2, 1)).permute(0, 2, 1)
        return self.transformer_encoder(total, mask), gene_embs

    def encode(self, gene_ids: Tensor, values: Tensor, pert_flags: Tensor,
               src_key_padding_mask: Tensor | None = None) -> Tensor:
        """Encode.

        Parameters
        ----------
        gene_ids
            ``(B, L)`` vocabulary ids.
        values
            ``(B, L)`` control expression.
        pert_flags
            ``(B, L)`` long flags (scGPT: 0 not perturbed, 1 perturbed, ``pert_pad_id`` padding).
        src_key_padding_mask
            ``(B, L)`` bool, True at padding; defaults to ``gene_ids == pad_token_id``.

        Returns
        -------
        Tensor
            ``(B, L, d_model)``.
        """
        mask = gene_ids.eq(self.config.pad_token_id) if src_key_padding_mask is None else src_key_padding_mask.bool()
        return self._encode(gene_ids, values, pert_flags, mask)[0]

    def forward(
        self,
        gene_ids: Tensor,
        values: Tensor,
        pert_flags: Tensor,
        src_key_padding_mask: Tensor | None = None,
        *,
        CLS: bool = False,  # noqa: N803
        MVC: bool = False,  # noqa: N803
        ECS: bool = False,  # noqa: N803
        do_sample: bool = False,
    ) -> ScGPTOutput:
        """Predict perturbed expression.

        Parameters
        ----------
        gene_ids, values, pert_flags, src_key_padding_mask
            As in :meth:`encode`.
        CLS, MVC, ECS, do_sample
            As in :meth:`TransformerModel.forward`.

        Returns
        -------
        ScGPTOutput
            ``mlm_output`` ``(B, L)`` is the predicted perturbed expression.
        """
        c = self.config
        mask = gene_ids.eq(c.pad_token_id) if src_key_padding_mask is None else src_key_padding_mask.bool()
        transformer_output, gene_embs = self._encode(gene_ids, values, pert_flags, mask)
        if isinstance(self.decoder, AffineExprDecoder):
            prediction = self.decoder(transformer_output, values)
        else:
            prediction = self.decoder(transformer_output)
        mlm_output, mlm_zero = _sample_or_mean(prediction, do_sample)
        cell_emb = pool_cell_embedding(transformer_output, c.cell_emb_style, mask, values)
        out = ScGPTOutput(mlm_output=mlm_output, mlm_zero_probs=mlm_zero, cell_emb=cell_emb)
        _apply_cell_heads(self, out, cell_emb, gene_embs, CLS=CLS, MVC=MVC, ECS=ECS, do_sample=do_sample)
        return out

    def loss(self, batch: dict[str, Tensor]) -> LossOutput:
        """Perturbation loss for the shared trainer.

        Parameters
        ----------
        batch
            ``gene_ids``, ``values`` (control), ``pert_flags``, ``target_values`` (perturbed), all
            (B, L); optional ``src_key_padding_mask``. Scored on every non-padding position.

        Returns
        -------
        LossOutput
        """
        ids = batch["gene_ids"]
        mask = batch.get("src_key_padding_mask")
        mask = ids.eq(self.config.pad_token_id) if mask is None else mask.bool()
        out = self(ids, batch["values"], batch["pert_flags"], mask)
        value = perturbation_loss(out.mlm_output, batch["target_values"], ~mask)
        return LossOutput(loss=value, metrics={"mse": float(value.detach())})

    @torch.no_grad()
    def pred_perturb(
        self,
        values: Tensor,
        pert_flags: Tensor,
        gene_ids: Tensor,
        include_zero_gene: str = "all",
        do_sample: bool = True,
    ) -> Tensor:
        """Predict perturbed expression for whole cells (scGPT's ``pred_perturb``, tensors only).

        Parameters
        ----------
        values
            ``(B, G)`` control expression over the dataset's G genes.
        pert_flags
            ``(B, G)`` long perturbation flags.
        gene_ids
            ``(G,)`` long vocabulary id of each dataset gene.
        include_zero_gene
            ``"all"``: feed every gene; ``"batch-wise"``: feed only genes non-zero in some cell of
            the batch (and predict 0 elsewhere, as scGPT does).
        do_sample
            Bernoulli sampling when the model has ``explicit_zero_prob`` (scGPT samples here).

        Returns
        -------
        Tensor
            ``(B, G)`` predicted expression.
        """
        if include_zero_gene not in ("all", "batch-wise"):
            raise ValueError("include_zero_gene must be 'all' or 'batch-wise'")
        was_training = self.training
        self.eval()
        try:
            if include_zero_gene == "all":
                cols = torch.arange(values.shape[1], device=values.device)
            else:
                cols = values.ne(0).any(dim=0).nonzero().flatten()
            batch = values.shape[0]
            ids = gene_ids.to(values.device)[cols].unsqueeze(0).expand(batch, -1)
            mask = torch.zeros(ids.shape, dtype=torch.bool, device=values.device)
            out = self(ids, values[:, cols], pert_flags[:, cols], mask, do_sample=do_sample)
            pred = torch.zeros_like(values)
            pred[:, cols] = out.mlm_output.to(pred.dtype)
            return pred
        finally:
            self.train(was_training)


# ============================================================================ MultiOmicTransformerModel


class MultiOmicTransformerModel(TransformerModel):
    """TransformerModel with a per-token modality embedding (RNA, ATAC, protein, ...).

    The modality embedding (``mod_encoder``, a BatchLabelEncoder over ``ntokens_mod`` types) is
    concatenated to the decoder inputs, like the batch embedding; with both, their sum is. The MVC
    head then works in ``2 * d`` for gene and cell sides alike, as in scGPT's multiomic model.

    Parameters
    ----------
    config
        Architecture with ``use_mod=True`` and ``ntokens_mod``.
    """

    def __init__(self, config: ScGPTConfig, loss_weights: ScGPTLossWeights | None = None) -> None:
        if not config.use_mod:
            raise ValueError("MultiOmicTransformerModel needs use_mod=True")
        super().__init__(config, loss_weights)
        self.mod_encoder = BatchLabelEncoder(config.ntokens_mod, config.d_model, padding_idx=config.mod_pad_id)

    def _build_heads(self) -> None:
        c = self.config
        d2 = 2 * c.d_model
        self.decoder = ExprDecoder(d2, d_hidden=c.d_model, explicit_zero_prob=c.explicit_zero_prob)
        if c.n_cls > 1:
            self.cls_decoder = ClsDecoder(c.d_model, c.n_cls, nlayers=c.nlayers_cls)
        if c.do_mvc:
            self.mvc_decoder = MVCDecoder(d2, d2, c.mvc_decoder_style, c.explicit_zero_prob)
        if c.do_dab:
            self.grad_reverse_discriminator = AdversarialDiscriminator(c.d_model, c.num_batch_labels, reverse_grad=True)

    def forward(  # type: ignore[override]
        self,
        gene_ids: Tensor,
        values: Tensor,
        src_key_padding_mask: Tensor | None = None,
        batch_labels: Tensor | None = None,
        mod_types: Tensor | None = None,
        *,
        CLS: bool = False,  # noqa: N803
        CCE: bool = False,  # noqa: N803
        MVC: bool = False,  # noqa: N803
        ECS: bool = False,  # noqa: N803
        do_sample: bool = False,
    ) -> ScGPTOutput:
        """As :meth:`TransformerModel.forward`, with ``mod_types`` ``(B, L)`` long modality ids."""
        if mod_types is None:
            raise ValueError("mod_types (B, L) are required by MultiOmicTransformerModel")
        c = self.config
        self._check_batch_labels(batch_labels)
        mask = self.padding_mask(gene_ids) if src_key_padding_mask is None else src_key_padding_mask.bool()
        transformer_output, gene_embs = self._encode(gene_ids, values, mask, batch_labels)
        length = transformer_output.shape[1]
        mod_emb = self.mod_encoder(mod_types)  # (B, L, d)
        token_ctx = mod_emb
        if c.use_batch_labels:
            batch_emb = self.batch_encoder(batch_labels)
            token_ctx = token_ctx + batch_emb.unsqueeze(1).expand(-1, length, -1)
        prediction = self.decoder(torch.cat([transformer_output, token_ctx], dim=2))
        mlm_output, mlm_zero = _sample_or_mean(prediction, do_sample)
        cell_emb = self.cell_embedding(transformer_output, mask, values)
        out = ScGPTOutput(mlm_output=mlm_output, mlm_zero_probs=mlm_zero, cell_emb=cell_emb)
        if CLS:
            if not hasattr(self, "cls_decoder"):
                raise ValueError("CLS=True needs a model built with n_cls > 1")
            out.cls_output = self.cls_decoder(cell_emb)
        if CCE:
            second = self._encode(gene_ids, values, mask, batch_labels)[0]
            out.loss_cce = contrastive_cell_loss(cell_emb, self.cell_embedding(second, mask, values),
                                                 c.cce_temperature)
        if MVC:
            if not hasattr(self, "mvc_decoder"):
                raise ValueError("MVC=True needs a model built with do_mvc=True")
            cell_ctx = pool_cell_embedding(token_ctx, c.cell_emb_style, mask, values)
            out.mvc_output, out.mvc_zero_probs = _sample_or_mean(
                self.mvc_decoder(torch.cat([cell_emb, cell_ctx], dim=1), torch.cat([gene_embs, token_ctx], dim=2)),
                do_sample,
            )
        if ECS:
            out.loss_ecs = elastic_cell_similarity_loss(cell_emb, c.ecs_threshold)
        if c.do_dab:
            out.dab_output = self.grad_reverse_discriminator(cell_emb)
        return out


def build_model(config: ScGPTConfig, kind: str = "transformer") -> nn.Module:
    """Construct a model of the scGPT family by name.

    Parameters
    ----------
    config
        Architecture.
    kind
        ``"transformer"``, ``"generator"`` or ``"multiomic"``.

    Returns
    -------
    nn.Module
    """
    registry = {
        "transformer": TransformerModel,
        "generator": TransformerGenerator,
        "multiomic": MultiOmicTransformerModel,
    }
    if kind not in registry:
        raise ValueError(f"Unknown scGPT model kind {kind!r}; choose one of {sorted(registry)}")
    return registry[kind](config)
