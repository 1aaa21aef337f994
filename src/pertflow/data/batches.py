"""Paired training batches as tensors: B perturbed cells and B controls of one context.

:class:`PairedBatches` turns the row indices of :class:`~pertflow.data.sampler.PairedBatchSampler`
into the tensors a network trains on, under the keys of :data:`pertflow.data.keys.BATCH_KEYS`.
A model that needs more than expression asks for it by name, without a loader of its own:

* ``target_arrays`` / ``control_arrays``: per-cell arrays (anything with ``get(rows)``, such as a
  cached latent or counts) read for the batch's target or control rows;
* ``group_arrays``: functions of the batch's (perturbation, context), such as a baseline's
  predicted shift, repeated over the batch's rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np
import torch

from pertflow.data.keys import BATCH_KEYS
from pertflow.data.sampler import PairedBatch, PairedBatchSampler, RowIndex

if TYPE_CHECKING:
    from pertflow.data.view import SplitView


class RowArray(Protocol):
    """Anything that returns a per-cell array for rows of the dataset."""

    def get(self, rows: np.ndarray) -> np.ndarray: ...


GroupArray = Callable[[str, str], np.ndarray]


class PairedBatches:
    """Seeded training batches over ``rows`` of a split view (see the module docstring).

    ``next_batch()`` returns ``target`` (B, G) and ``control`` (B, G) float32 expression,
    ``pert_ids`` (B, K) tokens, with a dose column (``spec.dose_col``) ``dose`` (B,) each target
    cell's dose, and the arrays asked for; its state (the sampler's generator)
    is what a checkpoint saves, so a resumed run draws the same batches.

    In a run of N processes (:meth:`shard`), process r takes batches r, r + N, r + 2N, ... of
    the one seeded stream: every process draws the stream's row indices (cheap) and reads the
    expression of its own batches only. The stream's state is then the same in every process,
    so a run resumes with any number of processes where it stopped, and N processes see the
    batches one process would see in N steps.

    ``index_cache``: a file beside the run where the row index of ``rows`` (rows per
    perturbation and context) is kept; a later run (a resumed one) reads it instead of building it.
    """

    def __init__(
        self,
        view: SplitView,
        rows: np.ndarray,
        batch_size: int,
        seed: int,
        max_components: int,
        weighting: str = "cells",
        include_controls: bool = False,
        target_arrays: dict[str, RowArray] | None = None,
        control_arrays: dict[str, RowArray] | None = None,
        group_arrays: dict[str, GroupArray] | None = None,
        index_cache: str | Path | None = None,
    ):
        self.view = view
        self.max_components = max_components
        self.target_arrays = dict(target_arrays or {})
        self.control_arrays = dict(control_arrays or {})
        self.group_arrays = dict(group_arrays or {})
        always = {BATCH_KEYS.TARGET, BATCH_KEYS.CONTROL, BATCH_KEYS.PERT_IDS, BATCH_KEYS.DOSE}
        taken = always & (set(self.target_arrays) | set(self.control_arrays) | set(self.group_arrays))
        if taken:
            raise ValueError(f"extra batch arrays may not reuse the keys {sorted(taken)}")
        data = view.data
        index = None
        if index_cache is not None:
            index = RowIndex.load(index_cache, RowIndex.digest_of(rows, data.n_cells, include_controls))
        if index is None:
            index = RowIndex.build(data.perturbations, data.contexts, data.is_control, rows, include_controls)
            if index_cache is not None:
                index.save(index_cache)
        self.sampler = PairedBatchSampler.from_data(
            data, rows, batch_size, seed, weighting=weighting, include_controls=include_controls, index=index
        )
        self.process_index, self.num_processes = 0, 1

    def next_rows(self) -> PairedBatch:
        """This process's next batch of row indices (see the class docstring)."""
        drawn = [self.sampler.sample() for _ in range(self.num_processes)]
        return drawn[self.process_index]

    def next_batch(self) -> dict[str, torch.Tensor]:
        b = self.next_rows()
        view = self.view
        comps = view.data.components(b.perturbation)
        ids = view.vocab.encode([comps] * len(b.target_rows), self.max_components)
        # one read of both sets of rows (on disk: sorted, in a few contiguous reads)
        expression = view.expression.get(np.concatenate([b.target_rows, b.control_rows]))
        n = len(b.target_rows)
        batch = {
            BATCH_KEYS.TARGET: torch.from_numpy(np.ascontiguousarray(expression[:n])),
            BATCH_KEYS.CONTROL: torch.from_numpy(np.ascontiguousarray(expression[n:])),
            BATCH_KEYS.PERT_IDS: torch.from_numpy(ids),
        }
        if view.data.spec.dose_col is not None:
            batch[BATCH_KEYS.DOSE] = torch.from_numpy(view.data.doses[b.target_rows].astype(np.float32))
        for name, source in self.target_arrays.items():
            batch[name] = torch.from_numpy(np.ascontiguousarray(source.get(b.target_rows)))
        for name, source in self.control_arrays.items():
            batch[name] = torch.from_numpy(np.ascontiguousarray(source.get(b.control_rows)))
        for name, fn in self.group_arrays.items():
            value = np.asarray(fn(b.perturbation, b.context), dtype=np.float32)
            batch[name] = torch.from_numpy(np.repeat(value[None], len(b.target_rows), axis=0))
        return batch

    def shard(self, process_index: int, num_processes: int) -> None:
        """Take the share of process ``process_index`` of ``num_processes`` from now on."""
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process {process_index} is not one of {num_processes}")
        self.process_index, self.num_processes = process_index, num_processes

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
