"""pertflow's metrics of one context, beside cell-eval's: correlations on the real top DE genes,
Systema deltas, centroid accuracy, the distribution metrics in a PCA of the training cells, and
(given a model's latent space) KNN purity in that space. The metrics themselves are the pure
functions of :mod:`pertflow.eval.metrics`.
"""

from __future__ import annotations

import re
import zlib
from typing import Callable

import numpy as np
import pandas as pd

from pertflow.data.dataset import SINGLE_CONTEXT
from pertflow.eval import metrics as M
from pertflow.eval.checks import TrainView
from pertflow.eval.config import EvalConfig

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
#: Metrics in a model's latent space: columns only when the evaluator is given one (``embed``).
LATENT_METRICS: dict[str, str] = {"knn_purity_latent": "higher"}


DELTA_CORRELATIONS = ("pearson_delta", "pearson_delta_top{k}_de")


def seeded_rng(cfg: EvalConfig, *keys: str) -> np.random.Generator:
    """A generator that depends on the seed and the names only, not on evaluation order."""
    return np.random.default_rng([cfg.seed] + [zlib.crc32(k.encode()) for k in keys])


def subsample(x: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    if x.shape[0] <= size:
        return x
    return x[np.sort(rng.choice(x.shape[0], size=size, replace=False))]


def systema_reference(
    train: TrainView | None, context: str, ctrl_mean: np.ndarray, control: str, where: str, notes: list[str]
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


def context_metrics(
    *,
    context: str,
    perts: list[str],
    x_real: np.ndarray,
    x_pred: np.ndarray,
    r_lab: np.ndarray,
    p_lab: np.ndarray,
    control: str,
    train: TrainView | None,
    pca: M.PCAProjection,
    cfg: EvalConfig,
    notes: list[str],
    where: str,
    embed: Callable[[np.ndarray], np.ndarray] | None = None,
) -> pd.DataFrame:
    """One row per perturbation of the context, one column per metric of :data:`PERTFLOW_METRICS`
    (and of :data:`LATENT_METRICS` with ``embed``: (n, G) cells -> (n, d) a model's embedding, in
    which the real and the predicted cells are placed)."""
    k = cfg.top_k_de
    ctrl_cells = x_real[r_lab == control]
    ctrl_mean = ctrl_cells.mean(axis=0)
    reference = systema_reference(train, context, ctrl_mean, control, where, notes)
    pcs_real = pca.transform(x_real)
    pcs_pred = pca.transform(x_pred)
    pcs_ctrl = pcs_real[r_lab == control]
    nan = float("nan")
    if embed is not None:
        z_real, z_pred = _embedded(embed, x_real), _embedded(embed, x_pred)

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

        rng = seeded_rng(cfg, context, p)
        size = cfg.max_cells_per_set
        sub_real = subsample(pcs_real[r_lab == p], size, rng)
        sub_pred = subsample(pcs_pred[p_lab == p], size, rng)
        row["edistance_pca"] = M.edistance(sub_pred, sub_real)
        row["mmd_rbf_pca"] = M.mmd_rbf(sub_pred, sub_real) if min(len(sub_pred), len(sub_real)) >= 2 else nan
        # Equal numbers of perturbed and control reference cells, so 0.5 means "cannot tell".
        n_ref = min(len(sub_real), len(pcs_ctrl), size)
        row["knn_purity_pca"] = M.knn_purity(
            sub_pred, subsample(sub_real, n_ref, rng), subsample(pcs_ctrl, n_ref, rng), cfg.knn_k
        )
        if embed is not None:
            row["knn_purity_latent"] = latent_knn_purity(
                z_pred[p_lab == p], z_real[r_lab == p], z_real[r_lab == control], cfg,
                seeded_rng(cfg, context, p, "latent")
            )
        rows.append(row)
    table = pd.DataFrame(rows)
    table["centroid_accuracy"] = M.centroid_accuracy(np.stack(pred_means), np.stack(real_means))
    ordered = (["perturbation"] + [name.format(k=k) for name in PERTFLOW_METRICS]
               + (list(LATENT_METRICS) if embed else []))
    return table[ordered]


def _embedded(embed: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    z = np.asarray(embed(np.asarray(x, dtype=np.float32)), dtype=np.float64)
    if z.ndim != 2 or z.shape[0] != x.shape[0] or not np.isfinite(z).all():
        raise ValueError(f"the latent space returned {z.shape} (or non-finite values) for {x.shape[0]} cells")
    return z


def latent_knn_purity(z_pred: np.ndarray, z_real: np.ndarray, z_ctrl: np.ndarray, cfg: EvalConfig,
                      rng: np.random.Generator) -> float:
    """KNN purity (SPEC 2.5) in a latent space: of each predicted cell's ``knn_k`` nearest among
    the real perturbed and real control cells (as many of each, at most ``max_cells_per_set``),
    the share that are real perturbed; averaged over predicted cells."""
    size = cfg.max_cells_per_set
    n_ref = min(len(z_real), len(z_ctrl), size)
    return M.knn_purity(subsample(z_pred, size, rng), subsample(z_real, n_ref, rng), subsample(z_ctrl, n_ref, rng),
                        cfg.knn_k)


def zero_flat_correlations(
    table: pd.DataFrame, perts: list[str], x_pred: np.ndarray, p_lab: np.ndarray, control: str, where: str,
    notes: list[str]
) -> None:
    """Pearson delta of a prediction with no shift at all: 0 instead of NaN (see ``EvalConfig``)."""
    ctrl_mean = x_pred[p_lab == control].mean(axis=0)
    flat = [p for p in perts if np.abs(x_pred[p_lab == p].mean(axis=0) - ctrl_mean).max() < 1e-9]
    if not flat:
        return
    cols = [c for c in table.columns if any(re.fullmatch(t.replace("{k}", r"\d+"), c) for t in DELTA_CORRELATIONS)]
    rows = table["perturbation"].isin(flat)
    table.loc[rows, cols] = table.loc[rows, cols].fillna(0.0)
    notes.append(f"{flat}{where}: predicted no shift from control; Pearson delta counted as 0 (undefined otherwise)")
