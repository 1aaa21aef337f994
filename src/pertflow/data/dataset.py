"""A perturbation dataset: AnnData metadata, its spec, and row access to log1p expression."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from pertflow.data.dose import numeric_doses, with_doses
from pertflow.data.loading import DEFAULT_CHUNK, ExpressionSource, H5adFile, normalize_log1p, stored_values
from pertflow.data.detect import Detection, check_spec, detect_spec
from pertflow.data.spec import SPEC_FIELDS, DataSpec, split_components
from pertflow.data.values import LOG_MAX, WHOLE_TOLERANCE, ValueEvidence, check_transform
from pertflow.errors import InputError

SINGLE_CONTEXT = "all"
MAX_VALUES_PER_READ = 2**26  # values of whole rows read at once (256 MB of float32)
UNLABELLED_COL = "pertflow_unlabelled"
SAME_GENES_FIX = "A saved model or split needs the same genes: use matching data or retrain."
#: The fix when data lacks genes a model needs: a model trained on the genes both datasets share.
GENE_PANEL_FIX = (
    "To use a model on data that lacks some of its genes, train it on the genes both datasets share: "
    "`pertflow train ... --genes FILE` (one gene name per line)."
)
CONTEXT_JOIN = "|"
#: Layers looked for, in this order, when a model needs raw counts and the expression is log-normalised.
COUNT_LAYERS = ("counts", "counts_reconstructed", "raw_counts", "raw")


def checked_labels(values: pd.Series, col: str, what: str) -> np.ndarray:
    """The labels of a column as text, once checked: refuses labels pertflow would otherwise guess
    at: missing ones (NaN, None or empty), which would become a label named "nan", and labels
    that differ only by surrounding spaces, by case or by type, which would be read as different
    perturbations or contexts (or one)."""
    text = values.astype(str)
    missing = values.isna() | (text.str.strip() == "")
    if missing.any():
        raise InputError(
            f"{int(missing.sum())} cells have no {what} label (NaN or empty) in obs['{col}']. Drop those cells "
            f"(adata = adata[adata.obs['{col}'].notna()]) or give them a label, then run again."
        )
    names = pd.Series(pd.unique(text))
    raw = pd.unique(values.dropna().to_numpy(dtype=object)) if values.dtype == object else names
    if len(raw) > len(names):
        kinds = sorted({type(v).__name__ for v in raw})
        raise InputError(
            f"{what} labels in obs['{col}'] mix types ({', '.join(kinds)}) that read as the same label (e.g. 1 and "
            f"'1'). Write them all as text (adata.obs['{col}'] = adata.obs['{col}'].astype(str)), then run again."
        )
    spaced = names[names != names.str.strip()]
    if len(spaced):
        raise InputError(
            f"{len(spaced)} {what} labels in obs['{col}'] have leading or trailing spaces (e.g. {list(spaced[:3])}), "
            f"so ' A' and 'A' would be two {what}s. Strip them (adata.obs['{col}'] = adata.obs['{col}'].astype(str)"
            ".str.strip()), then run again."
        )
    folded = names.groupby(names.str.lower()).agg(list)
    clashes = [group for group in folded if len(group) > 1]
    if clashes:
        raise InputError(
            f"{what} labels in obs['{col}'] differ only by case ({clashes[:3]}): pertflow would read them as different "
            f"{what}s. Write each one the same way, then run again."
        )
    return text.to_numpy()


class PerturbationData:
    """Cells, their perturbation and context labels, and their expression as log1p values.

    Build one with :meth:`read` (a file, in memory or backed) or :meth:`from_anndata`. The spec
    is detected unless given; bad input stops here with an error that names the fix.

    Attributes
    ----------
    adata
        The AnnData (metadata only when backed).
    spec
        The :class:`~pertflow.data.spec.DataSpec` in use.
    evidence
        How each spec key was found.
    perturbations
        Canonical perturbation name of each cell (``A+ctrl`` -> ``A``); controls carry
        ``spec.control``. With a dose column (``spec.dose_col``), a perturbed cell with a dose
        carries its condition, ``A@1`` (:func:`~pertflow.data.dose.dose_label`): every group by
        perturbation is then a group by (perturbation, dose).
    doses
        Each cell's dose (float64; 0 for controls, cells without a dose, and data without a dose
        column).
    contexts
        Context of each cell (values of ``spec.context_cols`` joined by ``|``), ``"all"``
        without context columns.
    is_control
        Boolean mask of control cells.
    """

    def __init__(
        self,
        adata: ad.AnnData,
        spec: DataSpec,
        source: ExpressionSource,
        evidence: dict[str, str] | None = None,
        path: Path | None = None,
        file: H5adFile | None = None,
    ):
        self.adata = adata
        self.spec = spec
        self.source = source
        self.evidence = evidence or {}
        self.path = path
        self._file = file
        self._check_names()
        labels = checked_labels(adata.obs[spec.pert_col], spec.pert_col, "perturbation")
        self._components: dict[str, tuple[str, ...]] = {}
        canonical_of_label: dict[str, str] = {}
        name_of_set: dict[frozenset[str], str] = {}
        for label in pd.unique(labels):
            comps = split_components(label, spec)
            if label == spec.control or not comps:
                canonical_of_label[label] = spec.control
                continue
            key = frozenset(comps)
            name = name_of_set.setdefault(key, spec.combo_delim.join(comps))
            canonical_of_label[label] = name
            self._components.setdefault(name, comps)
        self.is_control = np.array([canonical_of_label[x] == spec.control for x in labels])
        self.perturbations = np.array([canonical_of_label[x] for x in labels], dtype=object)
        self.doses = np.zeros(adata.n_obs, dtype=np.float64)
        if spec.dose_col is not None:
            found = numeric_doses(adata.obs[spec.dose_col], spec.dose_col)
            self.perturbations, dosed = with_doses(self.perturbations, found, ~self.is_control)
            self.doses[dosed] = found[dosed]
        if spec.context_cols:
            parts = [checked_labels(adata.obs[c], c, "context") for c in spec.context_cols]
            self.contexts = np.array([CONTEXT_JOIN.join(v) for v in zip(*parts)], dtype=object)
        else:
            self.contexts = np.full(adata.n_obs, SINGLE_CONTEXT, dtype=object)

    # ------------------------------------------------------------------ construction
    @classmethod
    def read(
        cls,
        path: str | Path,
        *,
        backed: bool = False,
        spec: DataSpec | str | Path | None = None,
        validate: bool = True,
        progress: bool = False,
        **spec_keys: Any,
    ) -> PerturbationData:
        """Open an ``.h5ad`` file.

        Parameters
        ----------
        path
            The file.
        backed
            Keep expression on disk and read rows on demand.
        spec
            A spec (or the path of its JSON); otherwise it is detected, with ``spec_keys``
            (``pert_col=``, ``control=``, ...) overriding detection.
        validate
            Check values, names and cell counts (see :meth:`validate`).
        """
        file = H5adFile(path, backed=backed)
        try:
            _check_not_empty(file.adata, path)
            detection = _resolve_spec(file.adata, spec, spec_keys, file.source, file.layer_names)
            data = cls(
                file.adata,
                detection.spec,
                file.source(detection.spec.layer),
                detection.evidence,
                path=Path(path),
                file=file,
            )
            if validate:
                data.validate(progress=progress)
        except Exception:
            file.close()
            raise
        return data

    @classmethod
    def read_unlabelled(cls, path: str | Path, *, backed: bool = False, **spec_keys: Any) -> PerturbationData:
        """Open a file without perturbation labels (for pretraining): every cell reads as a control."""
        file = H5adFile(path, backed=backed)
        try:
            _check_not_empty(file.adata, path)
            file.adata.obs[UNLABELLED_COL] = "control"
            keys = {k: v for k, v in spec_keys.items() if k not in ("pert_col", "control") and v is not None}
            detection = detect_spec(file.adata, file.source, file.layer_names, pert_col=UNLABELLED_COL,
                                    control="control", **keys)
            data = cls(file.adata, detection.spec, file.source(detection.spec.layer), detection.evidence, Path(path),
                       file)
            data.validate()
        except Exception:
            file.close()
            raise
        return data

    @staticmethod
    def has_perturbation_labels(path: str | Path) -> bool:
        """Whether spec detection finds a perturbation column with a control label in a file."""
        file = H5adFile(path, backed=True)
        try:
            detect_spec(file.adata, file.source, file.layer_names)
            return True
        except InputError:
            return False
        finally:
            file.close()

    @classmethod
    def from_anndata(
        cls,
        adata: ad.AnnData,
        spec: DataSpec | str | Path | None = None,
        validate: bool = True,
        **spec_keys: Any,
    ) -> PerturbationData:
        """Wrap an in-memory AnnData (not copied)."""
        _check_not_empty(adata, "the AnnData")
        detection = _resolve_spec(adata, spec, spec_keys, None, None)
        layer = detection.spec.layer
        source = ExpressionSource(adata.X if layer is None else adata.layers[layer], detection.spec.expression_source)
        data = cls(adata, detection.spec, source, detection.evidence)
        if validate:
            data.validate()
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> PerturbationData:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ checks
    def _check_names(self) -> None:
        for what, names, fix in (
            ("cell", self.adata.obs_names, "adata.obs_names_make_unique()"),
            ("gene", pd.Index(self.gene_symbols), "adata.var_names_make_unique() or drop the duplicated genes"),
        ):
            dup = names[names.duplicated()].unique()
            if len(dup):
                raise InputError(
                    f"{len(dup)} duplicated {what} names, e.g. {list(map(str, dup[:5]))}. Make them unique "
                    f"({fix}) and save the file again."
                )

    def validate(self, progress: bool = False) -> None:
        """Check expression values and cell counts; raise :class:`InputError` naming the fix.

        Expression is read in row chunks (never densified whole): NaN or Inf values and negative
        values are errors. The values must fit the declared transform (checked on a sample of
        cells, see :func:`~pertflow.data.values.check_transform`): raw counts are whole numbers,
        log-normalised values do not look like counts. There must be control cells, and every
        perturbation must have at least ``spec.min_cells`` cells in each context where it occurs.
        """
        source = self.source
        unfit: tuple[int, float] | None = None  # the first value that does not fit the declared transform
        chunks = source.iter_chunks(DEFAULT_CHUNK)
        n_chunks = -(-source.shape[0] // DEFAULT_CHUNK)
        if progress and n_chunks > 4:
            chunks = tqdm(chunks, total=n_chunks, desc="checking values", unit="chunk")
        for start, block in chunks:
            values = stored_values(block)
            bad = ~np.isfinite(values)
            if bad.any():
                row = start + _first_row_where(block, bad)
                raise InputError(
                    f"{source.name} holds {int(bad.sum())} NaN or Inf values in rows "
                    f"{start}-{start + block.shape[0] - 1} (first in cell '{self.adata.obs_names[row]}'). Remove or "
                    "repair those cells, or choose another expression source (--layer)."
                )
            neg = values < 0
            if neg.any():
                row = start + _first_row_where(block, neg)
                raise InputError(
                    f"{source.name} holds negative values (min {values.min():.3g}, first in cell "
                    f"'{self.adata.obs_names[row]}'). pertflow needs counts or log1p-normalised expression: "
                    "pass a layer with counts (--layer) or undo scaling/centring."
                )
            if unfit is None:  # the whole file, not only the sampled cells, must fit the transform
                wrong = np.abs(values - np.round(values)) > WHOLE_TOLERANCE if self.spec.is_counts else values > LOG_MAX
                if wrong.any():
                    unfit = (start + _first_row_where(block, wrong), float(values[wrong][0]))
        how = self._how_transform_was_set()
        check_transform(self.spec, ValueEvidence.sample(source), how, self._layer_names())
        if unfit is not None:
            row, value = unfit
            kind = (f"read as raw counts ({how}) but holds a value that is not a whole number" if self.spec.is_counts
                    else f"read as log-normalised ({how}) but holds a value far above what log1p expression reaches")
            raise InputError(
                f"{source.name} is {kind}: {value:.6g} in cell '{self.adata.obs_names[row]}' (row {row}), although the "
                "sampled cells looked right. Part of the file was stored another way: repair those cells, or choose "
                "another expression source (--layer)."
            )
        if not self.is_control.any():
            raise InputError(
                f"no control cells: no cell of obs['{self.spec.pert_col}'] is labelled '{self.spec.control}'. "
                "Give the right control label (--control); pertflow predicts from control cells."
            )
        counts = Counter(zip(self.perturbations[~self.is_control], self.contexts[~self.is_control]))
        small = sorted((n, p, c) for (p, c), n in counts.items() if n < self.spec.min_cells)
        if small:
            shown = ", ".join(f"'{p}' in {c}: {n}" for n, p, c in small[:5])
            raise InputError(
                f"{len(small)} perturbation(s) have fewer than min_cells={self.spec.min_cells} cells ({shown}). "
                "Drop them from the file or lower min_cells (--min-cells)."
            )

    def _how_transform_was_set(self) -> str:
        how = self.evidence.get("is_counts", "given")
        if how == "given":
            return f"{'--counts' if self.spec.is_counts else '--log'} was given"
        if how == "from the given spec":
            return f"the given data spec says is_counts={self.spec.is_counts}"
        return f"detected: {how}"

    def _layer_names(self) -> list[str]:
        return list(self._file.layer_names) if self._file is not None else list(self.adata.layers.keys())

    def __repr__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        n_pert = len(set(self.perturbations[~self.is_control]))
        return (f"PerturbationData({where}{self.n_cells} cells x {self.adata.n_vars} genes, {n_pert} perturbations, "
                f"{int(self.is_control.sum())} controls, {len(set(self.contexts))} contexts)")

    # ------------------------------------------------------------------ names
    @property
    def n_cells(self) -> int:
        return self.adata.n_obs

    @property
    def cell_names(self) -> pd.Index:
        return self.adata.obs_names

    @property
    def gene_names(self) -> pd.Index:
        return self.adata.var_names

    @property
    def gene_symbols(self) -> np.ndarray:
        """Gene symbols (``var_names`` unless the spec names a symbol column)."""
        col = self.spec.gene_symbol_col
        return (self.adata.var[col] if col else self.adata.var_names).astype(str).to_numpy()

    @property
    def perturbation_names(self) -> list[str]:
        """Canonical names of the perturbations (control excluded), in order of appearance."""
        return list(self._components)

    def components(self, perturbation: str) -> tuple[str, ...]:
        """Components of a perturbation name (``'A+B'`` -> ``('A', 'B')``; control -> ``()``)."""
        return self._components.get(perturbation) or split_components(perturbation, self.spec)

    def single_context_col(self, rows: np.ndarray) -> str | None:
        """The context column that separates ``rows``: the spec's one context column when the
        rows span several contexts, else None (one context: nothing to separate)."""
        if len(self.spec.context_cols) == 1 and len(set(self.contexts[rows])) > 1:
            return self.spec.context_cols[0]
        return None

    def rows_of(self, cell_names: list[str] | np.ndarray | pd.Index, what: str = "cells") -> np.ndarray:
        """Row indices of named cells; unknown names raise an error listing some of them."""
        index = self.cell_names.get_indexer(pd.Index(cell_names))
        missing = np.asarray(cell_names)[index < 0]
        if len(missing):
            raise InputError(
                f"{len(missing)} {what} are not in {self.path or 'the data'}, e.g. {list(map(str, missing[:5]))}. "
                "The split was made for another file: rebuild it with `pertflow split` on this file."
            )
        return index.astype(np.int64)

    def gene_indices(self, genes: list[str] | None, fix: str = SAME_GENES_FIX) -> np.ndarray:
        """Column indices of genes given by name (``var_names`` or symbols); None = all.

        Names the data lacks raise :func:`missing_genes_error`, ending with ``fix``.
        """
        if genes is None:
            return np.arange(self.adata.n_vars)
        by_name = pd.Index(self.gene_names).get_indexer(pd.Index(genes))
        if (by_name < 0).any():
            by_symbol = pd.Index(self.gene_symbols).get_indexer(pd.Index(genes))
            by_name = np.where(by_name < 0, by_symbol, by_name)
        missing = np.asarray(genes)[by_name < 0]
        if len(missing):
            raise missing_genes_error(missing, f"in {self.path or 'the data'}", fix)
        return by_name.astype(np.int64)

    # ------------------------------------------------------------------ expression
    def _log_blocks(self, rows: np.ndarray, genes: np.ndarray | None):
        """log1p blocks of ``rows`` on ``genes``, read a bounded number of values at a time.

        Counts are normalised on all genes of the file first (normalize_total + log1p), then
        the genes are chosen, so no more than one chunk of whole rows is ever in memory.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if genes is not None and np.array_equal(genes, np.arange(self.adata.n_vars)):
            genes = None  # every gene in file order: no copy of the block
        chunk = max(1, MAX_VALUES_PER_READ // max(1, self.adata.n_vars))
        for start in range(0, len(rows), chunk):
            block = self.source.read_rows(rows[start : start + chunk])
            if self.spec.is_counts:
                block = normalize_log1p(block, self.spec.target_sum)
            yield block if genes is None else block[:, genes]

    def log_expression(self, rows: np.ndarray, genes: np.ndarray | None = None) -> np.ndarray:
        """Dense (n, g) float32 log1p expression of ``rows`` on gene columns ``genes`` (all when None)."""
        n_genes = self.adata.n_vars if genes is None else len(genes)
        out = np.empty((len(rows), n_genes), dtype=np.float32)
        start = 0
        for block in self._log_blocks(rows, genes):
            out[start : start + block.shape[0]] = block.toarray() if sp.issparse(block) else block
            start += block.shape[0]
        return out

    def log_expression_csr(self, rows: np.ndarray, genes: np.ndarray | None = None) -> sp.csr_matrix:
        """The same as :meth:`log_expression`, as a CSR matrix (never dense whole)."""
        blocks = [sp.csr_matrix(b, dtype=np.float32) for b in self._log_blocks(rows, genes)]
        n_genes = self.adata.n_vars if genes is None else len(genes)
        return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n_genes), dtype=np.float32)

    def to_anndata(self, rows: np.ndarray, genes: np.ndarray | None = None, sparse: bool = False) -> ad.AnnData:
        """An in-memory AnnData of ``rows`` with log1p ``X`` (CSR with ``sparse``) and canonical labels."""
        X = self.log_expression_csr(rows, genes) if sparse else self.log_expression(rows, genes)
        obs = self.adata.obs.iloc[rows].copy()
        obs[self.spec.pert_col] = pd.Categorical(self.perturbations[rows].astype(str))
        var = self.adata.var.iloc[genes if genes is not None else slice(None)].copy()
        return ad.AnnData(X=X, obs=obs, var=var)

    def counts_source(self, layer: str | None = None) -> ExpressionSource:
        """The raw counts, for a model of counts: ``layer`` when given; else the expression source
        when the spec reads counts; else the first of :data:`COUNT_LAYERS` the file has.

        Raises :class:`InputError` naming the layer to give when there are none, or when the
        layer does not hold whole numbers (checked on a sample of cells).
        """
        layers = self._layer_names()
        if layer is None:
            if self.spec.is_counts:
                return self.source
            layer = next((name for name in COUNT_LAYERS if name in layers), None)
            if layer is None:
                raise InputError(
                    f"this model needs raw counts, but the expression ({self.spec.expression_source}) is "
                    f"log-normalised and the file has no counts layer (looked for {list(COUNT_LAYERS)}; layers: "
                    f"{layers}). Give the layer that holds the raw counts (--set model.counts_layer=NAME), or read "
                    "counts as the expression (--layer NAME --counts)."
                )
        elif layer not in layers:
            raise InputError(f"counts layer '{layer}' is not in the file; layers: {layers}. Fix model.counts_layer.")
        source = (self._file.source(layer) if self._file is not None
                  else ExpressionSource(self.adata.layers[layer], f"layers['{layer}']"))
        found = ValueEvidence.sample(source)
        if found.whole < 1.0 or found.n_values == 0:
            raise InputError(
                f"{source.name} does not hold raw counts: {found}. Give the layer with raw counts "
                f"(--set model.counts_layer=NAME; layers: {layers})."
            )
        return source

    # ------------------------------------------------------------------ description
    def control_cells_by_context(self) -> dict[str, int]:
        """Control cells of each context that has any, most first."""
        counts = pd.Series(self.contexts[self.is_control]).value_counts()
        return {str(k): int(v) for k, v in counts.items()}

    def summary(self) -> dict[str, Any]:
        """What ``pertflow inspect`` prints: spec, evidence and counts."""
        pert = pd.Series(self.perturbations[~self.is_control]).value_counts()
        combos = [p for p in pert.index if len(self.components(p)) > 1]
        contexts = pd.Series(self.contexts).value_counts()
        return {
            "file": str(self.path) if self.path else None,
            "cells": self.n_cells,
            "genes": int(self.adata.n_vars),
            "spec": self.spec.to_dict(),
            "evidence": dict(self.evidence),
            "expression": {
                "source": self.source.name,
                "kind": "counts" if self.spec.is_counts else "log-normalised",
                "storage": ("sparse" if self.source.is_sparse else "dense")
                + (" on disk" if self.source.on_disk else ""),
            },
            "control_cells": int(self.is_control.sum()),
            "control_cells_by_context": self.control_cells_by_context(),
            "perturbations": {str(k): int(v) for k, v in pert.items()},
            "n_perturbations": int(len(pert)),
            "n_combinations": len(combos),
            "combinations": combos,
            "contexts": {str(k): int(v) for k, v in contexts.items()},
        }


def missing_genes_error(missing: Sequence[str], where: str, fix: str) -> InputError:
    """The error for genes that are needed but absent: how many, the first few, and the fix."""
    return InputError(f"{len(missing)} genes are not {where}, e.g. {list(map(str, missing[:5]))}. {fix}")


def _check_not_empty(adata: ad.AnnData, where: str | Path) -> None:
    """A file without cells or without genes stops here, before detection guesses at it."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        missing = "cells" if adata.n_obs == 0 else "genes"
        raise InputError(
            f"{where} holds no {missing} ({adata.n_obs} cells x {adata.n_vars} genes): there is nothing to learn from "
            f"or predict. Check that the file was written completely (a filter may have removed every {missing[:-1]}), "
            "or choose another file."
        )


def _first_row_where(block: np.ndarray | sp.spmatrix, flags: np.ndarray) -> int:
    """Row of the first flagged stored value of a block."""
    first = int(np.argmax(flags))
    if sp.issparse(block):
        return int(np.searchsorted(sp.csr_matrix(block).indptr, first, side="right") - 1)
    return first // block.shape[1]


def _resolve_spec(
    adata: ad.AnnData,
    spec: DataSpec | str | Path | None,
    spec_keys: dict[str, Any],
    source_of: Any,
    layer_names: list[str] | None,
) -> Detection:
    if spec is None:
        return detect_spec(adata, source_of=source_of, layer_names=layer_names, **spec_keys)
    if not isinstance(spec, DataSpec):
        spec = DataSpec.load(spec)
    overrides = {k: v for k, v in spec_keys.items() if v is not None}
    if overrides:
        spec = spec.replace(**overrides)
    check_spec(adata, spec, layer_names)
    return Detection(spec=spec, evidence={k: "from the given spec" for k in SPEC_FIELDS})
