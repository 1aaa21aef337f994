"""Distributional pairing: B perturbed cells of one (perturbation, context) with B control cells.

No cell correspondence exists between a perturbed cell and a control cell (sequencing destroys
the cell), so a batch pairs the two groups as distributions, as scDFM does: B cells of one
perturbation in one context, and B control cells drawn independently from the same context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from pertflow.errors import InputError


@dataclass(frozen=True)
class PairedBatch:
    """Row indices of one training batch.

    Attributes
    ----------
    perturbation, context
        The group the target cells come from.
    target_rows
        (B,) rows of perturbed cells.
    control_rows
        (B,) rows of control cells of the same context, drawn independently.
    """

    perturbation: str
    context: str
    target_rows: np.ndarray
    control_rows: np.ndarray


class SeededStream:
    """A seeded random stream whose state a checkpoint saves and a multi-process run shards.

    Subclasses draw from ``self.rng``; a resumed run restores the generator's state and so
    draws the same batches as an unbroken one.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def shard(self, process_index: int) -> None:
        """Give process ``process_index`` of a multi-process run its own stream (0 keeps the seed's)."""
        if process_index:
            self.rng = np.random.default_rng([self.seed, process_index])

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (JSON-serialisable)."""
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["bit_generator"]


class PairedBatchSampler(SeededStream):
    """Seeded sampler of :class:`PairedBatch` es.

    Parameters
    ----------
    perturbations, contexts, is_control
        Per-cell labels of the whole dataset (see :class:`~pertflow.data.dataset.PerturbationData`).
    rows
        The rows that may be sampled (a split's training cells).
    batch_size
        B. A group with fewer than B cells is drawn with replacement.
    seed
        Seed of the sampler's own generator; its state is saved with checkpoints.
    weighting
        ``"cells"`` picks a group with probability proportional to its size (every cell about
        equally often); ``"uniform"`` picks every group equally often.
    include_controls
        Also train control -> control (the identity), a group per context.
    """

    def __init__(
        self,
        perturbations: np.ndarray,
        contexts: np.ndarray,
        is_control: np.ndarray,
        rows: np.ndarray,
        batch_size: int,
        seed: int = 0,
        weighting: str = "cells",
        include_controls: bool = False,
    ):
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}.")
        if weighting not in ("cells", "uniform"):
            raise InputError(f"weighting must be 'cells' or 'uniform', got '{weighting}'.")
        rows = np.asarray(rows, dtype=np.int64)
        super().__init__(seed)
        self.batch_size = batch_size
        self.controls: dict[str, np.ndarray] = {}
        self.groups: list[tuple[str, str, np.ndarray]] = []
        ctrl_rows = rows[is_control[rows]]
        for ctx in _unique(contexts[ctrl_rows]):
            self.controls[ctx] = ctrl_rows[contexts[ctrl_rows] == ctx]
        pert_rows = rows[~is_control[rows]]
        keys = np.array([f"{p}\x00{c}" for p, c in zip(perturbations[pert_rows], contexts[pert_rows])], dtype=object)
        for key in _unique(keys):
            pert, ctx = key.split("\x00")
            if ctx not in self.controls:
                raise InputError(
                    f"context '{ctx}' has perturbed cells ('{pert}') but no control cells among the training cells. "
                    "Keep some of its controls in the training split, or drop the context."
                )
            self.groups.append((pert, ctx, pert_rows[keys == key]))
        if include_controls:
            for ctx, ctx_rows in self.controls.items():
                self.groups.append((perturbations[ctx_rows[0]], ctx, ctx_rows))
        if not self.groups:
            raise InputError("no training groups: the training cells hold no perturbed cells. Check the split.")
        sizes = np.array([len(g[2]) for g in self.groups], dtype=float)
        self.weights = sizes / sizes.sum() if weighting == "cells" else np.full(len(sizes), 1.0 / len(sizes))

    @classmethod
    def from_data(cls, data: Any, rows: np.ndarray, batch_size: int, seed: int = 0, **kwargs: Any) -> PairedBatchSampler:
        """A sampler over ``rows`` of a :class:`~pertflow.data.dataset.PerturbationData`."""
        return cls(data.perturbations, data.contexts, data.is_control, rows, batch_size, seed, **kwargs)

    def _draw(self, pool: np.ndarray) -> np.ndarray:
        return self.rng.choice(pool, size=self.batch_size, replace=len(pool) < self.batch_size)

    def sample(self) -> PairedBatch:
        """One batch: a group chosen by the weighting, B target cells and B controls."""
        pert, ctx, pool = self.groups[int(self.rng.choice(len(self.groups), p=self.weights))]
        return PairedBatch(pert, ctx, self._draw(pool), self._draw(self.controls[ctx]))

    def __iter__(self) -> Iterator[PairedBatch]:
        while True:
            yield self.sample()


def _unique(values: np.ndarray) -> list[str]:
    """Distinct values in order of first appearance."""
    seen: dict[str, None] = {}
    for v in values:
        seen.setdefault(v, None)
    return list(seen)
