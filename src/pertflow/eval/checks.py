"""Checks of the evaluator's inputs: each bad input stops with an error that names the fix.

cell-eval guesses whether data are log-normalised (integer-valued input is silently
``normalize_total`` + ``log1p``-ed; values >= 15 raise), compares genes by position, and measures
predicted deltas against the prediction's own controls; the checks here make each of those
assumptions explicit before cell-eval runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertflow.errors import InputError

# Largest value cell-eval accepts as log1p data (cell_eval.utils.guess_is_lognorm).
LOG1P_MAX = 15.0


def read_anndata(adata: ad.AnnData | str | Path, name: str) -> ad.AnnData:
    if isinstance(adata, ad.AnnData):
        return adata
    if not isinstance(adata, (str, Path)):
        raise InputError(f"{name} must be an AnnData or an .h5ad path, got {type(adata).__name__}.")
    path = Path(adata)
    if not path.is_file():
        raise InputError(f"{name}: no such file {path}. Check the path.")
    return ad.read_h5ad(path)


def check_cell_eval_installed() -> None:
    try:
        import cell_eval  # noqa: F401
    except ImportError as err:
        raise InputError(
            "evaluation needs the 'cell-eval' package, which is not installed. "
            "Install it with: pip install cell-eval"
        ) from err


def check_obs(adata: ad.AnnData, name: str, pert_col: str, context_col: str | None) -> None:
    if not isinstance(adata, ad.AnnData):
        raise InputError(
            f"{name} must be an AnnData, got {type(adata).__name__}. Read it with anndata.read_h5ad."
        )
    for col in (pert_col, context_col):
        if col is not None and col not in adata.obs.columns:
            raise InputError(
                f"{name}.obs has no column '{col}' (columns: {list(adata.obs.columns)}). "
                f"Pass the right column name or add the column."
            )
        if col is not None and adata.obs[col].isna().any():
            raise InputError(
                f"{name}.obs['{col}'] has {int(adata.obs[col].isna().sum())} missing values. "
                f"Label every cell or drop the unlabelled ones."
            )
    if adata.n_obs == 0:
        raise InputError(f"{name} has no cells.")


def check_values(x: Any, name: str, *, require_decimals: bool) -> None:
    """Finite, non-negative, log1p-looking values; sparse matrices are checked on stored entries."""
    if x is None:
        raise InputError(f"{name}.X is empty. Put the log1p expression in X.")
    data = x.data if sp.issparse(x) else np.asarray(x)
    if not np.issubdtype(data.dtype, np.number):
        raise InputError(f"{name}.X has non-numeric dtype {data.dtype}. Store expression as floats.")
    if data.size == 0:
        return
    if not np.all(np.isfinite(data)):
        raise InputError(f"{name}.X holds NaN or Inf values. Fix the prediction (or drop those cells).")
    low, high = float(data.min()), float(data.max())
    if low < 0:
        raise InputError(
            f"{name}.X has negative values (min {low:.3g}); cell-eval needs non-negative log1p expression. "
            f"Clip predictions at 0 (np.clip(X, 0, None)) or evaluate in log1p space."
        )
    if high >= LOG1P_MAX:
        raise InputError(
            f"{name}.X has values up to {high:.3g}, too large for log1p-normalised data (cell-eval refuses >= "
            f"{LOG1P_MAX:g}). Apply normalize_total + log1p, or check for raw counts mixed into the file."
        )
    if require_decimals and np.all(np.modf(data)[0] <= 1e-3):
        raise InputError(
            f"{name}.X holds only whole numbers, which looks like raw counts; cell-eval would silently "
            f"normalise it (and not the other file). Apply normalize_total + log1p before evaluating."
        )


def check_genes(real: ad.AnnData, pred: ad.AnnData) -> pd.Index:
    real_genes = pd.Index(real.var_names.astype(str))
    pred_genes = pd.Index(pred.var_names.astype(str))
    for genes, name in ((real_genes, "real"), (pred_genes, "pred")):
        if not genes.is_unique:
            dup = genes[genes.duplicated()].unique().tolist()[:5]
            raise InputError(f"{name} has duplicated gene names, e.g. {dup}. Make var_names unique.")
    if real_genes.equals(pred_genes):
        return real_genes
    if set(real_genes) == set(pred_genes):
        raise InputError(
            "pred has the real genes in a different order; cell-eval compares genes by position. "
            "Reorder the prediction with pred = pred[:, real.var_names]."
        )
    missing = real_genes.difference(pred_genes).tolist()[:5]
    extra = pred_genes.difference(real_genes).tolist()[:5]
    raise InputError(
        f"pred and real have different genes (missing from pred e.g. {missing}; extra in pred e.g. {extra}). "
        f"Predict exactly the split's genes, in the split's order."
    )


def contexts_to_evaluate(
    real_pert: np.ndarray, real_ctx: np.ndarray, pred_pert: np.ndarray, pred_ctx: np.ndarray, control: str
) -> list[str]:
    pred_contexts = sorted(set(pred_ctx[pred_pert != control]))
    real_contexts = sorted(set(real_ctx[real_pert != control]))
    if not pred_contexts:
        raise InputError(
            f"pred has no predicted (non-'{control}') cells. Check the perturbation column and control label."
        )
    unpredicted = sorted(set(real_contexts) - set(pred_contexts))
    if unpredicted:
        raise InputError(
            f"real has test cells in contexts {unpredicted[:5]} that pred does not predict. "
            f"Predict every test context, or drop those cells from real."
        )
    return pred_contexts


def check_context_labels(r_lab: np.ndarray, p_lab: np.ndarray, control: str, where: str) -> None:
    if not np.any(r_lab == control):
        raise InputError(
            f"real has no '{control}' cells{where}. Include the real control cells of every test context in real."
        )
    if not np.any(p_lab == control):
        raise InputError(
            f"pred has no '{control}' cells{where}; cell-eval needs them. Add the real control cells of "
            f"each test context to the prediction under the label '{control}'."
        )
    real_perts, pred_perts = set(r_lab) - {control}, set(p_lab) - {control}
    extra = sorted(pred_perts - real_perts)
    if extra:
        raise InputError(
            f"pred has perturbations with no real cells{where}: {extra[:5]}. "
            f"Predict only the split's test perturbations (check spelling and the control label)."
        )
    missing = sorted(real_perts - pred_perts)
    if missing:
        raise InputError(
            f"pred lacks perturbations that real has{where}: {missing[:5]}. Predict every test perturbation."
        )


def prepare_train(train: ad.AnnData, genes: pd.Index, pert_col: str, context_col: str | None) -> TrainView:
    check_obs(train, "train", pert_col, None)
    train_genes = pd.Index(train.var_names.astype(str))
    if not train_genes.is_unique:
        raise InputError("train has duplicated gene names. Make var_names unique.")
    missing = genes.difference(train_genes)
    if len(missing):
        raise InputError(
            f"train lacks {len(missing)} of the evaluated genes (e.g. {missing.tolist()[:5]}). "
            f"Pass the training cells of the same split (same genes)."
        )
    x = train.X if train_genes.equals(genes) else train[:, genes].X
    check_values(x, "train", require_decimals=False)
    has_context = context_col is not None and context_col in train.obs.columns
    return TrainView(
        x=x,
        pert=train.obs[pert_col].astype(str).to_numpy(),
        context=train.obs[context_col].astype(str).to_numpy() if has_context else None,
    )


@dataclass(frozen=True)
class TrainView:
    """Training cells restricted to the evaluated genes."""

    x: Any
    pert: np.ndarray
    context: np.ndarray | None


def warn_degenerate(
    perts: list[str], r_lab: np.ndarray, p_lab: np.ndarray, x_pred: np.ndarray, where: str, notes: list[str]
) -> None:
    constant = []
    for p in perts:
        cells = x_pred[p_lab == p]
        if cells.shape[0] > 1 and np.all(cells.max(axis=0) == cells.min(axis=0)):
            constant.append(p)
        n_real, n_pred = int((r_lab == p).sum()), cells.shape[0]
        if n_real != n_pred:
            notes.append(
                f"'{p}'{where}: {n_pred} predicted cells for {n_real} real ones; DE p-values are not comparable"
            )
    if constant:
        message = (
            f"predicted cells are all identical (a mean-only prediction){where} for {constant[:5]}: cell-eval's DE "
            f"sees zero variance and calls far more genes significant than in real data (precision_at_*, "
            f"de_nsig_counts_pred, pr_auc/roc_auc degrade), and edistance_pca / mmd_rbf_pca / knn_purity_pca score "
            f"a point mass. Compare such models on the mean-profile metrics, or sample cells."
        )
        warnings.warn(message, UserWarning, stacklevel=4)
        notes.append(message)
