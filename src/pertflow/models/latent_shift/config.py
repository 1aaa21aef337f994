"""The ``model`` section of a ``latent-shift`` run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pertflow.configs import require_at_least_one
from pertflow.models.config import AnchoredConfig, FlowPathConfig


@dataclass(frozen=True)
class LatentShiftConfig(AnchoredConfig, FlowPathConfig):
    """A perturbation predictor in an embedding space, decoded by a frozen decoder (SPEC 2.5).

    The predictor itself is trained with the run's ``train`` section (``max_steps``,
    ``batch_size`` = cells of one group in a step, ``lr``, ``seed``, ...); the decoder, trained
    before it, with the ``decoder_*`` fields here.

    Attributes
    ----------
    embedding
        The embedding space, fitted on the split's training cells only: ``pca`` (principal
        components of the log1p expression), ``scgpt`` (cell embeddings of the frozen scGPT in
        the folder ``scgpt_checkpoint``) or ``cfm-vc`` (the intrinsic latent of CFM-VC's count VAE,
        trained on the training cells' counts: :mod:`pertflow.models.latent_shift.vae_embedding`).
    n_components
        Principal components of the ``pca`` embedding; the latent's width with ``cfm-vc``.
    vae_steps, counts_layer
        ``cfm-vc``: the VAE's training steps, and the layer of raw counts (None: found as CFM-VC
        finds it).
    scgpt_checkpoint
        A scGPT folder (``args.json``, ``vocab.json``, ``best_model.pt``: a public model, or one
        of ``pertflow pretrain``); the run records its path and reads it again when loaded.
    scgpt_max_seq_len
        Longest scGPT input sequence, ``<cls>`` included.
    predictor
        ``mlp`` (the reference conditional MLP) or ``flow`` (flow matching in the embedding space).
    descriptor
        The perturbation descriptor: ``onehot`` over the training perturbations' components,
        ``gene`` (the target gene's PCA loadings, or its scGPT gene embedding with ``embedding:
        scgpt``) or ``file`` (vectors keyed by component name, ``descriptor_file``, or the data
        spec's descriptors when no file is named). A combination is the sum of its components.
        ``auto``: where the test asks for components no training cell has (unseen
        perturbations), one predictor per descriptor at hand (``onehot``, ``gene`` unless the
        embedding is ``cfm-vc``, ``file`` where vectors are given) is trained on the inner split,
        and the one whose cells score best on its held-out perturbations is kept (the choice is
        saved with the run, in the fit report's ``descriptor``); elsewhere ``onehot``, which
        names every trained component.
    descriptor_rotations
        ``auto``: inner splits each descriptor is scored on (the mean ranks): the one the model is
        fitted on and ``descriptor_rotations - 1`` more holding out other training perturbations
        (their predictors cost one training each).
    descriptor_file
        CSV / TSV / parquet / npz of descriptor vectors, the first column (or the index) the name
        (read with ``descriptor: file`` or ``auto``).
    center
        Work relative to the context: the predictor sees and predicts embeddings minus the mean
        embedding of the context's control cells (added back afterwards), so that a shift learnt
        in one context carries to another.
    context_summary
        Also condition on the context: the mean embedding of its control cells.
    train_unknown
        Train a pseudo-perturbation per context with a zero descriptor whose cells are all of the
        context's perturbed cells, so that a perturbation without a descriptor (never seen) is
        predicted as the typical response instead of an untrained extrapolation.
    pairing
        How a group's perturbed cells are paired with control cells: ``random`` or ``ot``
        (optimal transport over the group, in the embedding).
    prior, validation, validation_held_out, refit
        Those of every anchored model (:class:`~pertflow.models.config.AnchoredConfig`): the
        prior's shift, carried into the embedding, moves the control cells before the predictor
        sees them, and the predictor learns the residual.
    hidden, n_layers
        Width and hidden layers of the predictor's network.
    groups_per_step
        (perturbation, context) groups in a training step (``train.batch_size`` pairs each).
    mmd_weight
        MLP predictor: weight of the MMD term beside the squared error of the group means.
    source_noise, coupling, time_sampler
        Flow predictor (:class:`~pertflow.models.config.FlowPathConfig`): the noise added to the
        (shifted) control embeddings where the flow starts, the coupling applied within each
        group, and where on the path to train.
    mean_weight
        Flow predictor: weight of the squared error of each group's mean one-step estimate
        against its real mean, beside the velocity loss (the MLP's mean term, for the flow).
    flow_reads_start
        Flow predictor: the velocity field also reads where its trajectory started (the noised
        control embedding), not only the current point, the covariate and the time.
    decoder_hidden, decoder_layers, decoder_steps, decoder_lr, decoder_batch_size
        The decoder (embedding -> expression, non-negative output), trained once on the training
        cells and then frozen.
    decode
        ``direct``: a predicted cell is ``decoder(z)``. ``residual``: the control cell it came from
        plus ``decoder(z) - decoder(z_control)`` (the decoder's change), which keeps that cell's
        variation outside the embedding and cancels the decoder's bias. ``prior-residual``: the
        prior's cell (the control cell plus the prior's shift) plus ``decoder(z) - decoder(z_prior)``,
        the decoder's change from the prior's embedding to the predicted one: the prior's shift
        enters whole, also the part of it outside the embedding, which ``residual`` loses, and a
        predictor that adds nothing to its prior predicts the prior exactly (the same as
        ``residual`` where the prior's shift is zero).
    """

    embedding: Literal["pca", "scgpt", "cfm-vc"] = "pca"
    n_components: int = 50
    vae_steps: int = 2000
    counts_layer: str | None = None
    scgpt_checkpoint: str | None = None
    scgpt_max_seq_len: int = 1200
    predictor: Literal["mlp", "flow"] = "mlp"
    descriptor: Literal["onehot", "gene", "file", "auto"] = "onehot"
    descriptor_rotations: int = 3
    descriptor_file: str | None = None
    center: bool = True
    context_summary: bool = True
    train_unknown: bool = True
    pairing: Literal["random", "ot"] = "ot"
    hidden: int = 256
    n_layers: int = 2
    groups_per_step: int = 8
    mmd_weight: float = 1.0
    mean_weight: float = 0.0
    flow_reads_start: bool = True
    decoder_hidden: int = 256
    decoder_layers: int = 2
    decoder_steps: int = 800
    decoder_lr: float = 1e-3
    decoder_batch_size: int = 256
    decode: Literal["direct", "residual", "prior-residual"] = "direct"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least_one(self, "n_components", "vae_steps", "descriptor_rotations", "hidden", "n_layers",
                             "groups_per_step", "decoder_hidden", "decoder_layers", "decoder_steps",
                             "decoder_batch_size")
        if self.scgpt_max_seq_len < 2:
            raise ValueError("scgpt_max_seq_len must be at least 2 (<cls> and one gene)")
        if self.mmd_weight < 0 or self.mean_weight < 0 or self.source_noise < 0 or self.decoder_lr <= 0:
            raise ValueError("mmd_weight, mean_weight and source_noise must be >= 0 and decoder_lr > 0")
        if self.embedding == "cfm-vc" and self.descriptor == "gene":
            raise ValueError("descriptor 'gene' needs gene vectors, which the CFM-VC latent has none of: use "
                             "model.embedding=pca (or scgpt), or model.descriptor=onehot with embedding 'cfm-vc'")
        if self.embedding == "scgpt" and not self.scgpt_checkpoint:
            raise ValueError("embedding 'scgpt' needs a scGPT folder: set model.scgpt_checkpoint=FOLDER (a public "
                             "scGPT model, or one made by `pertflow pretrain`)")
        if self.descriptor_file is not None and self.descriptor not in ("file", "auto"):
            raise ValueError(f"descriptor_file is read with descriptor 'file' or 'auto', not '{self.descriptor}'")
