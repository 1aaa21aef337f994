"""The gene-space conditional flow-matching network (SPEC 2.1): tensors in, velocities out.

Shapes: B cells, G genes in the step, d width, K perturbation components.

* tokens: ``fusion(cat[enc_state(x_t), enc_control(control)]) + gene_emb``  (B, G, d_t)
* condition: ``c = time_embedding(t) + perturbation_embedding``            (B, d)
* the backbone (``GeneFlowConfig.backbone``): scDFM's L dense layers (GeneAdaLN -> cat
  perturbation -> adapter -> DiffPerceiverBlock with the control cell's tokens as the
  reference; d_t = d), or a Perceiver-IO read / L latent blocks / write (:mod:`pertflow.nn.latent`)
* ``ExprDecoder(cat[x, perturbation])`` -> velocity per gene                 (B, G)

Training draws a random subset of genes per step and minimises the velocity MSE plus
``gamma * MMD(x_t + (1 - t) v, target)``; sampling integrates from the source over all genes
(or gene chunks) conditioned on control cells, and clamps expression at 0. The coupling, the
time sampler and the source are parts the network is given (:class:`~pertflow.models.flow.FlowParts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pertflow.data.keys import BATCH_KEYS
from pertflow.flows import CondOTPath, ODESolver
from pertflow.models.cfm.config import CFMConfig
from pertflow.models.config import PredictConfig
from pertflow.models.flow import FlowParts
from pertflow.nn import ExprDecoder, GeneEncoder
from pertflow.nn.backbone import ExpressionTokens, GeneFlowBackbone
from pertflow.nn.conditioning import TimestepEmbedder
from pertflow.nn.latent import LatentFlowBackbone
from pertflow.nn.loss import LossOutput
from pertflow.nn.perturbation import PerturbationEncoder, unknown_perturbation_dropout
from pertflow.ops.kernels import mmd2_rbf


@dataclass
class FieldContext:
    """What the velocity field reads besides ``(t, x_t)``: fixed for a whole ODE solve, so computed
    once (gene embeddings, the control cells' tokens and keys, the perturbation embedding)."""

    gene_idx: Tensor | None
    gene_emb: Tensor
    control_tokens: Tensor
    control_keys: Tensor | None
    pert: Tensor


class CFMModule(nn.Module):
    """The velocity field ``v(t, x_t | control, perturbation)`` over genes.

    Parameters
    ----------
    config
        Architecture and loss settings.
    parts
        Coupling, time sampler and source of the flow.
    gene_tokens
        (G_full,) vocabulary ids of the model's genes, in column order.
    n_tokens, first_other_token, pad_id, unk_id
        Vocabulary size, first non-gene token, padding token, unknown-perturbation token.
    descriptors
        Optional (n_tokens, D) descriptor vectors of perturbation tokens.
    """

    def __init__(
        self,
        config: CFMConfig,
        parts: FlowParts,
        gene_tokens: Tensor,
        n_tokens: int,
        first_other_token: int,
        pad_id: int,
        unk_id: int,
        descriptors: Tensor | None = None,
    ):
        super().__init__()
        self.config = config
        self.parts = parts
        self.pad_id, self.unk_id = pad_id, unk_id
        d, d_t = config.d_model, config.token_width
        self.register_buffer("gene_tokens", gene_tokens.long())
        self.gene_encoder = GeneEncoder(n_tokens, d_t, padding_idx=pad_id)
        self.tokens = ExpressionTokens(d_t, config.dropout)
        self.perturbation_encoder = PerturbationEncoder(n_tokens, first_other_token, pad_id, d_t, descriptors)
        self.time_embedder = TimestepEmbedder(d)
        if config.backbone == "dense":
            self.condition = nn.Identity()
            self.backbone = GeneFlowBackbone(d, config.n_heads, config.n_layers, config.mlp_ratio, config.differential_attention)
        else:
            self.condition = nn.Linear(d_t, d)  # the perturbation, at the latents' width
            self.backbone = LatentFlowBackbone(d, d_t, config.n_heads, config.n_layers, config.n_latents, config.mlp_ratio,
                                               config.differential_attention)
        self.decoder = ExprDecoder(2 * d_t, d_t)
        self.path = CondOTPath()

    @property
    def n_genes(self) -> int:
        return int(self.gene_tokens.shape[0])

    def context(self, control: Tensor, pert_ids: Tensor, gene_idx: Tensor | None = None) -> FieldContext:
        """What the field reads besides the state, for control cells ``(B, G)`` on the genes
        ``gene_idx`` (all genes when None) and perturbation tokens ``(B, K)``."""
        tokens = self.gene_tokens if gene_idx is None else self.gene_tokens[gene_idx]
        gene_emb = self.gene_encoder(tokens).unsqueeze(0)  # (1, G, d_t), broadcast over cells
        control_tokens = self.tokens.control(control)
        control_keys = self.backbone.control_keys(control_tokens) if isinstance(self.backbone, LatentFlowBackbone) else None
        pert = self.perturbation_encoder(pert_ids, self.gene_encoder)
        return FieldContext(gene_idx, gene_emb, control_tokens, control_keys, pert)

    def velocity(self, t: Tensor, x_t: Tensor, ctx: FieldContext) -> Tensor:
        """The velocity field.

        Parameters
        ----------
        t
            (B,) times.
        x_t
            (B, G) current state on the genes of ``ctx``.
        ctx
            From :meth:`context`.

        Returns
        -------
        Tensor
            (B, G) velocity.
        """
        x = self.tokens(x_t, ctx.control_tokens, ctx.gene_emb)
        c = self.time_embedder(t) + self.condition(ctx.pert)
        if isinstance(self.backbone, LatentFlowBackbone):
            x, pert_tokens = self.backbone(x, ctx.control_keys, ctx.pert, c)
        else:
            x, pert_tokens = self.backbone(x, ctx.gene_emb, ctx.control_tokens, ctx.pert, c)
        return self.decoder(torch.cat([x, pert_tokens], dim=-1)).pred

    def loss(self, batch: dict[str, Tensor]) -> LossOutput:
        """Flow-matching loss on a random gene subset.

        ``batch``: ``target`` (B, G_full) perturbed cells, ``control`` (B, G_full) control cells of
        the same context, ``pert_ids`` (B, K), and optionally ``prior_delta`` (B, G_full), the
        prior's shift (the flow then starts from ``control + prior_delta``).
        """
        target, control, pert_ids = batch[BATCH_KEYS.TARGET], batch[BATCH_KEYS.CONTROL], batch[BATCH_KEYS.PERT_IDS]
        shift = batch.get(BATCH_KEYS.PRIOR_DELTA)
        if self.training:
            pert_ids = unknown_perturbation_dropout(pert_ids, self.pad_id, self.unk_id, self.config.unknown_perturbation_p)
        n_genes = target.shape[1]
        g = min(self.config.genes_per_step, n_genes)
        gene_idx = torch.randperm(n_genes, device=target.device)[:g] if g < n_genes else None
        if gene_idx is not None:
            target, control = target[:, gene_idx], control[:, gene_idx]
            shift = None if shift is None else shift[:, gene_idx]
        offset = self.control_offset(control)
        anchor = self.anchor(control, shift) - offset
        x_0 = self.parts.source(anchor)
        x_1 = self.parts.coupling(x_0, target - offset)
        t = self.parts.time_sampler(x_1.shape[0], x_1.device)
        path = self.path.sample(t, x_0, x_1)
        v = self.velocity(t, path.x_t, self.context(self.reference_cells(anchor), pert_ids, gene_idx))
        mse = ((v.float() - path.dx_t.float()) ** 2).mean()
        loss = mse
        metrics = {"mse": float(mse.detach())}
        if self.config.gamma > 0 and x_1.shape[0] >= 2:
            x1_hat = self.path.target_estimate(path.x_t, v, t)
            mmd = mmd2_rbf(x1_hat.float(), x_1.float())
            loss = loss + self.config.gamma * mmd
            metrics["mmd"] = float(mmd.detach())
        return LossOutput(loss=loss, metrics=metrics)

    @staticmethod
    def anchor(control: Tensor, shift: Tensor | None) -> Tensor:
        """Where the flow starts before the source's noise, and what the network is conditioned
        on: the control cells, shifted by the prior's predicted response when there is one."""
        return control if shift is None else control + shift

    def control_embedding(self, control: Tensor) -> Tensor:
        """(B, G) control cells -> (B, G, d_t) their tokens, as :meth:`context` reads a control
        batch that no perturbation shifts (relative to :meth:`control_offset`). The value encoder
        is the same for every gene, so gene g's token depends on the cell's value of g alone."""
        return self.tokens.control(control - self.control_offset(control))

    def control_offset(self, control: Tensor) -> Tensor:
        """(1, G) what the flow's coordinates are relative to: the control batch's mean per gene
        with ``center``, else 0 (see ``GeneFlowConfig.center``)."""
        if self.config.center:
            return control.mean(dim=0, keepdim=True)
        return torch.zeros_like(control[:1])

    def reference_cells(self, control: Tensor) -> Tensor:
        """The cells the network is conditioned on, one per row of ``control`` (the anchors: control
        cells, shifted by the prior when there is one): the cells themselves, or with
        ``source="control"`` and ``reference_cell="other"`` another cell of the batch (the batch
        rolled by one; see ``GeneFlowConfig.reference_cell``)."""
        if self.config.source == "control" and self.config.reference_cell == "other" and control.shape[0] > 1:
            return control.roll(1, dims=0)
        return control

    def gene_chunks(self, chunk: int | None, generator: torch.Generator | None) -> list[Tensor | None]:
        """All genes (``[None]``), or a random partition into chunks of about ``chunk`` genes."""
        if chunk is None or chunk >= self.n_genes:
            return [None]
        perm = torch.randperm(self.n_genes, generator=generator).to(self.gene_tokens.device)
        return list(perm.chunk(math.ceil(self.n_genes / chunk)))

    @torch.no_grad()
    def sample(self, control: Tensor, pert_ids: Tensor, settings: PredictConfig, generator: torch.Generator | None = None,
               shift: Tensor | None = None) -> Tensor:
        """Generate perturbed cells from the source, one per control cell.

        Parameters
        ----------
        control
            (B, G_full) control cells.
        pert_ids
            (B, K) perturbation token ids.
        settings
            The solver, its steps and the gene chunks.
        generator
            Seeds the noise and the gene chunks.
        shift
            (B, G_full) the prior's shift: the flow starts from ``control + shift``. With a zero
            velocity (and no source noise) the result is the prior's prediction exactly.

        Returns
        -------
        Tensor
            (B, G_full) expression, clamped at 0.
        """
        offset = self.control_offset(control)
        anchor = self.anchor(control, shift) - offset
        start = self.parts.source(anchor, generator)
        reference = self.reference_cells(anchor)
        out = torch.empty_like(anchor)
        for idx in self.gene_chunks(settings.gene_chunk, generator):
            ctx = self.context(reference if idx is None else reference[:, idx], pert_ids, idx)
            x_0 = start if idx is None else start[:, idx]

            def field(t: Tensor, x: Tensor, ctx: FieldContext = ctx) -> Tensor:
                return self.velocity(t, x, ctx)

            x_1 = ODESolver(field).sample(x_0, settings.ode_method, settings.ode_steps)
            if idx is None:
                out = x_1
            else:
                out[:, idx] = x_1
        return (out + offset).clamp(min=0)
