"""What the gene-space flow networks share: the config fields of the backbone and the flow, and
the flow parts those fields name (tensors only; the AnnData side is :mod:`pertflow.models.flow_model`).

A new flow model's config subclasses :class:`GeneFlowConfig` (and adds only its own fields);
its network is given the parts of :func:`flow_parts` instead of reading strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pertflow.flows import COUPLINGS, TIME_SAMPLERS, AnchoredSource, Coupling, GaussianSource, TimeSampler


@dataclass(frozen=True)
class GeneFlowConfig:
    """The ``model`` section fields every gene-space flow model has (defaults are the SPEC's).

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
    max_components
        Most components of a combination.
    unknown_perturbation_p
        Share of training batches whose perturbation is replaced by ``<unk>``, so that a
        perturbation never seen in training (and without a descriptor) gets the typical
        response instead of an untrained embedding.
    source
        Where the flow starts (t = 0): ``noise``, a standard normal (the SPEC), or ``control``, the
        control cell plus ``source_noise`` times a standard normal: the flow then transports the
        control distribution onto the perturbed one, a much shorter path that a small budget
        learns well.
    source_noise
        Scale of the noise added to a control source.
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
    coupling
        How the B targets of a batch are paired with the B sources (:data:`pertflow.flows.COUPLINGS`):
        ``independent`` (as drawn) or ``ot`` (minibatch optimal transport, straighter paths).
    time_sampler
        Where on the path training samples are taken (:data:`pertflow.flows.TIME_SAMPLERS`).
    prior
        The baseline the flow is anchored on (:mod:`pertflow.models.prior`): the flow starts from
        the control cells shifted by its predicted response (with ``source: control``), so the
        network learns only the residual; ``none`` starts from the controls themselves; ``auto``
        picks the baseline that scores best on the split's validation perturbations.
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
    max_components: int = 2
    unknown_perturbation_p: float = 0.1
    source: Literal["noise", "control"] = "noise"
    source_noise: float = 0.1
    reference_cell: Literal["own", "other"] = "own"
    center: bool = False
    coupling: Literal["independent", "ot"] = "independent"
    time_sampler: Literal["uniform", "logit-normal"] = "uniform"
    prior: Literal["none", "mean", "additive", "linear", "context-shift", "auto"] = "none"

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.genes_per_step < 2:
            raise ValueError("genes_per_step must be at least 2")
        if self.prior != "none" and self.source != "control":
            raise ValueError(f"prior '{self.prior}' shifts where the flow starts: it needs source 'control', not '{self.source}'")
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


@dataclass(frozen=True)
class FlowParts:
    """The parts a flow network is given: how sources and targets pair, where on the path to
    train, and where the flow starts."""

    coupling: Coupling
    time_sampler: TimeSampler
    source: GaussianSource | AnchoredSource


def flow_parts(config: GeneFlowConfig) -> FlowParts:
    """The parts named by a config."""
    source = GaussianSource() if config.source == "noise" else AnchoredSource(config.source_noise)
    return FlowParts(COUPLINGS[config.coupling], TIME_SAMPLERS[config.time_sampler], source)
