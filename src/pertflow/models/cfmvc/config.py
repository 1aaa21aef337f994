"""Configuration of CFM-VC, the count VAE with a covariate-aware flow in its latent space."""

from __future__ import annotations

from dataclasses import dataclass

from pertflow.configs import require_at_least_one
from pertflow.models.config import CouplingName, PriorName
from pertflow.models.flow import FlowConfig, FlowSourceName


@dataclass(frozen=True)
class CFMVCConfig(FlowConfig):
    """The ``model`` section of a ``cfmvc`` run (SPEC 2.4): the fields of every flow
    (:class:`~pertflow.models.flow.FlowConfig`: ``source``, ``source_noise``, ``coupling``,
    ``time_sampler``, ``prior``, ``max_components``, ``unknown_perturbation_p``), read in the
    latent space, with CFM-VC's defaults (``source: control``, ``coupling: ot``, ``prior: auto``),
    and these.

    Attributes
    ----------
    n_latent, n_tech
        Widths of the intrinsic latent ``z_int`` (what the flow moves) and the technical latent
        ``z_tech`` (carried over from the control cell a generated cell starts from).
    hidden, n_layers, dropout
        The VAE's encoder and decoder MLPs.
    beta
        Weight of the KL terms of the ELBO.
    counts_layer
        The layer of raw counts the NB likelihood reads; None: the expression itself when it is
        counts, else the first of ``counts``, ``counts_reconstructed``, ``raw_counts``, ``raw``.
    vae_steps, vae_lr
        Stage 1: steps and learning rate of the VAE (the ``train`` section's other settings).
    flow_hidden, flow_layers, d_context, n_basis
        Stage 2: the velocity field's shared trunk (width, depth), the context encoder's width,
        and the number of basis velocity fields the per-context adapter mixes.
    context_from_controls
        How the flow reads the cell's context (cell type): False, an embedding per context (the
        seed's, learned only from the context's perturbed cells, so a context seen only in its
        controls -- the test context of a transfer task -- has an untrained one); True, a linear map
        of the context's mean control latent, which every context with control cells has.
    lambda_dist
        Weight of the distribution-matching term: the MMD between the one-step estimates
        ``z_t + (1 - t) v`` and the target latents (0: off).
    source, prior
        As every flow's, in latent space: with ``source: control`` the flow starts from the
        encoded control cell (shifted by the prior's predicted response, applied to the control
        cell before encoding) plus ``source_noise`` noise.
    spatial_key
        ``obsm`` key of spatial coordinates the flow is conditioned on (standardised on the
        training cells; a cell without coordinates sits at their mean); None: none.
    freeze_vae, joint_steps, joint_lr, joint_vae_weight
        Stage 3: with ``freeze_vae: false``, ``joint_steps`` steps of fine-tuning the VAE and the
        flow together (the flow's loss plus ``joint_vae_weight`` times the ELBO) at ``joint_lr``.
    predict_mean
        Predicted cells are the decoder's NB mean (True) or a count sample of it (False), both
        normalised as the data's expression (``log1p(c / L * target_sum)``).
    predict_residual
        Predicted cells are the control cell plus the decoded change: the decoder's mean of the
        flow's latent minus that of the control cell's own latent, both on the data's scale
        (clipped at 0). The control cell keeps its own measurement noise, as latent-shift's
        decoder keeps it, instead of a count sample of a decoder that may not reconstruct the
        cell well; ``predict_mean`` is then not read.
    context_names, batch_names, spatial_dim
        The covariates' categories and the coordinates' width: read off the data when the
        model is built (leave them unset) and saved with the run.
    """

    n_latent: int = 16
    n_tech: int = 4
    hidden: int = 128
    n_layers: int = 2
    dropout: float = 0.1
    beta: float = 1.0
    counts_layer: str | None = None
    vae_steps: int = 2000
    vae_lr: float = 1e-3
    flow_hidden: int = 128
    flow_layers: int = 3
    d_context: int = 64
    n_basis: int = 8
    context_from_controls: bool = False
    lambda_dist: float = 0.0
    # CFM-VC's defaults of FlowConfig's fields (same types, another default)
    source: FlowSourceName = "control"
    coupling: CouplingName = "ot"
    prior: PriorName = "auto"
    spatial_key: str | None = None
    freeze_vae: bool = True
    joint_steps: int = 200
    joint_lr: float = 1e-4
    joint_vae_weight: float = 1.0
    predict_mean: bool = False
    predict_residual: bool = False
    context_names: tuple[str, ...] = ()
    batch_names: tuple[str, ...] = ()
    spatial_dim: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least_one(self, "n_latent", "n_tech", "hidden", "n_layers", "vae_steps", "flow_hidden",
                             "flow_layers", "d_context", "n_basis")
        if not self.freeze_vae and self.joint_steps < 1:
            raise ValueError("freeze_vae: false fine-tunes the VAE and the flow together for joint_steps steps: give "
                             "joint_steps >= 1")
        if self.lambda_dist < 0 or self.beta < 0:
            raise ValueError("lambda_dist and beta must be >= 0")
