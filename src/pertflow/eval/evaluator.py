"""Evaluate a prediction against real cells: cell-eval's metrics plus pertflow's, per perturbation.

One call, :func:`evaluate`, returns one row per (context, perturbation) and an aggregate over rows.
Every metric that cell-eval computes is taken from cell-eval's ``MetricsEvaluator`` under
cell-eval's name (``pearson_delta``, ``mse``, ``mae``, ``mse_delta``, ``mae_delta``,
``discrimination_score_l1/l2/cosine``, ``pearson_edistance``, ``clustering_agreement``,
``overlap_at_N/50/100/200/500``, ``precision_at_*``, ``de_spearman_sig``, ``de_direction_match``,
``de_spearman_lfc_sig``, ``de_sig_genes_recall``, ``de_nsig_counts_real/pred``, ``pr_auc``,
``roc_auc``); the rest come from :mod:`pertflow.eval.metrics` (see :data:`PERTFLOW_METRICS`, and
:data:`LATENT_METRICS` when a model's latent space is given as ``embed``).

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

import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertflow.data.dataset import SINGLE_CONTEXT
from pertflow.errors import InputError
from pertflow.eval import metrics as M
from pertflow.eval.cell_eval_bridge import NEED_TWO_PERTURBATIONS, cell_eval_adata, mask_undefined, run_cell_eval
from pertflow.eval.checks import (
    TrainView,
    check_cell_eval_installed,
    check_context_labels,
    check_genes,
    check_obs,
    check_values,
    contexts_to_evaluate,
    prepare_train,
    read_anndata,
    warn_degenerate,
)
from pertflow.eval.config import EvalConfig
from pertflow.eval.context_metrics import LATENT_METRICS, PERTFLOW_METRICS, context_metrics, zero_flat_correlations
from pertflow.io import atomic_path
from pertflow.runtime import progress_bar

logger = logging.getLogger(__name__)


_ID_COLUMNS = ("context", "perturbation", "n_cells_real", "n_cells_pred")


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` returns.

    Attributes
    ----------
    per_perturbation
        One row per (context, perturbation): columns ``context`` (``"all"`` without a context
        column), ``perturbation``, ``n_cells_real``, ``n_cells_pred``, then one column per metric.
    aggregate
        cell-eval's aggregate layout (``agg_results.csv`` of ``cell-eval run``: polars'
        ``describe``): index ``statistic`` (``count``, ``null_count``, ``mean``, ``std``, ``min``,
        ``25%``, ``50%``, ``75%``, ``max``), one column per metric (cell-eval's, then pertflow's),
        over all rows of ``per_perturbation``; NaN values count as missing (``null_count``).
        ``aggregate.loc["mean", "pearson_delta"]`` is a model's mean Pearson delta.
    notes
        Decisions and warnings worth keeping with the numbers (fallbacks, degenerate inputs).
    yardstick, verdict
        With :func:`pertflow.api.evaluate_split`'s ``baselines``: the baselines' and the noise
        ceiling's mean scores on the same cells (:func:`pertflow.yardstick.yardstick`), and the
        sentences reading the model against them.

    The noise ceiling (the real cells, half against half, scored the same way) is
    :func:`pertflow.eval.ceiling.noise_ceiling`, the ``ceiling`` row of every benchmark table.
    """

    per_perturbation: pd.DataFrame
    aggregate: pd.DataFrame
    notes: tuple[str, ...] = field(default_factory=tuple)
    yardstick: pd.DataFrame | None = None
    verdict: tuple[str, ...] = field(default_factory=tuple)


def strongest(values: pd.Series, metric: str) -> tuple[str, float, float]:
    """The best of ``values`` (one per model, NaN skipped) on ``metric`` in its direction, its value,
    and the sign that turns a difference into a gain (``(x - best) * sign > 0``: ``x`` is better)."""
    sign = 1.0 if metric_direction(metric) == "higher" else -1.0
    values = values.astype(float).dropna()
    best = values.idxmax() if sign > 0 else values.idxmin()
    return str(best), float(values[best]), sign


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
    for template, direction in {**PERTFLOW_METRICS, **LATENT_METRICS}.items():
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


def evaluate(
    real: ad.AnnData | str | Path,
    pred: ad.AnnData | str | Path,
    *,
    pert_col: str,
    control: str,
    context_col: str | None = None,
    dose_col: str | None = None,
    train: ad.AnnData | str | Path | None = None,
    outdir: str | Path | None = None,
    de_cache: str | Path | None = None,
    config: EvalConfig | None = None,
    embed: Callable[[np.ndarray], np.ndarray] | None = None,
    controls: Literal["real", "own"] = "real",
    progress: bool = False,
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
    dose_col
        Dose column: each (perturbation, dose) is scored as its own group, under the label
        ``drugA@1`` (:func:`~pertflow.data.dose.dose_label`), which cell-eval sees as a
        perturbation. pertflow's files carry that label in ``pert_col`` already; a file whose
        labels are plain perturbations (another tool's) gets them from ``obs[dose_col]``.
    train
        Real training cells (needs ``real``'s genes; may hold more, sparse is fine). Used to fit
        the PCA of the distribution metrics and for the Systema reference. Without it the PCA is
        fitted on the real control cells and the Systema metrics are NaN.
    outdir
        If given: ``results.csv`` (per perturbation) and ``agg_results.csv`` are written
        there, and cell-eval's DE tables under ``cell_eval/<context>/``.
    de_cache
        Directory caching the real DE table per context (reused across models on the same real
        data). ``None`` computes it on every call.
    config
        :class:`EvalConfig`; defaults if ``None``.
    embed
        A model's latent space: (n, G) log1p cells (``real``'s genes, in its order) -> (n, d).
        Adds ``knn_purity_latent``: the real perturbed, real control and predicted cells of each
        perturbation placed in that space (e.g. a ``latent-shift`` run's embedding).
    controls
        ``"real"``: ``pred`` must carry the real control cells unchanged (checked).
        ``"own"``: ``pred`` brings its own control cells (the noise ceiling's other half of the
        real cells, :mod:`pertflow.eval.ceiling`); cell-eval's deltas use them.
    progress
        Show a progress bar over the perturbations (:func:`pertflow.runtime.progress_bar`).

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
    check_cell_eval_installed()
    real, pred = read_anndata(real, "real"), read_anndata(pred, "pred")
    train = None if train is None else read_anndata(train, "train")
    notes: list[str] = []
    pred = _fill_single_context(real, pred, context_col, notes)
    if dose_col is not None:
        real, pred = (_dose_conditions(a, name, pert_col, control, dose_col, notes)
                      for a, name in ((real, "real"), (pred, "pred")))
    for adata, name in ((real, "real"), (pred, "pred")):
        check_obs(adata, name, pert_col, context_col)
        check_values(adata.X, name, require_decimals=True)
    genes = check_genes(real, pred)
    real_pert = real.obs[pert_col].astype(str).to_numpy()
    pred_pert = pred.obs[pert_col].astype(str).to_numpy()
    real_ctx = context_labels(real, context_col)
    pred_ctx = context_labels(pred, context_col)
    contexts = contexts_to_evaluate(real_pert, real_ctx, pred_pert, pred_ctx, control)

    train_view = prepare_train(train, genes, pert_col, context_col) if train is not None else None
    pca = _fit_pca(train_view, real, real_pert == control, cfg, notes)

    tmp_dir = None
    if outdir is None:
        tmp_dir = tempfile.TemporaryDirectory(prefix="pertflow-cell-eval-")
        cell_eval_root = Path(tmp_dir.name)
    else:
        cell_eval_root = Path(outdir) / "cell_eval"
    n_perts = {c: len(set(pred_pert[pred_ctx == c]) - {control}) for c in contexts}
    bar = progress_bar(sum(n_perts.values()), "evaluating", "perturbation", enabled=progress)
    try:
        tables = []
        used_dirs: set[str] = set()
        for context in contexts:
            ctx_dir = cell_eval_root / _unique_dir_name(context, used_dirs)
            table = _evaluate_context(
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
                embed=embed,
                check_controls=controls == "real",
            )
            tables.append(table)
            bar.update(n_perts[context])
    finally:
        bar.close()
        if tmp_dir is not None:
            tmp_dir.cleanup()

    per_pert = _ordered_columns(pd.concat(tables, ignore_index=True), cfg.top_k_de)
    aggregate = aggregate_table(per_pert)
    if outdir is not None:
        write_tables(Path(outdir), per_pert, aggregate)
    return EvalResult(per_perturbation=per_pert, aggregate=aggregate, notes=tuple(notes))


def _ordered_columns(table: pd.DataFrame, k: int) -> pd.DataFrame:
    """Ids, then cell-eval's columns, then pertflow's: stable even when a context lacks a column."""
    ours = [name.format(k=k) for name in PERTFLOW_METRICS] + [name for name in LATENT_METRICS if name in table.columns]
    theirs = [c for c in table.columns if c not in _ID_COLUMNS and c not in ours]
    return table[list(_ID_COLUMNS) + theirs + ours]


def aggregate_table(per_perturbation: pd.DataFrame) -> pd.DataFrame:
    """cell-eval's aggregate of a per-perturbation table: polars' ``describe`` of the metric columns.

    cell-eval's own ``agg_results.csv`` is ``results.drop("perturbation").describe()``; the same
    call here gives the same rows (quantiles included) for cell-eval's metrics, and pertflow's
    metrics are further columns. NaN (an undefined value) is a missing value, as in cell-eval's
    own tables, so ``count`` is the number of defined rows.

    Parameters
    ----------
    per_perturbation
        :attr:`EvalResult.per_perturbation`.

    Returns
    -------
    pd.DataFrame
        Index ``statistic``, one column per metric.
    """
    import polars as pl

    values = per_perturbation.drop(columns=[c for c in _ID_COLUMNS if c in per_perturbation.columns])
    values = values.apply(pd.to_numeric, errors="coerce").astype(float)
    frame = pl.DataFrame({c: values[c].to_numpy() for c in values.columns}, nan_to_null=True)
    described = frame.describe().to_dict(as_series=False)
    agg = pd.DataFrame({c: described[c] for c in values.columns},
                       index=pd.Index(described["statistic"], name="statistic"))
    return agg.astype(float)


def _dose_conditions(adata: ad.AnnData, name: str, pert_col: str, control: str, dose_col: str,
                     notes: list[str]) -> ad.AnnData:
    """``adata`` whose perturbed cells' labels carry their dose (``drugA`` at dose 1 -> ``drugA@1``),
    from ``obs[dose_col]``; labels that carry one already stay (see :func:`evaluate`)."""
    from pertflow.data.dose import numeric_doses, parse_dose_label, with_doses

    if pert_col not in adata.obs.columns:
        return adata  # check_obs names the missing column
    labels = adata.obs[pert_col].astype(str)
    plain = (labels != control).to_numpy() & np.array([parse_dose_label(v)[1] is None for v in labels])
    if not plain.any():
        return adata
    if dose_col not in adata.obs.columns:
        raise InputError(f"{name} has perturbation labels without a dose (e.g. '{labels[plain].iloc[0]}') and no "
                         f"obs['{dose_col}']: with a dose column each (perturbation, dose) is scored on its own. Write "
                         f"each cell's dose into obs['{dose_col}'], or label cells perturbation@dose (e.g. drugA@1).")
    new, joined = with_doses(labels.to_numpy(dtype=object), numeric_doses(adata.obs[dose_col], dose_col), plain)
    if not joined.any():
        return adata
    obs = adata.obs.copy()
    obs[pert_col] = new.astype(str)
    notes.append(f"{name}: perturbation labels joined with obs['{dose_col}'] (perturbation@dose), one group per dose")
    return ad.AnnData(X=adata.X, obs=obs, var=adata.var)  # the caller's object stays as it is; X is shared


def _fill_single_context(real: ad.AnnData, pred: ad.AnnData, context_col: str | None, notes: list[str]) -> ad.AnnData:
    """A prediction without the context column, where the real cells have one context: filled in
    (a tool that predicts one cell line need not label it); with several contexts it stays an error."""
    if context_col is None or context_col in pred.obs.columns or context_col not in real.obs.columns:
        return pred
    contexts = pd.unique(real.obs[context_col].dropna().astype(str))
    if len(contexts) != 1:
        return pred  # check_obs names the missing column
    obs = pred.obs.copy()
    obs[context_col] = contexts[0]
    pred = ad.AnnData(X=pred.X, obs=obs, var=pred.var)  # the caller's object stays as it is; X is shared
    notes.append(f"pred has no obs['{context_col}']; the split has one test context, so every predicted cell "
                 f"was taken to be in '{contexts[0]}'")
    return pred


def context_labels(adata: ad.AnnData, context_col: str | None) -> np.ndarray:
    """Each cell's context (as str): ``obs[context_col]``, or :data:`SINGLE_CONTEXT` without one."""
    if context_col is None:
        return np.full(adata.n_obs, SINGLE_CONTEXT, dtype=object)
    return adata.obs[context_col].astype(str).to_numpy()


def _fit_pca(
    train: TrainView | None, real: ad.AnnData, real_is_ctrl: np.ndarray, cfg: EvalConfig, notes: list[str]
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
    train: TrainView | None,
    pca: M.PCAProjection,
    cell_eval_dir: Path,
    de_cache: Path | None,
    cfg: EvalConfig,
    notes: list[str],
    embed: Callable[[np.ndarray], np.ndarray] | None = None,
    check_controls: bool = True,
) -> pd.DataFrame:
    where = "" if context == SINGLE_CONTEXT else f" in context '{context}'"
    logger.info("evaluating%s", where or " (no context column)")
    r_idx, p_idx = np.flatnonzero(real_mask), np.flatnonzero(pred_mask)
    r_lab, p_lab = real_pert[r_idx], pred_pert[p_idx]
    check_context_labels(r_lab, p_lab, control, where)

    x_real = _dense(real.X[r_idx])
    x_pred = _dense(pred.X[p_idx])
    ctrl_real = x_real[r_lab == control]
    ctrl_pred = x_pred[p_lab == control]
    if check_controls and (ctrl_real.shape[0] != ctrl_pred.shape[0] or not np.allclose(
        ctrl_real.mean(axis=0), ctrl_pred.mean(axis=0), atol=1e-3, rtol=1e-3
    )):
        raise InputError(
            f"pred's '{control}' cells{where} differ from real's ({ctrl_pred.shape[0]} vs {ctrl_real.shape[0]} "
            f"cells, or different values). cell-eval measures predicted deltas against pred's own controls, so "
            f"altered controls change every delta metric. Put the real control cells, unchanged, into pred."
        )

    perts = sorted(set(p_lab) - {control})
    warn_degenerate(perts, r_lab, p_lab, x_pred, where, notes)

    skip = list(cfg.skip_cell_eval_metrics)
    if len(perts) < 2:
        # Both compare perturbations with each other and fail (only logged) with a single one.
        skip += [m for m in NEED_TWO_PERTURBATIONS if m not in skip]
    cell_eval_out = run_cell_eval(
        real_ad=cell_eval_adata(real.X[r_idx], r_lab, genes, pert_col),
        pred_ad=cell_eval_adata(pred.X[p_idx], p_lab, genes, pert_col),
        pert_col=pert_col,
        control=control,
        outdir=cell_eval_dir,
        de_cache=de_cache,
        skip=skip,
        cfg=cfg,
        notes=notes,
        where=where,
    )

    ours = context_metrics(
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
        embed=embed,
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
        mask_undefined(table, perts, cell_eval_out.n_sig_real, where, notes)
    if cfg.flat_correlation_is_zero:
        zero_flat_correlations(table, perts, x_pred, p_lab, control, where, notes)
    return table


def _unique_dir_name(context: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", context).strip("._") or "context"
    name, i = base, 1
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


def write_tables(outdir: Path, per_perturbation: pd.DataFrame, aggregate: pd.DataFrame) -> None:
    """``results.csv`` and ``agg_results.csv`` (``statistic`` first, as cell-eval writes it) into ``outdir``."""
    _write_csv(per_perturbation, outdir / "results.csv", index=False)
    _write_csv(aggregate, outdir / "agg_results.csv", index=True)


def _write_csv(frame: pd.DataFrame, path: Path, *, index: bool) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=index)
