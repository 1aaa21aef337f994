"""Evaluate a prediction against real cells: cell-eval's metrics plus pertflow's, per perturbation.

One call, :func:`evaluate`, returns one row per (context, perturbation) and an aggregate over rows.
Every metric that cell-eval computes is taken from cell-eval's ``MetricsEvaluator`` under
cell-eval's name (``pearson_delta``, ``mse``, ``mae``, ``mse_delta``, ``mae_delta``,
``discrimination_score_l1/l2/cosine``, ``pearson_edistance``, ``clustering_agreement``,
``overlap_at_N/50/100/200/500``, ``precision_at_*``, ``de_spearman_sig``, ``de_direction_match``,
``de_spearman_lfc_sig``, ``de_sig_genes_recall``, ``de_nsig_counts_real/pred``, ``pr_auc``,
``roc_auc``); the rest come from :mod:`pertflow.eval.metrics` (see :data:`PERTFLOW_METRICS`).

How cell-eval is driven, and why (cell-eval 0.8.2, pdex 0.3.0):

- cell-eval knows no contexts, so each context (cell type, line, donor) is evaluated on its own:
  its real test cells and real controls against its predicted cells and controls.
- cell-eval computes predicted deltas against the *prediction's own* control cells
  (ArcInstitute/cell-eval#183, #196), so a prediction must carry the real control cells
  unchanged; this is checked, since altered controls would move every delta metric.
- cell-eval guesses whether data are log-normalised: integer-valued input is silently
  ``normalize_total`` + ``log1p``-ed, decimals >= 15 raise (``guess_is_lognorm``; the mixed-scale
  loophole of cell-eval#204). Both inputs must already be log1p, so values are checked here and a
  counts-looking matrix is refused instead of being transformed behind the user's back.
- pdex builds groups from ``pd.Categorical(obs[pert_col])``, so unused categories (common after
  subsetting to one context) become empty groups and crash the DE ("X must have at least one
  row"); the AnnData handed to cell-eval is rebuilt with plain string labels, float32 ``X``
  (numba, under pdex, cannot use float16) and unique cell names.
- The real DE table depends only on the real data: it is computed by cell-eval once and cached in
  ``de_cache`` as parquet, keyed by a SHA-256 of the real matrix, labels, genes, control label and
  the cell-eval/pdex versions; later calls pass it back as ``de_real`` and only the predicted DE
  is computed.
- Where a cell-eval value is undefined, cell-eval reports a placeholder: ``discrimination_score_*``
  is 1.0 for any prediction in a context with one perturbation, ``overlap_at_*`` is 0.0 (even for a
  perfect prediction) for a perturbation with no significant real DE gene. These become NaN (with a
  note) unless ``EvalConfig.mask_undefined`` is off; ``pearson_edistance`` and
  ``clustering_agreement`` are skipped in one-perturbation contexts, where cell-eval errors.
- pdex runs with ``epsilon=0`` (pinned by cell-eval), so a gene absent from one group has an
  infinite log fold change: cell-eval logs "infinite log2 fold change values", and such genes rank
  first in ``overlap_at_*``. Left as cell-eval does it, so the numbers stay comparable.
- ``num_threads`` goes to pdex, which sets numba's *process-wide* thread count.
- ``metric_configs`` of cell-eval's pipeline are written into its global metric registry and
  persist across calls, so this module never passes them.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertflow.data.dataset import SINGLE_CONTEXT
from pertflow.errors import InputError
from pertflow.eval import metrics as M
from pertflow.io import atomic_path

logger = logging.getLogger(__name__)

#: Direction of every metric pertflow adds: "higher" or "lower" is better. ``{k}`` = ``top_k_de``.
PERTFLOW_METRICS: dict[str, str] = {
    "pearson_delta_top{k}_de": "higher",
    "mse_top{k}_de": "lower",
    "mse_top{k}_de_rel_nochange": "lower",
    "r2_delta": "higher",
    "systema_pearson_delta": "higher",
    "systema_pearson_delta_top{k}_de": "higher",
    "centroid_accuracy": "higher",
    "edistance_pca": "lower",
    "mmd_rbf_pca": "lower",
    "knn_purity_pca": "higher",
}

# Largest value cell-eval accepts as log1p data (cell_eval.utils.guess_is_lognorm).
_LOG1P_MAX = 15.0
_ID_COLUMNS = ("context", "perturbation", "n_cells_real", "n_cells_pred")


@dataclass(frozen=True)
class EvalConfig:
    """Settings of :func:`evaluate`.

    Attributes
    ----------
    top_k_de
        Number of real top DE genes for the ``*_top{k}_de`` metrics (GEARS/scGPT use 20).
    n_pcs
        PCA components for the distribution metrics (capped by cells and genes).
    max_pca_cells
        Cells (subsampled, seeded) used to fit the PCA.
    max_cells_per_set
        Cells per set (subsampled, seeded) for E-distance, MMD and KNN purity; bounds memory.
    knn_k
        Neighbours for KNN purity.
    num_threads
        Threads for cell-eval's DE (pdex/numba; process-wide setting).
    cell_eval_profile
        cell-eval metric profile: "full", "minimal", "vcc", "de", "anndata" or "pds".
    skip_cell_eval_metrics
        cell-eval metric names to skip (``clustering_agreement`` costs seconds of numba
        compilation and means little with few perturbations).
    noise_ceiling
        Also run cell-eval's ``compute_ceiling`` (a disjoint split-half of the real data with a
        Spearman-Brown correction; computes two more DE tables per context).
    mask_undefined
        Report NaN, not cell-eval's placeholder, where a cell-eval metric is undefined:
        ``discrimination_score_*`` in a context with one perturbation (cell-eval gives 1.0 to any
        prediction there) and ``overlap_at_*`` for a perturbation without a significant real DE
        gene (cell-eval gives 0.0, even to a perfect prediction). Each case is listed in
        ``notes``. ``False`` keeps cell-eval's numbers exactly.
    flat_correlation_is_zero
        A prediction whose mean shift from control is zero on every gene (a model that predicts
        nothing for an unseen perturbation; the no-change baseline when it uses every control) has an undefined
        Pearson delta; count it as 0 (no information about the shape of the response), so that
        averages over perturbations do not silently drop the perturbations a model gave up on.
    seed
        Seed for every subsample.
    """

    top_k_de: int = 20
    n_pcs: int = 50
    max_pca_cells: int = 20_000
    max_cells_per_set: int = 1_000
    knn_k: int = 10
    num_threads: int = 1
    cell_eval_profile: Literal["full", "minimal", "vcc", "de", "anndata", "pds"] = "full"
    skip_cell_eval_metrics: tuple[str, ...] = ()
    noise_ceiling: bool = False
    mask_undefined: bool = True
    flat_correlation_is_zero: bool = True
    seed: int = 0


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` returns.

    Attributes
    ----------
    per_perturbation
        One row per (context, perturbation): columns ``context`` (``"all"`` without a context
        column), ``perturbation``, ``n_cells_real``, ``n_cells_pred``, then one column per metric.
    aggregate
        Index = metric name; columns ``mean``, ``median``, ``std``, ``n`` (non-NaN rows) over all
        rows of ``per_perturbation``.
    ceiling
        cell-eval's noise ceiling per context (one row per context, Spearman-Brown corrected,
        NaN where cell-eval defines none), or ``None`` unless ``EvalConfig.noise_ceiling``.
    notes
        Decisions and warnings worth keeping with the numbers (fallbacks, degenerate inputs).
    """

    per_perturbation: pd.DataFrame
    aggregate: pd.DataFrame
    ceiling: pd.DataFrame | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def metric_direction(name: str, *, top_k_de: int = 20) -> Literal["higher", "lower", "none"]:
    """Whether a higher or a lower value of a metric column is better.

    Parameters
    ----------
    name
        A metric column of :attr:`EvalResult.per_perturbation`.
    top_k_de
        The ``top_k_de`` the table was made with.

    Returns
    -------
    str
        "higher", "lower", or "none" (counts such as ``de_nsig_counts_pred``).
    """
    for template, direction in PERTFLOW_METRICS.items():
        if name == template.format(k=top_k_de):
            return direction  # type: ignore[return-value]
    from cell_eval import metrics_registry

    base = name
    if base not in metrics_registry.list_metrics():
        # Dict-valued metrics become "<name>_<key>" columns (de_nsig_counts_real / _pred).
        base = name.rsplit("_", 1)[0]
    if base not in metrics_registry.list_metrics():
        raise KeyError(f"unknown metric column '{name}'")
    # cell-eval's MetricBestValue: "one" (higher is better), "zero" (lower), "none".
    best = metrics_registry.get_metric(base).best_value.value
    return {"one": "higher", "zero": "lower"}.get(best, "none")  # type: ignore[return-value]


# --- entry point ----------------------------------------------------------------------------------


def evaluate(
    real: ad.AnnData | str | Path,
    pred: ad.AnnData | str | Path,
    *,
    pert_col: str,
    control: str,
    context_col: str | None = None,
    train: ad.AnnData | str | Path | None = None,
    outdir: str | Path | None = None,
    de_cache: str | Path | None = None,
    config: EvalConfig | None = None,
) -> EvalResult:
    """Score predicted cells against real cells, per (context, perturbation).

    Parameters
    ----------
    real
        Real test cells plus the real control cells of every test context: non-negative log1p
        expression, the split's genes. An AnnData or an ``.h5ad`` path (as are ``pred``, ``train``).
    pred
        The prediction: the same genes in the same order, ``obs[pert_col]`` (and
        ``obs[context_col]``), one predicted cell per real test cell (other counts work but skew
        the DE p-values), plus the real control cells of each context under ``control``.
    pert_col
        Perturbation column of ``real.obs``, ``pred.obs`` (and ``train.obs``).
    control
        Control label.
    context_col
        Context column (cell type, line, donor); ``None`` evaluates everything as one context.
    train
        Real training cells (needs ``real``'s genes; may hold more, sparse is fine). Used to fit
        the PCA of the distribution metrics and for the Systema reference. Without it the PCA is
        fitted on the real control cells and the Systema metrics are NaN.
    outdir
        If given: ``results.csv`` (per perturbation), ``agg_results.csv`` (and ``ceiling.csv``) are written
        there, and cell-eval's DE tables under ``cell_eval/<context>/``.
    de_cache
        Directory caching the real DE table per context (reused across models on the same real
        data). ``None`` computes it on every call.
    config
        :class:`EvalConfig`; defaults if ``None``.

    Returns
    -------
    EvalResult

    Raises
    ------
    InputError
        Mismatched genes or gene order, negative/NaN/non-log1p values, missing control cells,
        perturbations in one file but not the other, altered control cells in ``pred``.
    """
    cfg = config or EvalConfig()
    _check_cell_eval_installed()
    real, pred = _read(real, "real"), _read(pred, "pred")
    train = None if train is None else _read(train, "train")
    for adata, name in ((real, "real"), (pred, "pred")):
        _check_obs(adata, name, pert_col, context_col)
        _check_values(adata.X, name, require_decimals=True)
    genes = _check_genes(real, pred)
    real_pert = real.obs[pert_col].astype(str).to_numpy()
    pred_pert = pred.obs[pert_col].astype(str).to_numpy()
    real_ctx = context_labels(real, context_col)
    pred_ctx = context_labels(pred, context_col)
    contexts = _contexts_to_evaluate(real_pert, real_ctx, pred_pert, pred_ctx, control)

    notes: list[str] = []
    train_view = _prepare_train(train, genes, pert_col, context_col) if train is not None else None
    pca = _fit_pca(train_view, real, real_pert == control, cfg, notes)

    tmp_dir = None
    if outdir is None:
        tmp_dir = tempfile.TemporaryDirectory(prefix="pertflow-cell-eval-")
        cell_eval_root = Path(tmp_dir.name)
    else:
        cell_eval_root = Path(outdir) / "cell_eval"
    try:
        tables, ceilings = [], []
        used_dirs: set[str] = set()
        for context in contexts:
            ctx_dir = cell_eval_root / _unique_dir_name(context, used_dirs)
            table, ceiling = _evaluate_context(
                context=context,
                real=real,
                pred=pred,
                real_mask=real_ctx == context,
                pred_mask=pred_ctx == context,
                real_pert=real_pert,
                pred_pert=pred_pert,
                genes=genes,
                pert_col=pert_col,
                control=control,
                train=train_view,
                pca=pca,
                cell_eval_dir=ctx_dir,
                de_cache=None if de_cache is None else Path(de_cache),
                cfg=cfg,
                notes=notes,
            )
            tables.append(table)
            if ceiling is not None:
                ceilings.append(ceiling)
    finally:
        if tmp_dir is not None:
            tmp_dir.cleanup()

    per_pert = _ordered_columns(pd.concat(tables, ignore_index=True), cfg.top_k_de)
    aggregate = aggregate_table(per_pert)
    ceiling_table = pd.concat(ceilings, ignore_index=True) if cfg.noise_ceiling else None
    if outdir is not None:
        _write_csv(per_pert, Path(outdir) / "results.csv", index=False)
        _write_csv(aggregate, Path(outdir) / "agg_results.csv", index=True)
        if ceiling_table is not None:
            _write_csv(ceiling_table, Path(outdir) / "ceiling.csv", index=False)
    return EvalResult(
        per_perturbation=per_pert, aggregate=aggregate, ceiling=ceiling_table, notes=tuple(notes)
    )


def _ordered_columns(table: pd.DataFrame, k: int) -> pd.DataFrame:
    """Ids, then cell-eval's columns, then pertflow's: stable even when a context lacks a column."""
    ours = [name.format(k=k) for name in PERTFLOW_METRICS]
    theirs = [c for c in table.columns if c not in _ID_COLUMNS and c not in ours]
    return table[list(_ID_COLUMNS) + theirs + ours]


def aggregate_table(per_perturbation: pd.DataFrame) -> pd.DataFrame:
    """Mean, median, std and count of every metric column over the rows of a per-perturbation table.

    Parameters
    ----------
    per_perturbation
        :attr:`EvalResult.per_perturbation`.

    Returns
    -------
    pd.DataFrame
        Index = metric, columns ``mean``, ``median``, ``std``, ``n`` (NaN rows skipped).
    """
    values = per_perturbation.drop(columns=[c for c in _ID_COLUMNS if c in per_perturbation.columns])
    values = values.apply(pd.to_numeric, errors="coerce").astype(float)
    agg = pd.DataFrame(
        {
            "mean": values.mean(),
            "median": values.median(),
            "std": values.std(),
            "n": values.notna().sum(),
        }
    )
    agg.index.name = "metric"
    return agg


# --- validation -----------------------------------------------------------------------------------


def _read(adata: ad.AnnData | str | Path, name: str) -> ad.AnnData:
    if isinstance(adata, ad.AnnData):
        return adata
    if not isinstance(adata, (str, Path)):
        raise InputError(f"{name} must be an AnnData or an .h5ad path, got {type(adata).__name__}.")
    path = Path(adata)
    if not path.is_file():
        raise InputError(f"{name}: no such file {path}. Check the path.")
    return ad.read_h5ad(path)


def _check_cell_eval_installed() -> None:
    try:
        import cell_eval  # noqa: F401
    except ImportError as err:
        raise InputError(
            "evaluation needs the 'cell-eval' package, which is not installed. "
            "Install it with: pip install cell-eval"
        ) from err


def _check_obs(adata: ad.AnnData, name: str, pert_col: str, context_col: str | None) -> None:
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


def _check_values(x: Any, name: str, *, require_decimals: bool) -> None:
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
    if high >= _LOG1P_MAX:
        raise InputError(
            f"{name}.X has values up to {high:.3g}, too large for log1p-normalised data (cell-eval refuses >= "
            f"{_LOG1P_MAX:g}). Apply normalize_total + log1p, or check for raw counts mixed into the file."
        )
    if require_decimals and np.all(np.modf(data)[0] <= 1e-3):
        raise InputError(
            f"{name}.X holds only whole numbers, which looks like raw counts; cell-eval would silently "
            f"normalise it (and not the other file). Apply normalize_total + log1p before evaluating."
        )


def _check_genes(real: ad.AnnData, pred: ad.AnnData) -> pd.Index:
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


def context_labels(adata: ad.AnnData, context_col: str | None) -> np.ndarray:
    """Each cell's context (as str): ``obs[context_col]``, or :data:`SINGLE_CONTEXT` without one."""
    if context_col is None:
        return np.full(adata.n_obs, SINGLE_CONTEXT, dtype=object)
    return adata.obs[context_col].astype(str).to_numpy()


def _contexts_to_evaluate(
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


def _prepare_train(train: ad.AnnData, genes: pd.Index, pert_col: str, context_col: str | None) -> _TrainView:
    _check_obs(train, "train", pert_col, None)
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
    _check_values(x, "train", require_decimals=False)
    has_context = context_col is not None and context_col in train.obs.columns
    return _TrainView(
        x=x,
        pert=train.obs[pert_col].astype(str).to_numpy(),
        context=train.obs[context_col].astype(str).to_numpy() if has_context else None,
    )


@dataclass(frozen=True)
class _TrainView:
    """Training cells restricted to the evaluated genes."""

    x: Any
    pert: np.ndarray
    context: np.ndarray | None


# --- per-context evaluation -----------------------------------------------------------------------


def _fit_pca(
    train: _TrainView | None, real: ad.AnnData, real_is_ctrl: np.ndarray, cfg: EvalConfig, notes: list[str]
) -> M.PCAProjection:
    if train is not None:
        return M.fit_pca(train.x, cfg.n_pcs, max_cells=cfg.max_pca_cells, seed=cfg.seed)
    notes.append("no training cells given: PCA fitted on the real control cells; Systema metrics are NaN")
    return M.fit_pca(
        real.X[np.flatnonzero(real_is_ctrl)], cfg.n_pcs, max_cells=cfg.max_pca_cells, seed=cfg.seed
    )


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def _evaluate_context(
    *,
    context: str,
    real: ad.AnnData,
    pred: ad.AnnData,
    real_mask: np.ndarray,
    pred_mask: np.ndarray,
    real_pert: np.ndarray,
    pred_pert: np.ndarray,
    genes: pd.Index,
    pert_col: str,
    control: str,
    train: _TrainView | None,
    pca: M.PCAProjection,
    cell_eval_dir: Path,
    de_cache: Path | None,
    cfg: EvalConfig,
    notes: list[str],
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    where = "" if context == SINGLE_CONTEXT else f" in context '{context}'"
    logger.info("evaluating%s", where or " (no context column)")
    r_idx, p_idx = np.flatnonzero(real_mask), np.flatnonzero(pred_mask)
    r_lab, p_lab = real_pert[r_idx], pred_pert[p_idx]
    _check_context_labels(r_lab, p_lab, control, where)

    x_real = _dense(real.X[r_idx])
    x_pred = _dense(pred.X[p_idx])
    ctrl_real = x_real[r_lab == control]
    ctrl_pred = x_pred[p_lab == control]
    if ctrl_real.shape[0] != ctrl_pred.shape[0] or not np.allclose(
        ctrl_real.mean(axis=0), ctrl_pred.mean(axis=0), atol=1e-3, rtol=1e-3
    ):
        raise InputError(
            f"pred's '{control}' cells{where} differ from real's ({ctrl_pred.shape[0]} vs {ctrl_real.shape[0]} "
            f"cells, or different values). cell-eval measures predicted deltas against pred's own controls, so "
            f"altered controls change every delta metric. Put the real control cells, unchanged, into pred."
        )

    perts = sorted(set(p_lab) - {control})
    _warn_degenerate(perts, r_lab, p_lab, x_pred, where, notes)

    skip = list(cfg.skip_cell_eval_metrics)
    if len(perts) < 2:
        # Both compare perturbations with each other and fail (only logged) with a single one.
        skip += [m for m in _NEED_TWO_PERTURBATIONS if m not in skip]
    cell_eval_out = _run_cell_eval(
        real_ad=_cell_eval_adata(real.X[r_idx], r_lab, genes, pert_col),
        pred_ad=_cell_eval_adata(pred.X[p_idx], p_lab, genes, pert_col),
        pert_col=pert_col,
        control=control,
        outdir=cell_eval_dir,
        de_cache=de_cache,
        skip=skip,
        cfg=cfg,
        notes=notes,
        where=where,
    )

    ours = _pertflow_metrics(
        context=context,
        perts=perts,
        x_real=x_real,
        x_pred=x_pred,
        r_lab=r_lab,
        p_lab=p_lab,
        control=control,
        train=train,
        pca=pca,
        cfg=cfg,
        notes=notes,
        where=where,
    )
    ids = pd.DataFrame(
        {
            "context": context,
            "perturbation": perts,
            "n_cells_real": [int((r_lab == p).sum()) for p in perts],
            "n_cells_pred": [int((p_lab == p).sum()) for p in perts],
        }
    )
    table = ids.merge(cell_eval_out.table, on="perturbation", how="left").merge(
        ours, on="perturbation", how="left"
    )
    if cfg.mask_undefined:
        _mask_undefined(table, perts, cell_eval_out.n_sig_real, where, notes)
    if cfg.flat_correlation_is_zero:
        _zero_flat_correlations(table, perts, x_pred, p_lab, control, where, notes)
    ceiling = cell_eval_out.ceiling
    if ceiling is not None:
        ceiling.insert(0, "context", context)
    return table, ceiling


# cell-eval metrics that compare perturbations with each other.
_NEED_TWO_PERTURBATIONS = ("pearson_edistance", "clustering_agreement")


def _mask_undefined(
    table: pd.DataFrame, perts: list[str], n_sig_real: dict[str, int] | None, where: str, notes: list[str]
) -> None:
    """Set cell-eval's placeholders for undefined values to NaN, in place (see EvalConfig.mask_undefined)."""
    if len(perts) < 2:
        columns = [c for c in table.columns if c.startswith("discrimination_score_")]
        if columns:
            table.loc[:, columns] = np.nan
            notes.append(
                f"one perturbation{where}: discrimination scores are undefined (cell-eval reports 1.0); set to NaN"
            )
    if n_sig_real is None:
        return
    no_sig = [p for p in perts if n_sig_real.get(p, 0) == 0]
    columns = [c for c in table.columns if c.startswith("overlap_at_")]
    if no_sig and columns:
        table.loc[table["perturbation"].isin(no_sig), columns] = np.nan
        notes.append(
            f"no significant real DE gene (FDR < 0.05){where} for {no_sig[:5]}{' ...' if len(no_sig) > 5 else ''}: "
            f"overlap_at_* undefined (cell-eval reports 0.0); set to NaN"
        )


def _check_context_labels(r_lab: np.ndarray, p_lab: np.ndarray, control: str, where: str) -> None:
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


_DELTA_CORRELATIONS = ("pearson_delta", "pearson_delta_top{k}_de")


def _zero_flat_correlations(
    table: pd.DataFrame, perts: list[str], x_pred: np.ndarray, p_lab: np.ndarray, control: str, where: str, notes: list[str]
) -> None:
    """Pearson delta of a prediction with no shift at all: 0 instead of NaN (see ``EvalConfig``)."""
    ctrl_mean = x_pred[p_lab == control].mean(axis=0)
    flat = [p for p in perts if np.abs(x_pred[p_lab == p].mean(axis=0) - ctrl_mean).max() < 1e-9]
    if not flat:
        return
    cols = [c for c in table.columns if any(re.fullmatch(t.replace("{k}", r"\d+"), c) for t in _DELTA_CORRELATIONS)]
    rows = table["perturbation"].isin(flat)
    table.loc[rows, cols] = table.loc[rows, cols].fillna(0.0)
    notes.append(f"{flat}{where}: predicted no shift from control; Pearson delta counted as 0 (undefined otherwise)")


def _warn_degenerate(
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


def _cell_eval_adata(x: Any, labels: np.ndarray, genes: pd.Index, pert_col: str) -> ad.AnnData:
    """A minimal AnnData that cell-eval cannot trip over: str labels, float32, unique names."""
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32)
    else:
        x = np.array(x, dtype=np.float32)
    obs = pd.DataFrame(
        {pert_col: np.asarray(labels, dtype=object)}, index=[f"cell{i}" for i in range(len(labels))]
    )
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=object)))


def _run_cell_eval(
    *,
    real_ad: ad.AnnData,
    pred_ad: ad.AnnData,
    pert_col: str,
    control: str,
    outdir: Path,
    de_cache: Path | None,
    skip: list[str],
    cfg: EvalConfig,
    notes: list[str],
    where: str,
) -> _CellEvalOutput:
    import polars as pl
    from cell_eval import MetricsEvaluator

    skip_de = cfg.cell_eval_profile in ("anndata", "pds")
    cache_path = None
    de_real = None
    if de_cache is not None and not skip_de:
        cache_path = de_cache / f"real_de_{real_de_key(real_ad, pert_col, control)}.parquet"
        if cache_path.is_file():
            de_real = pl.read_parquet(cache_path)
    with warnings.catch_warnings(), _CellEvalErrors() as errors:
        # cell-eval 0.8.2 calls polars' string cache, deprecated in polars 2: noise users cannot act on.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="cell_eval")
        evaluator = MetricsEvaluator(
            adata_pred=pred_ad,
            adata_real=real_ad,
            de_real=de_real,
            control_pert=control,
            pert_col=pert_col,
            num_threads=cfg.num_threads,
            outdir=str(outdir),
            allow_discrete=False,
            skip_de=skip_de,
        )
        if cache_path is not None and de_real is None:
            # The frame cell-eval itself used (after its own type coercion), so a cached run is identical.
            frame = evaluator.de_comparison.real.data
            frame = frame.with_columns([pl.col(c).cast(pl.Utf8) for c in ("target", "feature")])
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache_path) as tmp:
                frame.write_parquet(tmp)
        results, _ = evaluator.compute(
            profile=cfg.cell_eval_profile, skip_metrics=skip or None, write_csv=False
        )
        ceiling = None
        if cfg.noise_ceiling:
            _, agg = evaluator.compute_ceiling(
                profile=cfg.cell_eval_profile, skip_metrics=skip or None, write_csv=False, seed=cfg.seed
            )
            ceiling = _polars_to_pandas(agg)
    for message in errors.messages:
        # cell-eval logs a failing metric and leaves its column out; say so instead of hiding it.
        warnings.warn(f"cell-eval: {message}", UserWarning, stacklevel=5)
        notes.append(f"cell-eval{where}: {message}")
    n_sig_real = None
    if evaluator.de_comparison is not None:
        # Same threshold as cell-eval's overlap metrics (fdr_threshold default 0.05).
        significant = evaluator.de_comparison.real.filter_to_significant(fdr_threshold=0.05)
        counts = significant.group_by("target").len()
        n_sig_real = {str(t): int(n) for t, n in counts.iter_rows()}
    return _CellEvalOutput(table=_polars_to_pandas(results), ceiling=ceiling, n_sig_real=n_sig_real)


@dataclass(frozen=True)
class _CellEvalOutput:
    """cell-eval's per-perturbation table, its ceiling row, and real significant-gene counts."""

    table: pd.DataFrame
    ceiling: pd.DataFrame | None
    n_sig_real: dict[str, int] | None


class _CellEvalErrors(logging.Handler):
    """Collects the ERROR records cell-eval logs while it computes (a failed metric is only logged)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []
        self._logger = logging.getLogger("cell_eval")

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _CellEvalErrors:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)


def _polars_to_pandas(frame: Any) -> pd.DataFrame:
    # to_dict avoids polars' pyarrow dependency of to_pandas().
    return pd.DataFrame(frame.to_dict(as_series=False))


def real_de_key(real_ad: ad.AnnData, pert_col: str, control: str) -> str:
    """Cache key of the real DE table: SHA-256 of everything the table depends on.

    Parameters
    ----------
    real_ad
        The real AnnData handed to cell-eval (one context).
    pert_col
        Perturbation column.
    control
        Control label.

    Returns
    -------
    str
        24 hex characters.
    """
    from importlib.metadata import version

    digest = hashlib.sha256()
    # pdex decides the numbers; cell-eval decides the pdex arguments and the type coercion.
    digest.update(f"cell-eval={version('cell-eval')};pdex={version('pdex')}".encode())
    digest.update(f"control={control};shape={real_ad.shape}".encode())
    x = real_ad.X
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        for part in (x.data, x.indices, x.indptr):
            digest.update(np.ascontiguousarray(part).tobytes())
    else:
        arr = np.ascontiguousarray(x)
        digest.update(str(arr.dtype).encode())
        digest.update(arr.tobytes())
    digest.update("\x1f".join(real_ad.obs[pert_col].astype(str)).encode())
    digest.update("\x1f".join(real_ad.var_names.astype(str)).encode())
    return digest.hexdigest()[:24]


# --- pertflow's metrics for one context -----------------------------------------------------------


def _seeded_rng(cfg: EvalConfig, *keys: str) -> np.random.Generator:
    """A generator that depends on the seed and the names only, not on evaluation order."""
    return np.random.default_rng([cfg.seed] + [zlib.crc32(k.encode()) for k in keys])


def _subsample(x: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    if x.shape[0] <= size:
        return x
    return x[np.sort(rng.choice(x.shape[0], size=size, replace=False))]


def _systema_reference(
    train: _TrainView | None, context: str, ctrl_mean: np.ndarray, control: str, where: str, notes: list[str]
) -> np.ndarray | None:
    """Centroid of the training perturbations, in this context when the training data has it.

    A context without training perturbations (a held-out cell type, line or donor) gets its
    own control mean plus the average over training contexts of (their centroid - their control
    mean): the context-shift estimate of where "a typical perturbation" would land here.
    """
    if train is None:
        return None
    is_pert = train.pert != control
    if not is_pert.any():
        notes.append("train has no perturbed cells: Systema metrics are NaN")
        return None
    if train.context is None or context == SINGLE_CONTEXT:
        return M.perturbation_centroid(train.x[np.flatnonzero(is_pert)], train.pert[is_pert], control)
    here = is_pert & (train.context == context)
    if here.any():
        return M.perturbation_centroid(train.x[np.flatnonzero(here)], train.pert[here], control)
    shifts = []
    for other in np.unique(train.context):
        pert_rows = np.flatnonzero(is_pert & (train.context == other))
        ctrl_rows = np.flatnonzero(~is_pert & (train.context == other))
        if pert_rows.size and ctrl_rows.size:
            centroid = M.perturbation_centroid(train.x[pert_rows], train.pert[pert_rows], control)
            shifts.append(centroid - np.asarray(train.x[ctrl_rows].mean(axis=0)).ravel())
    if not shifts:
        notes.append(
            f"no training context has both perturbed and control cells{where}: Systema metrics are NaN"
        )
        return None
    notes.append(f"Systema reference{where}: control mean + mean perturbation shift of the training contexts")
    return ctrl_mean + np.mean(shifts, axis=0)


def _pertflow_metrics(
    *,
    context: str,
    perts: list[str],
    x_real: np.ndarray,
    x_pred: np.ndarray,
    r_lab: np.ndarray,
    p_lab: np.ndarray,
    control: str,
    train: _TrainView | None,
    pca: M.PCAProjection,
    cfg: EvalConfig,
    notes: list[str],
    where: str,
) -> pd.DataFrame:
    k = cfg.top_k_de
    ctrl_cells = x_real[r_lab == control]
    ctrl_mean = ctrl_cells.mean(axis=0)
    reference = _systema_reference(train, context, ctrl_mean, control, where, notes)
    pcs_real = pca.transform(x_real)
    pcs_pred = pca.transform(x_pred)
    pcs_ctrl = pcs_real[r_lab == control]
    nan = float("nan")

    rows = []
    real_means, pred_means = [], []
    for p in perts:
        real_cells, pred_cells = x_real[r_lab == p], x_pred[p_lab == p]
        real_mean, pred_mean = real_cells.mean(axis=0), pred_cells.mean(axis=0)
        real_means.append(real_mean)
        pred_means.append(pred_mean)
        de = M.top_de_genes(real_cells, ctrl_cells, k)
        row = {
            "perturbation": p,
            f"pearson_delta_top{k}_de": M.pearson_delta_vs_reference(pred_mean, real_mean, ctrl_mean, de),
            f"mse_top{k}_de": M.mean_squared_error(pred_mean, real_mean, de),
            f"mse_top{k}_de_rel_nochange": M.mse_relative_to_no_change(pred_mean, real_mean, ctrl_mean, de),
            "r2_delta": M.r2_delta(pred_mean, real_mean, ctrl_mean),
            "systema_pearson_delta": nan,
            f"systema_pearson_delta_top{k}_de": nan,
        }
        if reference is not None:
            row["systema_pearson_delta"] = M.pearson_delta_vs_reference(pred_mean, real_mean, reference)
            row[f"systema_pearson_delta_top{k}_de"] = M.pearson_delta_vs_reference(
                pred_mean, real_mean, reference, de
            )

        rng = _seeded_rng(cfg, context, p)
        size = cfg.max_cells_per_set
        sub_real = _subsample(pcs_real[r_lab == p], size, rng)
        sub_pred = _subsample(pcs_pred[p_lab == p], size, rng)
        row["edistance_pca"] = M.edistance(sub_pred, sub_real)
        row["mmd_rbf_pca"] = M.mmd_rbf(sub_pred, sub_real) if min(len(sub_pred), len(sub_real)) >= 2 else nan
        # Equal numbers of perturbed and control reference cells, so 0.5 means "cannot tell".
        n_ref = min(len(sub_real), len(pcs_ctrl), size)
        row["knn_purity_pca"] = M.knn_purity(
            sub_pred, _subsample(sub_real, n_ref, rng), _subsample(pcs_ctrl, n_ref, rng), cfg.knn_k
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    table["centroid_accuracy"] = M.centroid_accuracy(np.stack(pred_means), np.stack(real_means))
    ordered = ["perturbation"] + [name.format(k=k) for name in PERTFLOW_METRICS]
    return table[ordered]


# --- output ---------------------------------------------------------------------------------------


def _unique_dir_name(context: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", context).strip("._") or "context"
    name, i = base, 1
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


def _write_csv(frame: pd.DataFrame, path: Path, *, index: bool) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index)
