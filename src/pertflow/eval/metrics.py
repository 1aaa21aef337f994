"""Metrics that cell-eval does not compute, as pure functions: arrays in, floats or arrays out.

Shapes: ``G`` genes, ``P`` perturbations, ``n``/``m`` cells, ``K`` PCA components. Expression is
non-negative log1p data. "Mean" profiles are arithmetic means over cells of log1p expression
(pseudobulks, as in cell-eval). Nothing here holds state; randomness, where any, is seeded by an
argument.

Conventions, with where they come from:

- **Top DE genes** (:func:`top_de_genes`): GEARS' ``top_non_dropout_de_20``, which scGPT and
  Systema reuse for "Pearson delta on the top 20 DE genes": genes ranked by the absolute Welch
  t statistic of the real perturbed cells against the real control cells (scanpy
  ``rank_genes_groups(method="t-test", reference=control, rankby_abs=True)``), skipping
  "dropouts" (genes whose perturbed mean is 0 while the control mean is not), first ``k`` kept.
- **Deltas** are taken against a *real* reference: the real control mean (GEARS/scGPT) or the
  Systema centroid of training perturbations (:func:`perturbation_centroid`).
- **R^2** (:func:`r2_delta`) is the coefficient of determination of the mean *delta* vs control
  (``1 - SS_res / SS_tot``), not the squared Pearson of mean profiles (which is ~1 for any
  prediction near the control and rewards nothing).
- **Distances between cell sets** (:func:`edistance`, :func:`mmd_rbf`) use
  :mod:`pertflow.ops.kernels` (one implementation for losses and metrics), in float64, usually
  in a PCA space fitted on training cells (:func:`fit_pca`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from pertflow.ops import kernels

# --- helpers ------------------------------------------------------------------------------------


def _as_vector(a: np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(a, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError(f"{name} is empty")
    return v


def _as_matrix(a: np.ndarray, name: str) -> np.ndarray:
    if sp.issparse(a):
        a = a.toarray()
    m = np.asarray(a, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"{name} must be 2-D (cells, features); got shape {m.shape}")
    return m


def _select(v: np.ndarray, genes: np.ndarray | None) -> np.ndarray:
    return v if genes is None else v[np.asarray(genes, dtype=np.intp)]


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors; NaN (no warning) if either is constant.

    Parameters
    ----------
    a, b
        Vectors of the same length (>= 2).

    Returns
    -------
    float
        Correlation in ``[-1, 1]`` or NaN.
    """
    x, y = _as_vector(a, "a"), _as_vector(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"vectors differ in length: {x.size} and {y.size}")
    x = x - x.mean()
    y = y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    if denom == 0 or not np.isfinite(denom):
        return float("nan")
    return float(np.clip((x * y).sum() / denom, -1.0, 1.0))


# --- top DE genes -------------------------------------------------------------------------------


def welch_t_scores(pert: np.ndarray, ctrl: np.ndarray) -> np.ndarray:
    """Welch t statistic per gene, perturbed vs control cells (scanpy's ``t-test`` scores).

    Parameters
    ----------
    pert
        ``(n, G)`` perturbed cells.
    ctrl
        ``(m, G)`` control cells.

    Returns
    -------
    np.ndarray
        ``(G,)`` scores ``(mean_p - mean_c) / sqrt(var_p / n + var_c / m)`` with unbiased
        variances (ddof 1). ``0 / 0`` (a gene constant and equal in both groups, or a group of
        one cell) gives 0, as scanpy does; a non-zero difference over zero variance gives +-inf.
    """
    p, c = _as_matrix(pert, "pert"), _as_matrix(ctrl, "ctrl")
    if p.shape[1] != c.shape[1]:
        raise ValueError(f"pert and ctrl differ in genes: {p.shape[1]} and {c.shape[1]}")
    n, m = p.shape[0], c.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        var_p = p.var(axis=0, ddof=1) if n > 1 else np.full(p.shape[1], np.nan)
        var_c = c.var(axis=0, ddof=1) if m > 1 else np.full(c.shape[1], np.nan)
        scores = (p.mean(axis=0) - c.mean(axis=0)) / np.sqrt(var_p / n + var_c / m)
    scores[np.isnan(scores)] = 0.0
    return scores


def top_de_genes(
    pert: np.ndarray,
    ctrl: np.ndarray,
    k: int = 20,
    *,
    exclude_dropouts: bool = True,
) -> np.ndarray:
    """Indices of the top ``k`` DE genes of real perturbed vs real control cells (GEARS rule).

    Parameters
    ----------
    pert
        ``(n, G)`` real perturbed cells (log1p).
    ctrl
        ``(m, G)`` real control cells of the same context (log1p).
    k
        Number of genes (fewer are returned if fewer genes qualify).
    exclude_dropouts
        Skip genes whose perturbed mean is exactly 0 while the control mean is not (GEARS
        ``top_non_dropout_de_20``).

    Returns
    -------
    np.ndarray
        Integer gene indices, most significant first, ranked by ``|t|`` (Welch), ties broken by
        gene index.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    p, c = _as_matrix(pert, "pert"), _as_matrix(ctrl, "ctrl")
    order = np.argsort(-np.abs(welch_t_scores(p, c)), kind="stable")
    if exclude_dropouts:
        dropout = (p.mean(axis=0) == 0) & (c.mean(axis=0) != 0)
        order = order[~dropout[order]]
    return order[:k].astype(np.intp)


# --- mean-profile metrics -----------------------------------------------------------------------


def pearson_delta_vs_reference(
    pred_mean: np.ndarray,
    real_mean: np.ndarray,
    reference: np.ndarray,
    genes: np.ndarray | None = None,
) -> float:
    """Pearson correlation of ``pred_mean - reference`` and ``real_mean - reference``.

    With ``reference`` = the real control mean and ``genes`` = :func:`top_de_genes` this is
    GEARS/scGPT's ``pearson_delta`` on the top DE genes; with ``reference`` =
    :func:`perturbation_centroid` of the training perturbations it is Systema's
    ``corr_all_allpert`` / ``corr_20de_allpert``.

    Parameters
    ----------
    pred_mean, real_mean, reference
        ``(G,)`` mean profiles.
    genes
        Optional gene indices to restrict to.

    Returns
    -------
    float
        Correlation, or NaN when a delta is constant on the selected genes.
    """
    ref = _as_vector(reference, "reference")
    pred_delta = _as_vector(pred_mean, "pred_mean") - ref
    real_delta = _as_vector(real_mean, "real_mean") - ref
    return pearson_r(_select(pred_delta, genes), _select(real_delta, genes))


def mean_squared_error(
    pred_mean: np.ndarray, real_mean: np.ndarray, genes: np.ndarray | None = None
) -> float:
    """Mean over (selected) genes of ``(pred_mean - real_mean)^2``.

    Parameters
    ----------
    pred_mean, real_mean
        ``(G,)`` mean profiles.
    genes
        Optional gene indices.

    Returns
    -------
    float
    """
    diff = _select(_as_vector(pred_mean, "pred_mean") - _as_vector(real_mean, "real_mean"), genes)
    return float(np.mean(diff * diff))


def mse_relative_to_no_change(
    pred_mean: np.ndarray,
    real_mean: np.ndarray,
    ctrl_mean: np.ndarray,
    genes: np.ndarray | None = None,
) -> float:
    """MSE of the prediction divided by the MSE of predicting "no change" (the control mean).

    Parameters
    ----------
    pred_mean, real_mean, ctrl_mean
        ``(G,)`` mean profiles; ``ctrl_mean`` is the real control mean of the same context.
    genes
        Optional gene indices (usually the top DE genes).

    Returns
    -------
    float
        ``mse(pred, real) / mse(ctrl, real)``: < 1 beats the no-change baseline, 1 ties it.
        NaN when the real mean equals the control mean on the selected genes.
    """
    model = mean_squared_error(pred_mean, real_mean, genes)
    nochange = mean_squared_error(ctrl_mean, real_mean, genes)
    if nochange == 0:
        return float("nan")
    return model / nochange


def r2_delta(
    pred_mean: np.ndarray,
    real_mean: np.ndarray,
    ctrl_mean: np.ndarray,
    genes: np.ndarray | None = None,
) -> float:
    """Coefficient of determination of the mean delta vs control.

    ``y = real_mean - ctrl_mean``, ``y_hat = pred_mean - ctrl_mean``,
    ``R^2 = 1 - sum (y - y_hat)^2 / sum (y - mean(y))^2`` (sklearn's ``r2_score(y, y_hat)``).

    Parameters
    ----------
    pred_mean, real_mean, ctrl_mean
        ``(G,)`` mean profiles.
    genes
        Optional gene indices.

    Returns
    -------
    float
        1 is perfect; the no-change prediction scores ``-sum y^2 / sum (y - mean y)^2 <= 0``.
        NaN when the real delta is constant.
    """
    ctrl = _as_vector(ctrl_mean, "ctrl_mean")
    y = _select(_as_vector(real_mean, "real_mean") - ctrl, genes)
    y_hat = _select(_as_vector(pred_mean, "pred_mean") - ctrl, genes)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot == 0:
        return float("nan")
    return 1.0 - float(((y - y_hat) ** 2).sum()) / ss_tot


def group_means(matrix: np.ndarray | sp.spmatrix, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Mean profile of each label's rows; sparse input is never densified whole.

    Parameters
    ----------
    matrix
        ``(n, G)`` dense array or scipy sparse matrix.
    labels
        ``(n,)`` labels.

    Returns
    -------
    dict[str, np.ndarray]
        Label -> ``(G,)`` float64 mean.
    """
    labels = np.asarray(labels).astype(str)
    if labels.shape[0] != matrix.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {matrix.shape[0]} rows")
    means = {}
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        means[str(label)] = np.asarray(matrix[rows].mean(axis=0), dtype=np.float64).ravel()
    return means


def perturbation_centroid(matrix: np.ndarray | sp.spmatrix, labels: np.ndarray, control: str) -> np.ndarray:
    """Systema reference: the unweighted average of the perturbations' mean profiles.

    Each perturbation (control excluded) counts once, whatever its number of cells (Systema
    ``average_of_perturbation_centroids``).

    Parameters
    ----------
    matrix
        ``(n, G)`` expression of (training) cells, dense or sparse.
    labels
        ``(n,)`` perturbation labels.
    control
        Control label, excluded.

    Returns
    -------
    np.ndarray
        ``(G,)`` centroid.
    """
    means = {k: v for k, v in group_means(matrix, labels).items() if k != str(control)}
    if not means:
        raise ValueError("no perturbed cells to build a centroid from")
    return np.mean(np.stack(list(means.values())), axis=0)


def centroid_accuracy(pred_profiles: np.ndarray, real_profiles: np.ndarray) -> np.ndarray:
    """Systema centroid accuracy: is each prediction closest to its own real profile?

    For prediction ``i``: the fraction of the other perturbations ``j != i`` whose real profile
    is strictly farther (Euclidean) from ``pred_i`` than ``real_i`` is.

    Parameters
    ----------
    pred_profiles
        ``(P, G)`` predicted mean profiles, row ``i`` for perturbation ``i``.
    real_profiles
        ``(P, G)`` real mean profiles in the same order.

    Returns
    -------
    np.ndarray
        ``(P,)`` values in ``[0, 1]`` (1: closer to its own profile than to every other);
        NaN for every row when ``P < 2``. Random guessing averages 0.5.
    """
    pred, real = _as_matrix(pred_profiles, "pred_profiles"), _as_matrix(real_profiles, "real_profiles")
    if pred.shape != real.shape:
        raise ValueError(f"shapes differ: {pred.shape} and {real.shape}")
    n = pred.shape[0]
    if n < 2:
        return np.full(n, np.nan)
    dist = np.sqrt(((pred[:, None, :] - real[None, :, :]) ** 2).sum(axis=-1))
    own = np.diagonal(dist)
    return (dist > own[:, None]).sum(axis=1) / (n - 1)


# --- cell-distribution metrics ------------------------------------------------------------------


def knn_purity(pred: np.ndarray, real_pert: np.ndarray, real_ctrl: np.ndarray, k: int = 10) -> float:
    """KNN purity (SPEC 2.5): how "perturbed" the neighbourhood of a predicted cell is.

    The reference set is the real perturbed cells plus the real control cells. For each
    predicted cell, take its ``k`` nearest reference cells (Euclidean); purity is the fraction of
    them that are real perturbed cells, averaged over predicted cells.

    Parameters
    ----------
    pred
        ``(q, d)`` predicted cells (usually PCA coordinates).
    real_pert
        ``(n, d)`` real perturbed cells.
    real_ctrl
        ``(m, d)`` real control cells.
    k
        Neighbours per predicted cell (capped at ``n + m``).

    Returns
    -------
    float
        In ``[0, 1]``; higher means the predicted cells sit among real perturbed cells. With
        ``n == m`` (the evaluator balances the two sets) a prediction indistinguishable from
        either set scores about its share, 0.5 when real perturbed and control cells overlap.
        Ties in distance are broken in favour of the earlier reference cell (perturbed first).
    """
    q, rp, rc = (
        _as_matrix(pred, "pred"),
        _as_matrix(real_pert, "real_pert"),
        _as_matrix(real_ctrl, "real_ctrl"),
    )
    if rp.shape[0] == 0 or rc.shape[0] == 0 or q.shape[0] == 0:
        raise ValueError("knn_purity needs predicted, real perturbed and real control cells")
    reference = np.concatenate([rp, rc], axis=0)
    is_pert = np.concatenate([np.ones(rp.shape[0], bool), np.zeros(rc.shape[0], bool)])
    k = min(k, reference.shape[0])
    d2 = kernels.pairwise_sq_dists(torch.from_numpy(q), torch.from_numpy(reference)).numpy()
    nearest = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return float(is_pert[nearest].mean())


def edistance(x: np.ndarray, y: np.ndarray) -> float:
    """E-distance between two cell sets: ``2 E||X-Y|| - E||X-X'|| - E||Y-Y'||`` (not squared norms).

    Thin float64 wrapper of :func:`pertflow.ops.kernels.edistance`: V-statistic (self-pairs
    included), 0 for identical sets, the square of scipy's 1-D ``energy_distance``.

    Parameters
    ----------
    x
        ``(n, d)`` cells.
    y
        ``(m, d)`` cells.

    Returns
    -------
    float
    """
    return float(
        kernels.edistance(torch.from_numpy(_as_matrix(x, "x")), torch.from_numpy(_as_matrix(y, "y")))
    )


def mmd_rbf(
    x: np.ndarray,
    y: np.ndarray,
    *,
    scales: tuple[float, ...] = kernels.DEFAULT_SCALES,
    unbiased: bool = True,
) -> float:
    """Squared MMD with the multi-bandwidth RBF kernel (median heuristic on the pooled sample).

    Thin float64 wrapper of :func:`pertflow.ops.kernels.mmd2_rbf`; see there for the kernel
    ``mean_s exp(-||a-b||^2 / (s * median))``, ``s`` in (0.5, 1, 2, 4).

    Parameters
    ----------
    x
        ``(n, d)`` cells, ``n >= 2``.
    y
        ``(m, d)`` cells, ``m >= 2``.
    scales
        Bandwidth multipliers.
    unbiased
        U-statistic (default; can be slightly negative, ~0 for samples of one distribution) or
        V-statistic (>= 0).

    Returns
    -------
    float
    """
    value = kernels.mmd2_rbf(
        torch.from_numpy(_as_matrix(x, "x")),
        torch.from_numpy(_as_matrix(y, "y")),
        scales=scales,
        unbiased=unbiased,
    )
    return float(value)


# --- PCA ------------------------------------------------------------------------------------------

# Sparse input larger than this in both dimensions is fitted with ARPACK instead of a dense SVD.
_DENSE_SVD_MAX_DIM = 1000


@dataclass(frozen=True)
class PCAProjection:
    """A fitted PCA: ``coords = (x - mean) @ components.T``.

    Attributes
    ----------
    mean
        ``(G,)`` gene means of the fitting cells.
    components
        ``(K, G)`` orthonormal principal axes, sorted by decreasing variance; the sign of each
        axis makes its largest-magnitude loading positive (so fits are reproducible).
    explained_variance
        ``(K,)`` variance along each axis (ddof 1).
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray

    @property
    def n_components(self) -> int:
        """Number of axes ``K``."""
        return int(self.components.shape[0])

    def transform(self, matrix: np.ndarray | sp.spmatrix) -> np.ndarray:
        """Project ``(n, G)`` cells (dense or sparse) to ``(n, K)`` float64 coordinates."""
        if matrix.shape[1] != self.mean.shape[0]:
            raise ValueError(f"expected {self.mean.shape[0]} genes, got {matrix.shape[1]}")
        if sp.issparse(matrix):
            # x @ W.T - mean @ W.T keeps the sparse product sparse.
            return np.asarray(matrix @ self.components.T) - self.mean @ self.components.T
        return (np.asarray(matrix, dtype=np.float64) - self.mean) @ self.components.T


def fit_pca(
    matrix: np.ndarray | sp.spmatrix,
    n_components: int,
    *,
    max_cells: int | None = None,
    seed: int = 0,
) -> PCAProjection:
    """Fit a PCA (centred, not scaled) on cells, e.g. the real training cells.

    Parameters
    ----------
    matrix
        ``(n, G)`` cells, dense or scipy sparse (sparse input stays sparse; centring is implicit).
    n_components
        Requested ``K``; capped at ``min(n - 1, G)`` (and ``min(n, G) - 1`` for the sparse solver).
    max_cells
        If set and ``n`` is larger, fit on this many rows drawn without replacement with
        ``numpy.random.default_rng(seed)``.
    seed
        Seed for the row subsample and the iterative solver's start vector.

    Returns
    -------
    PCAProjection
    """
    n, g = matrix.shape
    rows = np.arange(n)
    if max_cells is not None and n > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))
    x = matrix[rows]
    n_fit = x.shape[0]
    if n_fit < 2:
        raise ValueError("PCA needs at least 2 cells")
    mean = np.asarray(x.mean(axis=0), dtype=np.float64).ravel()
    k = min(int(n_components), n_fit - 1, g)
    if k < 1:
        raise ValueError(f"n_components must be >= 1; got {n_components}")
    if sp.issparse(x) and min(n_fit, g) > _DENSE_SVD_MAX_DIM:
        components, singular = _sparse_pca(sp.csr_matrix(x, dtype=np.float64), mean, k, seed)
    else:
        dense = x.toarray() if sp.issparse(x) else np.asarray(x)
        centred = np.asarray(dense, dtype=np.float64) - mean
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        components, singular = vt[:k], singular[:k]
    # A deterministic sign: the largest-magnitude loading of each axis is positive.
    flip = np.sign(components[np.arange(components.shape[0]), np.abs(components).argmax(axis=1)])
    components = components * np.where(flip == 0, 1.0, flip)[:, None]
    return PCAProjection(
        mean=mean,
        components=components,
        explained_variance=singular**2 / (n_fit - 1),
    )


def _sparse_pca(x: sp.csr_matrix, mean: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` axes of the implicitly centred sparse matrix (ARPACK), as scanpy does."""
    from scipy.sparse.linalg import LinearOperator, svds

    n, g = x.shape
    k = min(k, min(n, g) - 1)

    # Centring stays implicit: (X - 1 mean^T) v = X v - (mean . v) 1.
    def matvec(v: np.ndarray) -> np.ndarray:
        v = np.ravel(v)
        return x @ v - mean @ v

    def rmatvec(u: np.ndarray) -> np.ndarray:
        u = np.ravel(u)
        return x.T @ u - mean * u.sum()

    op = LinearOperator((n, g), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).uniform(-1, 1, size=min(n, g))
    _, singular, vt = svds(op, k=k, v0=v0)
    order = np.argsort(-singular)
    return vt[order], singular[order]
