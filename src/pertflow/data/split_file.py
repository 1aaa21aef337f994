"""The split record, read and written in the interchange JSON format.

The format is the one of ``shared/data/README.md``: ``train``, ``val`` and ``test`` list cell
names; ``test_perturbations`` the held-out perturbations; ``genes`` the ordered gene list (or
null for all). Control cells are always in train or val (a model may see them); the test set
holds held-out perturbed cells only. :mod:`pertflow.data.splits` builds them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pertflow.data.dataset import PerturbationData
from pertflow.errors import InputError
from pertflow.io import read_json, write_json


@dataclass
class SplitRows:
    """Row indices of a split's cells in one dataset."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass(repr=False)
class Split:
    """A split of a dataset's cells, in the interchange format (see the module docstring).

    Keys beyond the named fields are kept in ``extra`` and written back unchanged.
    """

    train: list[str]
    val: list[str]
    test: list[str]
    test_perturbations: list[str]
    dataset: str | None = None
    pert_col: str | None = None
    control: str | None = None
    context_col: str | None = None
    genes: list[str] | None = None
    combo_delim: str | None = "+"
    name: str | None = None
    task: str | None = None
    fold: str | None = None
    test_context: str | None = None
    reference_contexts: list[str] | None = None
    test_controls: list[str] | None = None
    x_transform: str | None = None
    gene_selection: str | None = None
    subgroups: dict[str, str] | None = None
    notes: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        """A line, not the cell names: ``print(split)`` of a real split would print megabytes."""
        perts = self.test_perturbations
        shown = ", ".join(perts[:5]) + (f", ... ({len(perts)} in all)" if len(perts) > 5 else "")
        where = f", test context {self.test_context}" if self.test_context else ""
        genes = f"; {len(self.genes)} genes" if self.genes else ""
        return (f"Split({self.name or 'unnamed'}: {len(self.train)} train, {len(self.val)} val, {len(self.test)} test "
                f"cells; test perturbations {shown}{where}{genes})")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Split:
        required = ("train", "val", "test")
        missing = [k for k in required if k not in data]
        if missing:
            raise InputError(f"split is missing the keys {missing}; a split needs 'train', 'val' and 'test' cell "
                             "lists.")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        known.setdefault("test_perturbations", [])
        for key in ("train", "val", "test"):
            if not isinstance(known[key], list):
                raise InputError(f"split key '{key}' must be a list of cell names.")
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def digest(self) -> str:
        """A fingerprint of the split's cells and genes (a resumed run must train on the same)."""
        payload = json.dumps([self.train, self.val, self.test, self.genes])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @classmethod
    def load(cls, path: str | Path) -> Split:
        data = read_json(path)
        if not isinstance(data, dict):
            raise InputError(f"{path} must hold a JSON object (a split), not a {type(data).__name__}.")
        return cls.from_dict(data)

    # ------------------------------------------------------------------ checks
    def rows(self, data: PerturbationData) -> SplitRows:
        """Row indices in ``data``; checks that the split fits the data.

        Raises
        ------
        InputError
            Cells the file lacks, an empty test set, test cells also in train or val, control
            cells in the test set, a perturbation column or control label that differs from the
            data's, a listed test perturbation without test cells, or genes the file lacks.
        """
        if self.pert_col is not None and self.pert_col != data.spec.pert_col:
            raise InputError(
                f"the split uses perturbation column '{self.pert_col}' but the data spec uses '{data.spec.pert_col}'. "
                f"Pass --pert-col {self.pert_col} or use a split made for this spec."
            )
        if self.control is not None and self.control != data.spec.control:
            raise InputError(
                f"the split uses control label '{self.control}' but the data spec uses '{data.spec.control}'. "
                f"Pass --control {self.control} or use a split made for this spec."
            )
        if not self.test:
            raise InputError(
                "the split's test set is empty, so there is nothing to predict or evaluate. "
                "Rebuild the split with held-out cells (pertflow split)."
            )
        for part in ("train", "val", "test"):
            names = getattr(self, part)
            if len(set(names)) != len(names):
                twice = sorted(n for n, k in Counter(names).items() if k > 1)
                raise InputError(f"the split names {len(twice)} cells twice in '{part}' (e.g. {twice[:3]}). Name each "
                                 "cell once: fix the split.")
        both = set(self.train) & set(self.val)
        if both:
            raise InputError(f"{len(both)} cells are both in train and in val (e.g. {sorted(both)[:3]}). A cell "
                             "belongs to one part of a split: fix the split.")
        overlap = set(self.test) & (set(self.train) | set(self.val))
        if overlap:
            raise InputError(
                f"{len(overlap)} test cells are also in train or val (e.g. {sorted(overlap)[:3]}). "
                "A test cell must be unseen: fix the split."
            )
        rows = SplitRows(
            train=data.rows_of(self.train, "training cells of the split"),
            val=data.rows_of(self.val, "validation cells of the split"),
            test=data.rows_of(self.test, "test cells of the split"),
        )
        if data.is_control[rows.test].any():
            raise InputError(
                f"{int(data.is_control[rows.test].sum())} control cells are in the test set; controls belong in "
                "train/val (models predict from them). Fix the split."
            )
        present = {frozenset(data.components(p)) for p in set(data.perturbations[rows.test])}
        empty = [p for p in self.test_perturbations if frozenset(data.components(p)) not in present]
        if empty:
            raise InputError(
                f"{len(empty)} test perturbations of the split have no test cells in this data (e.g. {empty[:5]}), so "
                "they cannot be predicted or scored. Rebuild the split on this file (pertflow split), or remove them "
                "from the split's test_perturbations."
            )
        if self.genes is not None:
            data.gene_indices(self.genes)
        return rows
