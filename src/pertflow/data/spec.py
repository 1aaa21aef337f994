"""Which ``obs`` / ``var`` keys of an AnnData mean what: the data spec.

A :class:`DataSpec` is detected from a file where that is unambiguous
(:func:`~pertflow.data.detect.detect_spec`), otherwise the detection stops with an error that asks
for the one missing key. Every later step (splits, training, prediction, evaluation) reads the
spec instead of guessing again, and a run saves it as JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pertflow.data.dose import parse_dose_label
from pertflow.errors import InputError
from pertflow.io import read_json, write_json

# Common control labels (compared case-insensitively): split_components drops them from a label, and
# detection looks for them.
CONTROL_LABELS = (
    "control",
    "ctrl",
    "non-targeting",
    "non_targeting",
    "nontargeting",
    "NT",
    "DMSO",
    "vehicle",
    "unperturbed",
    "untreated",
    "negative_control",
    "safe-targeting",
)

SPEC_VERSION = 1


@dataclass(frozen=True)
class DataSpec:
    """What the keys of an AnnData mean.

    Attributes
    ----------
    pert_col
        ``obs`` column naming each cell's perturbation.
    control
        The label of control cells in ``pert_col``.
    combo_delim
        Separator of combinations (``A+B``); GEARS' ``A+ctrl`` reads as the single ``A``.
    context_cols
        ``obs`` columns whose values define a cell's context (cell type, cell line, donor). A
        context is the combination of their values; empty means one context for all cells.
    batch_col, dose_col
        Optional covariates; with a (numeric) dose column a perturbed cell's label is its
        condition, ``drugA@1`` (:mod:`pertflow.data.dose`).
    layer
        Expression source: ``None`` for ``X``, otherwise the name of a layer.
    is_counts
        True when the source holds raw counts (pertflow then applies normalize_total +
        log1p), False when it is already log-normalised.
    target_sum
        ``normalize_total`` target for counts.
    gene_symbol_col
        ``var`` column with gene symbols when ``var_names`` are not symbols (Ensembl IDs).
    genetic
        True when perturbation names are genes (CRISPR), False for drugs / cytokines. A
        component that is an expressed gene is a gene token either way.
    descriptors_key
        Optional ``uns`` key holding perturbation descriptor vectors (a DataFrame indexed by
        perturbation component, or a dict name -> vector).
    min_cells
        Each perturbation (in each context) needs at least this many cells.
    """

    pert_col: str
    control: str
    combo_delim: str = "+"
    context_cols: tuple[str, ...] = ()
    batch_col: str | None = None
    dose_col: str | None = None
    layer: str | None = None
    is_counts: bool = False
    target_sum: float = 1e4
    gene_symbol_col: str | None = None
    genetic: bool = True
    descriptors_key: str | None = None
    min_cells: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "context_cols", tuple(self.context_cols))
        if self.min_cells < 1:
            raise InputError(f"min_cells must be at least 1, got {self.min_cells}.")
        if not self.combo_delim:
            raise InputError("combo_delim must be a non-empty string such as '+'.")

    def split_dose(self, label: str) -> tuple[str, float | None]:
        """``'drugA@1'`` -> ``('drugA', 1.0)``; None: no dose column, or a label without a dose."""
        return parse_dose_label(label) if self.dose_col is not None else (str(label), None)

    def replace(self, **changes: Any) -> DataSpec:
        return dataclasses.replace(self, **changes)

    @property
    def expression_source(self) -> str:
        return "X" if self.layer is None else f"layers['{self.layer}']"

    @property
    def x_transform(self) -> str:
        """How expression becomes log1p values, in the split file's vocabulary."""
        return f"normalize_total_{self.target_sum:g}_log1p" if self.is_counts else "as_is_log1p"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["context_cols"] = list(self.context_cols)
        out["spec_version"] = SPEC_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        data = dict(data)
        version = data.pop("spec_version", SPEC_VERSION)
        if version > SPEC_VERSION:
            raise InputError(
                f"data spec version {version} is newer than this pertflow understands ({SPEC_VERSION}); "
                "upgrade pertflow."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unknown data spec keys {unknown}; valid keys are {sorted(names)}.")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> DataSpec:
        return cls.from_dict(read_json(path))


SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(DataSpec))


def split_components(label: str, spec_or_delim: DataSpec | str, control: str | None = None) -> tuple[str, ...]:
    """Components of a perturbation label without control parts: ``'A+ctrl'`` -> ``('A',)``.

    The control label itself gives ``()``. Components keep their order of appearance; a dose is
    none (with a spec that has a dose column, ``'A+B@1'`` -> ``('A', 'B')``)."""
    if isinstance(spec_or_delim, DataSpec):
        delim, control = spec_or_delim.combo_delim, spec_or_delim.control
        label = spec_or_delim.split_dose(label)[0]
    else:
        delim = spec_or_delim
    controls = {c.lower() for c in CONTROL_LABELS}
    if control is not None:
        controls.add(control.lower())
    parts = [p.strip() for p in str(label).split(delim)]
    return tuple(p for p in parts if p and p.lower() not in controls)
