"""scGPT's foundation model (``TransformerModel``) and its multi-omic variant, read top to bottom:
the output contract, the cell-embedding heads and pooling, then the models.

Tensors in, small dataclasses out; no AnnData. Attribute names match scGPT's so that a public
checkpoint maps onto ``state_dict()`` by name, with one rename: flash-attn's fused projection
``self_attn.Wqkv.{weight,bias}`` is stored here as ``self_attn.in_proj_{weight,bias}`` (the layout of
``torch.nn.MultiheadAttention``, identical tensors). See :mod:`pertflow.foundation.scgpt.checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pertflow.foundation.scgpt.config import ScGPTConfig
from pertflow.foundation.scgpt.heads import AdversarialDiscriminator, ClsDecoder, MVCDecoder
from pertflow.foundation.scgpt.layers import DomainSpecificBatchNorm1d, ScGPTTransformerEncoder
from pertflow.foundation.scgpt.losses import (
    ScGPTLossWeights,
    contrastive_cell_loss,
    elastic_cell_similarity_loss,
    scgpt_loss,
)
from pertflow.nn.decoders import ExprDecoder, ExprPrediction
from pertflow.nn.embeddings import BatchLabelEncoder, CategoryValueEncoder, ContinuousValueEncoder, GeneEncoder
from pertflow.nn.loss import LossOutput

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


def sample_or_mean(prediction: ExprPrediction, do_sample: bool) -> tuple[Tensor, Tensor | None]:
    # scGPT's sampling: keep each prediction with probability zero_probs (the non-zero probability).
    if do_sample and prediction.zero_probs is not None:
        keep = torch.bernoulli(prediction.zero_probs)
        return keep * prediction.pred, prediction.zero_probs
    return prediction.pred, prediction.zero_probs


def apply_cell_heads(
    model: nn.Module, out: ScGPTOutput, cell_input: Tensor, gene_embs: Tensor, *,
    CLS: bool, MVC: bool, ECS: bool,  # noqa: N803
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
        out.mvc_output, out.mvc_zero_probs = sample_or_mean(model.mvc_decoder(cell_input, gene_embs), do_sample)
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
        Architecture; see :class:`~pertflow.foundation.scgpt.config.ScGPTConfig`.

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
        if config.ntoken < 1:
            raise ValueError("TransformerModel needs the vocabulary size: config.ntoken > 0")
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
        mlm_output, mlm_zero = sample_or_mean(self.decoder(dec_in), do_sample)

        cell_emb = self.cell_embedding(transformer_output, mask, values)
        out = ScGPTOutput(mlm_output=mlm_output, mlm_zero_probs=mlm_zero, cell_emb=cell_emb)
        if CCE:
            second = self._encode(gene_ids, values, mask, batch_labels)[0]
            out.loss_cce = contrastive_cell_loss(
                cell_emb, self.cell_embedding(second, mask, values), c.cce_temperature
            )
        cell_in = cell_emb if batch_emb is None else torch.cat([cell_emb, batch_emb], dim=1)
        apply_cell_heads(self, out, cell_in, gene_embs, CLS=CLS, MVC=MVC, ECS=ECS, do_sample=do_sample)
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
        mlm_output, mlm_zero = sample_or_mean(prediction, do_sample)
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
            out.mvc_output, out.mvc_zero_probs = sample_or_mean(
                self.mvc_decoder(torch.cat([cell_emb, cell_ctx], dim=1), torch.cat([gene_embs, token_ctx], dim=2)),
                do_sample,
            )
        if ECS:
            out.loss_ecs = elastic_cell_similarity_loss(cell_emb, c.ecs_threshold)
        if c.do_dab:
            out.dab_output = self.grad_reverse_discriminator(cell_emb)
        return out
