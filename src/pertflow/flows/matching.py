"""Flow matching as one object: the training objective and the sampler of every flow in pertflow.

:class:`FlowMatching` is given the parts that make a conditional flow (the CondOT path, how
sources and targets pair, where on the path to train, where the flow starts; CellFlow's
``match_fn`` / ``time_sampler`` and Meta's ``flow_matching`` path and solver) and does the
three things each flow family used to write for itself::

    x_0, order = flow.couple(anchor, target)      # the source, and the target rows paired with it
    path = flow.interpolate(x_0, target[order])    # t from the time sampler, x_t and dx_t
    loss, metrics = flow.objective(v, path)        # velocity MSE (+ MMD of the one-step estimates)
    x_1 = flow.solve(field, x_0, method, steps)    # the ODE, with non-finite velocities guarded

A network owns only its velocity field; the families differ in what the field reads (genes,
an embedding, a VAE latent, two streams), never in how flow matching is done.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pertflow.flows.coupling import Coupling, independent_coupling
from pertflow.flows.path import CondOTPath, PathSample
from pertflow.flows.solver import FiniteVelocity, ODESolver, VelocityField
from pertflow.flows.source import AnchoredSource, GaussianSource
from pertflow.flows.time import TimeSampler
from pertflow.ops.kernels import mmd2_rbf


@dataclass
class FlowMatching:
    """A conditional flow: path, coupling, time sampler and source (see the module docstring).

    Attributes
    ----------
    coupling
        Pairs a batch of sources with a batch of targets (a permutation of the targets).
    time_sampler
        ``(n, device) -> (n,)`` training times in [0, 1].
    source
        Where the flow starts: noise, or the anchor (control cells, shifted by a prior) plus noise.
    path
        The probability path (CondOT: straight lines from source to target).
    nonfinite
        Velocity values replaced by 0 during :meth:`solve`, over the object's life.
    """

    coupling: Coupling
    time_sampler: TimeSampler
    source: GaussianSource | AnchoredSource
    path: CondOTPath = field(default_factory=CondOTPath)
    nonfinite: int = 0

    # ------------------------------------------------------------------ training
    def couple(self, anchor: Tensor, target: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
        """The source drawn at ``anchor`` (B, ...) and the order of ``target``'s rows paired with it.

        ``groups``: the batch is that many equal contiguous groups (each a perturbation in a
        context) and pairs are made within a group, never across.
        """
        x_0 = self.source(anchor)
        if self.coupling is independent_coupling:
            return x_0, torch.arange(len(target), device=target.device)
        size = len(target) // groups
        if groups < 1 or size * groups != len(target):
            raise ValueError(f"{len(target)} rows are not {groups} equal groups")
        order = [start + self.coupling(x_0[start:start + size], target[start:start + size])
                 for start in range(0, len(target), size)]
        return x_0, torch.cat(order)

    def interpolate(self, x_0: Tensor, x_1: Tensor, t: Tensor | None = None) -> PathSample:
        """A point of the path between each source and its target, at ``t`` (default: drawn by the
        time sampler), with the target velocity."""
        if t is None:
            t = self.time_sampler(x_1.shape[0], x_1.device)
        return self.path.sample(t, x_0, x_1)

    def objective(self, v: Tensor, path: PathSample, mmd_weight: float = 0.0, mask: Tensor | None = None,
                  name: str = "mse") -> tuple[Tensor, dict[str, float]]:
        """The flow-matching loss of velocities ``v`` on ``path``: the mean squared error to the
        target velocity, plus ``mmd_weight`` times the MMD between the one-step estimates of the
        targets (``x_t + (1 - t) v``) and the targets themselves (when at least two rows).

        ``mask``: (B,) bool, the rows that count (a loss of 0, still attached to ``v``, when none
        does); ``name``: the MSE's key in the metrics.
        """
        if mask is not None:
            if not bool(mask.any()):
                zero = v.sum() * 0.0
                return zero, {name: 0.0}
            v, path = v[mask], PathSample(path.t[mask], path.x_t[mask], path.dx_t[mask], path.x_1[mask])
        mse = ((v.float() - path.dx_t.float()) ** 2).mean()
        loss, metrics = mse, {name: float(mse.detach())}
        if mmd_weight > 0 and v.shape[0] >= 2:
            mmd = mmd2_rbf(self.estimate(v, path).float(), path.x_1.float())
            loss = loss + mmd_weight * mmd
            metrics["mmd"] = float(mmd.detach())
        return loss, metrics

    def estimate(self, v: Tensor, path: PathSample) -> Tensor:
        """The one-step estimates of the targets from velocities ``v`` on ``path``: ``x_t + (1 - t) v``
        (exact on the path for the true velocity)."""
        return self.path.target_estimate(path.x_t, v, path.t)

    # ------------------------------------------------------------------ sampling
    def start(self, anchor: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Where a trajectory starts for ``anchor`` (the source, seeded by ``generator``)."""
        return self.source(anchor, generator)

    def solve(self, field: VelocityField, x_0: Tensor, method: str, steps: int, what: str = "the flow") -> Tensor:
        """``x(1)`` of ``dx/dt = field(t, x)`` from ``x(0) = x_0``. A non-finite velocity value is
        replaced by 0 and counted (:attr:`nonfinite`, and a warning naming ``what``), never passed on."""
        guarded = FiniteVelocity(field)
        x_1 = ODESolver(guarded).sample(x_0, method, steps)
        if guarded.replaced:
            self.nonfinite += guarded.replaced
            warnings.warn(f"{what}: {guarded.replaced} non-finite velocity values during integration (first at t = "
                          f"{guarded.first_time:.3f}) were replaced by 0", RuntimeWarning, stacklevel=2)
        return x_1
