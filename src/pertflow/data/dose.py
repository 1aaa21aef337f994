"""Doses: where the data spec names a dose column, a *condition* is a (perturbation, dose),
labelled ``perturbation@dose`` (``drugA@1``, ``A+B@0.3``; the dose written with ``%g``).

Every step that groups cells by perturbation (splits, batches, baselines, prediction,
evaluation) then groups them by condition without knowing it; ``DataSpec.split_dose`` gives a
label's perturbation and dose back. Controls, and cells without a dose (NaN or <= 0), keep their
plain label.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pertflow.errors import InputError

DOSE_DELIM = "@"


def dose_label(perturbation: str, dose: float) -> str:
    """The label of a condition: ``perturbation@dose``, the dose written with ``%g`` (``1.0`` -> ``1``)."""
    return f"{perturbation}{DOSE_DELIM}{dose:g}"


def parse_dose_label(label: str) -> tuple[str, float | None]:
    """``'drugA@1'`` -> ``('drugA', 1.0)``; a label that carries no dose -> ``(label, None)``."""
    label = str(label)
    base, sep, value = label.rpartition(DOSE_DELIM)
    if not sep or not base:
        return label, None
    try:
        return base, float(value)
    except ValueError:
        return label, None


def _as_numbers(values: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """A column's values (as objects: categorical columns too), them as float64 (NaN where not a
    number), and the mask of the non-empty values that are not numbers."""
    values = pd.Series(np.asarray(values, dtype=object))
    found = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    return values, found, pd.isna(found) & values.notna().to_numpy()


def all_numbers(values: pd.Series) -> bool:
    """Whether every non-empty value of a column is a number."""
    return not _as_numbers(values)[2].any()


def numeric_doses(values: pd.Series, col: str) -> np.ndarray:
    """A dose column as float64 (NaN where empty); :class:`InputError` naming values that are not numbers."""
    values, found, bad = _as_numbers(values)
    if bad.any():
        shown = sorted(map(str, pd.unique(values[bad])))[:5]
        raise InputError(
            f"dose column obs['{col}'] must hold numbers (all doses in one unit, e.g. 0.1, 1, 10); it holds {shown}. "
            "Convert it to numbers, or name another column with dose_col=... (CLI: --dose-col)."
        )
    return found


def with_doses(labels: np.ndarray, doses: np.ndarray, plain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Condition labels: each ``plain`` label (a perturbed cell's, without a dose) joined with its
    dose where the dose is > 0. Returns the labels (object array) and the mask of those joined."""
    joined = plain & (np.nan_to_num(doses, nan=0.0) > 0)
    out = np.asarray(labels, dtype=object).copy()
    written = {d: dose_label("", d) for d in np.unique(doses[joined])}  # each dose formatted once
    out[joined] = out[joined] + np.array([written[d] for d in doses[joined]], dtype=object)
    return out, joined
