"""Which ``obs`` / ``var`` keys of an AnnData mean what: the data spec.

A :class:`DataSpec` is detected from a file where that is unambiguous, otherwise the detection
stops with an error that asks for the one missing key. Every later step (splits, training,
prediction, evaluation) reads the spec instead of guessing again, and a run saves it as JSON.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from pertflow.data.dose import all_numbers, parse_dose_label
from pertflow.data.loading import ExpressionSource, nonzero_values, sample_rows
from pertflow.errors import InputError
from pertflow.io import read_json, write_json

# Common names, most preferred first. A column is only chosen when it also holds a control label.
PERTURBATION_COLUMNS = (
    "condition",
    "perturbation",
    "target_gene",
    "target_genes",
    "gene",
    "guide_identity",
    "guide_target",
    "perturbation_name",
    "target",
    "treatment",
    "drug",
    "compound",
    "stim",
)
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
CONTEXT_COLUMNS = (
    "cell_type",
    "celltype",
    "cell_line",
    "cell_line_name",
    "cellline",
    "donor",
    "donor_id",
    "patient",
    "patient_id",
    "tissue",
)
BATCH_COLUMNS = ("batch", "batch_id", "gem_group", "gemgroup", "plate", "library_id", "sample_id", "sample", "dataset")
DOSE_COLUMNS = ("dose", "dose_val", "dose_value", "dosage", "concentration")
GENE_SYMBOL_COLUMNS = ("gene_symbol", "gene_symbols", "symbol", "feature_name", "gene_name", "gene_names", "gene_short_name")
PERTURBATION_TYPE_COLUMNS = ("perturbation_type", "perturbation_kind", "pert_type")

SPEC_VERSION = 1
WHOLE_TOLERANCE = 1e-3  # a count may be stored with float noise: within 1e-3 of an integer is a whole number
LOG_MAX = 50.0  # no log-normalised value comes near this (log1p(1e4) = 9.2, log2(1e6 + 1) = 19.9)
SAMPLED_ROWS = 2000
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d+")
_GENE_LIKE = re.compile(r"^[A-Z][A-Z0-9\-\.]*[A-Z0-9]$|^[A-Z]$")


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


@dataclass
class Detection:
    """A detected spec and, for each key, how it was found (for ``pertflow inspect``)."""

    spec: DataSpec
    evidence: dict[str, str] = field(default_factory=dict)


def _label_columns(obs: pd.DataFrame) -> list[str]:
    """Columns that could hold labels: categorical, string or object dtype."""
    return [
        c
        for c in obs.columns
        if isinstance(obs[c].dtype, pd.CategoricalDtype) or obs[c].dtype == object or pd.api.types.is_string_dtype(obs[c])
    ]


def _values(obs: pd.DataFrame, col: str) -> pd.Series:
    return obs[col].astype(str)


def _controls_in(values: pd.Series) -> list[str]:
    known = {c.lower() for c in CONTROL_LABELS}
    return sorted(v for v in values.unique() if v.lower() in known)


def _same_partition(a: pd.Series, b: pd.Series) -> bool:
    """True when two label columns group cells identically (labels may differ)."""
    codes_a = pd.factorize(a)[0]
    codes_b = pd.factorize(b)[0]
    return bool(np.array_equal(codes_a, codes_b))


def _detect_pert_col(obs: pd.DataFrame, control: str | None) -> tuple[str, str]:
    hits = []
    for col in PERTURBATION_COLUMNS:
        if col not in obs.columns:
            continue
        values = _values(obs, col)
        if control is not None:
            if (values == control).any():
                hits.append(col)
        elif len(_controls_in(values)) == 1:
            hits.append(col)
    named = [c for c in PERTURBATION_COLUMNS if c in obs.columns]
    if not hits and named:
        common = _values(obs, named[0]).value_counts().index[:10].tolist()
        which = f"the control label '{control}'" if control else f"a known control label ({list(CONTROL_LABELS)})"
        raise InputError(
            f"no control cells found: obs['{named[0]}'] looks like the perturbation column but {which} does not occur "
            f"in it; its most frequent values are {common}. If one of them is the control, name it with control=... "
            "(CLI: --control), and the column with pert_col=... (--pert-col) if it is another one; if the file holds "
            "no control cells at all, add them: pertflow predicts from control cells."
        )
    if not hits:
        candidates = [c for c in _label_columns(obs) if 1 < obs[c].nunique() < len(obs)]
        wanted = f"holding the control label '{control}'" if control else "holding a known control label"
        raise InputError(
            f"could not find a perturbation column {wanted} among the usual names "
            f"{list(PERTURBATION_COLUMNS)}. Label columns in obs: {candidates}. "
            "Name it with pert_col=... (CLI: --pert-col)."
        )
    first = hits[0]
    for other in hits[1:]:
        if not _same_partition(_values(obs, first), _values(obs, other)):
            raise InputError(
                f"several obs columns could be the perturbation column: {hits}, and they group cells "
                "differently. Name the right one with pert_col=... (CLI: --pert-col)."
            )
    return first, f"first of {hits} (identical grouping)" if len(hits) > 1 else "known column name with a control label"


def _detect_control(values: pd.Series, pert_col: str) -> str:
    found = _controls_in(values)
    if len(found) == 1:
        return found[0]
    common = values.value_counts().index[:10].tolist()
    if not found:
        raise InputError(
            f"no known control label in obs['{pert_col}'] (looked for {list(CONTROL_LABELS)}); its most "
            f"frequent values are {common}. Name it with control=... (CLI: --control)."
        )
    raise InputError(
        f"obs['{pert_col}'] holds several control-like labels {found}. Name the control with control=... "
        "(CLI: --control), or merge the labels first."
    )


def _first_present(obs: pd.DataFrame, names: tuple[str, ...], min_values: int) -> str | None:
    for col in names:
        if col in obs.columns and obs[col].nunique(dropna=True) >= min_values:
            return col
    return None


def _detect_genetic(obs: pd.DataFrame, components: list[str], gene_symbols: set[str]) -> tuple[bool, str]:
    for col in PERTURBATION_TYPE_COLUMNS:
        if col in obs.columns:
            kinds = {str(v).lower() for v in obs[col].unique()}
            if any("crispr" in k or "shrna" in k or "sirna" in k or "genetic" in k for k in kinds):
                return True, f"obs['{col}'] says {sorted(kinds)}"
            if any(k in {"drug", "chemical", "compound", "small molecule", "cytokine"} for k in kinds):
                return False, f"obs['{col}'] says {sorted(kinds)}"
    if not components:
        return False, "no perturbations besides the control"
    in_var = sum(c in gene_symbols for c in components) / len(components)
    if in_var >= 0.5:
        return True, f"{in_var:.0%} of perturbation names are measured genes"
    gene_like = sum(bool(_GENE_LIKE.match(c)) for c in components) / len(components)
    if gene_like >= 0.8:
        return True, f"{gene_like:.0%} of perturbation names look like gene symbols"
    return False, f"only {gene_like:.0%} of perturbation names look like gene symbols"


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


def _detect_counts(uns: Any, source: ExpressionSource, layer: str | None) -> tuple[bool, str]:
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


def _detect_gene_symbol_col(var: pd.DataFrame, var_names: pd.Index) -> tuple[str | None, str]:
    ensembl = np.mean([bool(_ENSEMBL.match(str(n))) for n in var_names[:200]]) if len(var_names) else 0.0
    if ensembl < 0.5:
        return None, "var_names are gene symbols"
    for col in GENE_SYMBOL_COLUMNS:
        if col in var.columns:
            return col, f"var_names are Ensembl IDs; symbols in var['{col}']"
    return None, "var_names are Ensembl IDs and no symbol column was found"


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


def detect_spec(
    adata: Any,
    source_of: Callable[[str | None], ExpressionSource] | None = None,
    layer_names: list[str] | None = None,
    **given: Any,
) -> Detection:
    """Detect a :class:`DataSpec` from an AnnData; ``given`` keys win over detection.

    Parameters
    ----------
    adata
        An AnnData; only ``obs``, ``var`` and ``uns`` are read, plus a sample of expression rows.
    source_of, layer_names
        How to reach the expression matrices when ``adata`` holds only metadata (a backed
        :class:`~pertflow.data.loading.H5adFile`); by default ``adata.X`` and ``adata.layers``.

    Raises
    ------
    InputError
        When a key is ambiguous or missing; the message lists the candidates and the fix.
    """
    unknown = sorted(set(given) - set(SPEC_FIELDS))
    if unknown:
        raise InputError(f"unknown data spec keys {unknown}; valid keys are {list(SPEC_FIELDS)}.")
    given = {k: v for k, v in given.items() if v is not None}
    obs = adata.obs
    evidence: dict[str, str] = {}

    pert_col = given.get("pert_col")
    if pert_col is not None:
        if pert_col not in obs.columns:
            raise InputError(
                f"perturbation column '{pert_col}' is not in obs. Columns: {list(obs.columns)}. "
                "Pass one of them as pert_col (CLI: --pert-col)."
            )
        evidence["pert_col"] = "given"
    else:
        pert_col, evidence["pert_col"] = _detect_pert_col(obs, given.get("control"))
    values = _values(obs, pert_col)

    control = given.get("control")
    if control is not None:
        if not (values == control).any():
            common = values.value_counts().index[:10].tolist()
            raise InputError(
                f"control label '{control}' does not occur in obs['{pert_col}']; its most frequent values "
                f"are {common}. Pass the right label as control (CLI: --control)."
            )
        evidence["control"] = "given"
    else:
        control = _detect_control(values, pert_col)
        evidence["control"] = "known control label"

    delim = given.get("combo_delim", "+")
    evidence["combo_delim"] = "given" if "combo_delim" in given else "default"

    if "context_cols" in given:
        context_cols = tuple([given["context_cols"]] if isinstance(given["context_cols"], str) else given["context_cols"])
        missing = [c for c in context_cols if c not in obs.columns]
        if missing:
            raise InputError(
                f"context columns {missing} are not in obs. Columns: {list(obs.columns)}. Fix context_cols (CLI: --context-col)."
            )
        evidence["context_cols"] = "given"
    else:
        context_cols = tuple(c for c in CONTEXT_COLUMNS if c in obs.columns and obs[c].notna().all())
        evidence["context_cols"] = "known column names" if context_cols else "none found: one context"

    def optional(key: str, names: tuple[str, ...]) -> str | None:
        if key in given:
            if given[key] not in obs.columns:
                raise InputError(f"{key} '{given[key]}' is not in obs. Columns: {list(obs.columns)}.")
            evidence[key] = "given"
            return given[key]
        col = _first_present(obs, names, min_values=2)
        evidence[key] = "known column name" if col else "none found"
        return col

    batch_col = optional("batch_col", BATCH_COLUMNS)
    dose_col = optional("dose_col", DOSE_COLUMNS)
    if dose_col is not None and "dose_col" not in given and not all_numbers(obs[dose_col]):
        evidence["dose_col"], dose_col = f"obs['{dose_col}'] is not numeric: no doses (convert it, then --dose-col {dose_col})", None

    if source_of is None:
        layer_names = list(adata.layers.keys())

        def source_of(name: str | None) -> ExpressionSource:
            return ExpressionSource(adata.X if name is None else adata.layers[name], "X" if name is None else name)

    layer = given.get("layer")
    if layer is not None and layer not in (layer_names or []):
        raise InputError(f"layer '{layer}' is not in the file; layers: {layer_names}. Fix layer (CLI: --layer).")
    evidence["layer"] = "given" if layer is not None else "X by default"

    if "is_counts" in given:
        is_counts = bool(given["is_counts"])
        evidence["is_counts"] = "given"
    else:
        is_counts, evidence["is_counts"] = _detect_counts(adata.uns, source_of(layer), layer)

    if "gene_symbol_col" in given:
        gene_symbol_col = given["gene_symbol_col"]
        if gene_symbol_col not in adata.var.columns:
            raise InputError(f"gene_symbol_col '{gene_symbol_col}' is not in var. Columns: {list(adata.var.columns)}.")
        evidence["gene_symbol_col"] = "given"
    else:
        gene_symbol_col, evidence["gene_symbol_col"] = _detect_gene_symbol_col(adata.var, adata.var_names)

    symbols = set(map(str, adata.var[gene_symbol_col])) if gene_symbol_col else set(map(str, adata.var_names))
    components = sorted({c for v in values.unique() for c in split_components(v, delim, control)})
    if "genetic" in given:
        genetic = bool(given["genetic"])
        evidence["genetic"] = "given"
    else:
        genetic, evidence["genetic"] = _detect_genetic(obs, components, symbols)

    descriptors_key = given.get("descriptors_key")
    if descriptors_key is not None and descriptors_key not in adata.uns:
        raise InputError(f"descriptors_key '{descriptors_key}' is not in uns; keys: {list(adata.uns.keys())}.")

    spec = DataSpec(
        pert_col=pert_col,
        control=control,
        combo_delim=delim,
        context_cols=context_cols,
        batch_col=batch_col,
        dose_col=dose_col,
        layer=layer,
        is_counts=is_counts,
        target_sum=float(given.get("target_sum", 1e4)),
        gene_symbol_col=gene_symbol_col,
        genetic=genetic,
        descriptors_key=descriptors_key,
        min_cells=int(given.get("min_cells", 1)),
    )
    return Detection(spec=spec, evidence=evidence)


def check_spec(adata: Any, spec: DataSpec, layer_names: list[str] | None = None) -> None:
    """Check that a given spec fits a file: its columns, control label and layer exist."""
    obs = adata.obs
    if spec.pert_col not in obs.columns:
        raise InputError(
            f"perturbation column '{spec.pert_col}' is not in obs. Columns: {list(obs.columns)}. "
            "Fix pert_col in the spec (CLI: --pert-col)."
        )
    values = _values(obs, spec.pert_col)
    if not (values == spec.control).any():
        common = values.value_counts().index[:10].tolist()
        raise InputError(
            f"control label '{spec.control}' does not occur in obs['{spec.pert_col}']; its most frequent values "
            f"are {common}. Fix control in the spec (CLI: --control)."
        )
    for key in ("batch_col", "dose_col"):
        col = getattr(spec, key)
        if col is not None and col not in obs.columns:
            raise InputError(f"{key} '{col}' is not in obs. Columns: {list(obs.columns)}. Fix the spec.")
    missing = [c for c in spec.context_cols if c not in obs.columns]
    if missing:
        raise InputError(f"context columns {missing} are not in obs. Columns: {list(obs.columns)}. Fix the spec.")
    names = list(adata.layers.keys()) if layer_names is None else layer_names
    if spec.layer is not None and spec.layer not in names:
        raise InputError(f"layer '{spec.layer}' is not in the file; layers: {names}. Fix the spec (CLI: --layer).")
    if spec.gene_symbol_col is not None and spec.gene_symbol_col not in adata.var.columns:
        raise InputError(
            f"gene_symbol_col '{spec.gene_symbol_col}' is not in var. Columns: {list(adata.var.columns)}. Fix the spec."
        )
