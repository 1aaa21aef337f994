"""The gene-space conditional flow-matching network (SPEC 2.1): tensors in, velocities out.

Everything but the loss and the sampler is the shared :class:`~pertflow.models.flow.GeneFlowNetwork`
(per-gene tokens, conditioning, backbone, expression head, anchor and coordinates). Training
draws a random subset of genes per step and minimises the velocity MSE plus
``gamma * MMD(x_t + (1 - t) v, target)``; sampling integrates from the source over all genes
(or gene chunks) conditioned on the reference cells, and clamps expression at 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pertflow.models.config import PredictConfig
from pertflow.models.flow import FieldContext, GeneFlowNetwork
from pertflow.nn.loss import LossOutput


class CFMModule(GeneFlowNetwork):
    """The velocity field ``v(t, x_t | reference, perturbation)`` over genes (see the module docstring)."""

    def velocity(self, t: Tensor, x_t: Tensor, ctx: FieldContext) -> Tensor:
        """(B,) times, (B, G) state on the genes of ``ctx`` -> (B, G) velocity."""
        x, pert_tokens, _ = self.encode(t, x_t, ctx)
        return self.expression_velocity(x, pert_tokens)

    def loss(self, batch: dict[str, Tensor]) -> LossOutput:
        """Flow-matching loss on a random gene subset (see :meth:`GeneFlowNetwork.prepare` for the batch)."""
        b = self.prepare(batch)
        x_0, order = self.flow.couple(b.anchor, b.target)
        path = self.flow.interpolate(x_0, b.target[order])
        v = self.velocity(path.t, path.x_t, self.context(self.reference_cells(b.anchor), b.pert_ids, b.gene_idx, b.dose,
                                                         b.control_mean))
        loss, metrics = self.flow.objective(v, path, self.config.gamma)
        return LossOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def sample(self, control: Tensor, pert_ids: Tensor, settings: PredictConfig,
               generator: torch.Generator | None = None, shift: Tensor | None = None,
               dose: Tensor | None = None) -> Tensor:
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
        dose
            (B,) the condition's dose (a network built with ``dose``; None: no dose).

        Returns
        -------
        Tensor
            (B, G_full) expression, clamped at 0.
        """

        def generate(x_0: Tensor, reference: Tensor, ctx: FieldContext, settings: PredictConfig) -> Tensor:
            return self.integrate(lambda t, x: self.velocity(t, x, ctx), x_0, settings)

        return self.sample_by_chunks(control, pert_ids, settings, generator, shift, generate, dose)
