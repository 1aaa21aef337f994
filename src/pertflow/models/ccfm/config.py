"""Configuration of CCFM, the cascaded conditioned flow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pertflow.configs import require_at_least_one
from pertflow.models.flow import GeneFlowConfig
from pertflow.models.latent_shift.config import LatentShiftConfig

#: what the cascade's first stage generates: ``gene-features`` (the SPEC's per-gene features of a
#: frozen foundation, :class:`CCFMConfig`) or ``cell`` (a compact cell-level embedding,
#: :class:`CellCascadeConfig`)
LatentStream = Literal["gene-features", "cell"]


@dataclass(frozen=True)
class CCFMConfig(GeneFlowConfig):
    """The ``model`` section of a ``ccfm`` run: every gene-space flow model's fields
    (:class:`~pertflow.models.flow.GeneFlowConfig`) and the cascade's (SPEC 2.2).

    Attributes
    ----------
    foundation
        A scGPT model folder in the public layout (``args.json``, ``vocab.json``,
        ``best_model.pt``) whose frozen per-gene features are the latent stream's target. None:
        a small scGPT is pretrained on the split's training cells first (``pertflow pretrain``'s
        code), into the run folder, where a resumed or repeated run finds it.
    foundation_d_model, foundation_layers, foundation_steps, foundation_batch_size, foundation_lr
        Size and budget of that pretrained scGPT. Its width is the latent's feature width D: the
        latent is G x D per cell, so D is also what the feature cache costs
        (cells x genes x D x 2 bytes, float16, on disk and memory-mapped).
    foundation_max_seq_len
        Longest sequence of that pretraining, ``<cls>`` included: a cell with more expressed genes
        is sampled down to this many, as scGPT's own pretraining does (1200 there). Its attention
        costs the square of it: on kang (2000 genes, up to ~1500 expressed) a step of 16 cells
        took 3.2 s on one CPU thread at the full length. The features are extracted over all the
        genes whatever this is (scGPT has no positional limit).
    feature_block
        Genes per sequence when the features are extracted: the genes are cut into consecutive
        blocks of this many, each encoded on its own (a gene's features then see its block's
        genes only), so the foundation's attention costs cells x G x block instead of
        cells x G x G. None: all genes in one sequence. Part of the cache's fingerprint.
    n_bins
        Value bins of the foundation's input (51 for the released models and for pertflow's
        pretraining); None feeds log1p values.
    bottleneck_dim
        Width of the ``FeatureEmbedder``'s bottleneck (D -> bottleneck -> token width).
    dh_depth
        AdaLN self-attention blocks of the ``FeatureVelocityHead``.
    dh_heads
        Attention heads of those blocks (None: ``n_heads``). They attend over the genes at the
        token width, which the ``latent`` backbone makes narrow (``d_model // 4``): at d_model 64
        and 4 heads a head is 4 wide, and on CPU the attention's backward then costs more than the
        rest of a step; one 16-wide head is what the CPU config uses.
    choose_latent_p
        Share of training samples that train the latent stream (t_expr = 0); the others train the
        expression stream with the true latent (t_latent = 1).
    latent_augment
        Conditioning augmentation of the expression stream: its latent is the true one noised to
        t_latent ~ U(1 - latent_augment, 1) in training, and the generated one noised to
        1 - latent_augment / 2 in sampling (0: the true latent, t_latent = 1), so that stage 2 does
        not read a generated latent as if it were exact.
    latent_weight
        Weight of the latent stream's velocity loss.
    warmup_batches, target_std
        The latent's normalisation: per-dimension running mean and variance over the first
        ``warmup_batches`` batches of cached training features, then frozen; times ``target_std``.
    latent_dim
        D, the foundation's feature width: read off the foundation when fitting (leave it unset)
        and saved with the run, so that a trained model loads without its foundation.
    latent_stream
        ``gene-features`` (this config). ``cell`` selects the cascade on a compact cell-level
        latent instead, whose ``model`` section is a :class:`CellCascadeConfig`.
    """

    latent_stream: LatentStream = "gene-features"

    foundation: str | None = None
    foundation_d_model: int = 32
    foundation_layers: int = 2
    foundation_steps: int = 300
    foundation_batch_size: int = 16
    foundation_lr: float = 1e-3
    foundation_max_seq_len: int = 1200
    feature_block: int | None = None
    n_bins: int | None = 51
    bottleneck_dim: int = 128
    dh_depth: int = 2
    dh_heads: int | None = None
    choose_latent_p: float = 0.4
    latent_weight: float = 1.0
    latent_augment: float = 0.0
    warmup_batches: int = 200
    target_std: float = 1.0
    latent_dim: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latent_stream != "gene-features":
            raise ValueError(f"latent_stream '{self.latent_stream}' is the cascade on a cell-level latent, "
                             "whose settings are those of CellCascadeConfig (ccfm-cpu.yaml), "
                             "not of the per-gene-feature cascade")
        if not 0.0 < self.choose_latent_p < 1.0:
            raise ValueError(f"choose_latent_p must be in (0, 1): both streams train, got {self.choose_latent_p}")
        if not 0.0 <= self.latent_augment < 1.0:
            raise ValueError(f"latent_augment must be in [0, 1), got {self.latent_augment}")
        if self.foundation_max_seq_len < 2:
            raise ValueError("foundation_max_seq_len must be at least 2 (<cls> and a gene), got "
                             f"{self.foundation_max_seq_len}")
        if self.feature_block is not None and self.feature_block < 1:
            raise ValueError("feature_block must be at least 1 gene (or null: all genes at once), got "
                             f"{self.feature_block}")
        if self.dh_depth < 1:
            raise ValueError(f"dh_depth must be at least 1, got {self.dh_depth}")
        if self.dh_heads is not None and self.dh_heads < 1:
            raise ValueError(f"dh_heads must be at least 1 (or null: n_heads), got {self.dh_heads}")


@dataclass(frozen=True)
class CellCascadeConfig(LatentShiftConfig):
    """The ``model`` section of a ``ccfm`` run whose latent is a compact cell-level embedding
    (``latent_stream: cell``, issue 27): the cascade's first stage is latent-shift's (the
    embedding, its frozen decoder, the prior and a predictor of the target cell's embedding,
    every field of :class:`~pertflow.models.latent_shift.config.LatentShiftConfig`), the second
    a flow in expression space conditioned on the generated embedding.

    Attributes
    ----------
    latent_stream
        ``cell`` (this config).
    predictor
        Stage 1's predictor: ``flow`` (the cascade's own) or ``mlp``.
    expression_hidden, expression_layers
        Width and hidden layers of the expression flow's velocity field ``v(t, x_t, z)``.
    expression_steps, expression_lr, expression_batch_size
        Its training: steps, learning rate, cell pairs of one (perturbation, context) group in a
        step (``groups_per_step`` groups a step).
    expression_noise
        Noise added where the expression flow starts (the decoded cell, see the model).
    expression_mean_weight
        Weight of each group's mean one-step estimate against its real mean, beside the velocity loss.
    expression_pairs
        At most this many (control, perturbed) cell pairs of a group train the expression flow.
    latent_augment
        Noise (a fraction of each embedding dimension's spread) added to the true embedding the
        expression flow is conditioned on in training, so that it does not read the generated
        embedding of stage 1 as exact (0: the true embedding).
    """

    latent_stream: Literal["cell"] = "cell"
    predictor: Literal["mlp", "flow"] = "flow"
    expression_hidden: int = 512
    expression_layers: int = 2
    expression_steps: int = 1500
    expression_lr: float = 1e-3
    expression_batch_size: int = 64
    expression_noise: float = 0.1
    expression_mean_weight: float = 1.0
    expression_pairs: int = 512
    latent_augment: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least_one(self, "expression_hidden", "expression_layers", "expression_steps",
                             "expression_batch_size", "expression_pairs")
        if (self.expression_lr <= 0 or self.expression_noise < 0 or self.expression_mean_weight < 0
                or self.latent_augment < 0):
            raise ValueError("expression_lr must be > 0; expression_noise, expression_mean_weight and "
                             "latent_augment >= 0")
        if self.decode == "prior-residual":  # stage 2 trains from starts decoded without a prior's shift
            raise ValueError("decode 'prior-residual' is latent-shift's: the cascade's expression flow is trained "
                             "from cells decoded without the prior's shift, so use decode=residual (or direct)")
