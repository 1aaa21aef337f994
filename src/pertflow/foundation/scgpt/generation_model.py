"""scGPT's perturbation model, ``TransformerGenerator`` (scGPT's ``generation_model.py``): a control
cell's tokens plus perturbation flags in, the perturbed cell's expression out.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pertflow.foundation.scgpt.config import ScGPTConfig
from pertflow.foundation.scgpt.heads import AffineExprDecoder, ClsDecoder, MVCDecoder
from pertflow.foundation.scgpt.layers import ScGPTTransformerEncoder
from pertflow.foundation.scgpt.losses import perturbation_loss
from pertflow.foundation.scgpt.transformer import ScGPTOutput, apply_cell_heads, pool_cell_embedding, sample_or_mean
from pertflow.nn.decoders import ExprDecoder
from pertflow.nn.embeddings import ContinuousValueEncoder, GeneEncoder
from pertflow.nn.loss import LossOutput

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
        if config.ntoken < 1:
            raise ValueError("TransformerGenerator needs the vocabulary size: config.ntoken > 0")
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
        mlm_output, mlm_zero = sample_or_mean(prediction, do_sample)
        cell_emb = pool_cell_embedding(transformer_output, c.cell_emb_style, mask, values)
        out = ScGPTOutput(mlm_output=mlm_output, mlm_zero_probs=mlm_zero, cell_emb=cell_emb)
        apply_cell_heads(self, out, cell_emb, gene_embs, CLS=CLS, MVC=MVC, ECS=ECS, do_sample=do_sample)
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
