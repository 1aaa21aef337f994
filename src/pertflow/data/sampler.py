"""Distributional pairing: B perturbed cells of one (perturbation, context) with B control cells.

No cell correspondence exists between a perturbed cell and a control cell (sequencing destroys
the cell), so a batch pairs the two groups as distributions, as scDFM does: B cells of one
perturbation in one context, and B control cells drawn independently from the same context.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

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

    def shard(self, process_index: int, num_processes: int = 1) -> None:
        """Give process ``process_index`` of a multi-process run its own stream (0 keeps the seed's)."""
        if process_index:
            self.rng = np.random.default_rng([self.seed, process_index])

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (JSON-serialisable)."""
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["bit_generator"]


@dataclass
class RowIndex:
    """The rows a sampler draws from: each (perturbation, context) group's rows, and each
    context's control rows. Built once from per-cell labels (vectorised: seconds for millions of
    cells) and cached beside a run (:meth:`save`, :meth:`load`).

    Attributes
    ----------
    groups
        (perturbation, context, rows) in order of first appearance among the rows.
    controls
        context -> control rows, in order of first appearance.
    digest
        What the index was built from (the rows, their number, ``include_controls``).
    """

    groups: list[tuple[str, str, np.ndarray]]
    controls: dict[str, np.ndarray]
    digest: str

    @staticmethod
    def digest_of(rows: np.ndarray, n_cells: int, include_controls: bool) -> str:
        h = hashlib.sha1(np.asarray(rows, dtype=np.int64).tobytes())
        h.update(f"{n_cells}:{include_controls}".encode())
        return h.hexdigest()

    @classmethod
    def build(cls, perturbations: np.ndarray, contexts: np.ndarray, is_control: np.ndarray, rows: np.ndarray,
              include_controls: bool = False) -> RowIndex:
        rows = np.asarray(rows, dtype=np.int64)
        ctrl_rows = rows[is_control[rows]]
        controls = dict(_by_key(contexts[ctrl_rows], ctrl_rows))
        pert_rows = rows[~is_control[rows]]
        p_codes, p_names = pd.factorize(perturbations[pert_rows], sort=False)
        c_codes, c_names = pd.factorize(contexts[pert_rows], sort=False)
        groups = []
        for key, group_rows in _by_key(p_codes.astype(np.int64) * max(1, len(c_names)) + c_codes, pert_rows):
            pert, ctx = str(p_names[key // max(1, len(c_names))]), str(c_names[key % max(1, len(c_names))])
            if ctx not in controls:
                raise InputError(
                    f"context '{ctx}' has perturbed cells ('{pert}') but no control cells among the training cells. "
                    "Keep some of its controls in the training split, or drop the context."
                )
            groups.append((pert, ctx, group_rows))
        if include_controls:
            for ctx, ctx_rows in controls.items():
                groups.append((str(perturbations[ctx_rows[0]]), ctx, ctx_rows))
        return cls(groups, controls, cls.digest_of(rows, len(is_control), include_controls))

    def save(self, path: str | Path) -> None:
        """Write the index (an ``.npz``; atomically)."""
        from pertflow.io import atomic_path

        arrays = {
            "digest": np.array(self.digest),
            "group_names": np.array([[p, c] for p, c, _ in self.groups], dtype=str).reshape(-1, 2),
            "group_sizes": np.array([len(r) for _, _, r in self.groups], dtype=np.int64),
            "group_rows": np.concatenate([r for _, _, r in self.groups]) if self.groups else np.zeros(0, np.int64),
            "control_names": np.array(list(self.controls), dtype=str),
            "control_sizes": np.array([len(r) for r in self.controls.values()], dtype=np.int64),
            "control_rows": np.concatenate(list(self.controls.values())) if self.controls else np.zeros(0, np.int64),
        }
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path, digest: str) -> RowIndex | None:
        """The index saved at ``path`` if it was built from what ``digest`` names, else None."""
        path = Path(path)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["digest"]) != digest:
                    return None
                group_rows = (np.split(z["group_rows"], np.cumsum(z["group_sizes"])[:-1]) if len(z["group_sizes"])
                              else [])
                control_rows = (np.split(z["control_rows"], np.cumsum(z["control_sizes"])[:-1])
                                if len(z["control_sizes"]) else [])
                groups = [(str(p), str(c), r) for (p, c), r in zip(z["group_names"], group_rows)]
                controls = {str(c): r for c, r in zip(z["control_names"], control_rows)}
        except (OSError, ValueError, KeyError):
            return None  # unreadable: build it again
        return cls(groups, controls, digest)


class PairedBatchSampler(SeededStream):
    """Seeded sampler of :class:`PairedBatch` es.

    :meth:`sample` gives the next batch of one seeded stream; every process of a multi-process
    run draws the same stream and keeps its own share (see :class:`~pertflow.data.batches.PairedBatches`).

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
        equally often); ``"uniform"`` picks every group equally often; ``"epoch"`` visits every
        row exactly once per epoch as a target: each group's rows are shuffled and cut into
        batches of B (a group's last batch holds the rest, fewer than B), and the epoch's batches
        are shuffled. The controls of a batch are drawn at random from its context.
    include_controls
        Also train control -> control (the identity), a group per context.
    index
        A :class:`RowIndex` of these rows built before (e.g. loaded from beside the run);
        built from the labels when None.
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
        index: RowIndex | None = None,
    ):
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}.")
        if weighting not in WEIGHTINGS:
            raise InputError(f"weighting must be one of {WEIGHTINGS}, got '{weighting}'.")
        super().__init__(seed)
        self.batch_size = batch_size
        self.weighting = weighting
        self.index = index or RowIndex.build(perturbations, contexts, is_control, rows, include_controls)
        self.groups, self.controls = self.index.groups, self.index.controls
        if not self.groups:
            raise InputError("no training groups: the training cells hold no perturbed cells. Check the split.")
        sizes = np.array([len(g[2]) for g in self.groups], dtype=float)
        self.weights = sizes / sizes.sum() if weighting == "cells" else np.full(len(sizes), 1.0 / len(sizes))
        self.epoch, self.cursor = 0, 0
        self._plan: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_data(cls, data: Any, rows: np.ndarray, batch_size: int, seed: int = 0,
                  **kwargs: Any) -> PairedBatchSampler:
        """A sampler over ``rows`` of a :class:`~pertflow.data.dataset.PerturbationData`."""
        return cls(data.perturbations, data.contexts, data.is_control, rows, batch_size, seed, **kwargs)

    def _draw(self, pool: np.ndarray) -> np.ndarray:
        return self.rng.choice(pool, size=self.batch_size, replace=len(pool) < self.batch_size)

    def sample(self) -> PairedBatch:
        """The next batch: a group, its target cells and as many controls of its context."""
        if self.weighting == "epoch":
            return self._sample_epoch()
        pert, ctx, pool = self.groups[int(self.rng.choice(len(self.groups), p=self.weights))]
        return PairedBatch(pert, ctx, self._draw(pool), self._draw(self.controls[ctx]))

    def __iter__(self) -> Iterator[PairedBatch]:
        while True:
            yield self.sample()

    # ------------------------------------------------------------------ epochs
    @property
    def batches_per_epoch(self) -> int:
        return int(sum(-(-len(g[2]) // self.batch_size) for g in self.groups))

    def _epoch_plan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's batches (rows, start of each batch, its group, the batch order), drawn from
        a generator of (seed, epoch) alone: a resumed run rebuilds it from the epoch number."""
        if self._plan is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            rows, starts, group_of = [], [], []
            offset = 0
            for g, (_, _, pool) in enumerate(self.groups):
                rows.append(rng.permutation(pool))
                cuts = np.arange(0, len(pool), self.batch_size)
                starts.append(offset + cuts)
                group_of.append(np.full(len(cuts), g))
                offset += len(pool)
            all_starts = np.concatenate(starts)
            self._plan = (np.concatenate(rows), np.append(all_starts, offset), np.concatenate(group_of),
                          rng.permutation(len(all_starts)))
        return self._plan

    def _sample_epoch(self) -> PairedBatch:
        rows, starts, group_of, order = self._epoch_plan()
        if self.cursor >= len(order):
            self.epoch, self.cursor, self._plan = self.epoch + 1, 0, None
            rows, starts, group_of, order = self._epoch_plan()
        i = order[self.cursor]
        pert, ctx, _ = self.groups[group_of[i]]
        target = rows[starts[i] : starts[i + 1]]  # groups lie one after another: a group's last batch holds the rest
        pool = self.controls[ctx]
        controls = np.random.default_rng([self.seed, self.epoch, self.cursor]).choice(
            pool, size=len(target), replace=len(pool) < len(target))
        self.cursor += 1
        return PairedBatch(pert, ctx, target, controls)

    def state_dict(self) -> dict[str, Any]:
        if self.weighting == "epoch":
            return {"epoch": self.epoch, "cursor": self.cursor}
        return super().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.weighting == "epoch":
            self.epoch, self.cursor, self._plan = int(state["epoch"]), int(state["cursor"]), None
        else:
            super().load_state_dict(state)


WEIGHTINGS = ("cells", "uniform", "epoch")


def _by_key(keys: np.ndarray, rows: np.ndarray) -> Iterator[tuple[Any, np.ndarray]]:
    """(key, its rows) in order of the key's first appearance, rows in their given order."""
    codes, uniques = pd.factorize(keys, sort=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes, minlength=len(uniques)))[:-1]
    for key, part in zip(uniques, np.split(rows[order], bounds)):
        yield key, part
