"""Guessing which ``obs`` / ``var`` keys of an AnnData mean what: :func:`detect_spec` detects a
:class:`~pertflow.data.spec.DataSpec` where that is unambiguous, otherwise it stops with an error
that asks for the one missing key; :func:`check_spec` checks that a given spec fits a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from pertflow.data.dose import all_numbers
from pertflow.data.loading import ExpressionSource
from pertflow.data.spec import CONTROL_LABELS, SPEC_FIELDS, DataSpec, split_components
from pertflow.data.values import detect_counts
from pertflow.errors import InputError

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
GENE_SYMBOL_COLUMNS = (
    "gene_symbol", "gene_symbols", "symbol", "feature_name", "gene_name", "gene_names", "gene_short_name",
)
PERTURBATION_TYPE_COLUMNS = ("perturbation_type", "perturbation_kind", "pert_type")
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d+")
_GENE_LIKE = re.compile(r"^[A-Z][A-Z0-9\-\.]*[A-Z0-9]$|^[A-Z]$")


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
        if isinstance(obs[c].dtype, pd.CategoricalDtype)
        or obs[c].dtype == object
        or pd.api.types.is_string_dtype(obs[c])
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



def _detect_gene_symbol_col(var: pd.DataFrame, var_names: pd.Index) -> tuple[str | None, str]:
    ensembl = np.mean([bool(_ENSEMBL.match(str(n))) for n in var_names[:200]]) if len(var_names) else 0.0
    if ensembl < 0.5:
        return None, "var_names are gene symbols"
    for col in GENE_SYMBOL_COLUMNS:
        if col in var.columns:
            return col, f"var_names are Ensembl IDs; symbols in var['{col}']"
    return None, "var_names are Ensembl IDs and no symbol column was found"


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
        given_cols = given["context_cols"]
        context_cols = tuple([given_cols] if isinstance(given_cols, str) else given_cols)
        missing = [c for c in context_cols if c not in obs.columns]
        if missing:
            raise InputError(
                f"context columns {missing} are not in obs. Columns: {list(obs.columns)}. "
                "Fix context_cols (CLI: --context-col)."
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
        evidence["dose_col"] = f"obs['{dose_col}'] is not numeric: no doses (convert it, then --dose-col {dose_col})"
        dose_col = None

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
        is_counts, evidence["is_counts"] = detect_counts(adata.uns, source_of(layer), layer)

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
