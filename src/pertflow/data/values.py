"""Raw counts or log-normalised: what a random sample of cells says about an expression matrix
(:class:`ValueEvidence`), and the check that the values fit the transform a spec declares
(:func:`check_transform`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pertflow.data.loading import ExpressionSource, nonzero_values, sample_rows
from pertflow.data.spec import DataSpec
from pertflow.errors import InputError

WHOLE_TOLERANCE = 1e-3  # a count may be stored with float noise: within 1e-3 of an integer is a whole number
LOG_MAX = 50.0  # no log-normalised value comes near this (log1p(1e4) = 9.2, log2(1e6 + 1) = 19.9)
SAMPLED_ROWS = 2000


@dataclass(frozen=True)
class ValueEvidence:
    """What a random sample of cells says about an expression matrix: raw counts or log-normalised.

    Attributes
    ----------
    n_rows
        Cells sampled.
    n_values
        Finite non-zero values among them.
    max
        The largest of those values.
    whole
        The share of those values that are whole numbers (within :data:`WHOLE_TOLERANCE`).
    median_row_sum
        The median over the sampled cells of the sum of their values (a count depth, or a sum
        of log values).
    """

    n_rows: int
    n_values: int
    max: float
    whole: float
    median_row_sum: float

    @classmethod
    def sample(cls, source: ExpressionSource, n_rows: int = SAMPLED_ROWS) -> ValueEvidence:
        """The evidence of up to ``n_rows`` random whole rows (read in one block, never the whole matrix)."""
        block = sample_rows(source, n_rows)
        values = nonzero_values(block)
        sums = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
        whole = float(np.mean(np.abs(values - np.round(values)) <= WHOLE_TOLERANCE)) if values.size else 1.0
        return cls(
            n_rows=int(block.shape[0]),
            n_values=int(values.size),
            max=float(values.max()) if values.size else 0.0,
            whole=whole,
            median_row_sum=float(np.nanmedian(sums)) if sums.size else 0.0,
        )

    @property
    def looks_like_counts(self) -> bool:
        """Every value a whole number, and some above 1."""
        return self.n_values > 0 and self.whole == 1.0 and self.max > 1

    def __str__(self) -> str:
        return (
            f"in {self.n_rows} sampled cells the largest value is {self.max:.4g}, {self.whole:.1%} of the non-zero "
            f"values are whole numbers, and the median sum of a cell's values is {self.median_row_sum:.4g}"
        )


def detect_counts(uns: Any, source: ExpressionSource, layer: str | None) -> tuple[bool, str]:
    """Counts when the sampled values are all whole numbers (some above 1); log-normalised otherwise."""
    if "log1p" in uns and layer is None:
        return False, "uns['log1p'] is set"
    found = ValueEvidence.sample(source)
    if found.n_values == 0:
        return False, "no non-zero values sampled"
    if found.looks_like_counts:
        return True, f"sampled values are whole numbers up to {found.max:g}"
    return False, f"sampled values are fractional (max {found.max:.3g})"


def check_transform(spec: DataSpec, found: ValueEvidence, how: str, layer_names: list[str]) -> None:
    """Check that the values fit the transform the spec declares; raise :class:`InputError` with the evidence.

    Raw counts (``is_counts``) must be whole numbers: every sampled non-zero value within
    :data:`WHOLE_TOLERANCE` of an integer. Log-normalised values must not look like raw counts
    (all whole numbers, some above 1) nor exceed :data:`LOG_MAX`.

    Parameters
    ----------
    spec
        The data spec in use.
    found
        The evidence of a sample of the spec's expression source.
    how
        How ``is_counts`` was set (the spec's evidence for it), for the message.
    layer_names
        The file's layers, to suggest another source.
    """
    if found.n_values == 0:
        return
    source = spec.expression_source
    layers = f"; layers in the file: {layer_names}" if layer_names else ""
    if spec.is_counts and found.whole < 1.0:
        raise InputError(
            f"{source} is read as raw counts ({how}) but does not hold whole numbers: {found}. Normalising and "
            "log-transforming it would distort it. If it is already log-normalised, pass --log (is_counts=False); "
            f"otherwise choose the layer with raw counts (--layer{layers}). Counts may differ from an integer by at "
            f"most {WHOLE_TOLERANCE:g}: round corrected counts first."
        )
    if not spec.is_counts and found.looks_like_counts:
        raise InputError(
            f"{source} is read as log-normalised ({how}) but looks like raw counts: {found}. Pass --counts "
            "(is_counts=True) so that pertflow applies normalize_total + log1p, or choose a log-normalised layer "
            f"(--layer{layers})."
        )
    if not spec.is_counts and found.max > LOG_MAX:
        raise InputError(
            f"{source} is read as log-normalised ({how}) but holds values far above what log-normalised "
            f"expression reaches (at most about {LOG_MAX:g}): {found}. Pass raw counts with --counts "
            f"(is_counts=True), log-normalise the values first (normalize_total + log1p), or choose a log-normalised "
            f"layer (--layer{layers})."
        )

