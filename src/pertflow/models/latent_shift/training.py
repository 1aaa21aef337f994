"""Training the latent-shift networks (the decoder, the predictors) with the shared engine.

Each network is an ``nn.Module`` with ``loss(batch) -> LossOutput``; :func:`train_network` hands
it to :class:`~pertflow.train.Trainer` (checkpoints, resume, the finite-value guard, the loss log)
in a folder of its own, and loads the final weights back on the CPU. The batch sources here draw
from arrays held in memory (embeddings are small), seeded and checkpointed like the paired
sampler of the gene-space models.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pertflow.data.sampler import SeededStream
from pertflow.train.checkpoint import CheckpointDir
from pertflow.train.config import TrainConfig
from pertflow.train.engine import Trainer, TrainResult


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    """The folder of one stage's training run: ``<run>/checkpoints/<stage>`` (inside the run's
    ``checkpoints/``, which ``pertflow train`` refuses or clears unless it resumes)."""
    return Path(run_dir) / "checkpoints" / stage


def train_network(network: torch.nn.Module, batches: Any, config: TrainConfig, run_dir: Path | None = None,
                  metadata: dict[str, Any] | None = None,
                  val_batches: list[dict[str, torch.Tensor]] | None = None) -> TrainResult:
    """Train ``network`` on ``batches`` with the shared engine; its final weights (those of the
    best validation step when ``val_batches`` are given, else the last) end up in it, on the CPU.

    ``run_dir`` None trains in a temporary folder (a predictor used on its own, outside a run).
    A folder that holds checkpoints already is continued from the latest (a resumed run; a
    finished stage then only reloads its weights).
    """
    if run_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return train_network(network, batches, config, Path(tmp), metadata, val_batches)
    run_dir = Path(run_dir)
    trainer = Trainer(network, config, run_dir, batches, val_batches, metadata=metadata or {})
    result = trainer.fit(resume=CheckpointDir(run_dir).exists())
    network.load_state_dict(trainer.final_weights())
    network.to("cpu")
    return result


class CellBatches(SeededStream):
    """Random cells: ``{"latent": (B, k), "expression": (B, G)}`` (the decoder's batches)."""

    def __init__(self, latent: np.ndarray, expression: np.ndarray, batch_size: int, seed: int):
        super().__init__(seed)
        if len(latent) != len(expression) or not len(latent):
            raise ValueError(f"{len(latent)} embeddings for {len(expression)} cells")
        self.latent = torch.from_numpy(np.ascontiguousarray(latent, dtype=np.float32))
        self.expression = torch.from_numpy(np.ascontiguousarray(expression, dtype=np.float32))
        self.batch_size = batch_size

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = torch.from_numpy(self.rng.choice(len(self.latent), size=self.batch_size,
                                                replace=len(self.latent) < self.batch_size))
        return {"latent": self.latent[rows], "expression": self.expression[rows]}

    def all_cells(self, chunk: int = 1024) -> list[dict[str, torch.Tensor]]:
        """Every cell once, in batches of at most ``chunk`` (fixed validation batches)."""
        return [{"latent": self.latent[i:i + chunk], "expression": self.expression[i:i + chunk]}
                for i in range(0, len(self.latent), chunk)]


def group_ids(pert_cov: np.ndarray) -> np.ndarray:
    """(n,) group of each pair: pairs with the same covariate vector form one group (one
    perturbation in one context, as far as a predictor can tell them apart)."""
    return np.unique(np.asarray(pert_cov), axis=0, return_inverse=True)[1].reshape(-1)


class GroupBatches(SeededStream):
    """Batches of ``groups_per_step`` groups with ``batch_size`` pairs each, grouped in order.

    A batch is ``{"source": (n, k), "target": (n, k), "cov": (n, c), "group": (n,)}`` with
    ``n = groups * batch_size`` and ``group`` the position of the row's group in the batch (rows
    of one group are contiguous). The groups are ``groups`` (one label per pair) when given, else
    the distinct covariate vectors (:func:`group_ids`). Groups are drawn uniformly (every perturbation counts the
    same), pairs within a group uniformly, with replacement when the group is smaller than B.
    """

    def __init__(self, source: np.ndarray, target: np.ndarray, cov: np.ndarray, batch_size: int,
                 groups_per_step: int, seed: int, groups: np.ndarray | None = None):
        super().__init__(seed)
        if not (len(source) == len(target) == len(cov)) or not len(source):
            raise ValueError(f"{len(source)} control, {len(target)} perturbed embeddings and {len(cov)} covariates: "
                             "give one of each per pair, at least one pair")
        self.source = torch.from_numpy(np.ascontiguousarray(source, dtype=np.float32))
        self.target = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))
        self.cov = torch.from_numpy(np.ascontiguousarray(cov, dtype=np.float32))
        ids = group_ids(cov) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
        if len(ids) != len(source):
            raise ValueError(f"{len(ids)} group labels for {len(source)} pairs")
        self.groups = [np.flatnonzero(ids == g) for g in range(int(ids.max()) + 1)]
        self.batch_size = batch_size
        self.groups_per_step = min(groups_per_step, len(self.groups))

    def next_batch(self) -> dict[str, torch.Tensor]:
        chosen = self.rng.choice(len(self.groups), size=self.groups_per_step, replace=False)
        rows = np.concatenate([
            self.rng.choice(self.groups[g], size=self.batch_size, replace=len(self.groups[g]) < self.batch_size)
            for g in chosen
        ])
        index = torch.from_numpy(rows)
        return {
            "source": self.source[index],
            "target": self.target[index],
            "cov": self.cov[index],
            "group": torch.arange(len(chosen)).repeat_interleave(self.batch_size),
        }
