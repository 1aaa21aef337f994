"""The CFM-VC network (SPEC 2.4): the count VAE and a covariate-aware flow in its ``z_int`` space.
Tensors only.

Training is staged (the model sets :attr:`CFMVCModule.stage`; the engine calls :meth:`loss`):

1. ``vae``: the negative ELBO of the count VAE (:mod:`pertflow.models.cfmvc.vae`) on the batch's
   perturbed and control cells.
2. ``flow``: the VAE frozen (no gradient, eval mode, its latents computed without a graph), a
   conditional flow in ``z_int`` space from the latent of the control cell shifted by the prior's
   response (the flow's anchor) to the latent of a perturbed cell, with the velocity
   ``v(t, z | c) = sum_k alpha_k(c) * basis_k(trunk(z, t, c))``: one shared trunk and ``n_basis``
   basis fields, mixed per context by a small adapter, not one network per perturbation. The
   context ``c`` encodes the perturbation as a multi-hot vector over the vocabulary (so a
   combination is its components together), the batch, the cell type and optional spatial
   coordinates. Loss: velocity MSE + ``lambda_dist`` x MMD of the one-step estimates.
3. ``joint`` (optional): the flow's loss with gradients into the VAE, plus the ELBO.

Sampling encodes the control cells, integrates the flow from their (prior-shifted) latents with the
control's own ``z_tech`` kept, replaces and reports any non-finite velocity, and decodes: the NB
mean or a count sample, normalised as the data's expression.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from pertflow.data.keys import BATCH_KEYS
from pertflow.flows import FlowMatching
from pertflow.models.cfmvc.config import CFMVCConfig
from pertflow.models.cfmvc.vae import CountVAE
from pertflow.models.config import PredictConfig
from pertflow.nn.conditioning import TimestepEmbedder
from pertflow.nn.loss import LossOutput
from pertflow.nn.mlp import mlp
from pertflow.nn.perturbation import unknown_perturbation_dropout

# Names of the per-cell arrays of a CFM-VC batch (besides BATCH_KEYS).
TARGET_COUNTS, CONTROL_COUNTS = "target_counts", "control_counts"  # (B, G + 1) counts, then the rest of the library
TARGET_COVARIATES, CONTROL_COVARIATES = "target_covariates", "control_covariates"  # (B, 2) int64: batch, context
TARGET_SPATIAL = "target_spatial"  # (B, S) coordinates of the perturbed cells
STAGES = ("vae", "flow", "joint")


class ContextEncoder(nn.Module):
    """Perturbation (multi-hot over the vocabulary), batch, cell type and spatial coordinates ->
    (B, d). The perturbation's weights start at zero, so a token never trained adds nothing. The
    cell type is an embedding per context, or with ``summary_dim`` a linear map of a summary of
    it (the context's mean control latent, see ``CFMVCConfig.context_from_controls``). Optional
    descriptor vectors (V, D) of the tokens are summed over a combination's components, projected
    and added (what an unseen component with a descriptor is read by)."""

    def __init__(self, n_tokens: int, n_batch: int, n_context: int, spatial_dim: int, d: int, summary_dim: int = 0,
                 descriptors: Tensor | None = None):
        super().__init__()
        self.perturbation = nn.Linear(n_tokens, d, bias=False)
        nn.init.zeros_(self.perturbation.weight)
        if descriptors is not None:
            self.register_buffer("descriptors", descriptors.float())
            self.descriptor_proj = nn.Linear(descriptors.shape[1], d, bias=False)
        else:
            self.descriptors = None
        self.batch = nn.Embedding(n_batch, d)
        self.context = nn.Linear(summary_dim, d) if summary_dim else nn.Embedding(n_context, d)
        self.spatial = nn.Linear(spatial_dim, d) if spatial_dim else None
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, multi_hot: Tensor, batch_idx: Tensor, context: Tensor, spatial: Tensor | None = None) -> Tensor:
        """``context``: (B,) context indices, or (B, summary_dim) summaries for an encoder built with them."""
        context = self.context(context if isinstance(self.context, nn.Linear) else context.long())
        h = self.perturbation(multi_hot) + self.batch(batch_idx.long()) + context
        if self.descriptors is not None:
            h = h + self.descriptor_proj(multi_hot @ self.descriptors)
        if self.spatial is not None and spatial is not None:
            h = h + self.spatial(spatial.float())
        return self.mlp(h)


class LatentVelocity(nn.Module):
    """``v(t, z | c) = sum_k alpha_k(c) basis_k(h)``, ``h = trunk(cat[z, c + time(t)])``: a shared
    trunk, ``n_basis`` linear basis fields on it, and the adapter ``alpha`` (a linear map of the
    context to ``n_basis`` weights)."""

    def __init__(self, n_latent: int, d_context: int, hidden: int, n_layers: int, n_basis: int):
        super().__init__()
        self.n_latent, self.n_basis = n_latent, n_basis
        self.time = TimestepEmbedder(d_context)
        self.trunk = mlp(n_latent + d_context, hidden, n_layers, layer_norm=True, dropout=0.0, xavier=True)
        self.basis = nn.Linear(hidden, n_basis * n_latent)
        self.adapter = nn.Linear(d_context, n_basis)
        nn.init.xavier_uniform_(self.basis.weight, gain=0.1)
        nn.init.zeros_(self.basis.bias)

    def forward(self, t: Tensor, z_t: Tensor, context: Tensor) -> Tensor:
        """(B,) times, (B, n_latent) state, (B, d) context -> (B, n_latent) velocity."""
        h = self.trunk(torch.cat([z_t, context + self.time(t)], dim=-1))
        basis = self.basis(h).view(-1, self.n_basis, self.n_latent)
        return (self.adapter(context).unsqueeze(-1) * basis).sum(1)


class CFMVCModule(nn.Module):
    """The VAE and the latent flow (see the module docstring).

    Parameters
    ----------
    config
        The model section.
    flow
        The latent flow's matching (path, coupling, time sampler, source): its loss and sampler.
    n_genes
        G.
    n_tokens, pad_id, unk_id
        The vocabulary (the multi-hot's width), its padding and unknown-perturbation tokens.
    target_sum
        The data's normalisation target: cells are written ``log1p(c / L * target_sum)``.
    """

    def __init__(self, config: CFMVCConfig, flow: FlowMatching, n_genes: int, n_tokens: int, pad_id: int, unk_id: int,
                 target_sum: float, descriptors: Tensor | None = None):
        super().__init__()
        self.config, self.flow = config, flow
        self.n_tokens, self.pad_id, self.unk_id = n_tokens, pad_id, unk_id
        self.target_sum = float(target_sum)
        n_batch, n_context = max(1, len(config.batch_names)), max(1, len(config.context_names))
        self.vae = CountVAE(n_genes, n_batch, n_context, config.n_latent, config.n_tech, config.hidden, config.n_layers,
                            config.dropout)
        self.context_encoder = ContextEncoder(n_tokens, n_batch, n_context, config.spatial_dim, config.d_context,
                                              config.n_latent if config.context_from_controls else 0, descriptors)
        self.field = LatentVelocity(config.n_latent, config.d_context, config.flow_hidden, config.flow_layers,
                                    config.n_basis)
        # per context: log-library location and scale (count samples), the control cells' latent
        # (z_int, z_tech) mean and spread (generation without control cells); spatial standardisation
        self.register_buffer("library_loc", torch.zeros(n_context))
        self.register_buffer("library_scale", torch.zeros(n_context))
        self.register_buffer("control_loc", torch.zeros(n_context, config.n_latent + config.n_tech))
        self.register_buffer("control_scale", torch.ones(n_context, config.n_latent + config.n_tech))
        self.register_buffer("spatial_loc", torch.zeros(config.spatial_dim))
        self.register_buffer("spatial_scale", torch.ones(config.spatial_dim))
        self.stage = "vae"

    # ------------------------------------------------------------------ stages
    def set_stage(self, stage: str) -> None:
        """``vae``: only the VAE learns; ``flow``: the VAE is frozen (no gradient, eval mode); ``joint``: all learn."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}'; stages: {STAGES}")
        self.stage = stage
        self.vae.requires_grad_(stage != "flow")
        for part in (self.context_encoder, self.field):
            part.requires_grad_(stage != "vae")
        self.train(self.training)

    def train(self, mode: bool = True) -> CFMVCModule:
        super().train(mode)
        if self.stage == "flow":
            self.vae.eval()  # frozen: no dropout, whatever mode the engine sets
        return self

    # ------------------------------------------------------------------ pieces
    def multi_hot(self, pert_ids: Tensor) -> Tensor:
        """(B, K) perturbation token ids -> (B, n_tokens) multi-hot (padding left out)."""
        out = torch.zeros(pert_ids.shape[0], self.n_tokens, device=pert_ids.device)
        out.scatter_(1, pert_ids.long(), 1.0)
        out[:, self.pad_id] = 0.0
        return out

    def standardise(self, spatial: Tensor | None, n: int, device: torch.device) -> Tensor | None:
        """Spatial coordinates standardised on the training cells; a cell without them sits at 0 (their mean)."""
        if not self.config.spatial_dim:
            return None
        if spatial is None:
            return torch.zeros(n, self.config.spatial_dim, device=device)
        return (spatial.float() - self.spatial_loc) / self.spatial_scale

    def context_of(self, context_idx: Tensor) -> Tensor:
        """What the context encoder reads of each cell's context: its index, or with
        ``context_from_controls`` its training controls' mean ``z_int`` (``control_loc``, fitted
        after the VAE stage)."""
        if self.config.context_from_controls:
            return self.control_loc[context_idx.long(), : self.config.n_latent]
        return context_idx

    def latents(self, target: Tensor, anchor_cells: Tensor, target_cov: Tensor,
                control_cov: Tensor) -> tuple[Tensor, Tensor]:
        """``z_int`` posterior means of the target cells and of the anchor cells (controls shifted by
        the prior); computed without a graph, i.e. detached, while the VAE is frozen."""
        frozen = self.stage == "flow"
        with torch.no_grad() if frozen else contextlib.nullcontext():
            z_1 = self.vae.encode(target, target_cov[:, 0], target_cov[:, 1]).int_mu
            anchor = self.vae.encode(anchor_cells, control_cov[:, 0], control_cov[:, 1]).int_mu
        if frozen:
            z_1, anchor = z_1.detach(), anchor.detach()
        return z_1, anchor

    # ------------------------------------------------------------------ losses
    def loss(self, batch: dict[str, Tensor]) -> LossOutput:
        """The loss of the current stage (see the module docstring)."""
        if self.stage == "vae":
            return self.vae_loss(batch)
        flow = self.flow_loss(batch)
        if self.stage == "flow":
            return flow
        vae = self.vae_loss(batch)
        return LossOutput(flow.loss + self.config.joint_vae_weight * vae.loss, {**flow.metrics, **vae.metrics})

    def vae_loss(self, batch: dict[str, Tensor]) -> LossOutput:
        """Negative ELBO per cell and modelled entry (G + 1), over the batch's perturbed and control cells."""
        x = torch.cat([batch[BATCH_KEYS.TARGET], batch[BATCH_KEYS.CONTROL]])
        counts = torch.cat([batch[TARGET_COUNTS], batch[CONTROL_COUNTS]]).float()
        cov = torch.cat([batch[TARGET_COVARIATES], batch[CONTROL_COVARIATES]])
        rec, kl = self.vae.elbo_terms(x, counts, cov[:, 0], cov[:, 1])
        neg_elbo = -(rec - self.config.beta * kl)
        loss = neg_elbo.mean() / counts.shape[1]
        return LossOutput(loss, {"elbo": float(-neg_elbo.mean().detach()), "nb_nll": float(-rec.mean().detach()),
                                 "kl": float(kl.mean().detach())})

    def flow_loss(self, batch: dict[str, Tensor]) -> LossOutput:
        """Flow matching in ``z_int`` space from the prior-shifted control latents to the perturbed ones."""
        target, control = batch[BATCH_KEYS.TARGET], batch[BATCH_KEYS.CONTROL]
        shift = batch.get(BATCH_KEYS.PRIOR_DELTA)
        anchor_cells = control if shift is None else (control + shift).clamp(min=0)
        target_cov, control_cov = batch[TARGET_COVARIATES], batch[CONTROL_COVARIATES]
        z_1, anchor = self.latents(target, anchor_cells, target_cov, control_cov)
        pert_ids = batch[BATCH_KEYS.PERT_IDS]
        if self.training:
            pert_ids = unknown_perturbation_dropout(pert_ids, self.pad_id, self.unk_id,
                                                    self.config.unknown_perturbation_p)
        x_0, order = self.flow.couple(anchor, z_1)
        x_1, target_cov = z_1[order], target_cov[order]
        spatial = batch.get(TARGET_SPATIAL)
        spatial = self.standardise(None if spatial is None else spatial[order], len(x_1), x_1.device)
        context = self.context_encoder(self.multi_hot(pert_ids), target_cov[:, 0], self.context_of(target_cov[:, 1]),
                                       spatial)
        path = self.flow.interpolate(x_0, x_1)
        v = self.field(path.t, path.x_t, context)
        loss, metrics = self.flow.objective(v, path, self.config.lambda_dist, name="flow_mse")
        return LossOutput(loss, metrics)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, control: Tensor, pert_ids: Tensor, settings: PredictConfig,
               generator: torch.Generator | None = None, shift: Tensor | None = None, covariates: Tensor | None = None,
               spatial: Tensor | None = None, use_mean: bool | None = None) -> Tensor:
        """Perturbed cells, one per control cell.

        Parameters
        ----------
        control
            (B, G) log1p control cells.
        pert_ids
            (B, K) perturbation token ids.
        settings
            The ODE solver and its steps.
        generator
            Seeds the source noise, the libraries and the count samples.
        shift
            (B, G) the prior's shift: the flow starts from the latent of ``control + shift``.
        covariates
            (B, 2) batch and context indices (0, 0 when None).
        spatial
            (B, S) raw coordinates of the cells to generate (None: the training cells' mean).
        use_mean
            The NB mean (True) or a count sample (False); None: as the config says
            (``predict_residual``, else ``predict_mean``).

        Returns
        -------
        Tensor
            (B, G) log1p cells, ``log1p(c / L * target_sum)``.
        """
        n = control.shape[0]
        if covariates is None:
            covariates = torch.zeros(n, 2, dtype=torch.long, device=control.device)
        batch_idx, context_idx = covariates[:, 0].long(), covariates[:, 1].long()
        own = self.vae.encode(control, batch_idx, context_idx)
        anchor = (own.int_mu if shift is None
                  else self.vae.encode((control + shift).clamp(min=0), batch_idx, context_idx).int_mu)
        context = self.context_encoder(self.multi_hot(pert_ids), batch_idx, self.context_of(context_idx),
                                       self.standardise(spatial, n, control.device))
        z_1 = self.integrate(self.flow.start(anchor, generator), context, settings)
        rho = self.vae.decode(z_1, own.tech_mu, batch_idx)
        if self.config.predict_residual and use_mean is None:
            change = self.vae.to_expression(rho, self.target_sum) - self.vae.to_expression(
                self.vae.decode(own.int_mu, own.tech_mu, batch_idx), self.target_sum)
            return (control + change).clamp(min=0)
        if self.config.predict_mean if use_mean is None else use_mean:
            return self.vae.to_expression(rho, self.target_sum)
        noise = torch.randn(n, 1, generator=generator).to(control.device)
        library = (self.library_loc[context_idx, None] + self.library_scale[context_idx, None] * noise).exp()
        return self.vae.to_expression(rho, self.target_sum, library, generator)

    def integrate(self, x_0: Tensor, context: Tensor, settings: PredictConfig) -> Tensor:
        """``z(1)`` of the flow from ``x_0`` (non-finite velocities guarded: :meth:`FlowMatching.solve`)."""
        return self.flow.solve(lambda t, z: self.field(t, z, context), x_0, settings.ode_method, settings.ode_steps,
                               "cfmvc")

    @property
    def nonfinite_velocities(self) -> int:
        """Velocity values replaced by 0 during sampling, over the module's life."""
        return self.flow.nonfinite

    @torch.no_grad()
    def control_latents(self, n: int, context_idx: int,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` draws of a context's control latents ``(z_int, z_tech)`` from their fitted Gaussian
        (for generating without control cells)."""
        loc, scale = self.control_loc[context_idx], self.control_scale[context_idx]
        z = loc + scale * torch.randn(n, loc.shape[0], generator=generator).to(loc.device)
        return z[:, : self.config.n_latent], z[:, self.config.n_latent :]
