"""What the gene-space flow networks share (tensors only; the AnnData side is
:mod:`pertflow.models.flow_model`): the config fields of the backbone and the flow, the flow parts
those fields name, and :class:`GeneFlowNetwork`, the network front and back that every such flow
is built on (per-gene tokens, perturbation and time conditioning, the backbone, the expression
head) with where a flow starts (the anchor), its coordinates and its gene subsets.

A new flow model's config subclasses :class:`GeneFlowConfig` (and adds only its own fields); its
network subclasses :class:`GeneFlowNetwork` and is given the :class:`~pertflow.flows.FlowMatching` of
:func:`flow_matching` (its loss and sampler) instead of reading strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from pertflow.data.keys import BATCH_KEYS
from pertflow.flows import COUPLINGS, TIME_SAMPLERS, AnchoredSource, FlowMatching, GaussianSource
from pertflow.models.config import AnchoredConfig, FlowPathConfig, PredictConfig
from pertflow.nn import ExprDecoder, GeneEncoder
from pertflow.nn.backbone import ContextSummary, ExpressionTokens, GeneFlowBackbone
from pertflow.nn.conditioning import TimestepEmbedder
from pertflow.nn.latent import LatentFlowBackbone
from pertflow.nn.perturbation import PerturbationEncoder, unknown_perturbation_dropout


#: Where a flow starts (the other names of a flow's fields: :mod:`pertflow.models.config`).
FlowSourceName = Literal["noise", "control"]


@dataclass(frozen=True)
class FlowConfig(AnchoredConfig, FlowPathConfig):
    """The ``model`` section fields of every flow model anchored on a prior: the flow's parts
    (:func:`flow_matching`), its prior and how it reads perturbations. The gene-space models
    (:class:`GeneFlowConfig`) and CFM-VC's latent flow subclass it; a subclass may give a field
    another default by declaring it again with the same type (e.g. ``source: FlowSourceName =
    "control"``), never another meaning.

    Attributes
    ----------
    source
        Where the flow starts (t = 0): ``noise``, a standard normal (the SPEC), or ``control``, the
        control cell (or its latent) plus ``source_noise`` times a standard normal: the flow then
        transports the control distribution onto the perturbed one, a much shorter path that a
        small budget learns well.
    source_noise, coupling, time_sampler
        The flow's path (:class:`~pertflow.models.config.FlowPathConfig`).
    prior, validation, validation_held_out, refit
        Those of every anchored model (:class:`~pertflow.models.config.AnchoredConfig`): the flow
        starts from the control cells shifted by the prior's predicted response (with ``source:
        control``), so the network learns only the residual.
    max_components
        Most components of a combination.
    unknown_perturbation_p
        Share of training batches whose perturbation is replaced by ``<unk>``, so that a
        perturbation never seen in training (and without a descriptor) gets the typical
        response instead of an untrained embedding.
    descriptor
        What the network reads of a perturbation's component besides the data's descriptors
        (:mod:`pertflow.models.descriptor_choice`): ``onehot``, its own token (a gene-space
        flow's gene token is shared with expression); ``gene``, also the target gene's loadings
        in a PCA of the training cells; ``auto``, the one that scores best on held-out training
        perturbations where the test asks for unseen ones (the network trained once per
        descriptor), else ``onehot``.
    """

    source: FlowSourceName = "noise"
    max_components: int = 2
    unknown_perturbation_p: float = 0.1
    descriptor: Literal["onehot", "gene", "auto"] = "onehot"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prior != "none" and self.source != "control":
            raise ValueError(f"prior '{self.prior}' shifts where the flow starts: it needs source 'control', not "
                             f"'{self.source}'")


@dataclass(frozen=True)
class GeneFlowConfig(FlowConfig):
    """The ``model`` section fields every gene-space flow model has (defaults are the SPEC's):
    those of every flow (:class:`FlowConfig`: ``source``, ``source_noise``, ``coupling``,
    ``time_sampler``, ``prior``, ``max_components``, ``unknown_perturbation_p``) and these.

    Attributes
    ----------
    d_model, n_heads, n_layers, mlp_ratio, dropout
        Width, attention heads, backbone layers (DiffPerceiverBlocks), MLP width ratio, dropout
        of the value encoders.
    differential_attention
        scDFM's differential attention (True) or plain attention (False, an ablation).
    backbone
        ``dense``: scDFM's backbone (SPEC 2.1), attention among all genes in every layer, O(G^2)
        per cell. ``latent``: a Perceiver-IO backbone (:mod:`pertflow.nn.latent`): ``n_latents``
        vectors read the genes once (differentially against the control cell), ``n_layers`` AdaLN
        blocks run on them, and every gene reads them back; linear in G.
    n_latents
        M, the latent vectors of the ``latent`` backbone.
    d_token
        Width of the gene tokens; None: ``d_model`` for ``dense``, ``d_model // 4`` for ``latent``
        (the latents carry the cell, a gene token only a gene's identity and two values).
    genes_per_step
        G: random genes per training step (all genes when the data has fewer).
    gamma
        Weight of the MMD term on the one-step estimate ``x_t + (1 - t) v``.
    reference_cell
        With a control source, which control cell the network is conditioned on: ``own``, the
        cell the flow starts from, or ``other``, another control cell of the batch. With ``own``
        the network can read the start point off the condition and learn ``v = (x_t - x_0) / t``,
        which carries each cell toward the mean of its possible targets; ``source_noise`` is then
        what keeps the cells spread. ``other`` leaves only the context to the condition, so the
        flow must transport the whole distribution.
    center
        Work in coordinates centred on the control cells' mean per gene: the flow's inputs and
        outputs have the batch's control mean subtracted, and it is added back to the generated
        cells. The network then sees how far a cell is from its own context's controls rather
        than absolute expression, which differs from context to context; the model is exactly
        equivariant to a per-gene shift of all its inputs.
    context_condition
        Also give the network the context as a condition: a summary of the context's control mean
        per gene (:class:`~pertflow.nn.backbone.ContextSummary`) added to the time and perturbation
        condition. With ``center`` the tokens no longer say which context the cells are in; this
        lets the response depend on it (a cell type's own interferon response).
    """

    d_model: int = 128
    n_heads: int = 8
    n_layers: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    differential_attention: bool = True
    backbone: Literal["dense", "latent"] = "dense"
    n_latents: int = 32
    d_token: int | None = None
    genes_per_step: int = 1000
    gamma: float = 0.5
    reference_cell: Literal["own", "other"] = "own"
    center: bool = False
    context_condition: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.genes_per_step < 2:
            raise ValueError("genes_per_step must be at least 2")
        if self.backbone == "dense" and self.d_token not in (None, self.d_model):
            raise ValueError("the dense backbone's gene tokens are d_model wide: leave d_token unset")
        if self.token_width % self.n_heads and self.backbone == "dense":
            raise ValueError(f"d_token ({self.token_width}) must be divisible by n_heads ({self.n_heads})")

    @property
    def token_width(self) -> int:
        """The width of the gene tokens (see ``d_token``)."""
        if self.d_token is not None:
            return self.d_token
        return self.d_model if self.backbone == "dense" else max(8, self.d_model // 4)


def flow_matching(config: FlowConfig) -> FlowMatching:
    """The flow-matching object (:class:`~pertflow.flows.FlowMatching`) a config's fields name."""
    source = GaussianSource() if config.source == "noise" else AnchoredSource(config.source_noise)
    return FlowMatching(COUPLINGS[config.coupling], TIME_SAMPLERS[config.time_sampler], source)


@dataclass
class FieldContext:
    """What the velocity field reads besides ``(t, x_t)``: fixed for a whole ODE solve, so computed
    once (gene embeddings, the control cells' tokens and keys, the perturbation embedding)."""

    gene_idx: Tensor | None
    gene_emb: Tensor
    control_tokens: Tensor
    control_keys: Tensor | None
    pert: Tensor
    context: Tensor | None = None


@dataclass
class FlowBatch:
    """A training batch on the step's genes, in the flow's coordinates (see :meth:`GeneFlowNetwork.prepare`).

    Attributes
    ----------
    target
        (B, G) perturbed cells minus ``offset``.
    anchor
        (B, G) where the flow starts before the source's noise: control cells plus the prior's
        shift, minus ``offset``.
    pert_ids
        (B, K) perturbation tokens (with the unknown-perturbation dropout of training).
    dose
        (B,) each target cell's dose, or None (a network without dose).
    gene_idx
        (G,) the step's genes among the model's (None: all).
    offset
        (1, G) what the coordinates are relative to.
    control_mean
        (1, G) the control batch's mean per gene (what :class:`ContextSummary` reads); None for a
        network without ``context_condition``.
    """

    target: Tensor
    anchor: Tensor
    pert_ids: Tensor
    dose: Tensor | None
    gene_idx: Tensor | None
    offset: Tensor
    control_mean: Tensor | None


class GeneFlowNetwork(nn.Module):
    """The shared front and back of the gene-space flow networks (SPEC 2.1).

    Shapes: B cells, G genes in the step, d width, d_t token width, K perturbation components.

    * tokens: ``fusion(cat[enc_state(x_t), enc_control(reference)]) + gene_emb``  (B, G, d_t)
    * condition: ``c = time_embedding(t) + perturbation_embedding``              (B, d)
    * the backbone (``GeneFlowConfig.backbone``): scDFM's dense layers or the Perceiver-IO latents
    * ``ExprDecoder(cat[x, perturbation])`` -> velocity per gene                   (B, G)

    A subclass adds what its flow needs (a loss, a sampler, more streams) on top of
    :meth:`context`, :meth:`encode` and :meth:`expression_velocity`.

    Parameters
    ----------
    config
        Architecture and loss settings.
    flow
        The flow matching (path, coupling, time sampler, source): loss and sampling go through it.
    gene_tokens
        (G_full,) vocabulary ids of the model's genes, in column order.
    n_tokens, first_other_token, pad_id, unk_id
        Vocabulary size, first non-gene token, padding token, unknown-perturbation token.
    descriptors
        Optional (n_tokens, D) descriptor vectors of perturbation tokens.
    dose
        Condition on each condition's dose: the perturbation encoder's log-dose embedding
        (:class:`~pertflow.nn.perturbation.PerturbationEncoder`), read from the batch's ``dose``
        in training and from ``dose=`` in :meth:`context` / sampling.
    """

    def __init__(
        self,
        config: GeneFlowConfig,
        flow: FlowMatching,
        gene_tokens: Tensor,
        n_tokens: int,
        first_other_token: int,
        pad_id: int,
        unk_id: int,
        descriptors: Tensor | None = None,
        dose: bool = False,
    ):
        super().__init__()
        self.config = config
        self.flow = flow
        self.pad_id, self.unk_id = pad_id, unk_id
        d, d_t = config.d_model, config.token_width
        self.register_buffer("gene_tokens", gene_tokens.long())
        self.gene_encoder = GeneEncoder(n_tokens, d_t, padding_idx=pad_id)
        self.tokens = ExpressionTokens(d_t, config.dropout)
        self.perturbation_encoder = PerturbationEncoder(n_tokens, first_other_token, pad_id, d_t, descriptors,
                                                        dose=dose)
        self.time_embedder = TimestepEmbedder(d)
        if config.backbone == "dense":
            self.condition = nn.Identity()
            self.backbone = GeneFlowBackbone(d, config.n_heads, config.n_layers, config.mlp_ratio,
                                             config.differential_attention)
        else:
            self.condition = nn.Linear(d_t, d)  # the perturbation, at the latents' width
            self.backbone = LatentFlowBackbone(d, d_t, config.n_heads, config.n_layers, config.n_latents,
                                               config.mlp_ratio, config.differential_attention)
        self.decoder = ExprDecoder(2 * d_t, d_t)
        self.context_summary = ContextSummary(d_t, d) if config.context_condition else None

    @property
    def n_genes(self) -> int:
        return int(self.gene_tokens.shape[0])

    def set_grad_checkpointing(self, on: bool) -> None:
        """Recompute the backbone's activations in the backward pass (``train.grad_checkpointing``)."""
        self.backbone.grad_checkpointing = on

    # ------------------------------------------------------------------ the network
    def context(self, reference: Tensor, pert_ids: Tensor, gene_idx: Tensor | None = None,
                dose: Tensor | None = None, control_mean: Tensor | None = None) -> FieldContext:
        """What the field reads besides the state, for reference cells ``(B, G)`` on the genes
        ``gene_idx`` (all genes when None), perturbation tokens ``(B, K)`` and, for a network with
        dose, the doses ``(B,)`` (None: no dose, as for a control); a network with
        ``context_condition`` also reads the context's ``control_mean`` ``(1, G)``."""
        tokens = self.gene_tokens if gene_idx is None else self.gene_tokens[gene_idx]
        gene_emb = self.gene_encoder(tokens).unsqueeze(0)  # (1, G, d_t), broadcast over cells
        control_tokens = self.tokens.control(reference)
        control_keys = (self.backbone.control_keys(control_tokens) if isinstance(self.backbone, LatentFlowBackbone)
                        else None)
        pert = self.perturbation_encoder(pert_ids, self.gene_encoder, dose)
        context = None
        if self.context_summary is not None:
            if control_mean is None:
                raise ValueError("this network conditions on the context (context_condition): pass control_mean")
            context = self.context_summary(control_mean, gene_emb)
        return FieldContext(gene_idx, gene_emb, control_tokens, control_keys, pert, context)

    def encode(self, t: Tensor, x_t: Tensor, ctx: FieldContext, extra_tokens: Tensor | None = None,
               extra_condition: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The backbone's tokens of a state.

        Parameters
        ----------
        t
            (B,) times of the expression flow.
        x_t
            (B, G) state on the genes of ``ctx``.
        ctx
            From :meth:`context`.
        extra_tokens, extra_condition
            (B, G, d_t) added to the tokens and (B, d) added to the condition (a second stream).

        Returns
        -------
        x, pert_tokens, c
            (B, G, d_t) tokens, (B, G, d_t) perturbation tokens, (B, d) the condition.
        """
        x = self.tokens(x_t, ctx.control_tokens, ctx.gene_emb)
        if extra_tokens is not None:
            x = x + extra_tokens
        c = self.time_embedder(t) + self.condition(ctx.pert)
        if extra_condition is not None:
            c = c + extra_condition
        if ctx.context is not None:
            c = c + ctx.context
        if isinstance(self.backbone, LatentFlowBackbone):
            x, pert_tokens = self.backbone(x, ctx.control_keys, ctx.pert, c)
        else:
            x, pert_tokens = self.backbone(x, ctx.gene_emb, ctx.control_tokens, ctx.pert, c)
        return x, pert_tokens, c

    def expression_velocity(self, x: Tensor, pert_tokens: Tensor) -> Tensor:
        """(B, G) velocity of the expression from the backbone's tokens."""
        return self.decoder(torch.cat([x, pert_tokens], dim=-1)).pred

    # ------------------------------------------------------------------ where the flow starts
    def prepare(self, batch: dict[str, Tensor]) -> FlowBatch:
        """A training batch on a random subset of ``genes_per_step`` genes, in the flow's coordinates.

        ``batch``: ``target`` (B, G_full) perturbed cells, ``control`` (B, G_full) control cells of
        the same context, ``pert_ids`` (B, K), and optionally ``prior_delta`` (B, G_full), the
        prior's shift (the flow then starts from ``control + prior_delta``), and ``dose`` (B,).
        """
        target, control, pert_ids = batch[BATCH_KEYS.TARGET], batch[BATCH_KEYS.CONTROL], batch[BATCH_KEYS.PERT_IDS]
        shift = batch.get(BATCH_KEYS.PRIOR_DELTA)
        if self.training:
            pert_ids = unknown_perturbation_dropout(pert_ids, self.pad_id, self.unk_id,
                                                    self.config.unknown_perturbation_p)
        n_genes = target.shape[1]
        g = min(self.config.genes_per_step, n_genes)
        gene_idx = torch.randperm(n_genes, device=target.device)[:g] if g < n_genes else None
        if gene_idx is not None:
            target, control = target[:, gene_idx], control[:, gene_idx]
            shift = None if shift is None else shift[:, gene_idx]
        offset = self.control_offset(control)
        return FlowBatch(target - offset, self.anchor(control, shift) - offset, pert_ids, batch.get(BATCH_KEYS.DOSE),
                         gene_idx, offset, self.context_mean(control))

    @staticmethod
    def anchor(control: Tensor, shift: Tensor | None) -> Tensor:
        """Where the flow starts before the source's noise, and what the network is conditioned
        on: the control cells, shifted by the prior's predicted response when there is one."""
        return control if shift is None else control + shift

    def control_offset(self, control: Tensor) -> Tensor:
        """(1, G) what the flow's coordinates are relative to: the control batch's mean per gene
        with ``center``, else 0 (see ``GeneFlowConfig.center``)."""
        if self.config.center:
            return control.mean(dim=0, keepdim=True)
        return torch.zeros_like(control[:1])

    def context_mean(self, control: Tensor) -> Tensor | None:
        """(1, G) the control batch's mean per gene, what a network with ``context_condition``
        reads of the context (None without it: nothing to compute)."""
        return None if self.context_summary is None else control.mean(dim=0, keepdim=True)

    def control_embedding(self, control: Tensor) -> Tensor:
        """(B, G) control cells -> (B, G, d_t) their tokens, as :meth:`context` reads a control
        batch that no perturbation shifts (relative to :meth:`control_offset`). The value encoder
        is the same for every gene, so gene g's token depends on the cell's value of g alone."""
        return self.tokens.control(control - self.control_offset(control))

    def reference_cells(self, anchor: Tensor) -> Tensor:
        """The cells the network is conditioned on, one per row of ``anchor`` (control cells,
        shifted by the prior when there is one): the cells themselves, or with
        ``source="control"`` and ``reference_cell="other"`` another cell of the batch (the batch
        rolled by one; see ``GeneFlowConfig.reference_cell``)."""
        if self.config.source == "control" and self.config.reference_cell == "other" and anchor.shape[0] > 1:
            return anchor.roll(1, dims=0)
        return anchor

    def gene_chunks(self, chunk: int | None, generator: torch.Generator | None) -> list[Tensor | None]:
        """All genes (``[None]``), or a random partition into chunks of about ``chunk`` genes."""
        if chunk is None or chunk >= self.n_genes:
            return [None]
        perm = torch.randperm(self.n_genes, generator=generator).to(self.gene_tokens.device)
        return list(perm.chunk(math.ceil(self.n_genes / chunk)))

    def sample_by_chunks(
        self,
        control: Tensor,
        pert_ids: Tensor,
        settings: PredictConfig,
        generator: torch.Generator | None,
        shift: Tensor | None,
        generate: Callable[[Tensor, Tensor, FieldContext, PredictConfig], Tensor],
        dose: Tensor | None = None,
    ) -> Tensor:
        """Cells from the source, gene chunk by gene chunk: ``generate(x_0, reference, ctx,
        settings)`` integrates one chunk (in the flow's coordinates) and returns its end point
        (``dose``: (B,) the condition's dose, for a network with dose)."""
        offset = self.control_offset(control)
        control_mean = self.context_mean(control)
        anchor = self.anchor(control, shift) - offset
        start = self.flow.start(anchor, generator)
        reference = self.reference_cells(anchor)
        out = torch.empty_like(anchor)
        for idx in self.gene_chunks(settings.gene_chunk, generator):
            sub_reference = reference if idx is None else reference[:, idx]
            ctx = self.context(sub_reference, pert_ids, idx, dose,
                               control_mean if control_mean is None or idx is None else control_mean[:, idx])
            x_1 = generate(start if idx is None else start[:, idx], sub_reference, ctx, settings)
            if idx is None:
                out = x_1
            else:
                out[:, idx] = x_1
        return (out + offset).clamp(min=0)

    def integrate(self, field: Callable[[Tensor, Tensor], Tensor], x_0: Tensor, settings: PredictConfig) -> Tensor:
        """``x(1)`` of ``dx/dt = field(t, x)`` from ``x(0) = x_0`` with the settings' solver."""
        return self.flow.solve(field, x_0, settings.ode_method, settings.ode_steps, type(self).__name__)
