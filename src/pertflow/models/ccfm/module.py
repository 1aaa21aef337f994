"""CCFM's network (SPEC 2.2): a cascaded flow over a latent stream and the expression.

The latent stream is the frozen foundation model's per-gene features of the *target* cell, an
auxiliary generation target (after LatentForcing): at inference the network generates them first,
then the expression conditioned on them; the foundation model is never called there. Shapes: B
cells, G genes in the step, D feature width, d width, d_t token width.

* tokens: the expression tokens of :class:`~pertflow.models.flow.GeneFlowNetwork` plus
  ``FeatureEmbedder(z_t)`` (D -> bottleneck -> d_t), per gene                   (B, G, d_t)
* condition: ``c = temb(t_expr) + temb_latent(t_latent) + perturbation``       (B, d)
* heads: the expression velocity (B, G), and ``FeatureVelocityHead`` (AdaLN self-attention blocks
  over the genes conditioned on c) -> the latent velocity                      (B, G, D)

Training samples each cell's stream (:func:`cascaded_times`): with probability
``choose_latent_p`` the latent stream (t_latent ~ U, t_expr = 0: the expression sits at its
start, the anchor), else the expression stream (t_expr ~ U, t_latent = 1: the true latent; with
``latent_augment`` a, t_latent ~ U(1 - a, 1), the true latent partly noised, so that stage 2
tolerates a generated latent, which sampling noises to t_latent = 1 - a/2).
Loss = expression MSE + ``latent_weight`` x latent MSE + ``gamma`` x MMD on the expression
samples' one-step estimates. Sampling: (1) the latent from noise, t_latent 0 -> 1, with the
expression at its start; (2) the expression from its start, t_expr 0 -> 1, with the generated
latent fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pertflow.models.ccfm.config import CCFMConfig
from pertflow.models.config import PredictConfig
from pertflow.flows import FlowMatching
from pertflow.models.flow import FieldContext, GeneFlowNetwork
from pertflow.nn.attention import AdaLNAttentionBlock
from pertflow.nn.conditioning import TimestepEmbedder
from pertflow.nn.loss import LossOutput

TARGET_LATENT = "target_latent"  # batch key: (B, G_full, D) normalised features of the target cells


class FeatureEmbedder(nn.Module):
    """(B, G, D) foundation features (the latent stream) -> (B, G, d_t) tokens: Linear -> GELU ->
    Linear through a bottleneck. (Kept as the module attribute ``latent_embedder``: the name saved
    runs hold.)"""

    def __init__(self, latent_dim: int, bottleneck_dim: int, d_token: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, bottleneck_dim), nn.GELU(), nn.Linear(bottleneck_dim, d_token))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class FeatureVelocityHead(nn.Module):
    """(B, G, d_t) backbone tokens and (B, d) condition -> (B, G, D) velocity of the latent stream
    (the foundation features; the module attribute ``latent_decoder``, the name saved runs hold).

    A projection, ``depth`` AdaLN self-attention blocks over the genes conditioned on c, then
    LayerNorm -> Linear -> GELU -> Linear to D.
    """

    def __init__(self, d_model: int, d_token: int, latent_dim: int, n_heads: int, depth: int, mlp_ratio: float):
        super().__init__()
        self.proj = nn.Linear(d_token, d_token)
        self.condition = nn.Identity() if d_model == d_token else nn.Linear(d_model, d_token)
        self.blocks = nn.ModuleList(AdaLNAttentionBlock(d_token, n_heads, i, mlp_ratio, differential=False)
                                    for i in range(depth))
        self.final = nn.Sequential(nn.LayerNorm(d_token), nn.Linear(d_token, d_token), nn.GELU(),
                                   nn.Linear(d_token, latent_dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        h, c = self.proj(x), self.condition(c)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h)


@dataclass(frozen=True)
class CascadedTimes:
    """Per-sample times and loss weights of one training batch (see :func:`cascaded_times`)."""

    t_expr: Tensor
    t_latent: Tensor
    latent: Tensor  # (B,) bool: the sample trains the latent stream


def cascaded_times(n: int, choose_latent_p: float, time_sampler, device: torch.device,
                   latent_augment: float = 0.0) -> CascadedTimes:
    """Each sample trains one stream: the latent (prob ``choose_latent_p``; t_latent from the time
    sampler, t_expr = 0) or the expression (t_expr from the time sampler; t_latent = 1, the true
    latent, or with ``latent_augment`` > 0 uniform in [1 - latent_augment, 1]: a partly noised latent)."""
    t_latent, t_expr = time_sampler(n, device), time_sampler(n, device)
    latent = torch.rand(n, device=device) < choose_latent_p
    given = 1.0 - latent_augment * torch.rand(n, device=device) if latent_augment > 0 else torch.ones(n, device=device)
    return CascadedTimes(
        t_expr=torch.where(latent, torch.zeros_like(t_expr), t_expr),
        t_latent=torch.where(latent, t_latent, given),
        latent=latent,
    )


class CCFMModule(GeneFlowNetwork):
    """The cascaded velocity fields ``(v_expr, v_latent)(t_expr, t_latent, x_t, z_t | reference,
    perturbation)`` (see the module docstring).

    Parameters
    ----------
    latent_dim
        D, the foundation model's feature width.
    Others
        As :class:`~pertflow.models.flow.GeneFlowNetwork`.
    """

    def __init__(self, config: CCFMConfig, flow: FlowMatching, gene_tokens: Tensor, n_tokens: int,
                 first_other_token: int, pad_id: int, unk_id: int, latent_dim: int, descriptors: Tensor | None = None):
        super().__init__(config, flow, gene_tokens, n_tokens, first_other_token, pad_id, unk_id, descriptors)
        d, d_t = config.d_model, config.token_width
        heads = config.dh_heads or config.n_heads
        if d_t % heads:
            raise ValueError(f"the latent decoder attends over genes at the token width {d_t}: it must divide by its "
                             f"heads (dh_heads, else n_heads) {heads}")
        self.latent_dim = latent_dim
        self.latent_embedder = FeatureEmbedder(latent_dim, config.bottleneck_dim, d_t)
        self.latent_time_embedder = TimestepEmbedder(d)
        self.latent_decoder = FeatureVelocityHead(d, d_t, latent_dim, heads, config.dh_depth, config.mlp_ratio)

    def streams(self, t_expr: Tensor, t_latent: Tensor, x_t: Tensor, z_t: Tensor,
                ctx: FieldContext) -> tuple[Tensor, Tensor, Tensor]:
        """The backbone's tokens of both streams' state at times ``t_expr``, ``t_latent`` (B,):
        (x, pert_tokens, c) for the heads."""
        return self.encode(t_expr, x_t, ctx, self.latent_embedder(z_t), self.latent_time_embedder(t_latent))

    def velocities(self, t_expr: Tensor, t_latent: Tensor, x_t: Tensor, z_t: Tensor,
                   ctx: FieldContext) -> tuple[Tensor, Tensor]:
        """(B, G) expression and (B, G, D) latent velocities at times ``t_expr``, ``t_latent`` (B,)."""
        x, pert_tokens, c = self.streams(t_expr, t_latent, x_t, z_t, ctx)
        return self.expression_velocity(x, pert_tokens), self.latent_decoder(x, c)

    def latent_velocity(self, t_latent: Tensor, z_t: Tensor, x_0: Tensor, ctx: FieldContext) -> Tensor:
        """Stage 1's field: the latent's velocity with the expression at its start (t_expr = 0)."""
        x, _, c = self.streams(torch.zeros_like(t_latent), t_latent, x_0, z_t, ctx)
        return self.latent_decoder(x, c)

    def expression_velocity_given(self, t_expr: Tensor, x_t: Tensor, latent: Tensor, ctx: FieldContext,
                                  t_latent: float = 1.0) -> Tensor:
        """Stage 2's field: the expression's velocity with the generated latent fixed (at ``t_latent``)."""
        x, pert_tokens, _ = self.streams(t_expr, torch.full_like(t_expr, t_latent), x_t, latent, ctx)
        return self.expression_velocity(x, pert_tokens)

    def loss(self, batch: dict[str, Tensor]) -> LossOutput:
        """The cascaded loss on a random gene subset; ``batch`` as :meth:`GeneFlowNetwork.prepare`
        reads it, plus ``target_latent`` (B, G_full, D)."""
        b = self.prepare(batch)
        z_1 = batch[TARGET_LATENT]
        if b.gene_idx is not None:
            z_1 = z_1[:, b.gene_idx]
        x_0, order = self.flow.couple(b.anchor, b.target)
        x_1, z_1 = b.target[order], z_1[order]
        times = cascaded_times(x_1.shape[0], self.config.choose_latent_p, self.flow.time_sampler, x_1.device,
                               self.config.latent_augment)
        expr_path = self.flow.interpolate(x_0, x_1, times.t_expr)
        latent_path = self.flow.interpolate(torch.randn_like(z_1), z_1, times.t_latent)
        ctx = self.context(self.reference_cells(b.anchor), b.pert_ids, b.gene_idx, control_mean=b.control_mean)
        v_expr, v_latent = self.velocities(times.t_expr, times.t_latent, expr_path.x_t, latent_path.x_t, ctx)
        loss_expr, metrics = self.flow.objective(v_expr, expr_path, self.config.gamma, mask=~times.latent,
                                                 name="mse_expr")
        loss_latent, latent_metrics = self.flow.objective(v_latent, latent_path, mask=times.latent, name="mse_latent")
        return LossOutput(loss=loss_expr + self.config.latent_weight * loss_latent,
                          metrics={**metrics, **latent_metrics})

    @torch.no_grad()
    def sample(self, control: Tensor, pert_ids: Tensor, settings: PredictConfig,
               generator: torch.Generator | None = None, shift: Tensor | None = None) -> Tensor:
        """Generate perturbed cells in two stages, one per control cell (see the module docstring).

        Parameters are those of :meth:`pertflow.models.cfm.module.CFMModule.sample`; each stage
        integrates with ``settings.ode_method`` and ``settings.ode_steps``.
        """

        def generate(x_0: Tensor, reference: Tensor, ctx: FieldContext, settings: PredictConfig) -> Tensor:
            z_noise = torch.randn((*x_0.shape, self.latent_dim), generator=generator).to(x_0.device, x_0.dtype)
            latent = self.integrate(lambda t, z: self.latent_velocity(t, z, x_0, ctx), z_noise, settings)
            # with augmentation, stage 2 reads the generated latent noised to the middle of the
            # training range, as it read true latents (the path at t: (1 - t) noise + t latent)
            s = 1.0 - self.config.latent_augment / 2
            if s < 1.0:
                noise = torch.randn(latent.shape, generator=generator).to(latent.device, latent.dtype)
                latent = (1 - s) * noise + s * latent
            return self.integrate(lambda t, x: self.expression_velocity_given(t, x, latent, ctx, s), x_0, settings)

        return self.sample_by_chunks(control, pert_ids, settings, generator, shift, generate)
