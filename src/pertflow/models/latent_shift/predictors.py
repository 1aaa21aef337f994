"""Perturbation predictors in an embedding space (SPEC 2.5): the protocol and two implementations.

A predictor is any object with two methods (:class:`LatentPredictor`, a ``typing.Protocol``)::

    train(ctrl_emb (n, k), pert_emb (n, k), pert_cov (n, c)) -> None
    predict(ctrl_emb (m, k), pert_cov (m, c)) -> pred_emb (m, k)

``train`` gets pairs: row i is a control cell's embedding, a perturbed cell's embedding of the
same perturbation in the same context, and the covariate vector that conditions the prediction
(the perturbation's descriptor, and a summary of the context). There is no cell-to-cell
correspondence between a perturbed and a control cell (sequencing destroys the cell): the pairs
are drawn at random or matched by optimal transport, and rows with the same covariate form one
group, one (perturbation, context), which is what the two predictors here learn from.

* :class:`MLPPredictor`, the reference: ``z_hat = z_ctrl + MLP([z_ctrl, cov])``. Trained on the
  **group means** (squared error of the mean predicted and mean real embedding of a group) plus
  an MMD between the predicted and real cells of the group. A per-pair squared error, the
  tutorial's loss, would teach the network the *average* perturbed cell of a group whatever the
  control (the pairs are random), and collapse every predicted cell onto the group mean; the
  mean term fixes the shift, the MMD term the spread, and the residual form keeps each control
  cell's own variation.
* :class:`FlowPredictor`: conditional flow matching in the embedding space, built from the
  shared flow parts (:mod:`pertflow.flows`): the flow starts from the (noised) control cells,
  follows the CondOT path to the perturbed cells of the pairs (optionally re-coupled by minibatch
  optimal transport), and is integrated with :class:`~pertflow.flows.ODESolver`. Its velocity
  field is a small MLP ``v(t, z_t, cov)``.

Both are networks (``loss(batch)``) trained by the shared engine
(:func:`~pertflow.models.latent_shift.training.train_network`); the model hands them the run's
training settings and folder, used on their own they train in a temporary folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from pertflow.flows import COUPLINGS, TIME_SAMPLERS, AnchoredSource, FlowMatching
from pertflow.models.config import PredictConfig
from pertflow.models.latent_shift.training import GroupBatches, train_network
from pertflow.nn.conditioning import TimestepEmbedder
from pertflow.nn.loss import LossOutput
from pertflow.nn.mlp import mlp
from pertflow.ops.kernels import mmd2_rbf
from pertflow.train.config import TrainConfig

PREDICT_CHUNK = 4096


@runtime_checkable
class LatentPredictor(Protocol):
    """What the latent-shift model needs of a perturbation predictor (see the module docstring)."""

    def train(self, ctrl_emb: np.ndarray, pert_emb: np.ndarray, pert_cov: np.ndarray) -> None: ...

    def predict(self, ctrl_emb: np.ndarray, pert_cov: np.ndarray) -> np.ndarray: ...


def _as_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _by_group(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """(n, k) rows in equal contiguous groups -> (groups, n / groups, k)."""
    n_groups = int(group.max()) + 1
    return x.reshape(n_groups, -1, x.shape[-1])


# ============================================================================ networks


class ConditionalMLP(nn.Module):
    """``z_hat = z + MLP([z, cov])``; loss: group means' squared error + ``mmd_weight`` * MMD."""

    def __init__(self, latent_dim: int, cov_dim: int, hidden: int = 256, n_layers: int = 2, mmd_weight: float = 1.0):
        super().__init__()
        self.net = mlp(latent_dim + cov_dim, hidden, n_layers, latent_dim)
        self.mmd_weight = mmd_weight

    def forward(self, latent: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        return latent + self.net(torch.cat([latent, cov], dim=-1))

    def loss(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        pred = _by_group(self(batch["source"], batch["cov"]), batch["group"])
        real = _by_group(batch["target"], batch["group"])
        mean_error = (pred.mean(1) - real.mean(1)).pow(2).mean()
        metrics = {"mean_mse": float(mean_error.detach())}
        loss = mean_error
        if self.mmd_weight > 0 and pred.shape[1] >= 2:
            mmd = torch.stack([mmd2_rbf(p, r) for p, r in zip(pred, real)]).mean()
            loss = loss + self.mmd_weight * mmd
            metrics["mmd"] = float(mmd.detach())
        return LossOutput(loss=loss, metrics=metrics)


class LatentFlow(nn.Module):
    """A velocity field ``v(t, z_t, cov[, z_0])`` in the embedding space, trained by flow matching.

    With ``reads_start`` the field also reads the point its trajectory started from (the noised
    control embedding), so the flow learns how each control cell moves. That helped on a held-out
    glioblastoma line (read without it the flow carried the cells onto the training lines'
    spread: E-distance 2.3 against 0.27 for no change), and hurt on kang's held-out cell types,
    where a field of ``z_t`` alone with more source noise transferred far better (CD14+Mono:
    E-distance 1.26 against 7.65; ``benchmarks/results/NOTES.md``).

    Parameters
    ----------
    flow
        The flow matching: its coupling (applied within each group of a batch), time sampler and
        source (the control embeddings plus noise).
    """

    def __init__(self, latent_dim: int, cov_dim: int, flow: FlowMatching, hidden: int = 256, n_layers: int = 2,
                 time_dim: int = 32, mean_weight: float = 0.0, reads_start: bool = True):
        super().__init__()
        self.flow = flow
        self.mean_weight = mean_weight
        self.reads_start = reads_start
        self.time = TimestepEmbedder(time_dim, freq_dim=64)
        self.net = mlp((2 if reads_start else 1) * latent_dim + time_dim + cov_dim, hidden, n_layers, latent_dim)

    def velocity(self, t: torch.Tensor, z_t: torch.Tensor, cov: torch.Tensor, z_0: torch.Tensor) -> torch.Tensor:
        inputs = [z_t, self.time(t), cov, z_0] if self.reads_start else [z_t, self.time(t), cov]
        return self.net(torch.cat(inputs, dim=-1))

    def loss(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        groups = int(batch["group"].max()) + 1  # pair within each group, never across
        z_0, order = self.flow.couple(batch["source"], batch["target"], groups)
        path = self.flow.interpolate(z_0, batch["target"][order])
        v = self.velocity(path.t, path.x_t, batch["cov"], z_0)
        loss, metrics = self.flow.objective(v, path, name="velocity_mse")
        if self.mean_weight > 0:  # each group's mean one-step estimate on its real mean (the MLP's mean term)
            estimate, real = _by_group(self.flow.estimate(v, path), batch["group"]), _by_group(path.x_1, batch["group"])
            mean_error = (estimate.mean(1) - real.mean(1)).pow(2).mean()
            loss = loss + self.mean_weight * mean_error
            metrics["mean_mse"] = float(mean_error.detach())
        return LossOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def sample(self, anchor: torch.Tensor, cov: torch.Tensor, generator: torch.Generator | None, method: str,
               steps: int) -> torch.Tensor:
        z_0 = self.flow.start(anchor, generator)
        return self.flow.solve(lambda t, z: self.velocity(t, z, cov, z_0), z_0, method, steps,
                               "the latent flow predictor")


# ============================================================================ predictors


class NetworkPredictor:
    """A :class:`LatentPredictor` backed by a network trained with the shared engine.

    Parameters
    ----------
    latent_dim, cov_dim
        k and c.
    hidden, n_layers
        The network's width and hidden layers.
    groups_per_step
        Groups per training batch (``train_config.batch_size`` pairs each).
    train_config
        Steps, batch size, learning rate, seed... (default: 1000 steps of 8 x 64 pairs, lr 1e-3).
    """

    name: ClassVar[str] = ""
    DEFAULT_TRAINING: ClassVar[TrainConfig] = TrainConfig(
        max_steps=1000, batch_size=64, lr=1e-3, warmup_steps=50, min_lr_ratio=0.05, val_every=1000,
        checkpoint_every=1000, progress=False,
    )

    def __init__(self, latent_dim: int, cov_dim: int, *, hidden: int = 256, n_layers: int = 2, groups_per_step: int = 8,
                 train_config: TrainConfig | None = None):
        self.latent_dim, self.cov_dim = int(latent_dim), int(cov_dim)
        self.hidden, self.n_layers, self.groups_per_step = hidden, n_layers, groups_per_step
        self.train_config = train_config or self.DEFAULT_TRAINING
        self.network = self.build_network()
        self.fit_report: dict[str, Any] = {}

    def build_network(self) -> nn.Module:
        raise NotImplementedError

    def _check(self, name: str, x: np.ndarray, width: int) -> None:
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"{name} must be (n, {width}), got {x.shape}")

    def train(self, ctrl_emb: np.ndarray, pert_emb: np.ndarray, pert_cov: np.ndarray, *,
              groups: np.ndarray | None = None, run_dir: Path | None = None,
              metadata: dict[str, Any] | None = None) -> None:
        """Fit on pairs (see the module docstring).

        ``groups``: (n,) a label per pair, its (perturbation, context), when the covariates do not
        tell the groups apart (default: one group per distinct covariate vector); ``run_dir``: the
        folder of the shared engine's checkpoints and ``history.csv`` (a temporary one when None).
        """
        ctrl_emb, pert_emb, pert_cov = (np.asarray(a, np.float32) for a in (ctrl_emb, pert_emb, pert_cov))
        self._check("ctrl_emb", ctrl_emb, self.latent_dim)
        self._check("pert_emb", pert_emb, self.latent_dim)
        self._check("pert_cov", pert_cov, self.cov_dim)
        config = self.train_config
        batches = GroupBatches(ctrl_emb, pert_emb, pert_cov, config.batch_size, self.groups_per_step, config.seed,
                               groups)
        torch.manual_seed(config.seed)
        self.network = self.build_network()
        result = train_network(self.network, batches, config, run_dir,
                               {"predictor": self.name, "latent_dim": self.latent_dim, "cov_dim": self.cov_dim,
                                **(metadata or {})})
        self.network.eval()
        self.fit_report = {"steps": result.steps, "pairs": len(ctrl_emb), "groups": len(batches.groups),
                           "parameters": sum(p.numel() for p in self.network.parameters())}

    def predict(self, ctrl_emb: np.ndarray, pert_cov: np.ndarray, *, generator: torch.Generator | None = None,
                settings: PredictConfig | None = None) -> np.ndarray:
        """(m, k) predicted embeddings, one per control embedding; ``generator`` seeds any noise."""
        ctrl_emb, pert_cov = np.asarray(ctrl_emb, np.float32), np.asarray(pert_cov, np.float32)
        self._check("ctrl_emb", ctrl_emb, self.latent_dim)
        self._check("pert_cov", pert_cov, self.cov_dim)
        if len(ctrl_emb) != len(pert_cov):
            raise ValueError(f"{len(ctrl_emb)} control embeddings but {len(pert_cov)} covariates")
        was_training = self.network.training
        self.network.eval()
        out = [self._predict(_as_tensor(ctrl_emb[i:i + PREDICT_CHUNK]), _as_tensor(pert_cov[i:i + PREDICT_CHUNK]),
                             generator, settings or PredictConfig()).numpy()
               for i in range(0, len(ctrl_emb), PREDICT_CHUNK)]
        self.network.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, self.latent_dim), np.float32)

    def _predict(self, latent: torch.Tensor, cov: torch.Tensor, generator: torch.Generator | None,
                 settings: PredictConfig) -> torch.Tensor:
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.network.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.network.load_state_dict(tensors)
        self.network.eval()


class MLPPredictor(NetworkPredictor):
    """The reference conditional MLP (see the module docstring).

    ``mmd_weight``: weight of the MMD between predicted and real cells of a group.
    """

    name = "mlp"

    def __init__(self, latent_dim: int, cov_dim: int, *, mmd_weight: float = 1.0, **kwargs: Any):
        self.mmd_weight = mmd_weight
        super().__init__(latent_dim, cov_dim, **kwargs)

    def build_network(self) -> ConditionalMLP:
        return ConditionalMLP(self.latent_dim, self.cov_dim, self.hidden, self.n_layers, self.mmd_weight)

    @torch.no_grad()
    def _predict(self, latent, cov, generator, settings):
        return self.network(latent, cov)


class FlowPredictor(NetworkPredictor):
    """Flow matching in the embedding space (see the module docstring).

    ``source_noise``: scale of the Gaussian noise added to the control embeddings where the flow
    starts; ``coupling`` and ``time_sampler``: names in :data:`pertflow.flows.COUPLINGS` and
    :data:`pertflow.flows.TIME_SAMPLERS`. Prediction integrates with ``settings.ode_method`` and
    ``settings.ode_steps``. ``mean_weight``: weight of the squared error between each group's mean
    one-step estimate (``z_t + (1 - t) v``) and its real mean, beside the velocity loss;
    ``reads_start``: whether the velocity field also reads the point its trajectory started from.
    """

    name = "flow"

    def __init__(self, latent_dim: int, cov_dim: int, *, source_noise: float = 0.1, coupling: str = "independent",
                 time_sampler: str = "uniform", mean_weight: float = 0.0, reads_start: bool = True, **kwargs: Any):
        self.mean_weight, self.reads_start = mean_weight, reads_start
        self.flow = FlowMatching(COUPLINGS[coupling], TIME_SAMPLERS[time_sampler], AnchoredSource(source_noise))
        super().__init__(latent_dim, cov_dim, **kwargs)

    def build_network(self) -> LatentFlow:
        return LatentFlow(self.latent_dim, self.cov_dim, self.flow, self.hidden, self.n_layers,
                          mean_weight=self.mean_weight, reads_start=self.reads_start)

    def _predict(self, latent, cov, generator, settings):
        return self.network.sample(latent, cov, generator, settings.ode_method, settings.ode_steps)


PREDICTORS: dict[str, type[NetworkPredictor]] = {"mlp": MLPPredictor, "flow": FlowPredictor}
