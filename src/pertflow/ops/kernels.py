"""Kernels and two-sample distances on tensors: one implementation for losses, the adapter and metrics.

Everything here is weight-free, differentiable with respect to its inputs and works on any device
and floating dtype. Samples are rows: ``x`` has shape ``(n, d)``, ``y`` has shape ``(m, d)``. The
distances, the median heuristic and the MMD also take a batch of sample pairs, ``(..., n, d)`` and
``(..., m, d)`` with the same leading shape (e.g. one pair per gene), and then return one value per
pair, each computed exactly as for that pair alone.

Conventions (stated once, used everywhere):

- Squared Euclidean distance ``D(a, b) = ||a - b||^2``.
- Bandwidth ``h`` is a *squared* length scale and the RBF kernel is ``k(a, b) = exp(-D(a, b) / h)``
  (no factor 2: ``h`` plays the role of ``2 sigma^2``).
- Multi-bandwidth kernel: ``k(a, b) = mean_s exp(-D(a, b) / (s * h))`` over ``s`` in
  :data:`DEFAULT_SCALES` = (0.5, 1, 2, 4), with ``h`` the median heuristic below.
- Median heuristic: ``h`` = median of ``D`` over all distinct pairs of the pooled sample
  ``[x; y]`` (each unordered pair once, self-pairs excluded), computed without gradient. If that
  median is below ``min_bandwidth`` (e.g. more than half of the points coincide) the mean of the
  pooled pair distances is used instead, and the result is finally clamped at ``min_bandwidth``,
  so the bandwidth can never collapse to 0.
- MMD^2 (:func:`mmd2_rbf`): unbiased U-statistic by default (self-pairs excluded within ``x`` and
  within ``y``; all ``n * m`` cross pairs), which is unbiased for the population MMD^2 and can be
  slightly negative. ``unbiased=False`` gives the V-statistic (all pairs), which is >= 0 and
  exactly 0 when ``x`` and ``y`` are the same set.
- E-distance (:func:`edistance`): ``2 E||X - Y|| - E||X - X'|| - E||Y - Y'||`` with *Euclidean*
  (not squared) norms and all pairs averaged, self-pairs included (V-statistic), as in pertpy's
  ``Edistance`` (current versions) and cell-eval's ``pearson_edistance``. This quantity is the
  square of Szekely's energy distance: for 1-D samples it equals
  ``scipy.stats.energy_distance(u, v) ** 2``. It is 0 for identical sets.
"""

from __future__ import annotations

import torch

#: Multipliers of the median-heuristic bandwidth used by the multi-bandwidth RBF kernel.
DEFAULT_SCALES: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)

#: Lower bound on the squared bandwidth, so a degenerate sample cannot make it 0.
DEFAULT_MIN_BANDWIDTH: float = 1e-6


def _check_pair(x: torch.Tensor, y: torch.Tensor | None, batched: bool = True) -> None:
    """2-D samples (``batched``: or a batch of them, ``(..., n, d)``), with the same features and
    the same leading shape on both sides."""
    shape = "2-D (samples, features)" + (" or (..., samples, features)" if batched else "")
    if x.ndim != 2 and not (batched and x.ndim > 2):
        raise ValueError(f"x must be {shape}; got shape {tuple(x.shape)}")
    if y is not None:
        if y.ndim != x.ndim:
            raise ValueError(f"y must be {shape} like x; got shapes {tuple(x.shape)} and {tuple(y.shape)}")
        if y.shape[-1] != x.shape[-1]:
            raise ValueError(
                f"x and y must have the same number of features; got {x.shape[-1]} and {y.shape[-1]}"
            )
        if y.shape[:-2] != x.shape[:-2]:
            raise ValueError(f"x and y must have the same batch shape; got {tuple(x.shape[:-2])} and "
                             f"{tuple(y.shape[:-2])}")


def pairwise_sq_dists(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``x`` and ``y``.

    Parameters
    ----------
    x
        ``(n, d)`` tensor (or ``(..., n, d)``).
    y
        ``(m, d)`` tensor (or ``(..., m, d)``), or ``None`` for distances within ``x``.

    Returns
    -------
    torch.Tensor
        ``(n, m)`` (or ``(n, n)``; ``(..., n, m)`` for a batch) tensor of ``||x_i - y_j||^2``,
        clamped at 0. When ``y`` is ``None`` the diagonal is exactly 0.

    Notes
    -----
    Uses ``||a||^2 + ||b||^2 - 2 a.b`` (one matrix product, differentiable everywhere). In
    float32 this loses precision for points that are far from the origin but close to each
    other; metrics therefore call it in float64.
    """
    _check_pair(x, y)
    x_sq = (x * x).sum(dim=-1)
    if y is None:
        d2 = x_sq[..., :, None] + x_sq[..., None, :] - 2.0 * (x @ x.mT)
        d2 = d2.clamp_min(0.0)
        # Rounding leaves tiny non-zeros on the diagonal; self-distances are exactly 0.
        eye = torch.eye(x.shape[-2], dtype=torch.bool, device=x.device)
        return d2.masked_fill(eye, 0.0)
    y_sq = (y * y).sum(dim=-1)
    d2 = x_sq[..., :, None] + y_sq[..., None, :] - 2.0 * (x @ y.mT)
    return d2.clamp_min(0.0)


def _median(values: torch.Tensor) -> torch.Tensor:
    """Ordinary median over the last dimension (mean of the two middle values for an even
    count), unlike torch.median."""
    n = values.shape[-1]
    lo = torch.kthvalue(values, (n - 1) // 2 + 1, dim=-1).values
    hi = torch.kthvalue(values, n // 2 + 1, dim=-1).values
    return 0.5 * (lo + hi)


def _pooled_pair_dists(
    d_xx: torch.Tensor, d_yy: torch.Tensor | None, d_xy: torch.Tensor | None
) -> torch.Tensor:
    """Distances of every unordered pair of distinct points of the pooled sample, flattened over
    the last dimension (``(..., pairs)``)."""
    n = d_xx.shape[-1]
    iu = torch.triu_indices(n, n, offset=1, device=d_xx.device)
    parts = [d_xx[..., iu[0], iu[1]]]
    if d_yy is not None and d_xy is not None:
        m = d_yy.shape[-1]
        ju = torch.triu_indices(m, m, offset=1, device=d_yy.device)
        parts.append(d_yy[..., ju[0], ju[1]])
        parts.append(d_xy.flatten(-2))
    return torch.cat(parts, dim=-1)


def _bandwidth_from_pairs(pair_d2: torch.Tensor, min_bandwidth: float) -> torch.Tensor:
    """The median heuristic of each row of ``(..., pairs)`` squared distances (module docstring)."""
    pair_d2 = pair_d2.detach()
    if pair_d2.shape[-1] == 0:
        return torch.full(pair_d2.shape[:-1], min_bandwidth, dtype=pair_d2.dtype, device=pair_d2.device)
    h = _median(pair_d2)
    # More than half of the pairs coincide: the mean still sees the spread of the rest.
    h = torch.where(h < min_bandwidth, pair_d2.mean(dim=-1), h)
    return h.clamp_min(min_bandwidth)


def median_sq_dist(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    min_bandwidth: float = DEFAULT_MIN_BANDWIDTH,
) -> torch.Tensor:
    """Median-heuristic squared bandwidth of the pooled sample ``[x; y]`` (no gradient).

    Parameters
    ----------
    x
        ``(n, d)`` tensor (or ``(..., n, d)``).
    y
        ``(m, d)`` tensor (or ``(..., m, d)``) or ``None`` (then only ``x`` is used).
    min_bandwidth
        Lower bound; see the module docstring for the fallback rule.

    Returns
    -------
    torch.Tensor
        0-d tensor ``h`` (squared distance units; ``(...)`` for a batch), detached from the graph.
    """
    _check_pair(x, y)
    with torch.no_grad():
        d_xx = pairwise_sq_dists(x)
        if y is None:
            return _bandwidth_from_pairs(_pooled_pair_dists(d_xx, None, None), min_bandwidth)
        pairs = _pooled_pair_dists(d_xx, pairwise_sq_dists(y), pairwise_sq_dists(x, y))
        return _bandwidth_from_pairs(pairs, min_bandwidth)


def rbf_kernel(
    sq_dists: torch.Tensor,
    bandwidth: torch.Tensor | float,
    scales: tuple[float, ...] = DEFAULT_SCALES,
) -> torch.Tensor:
    """Multi-bandwidth RBF kernel from squared distances: ``mean_s exp(-D / (s * h))``.

    Parameters
    ----------
    sq_dists
        Tensor of squared distances, any shape.
    bandwidth
        Squared bandwidth ``h`` (> 0).
    scales
        Multipliers of ``h``; the kernel is the average over them.

    Returns
    -------
    torch.Tensor
        Kernel values, same shape as ``sq_dists``, in ``(0, 1]``.
    """
    if len(scales) == 0:
        raise ValueError("scales must name at least one bandwidth multiplier")
    total = torch.zeros_like(sq_dists)
    for s in scales:
        total = total + torch.exp(-sq_dists / (s * bandwidth))
    return total / len(scales)


def _off_diagonal_mean(k: torch.Tensor) -> torch.Tensor:
    n = k.shape[-1]
    return (k.sum(dim=(-2, -1)) - torch.diagonal(k, dim1=-2, dim2=-1).sum(dim=-1)) / (n * (n - 1))


def mmd2_rbf(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    scales: tuple[float, ...] = DEFAULT_SCALES,
    bandwidth: torch.Tensor | float | None = None,
    min_bandwidth: float = DEFAULT_MIN_BANDWIDTH,
    unbiased: bool = True,
) -> torch.Tensor:
    """Squared maximum mean discrepancy with the multi-bandwidth RBF kernel.

    Parameters
    ----------
    x
        ``(n, d)`` sample, ``n >= 2`` for the unbiased estimator; or a batch ``(..., n, d)``.
    y
        ``(m, d)`` sample, ``m >= 2`` for the unbiased estimator; or a batch ``(..., m, d)``.
    scales
        Bandwidth multipliers (default 0.5, 1, 2, 4).
    bandwidth
        Base squared bandwidth ``h`` (a number, or one per pair of a batch); ``None`` uses the
        median heuristic of each pooled sample (detached, lower-bounded by ``min_bandwidth``).
    min_bandwidth
        Lower bound of the median heuristic.
    unbiased
        ``True``: U-statistic ``mean_{i!=j} k(x_i,x_j) + mean_{i!=j} k(y_i,y_j) - 2 mean k(x_i,y_j)``
        (can be < 0). ``False``: V-statistic with all pairs (>= 0).

    Returns
    -------
    torch.Tensor
        0-d tensor (``(...)`` for a batch), differentiable with respect to ``x`` and ``y``.
    """
    _check_pair(x, y)
    n, m = x.shape[-2], y.shape[-2]
    if unbiased and (n < 2 or m < 2):
        raise ValueError(f"the unbiased MMD needs at least 2 samples on each side; got {n} and {m}")
    if n == 0 or m == 0:
        raise ValueError("MMD needs non-empty samples")
    d_xx = pairwise_sq_dists(x)
    d_yy = pairwise_sq_dists(y)
    d_xy = pairwise_sq_dists(x, y)
    if bandwidth is None:
        h = _bandwidth_from_pairs(_pooled_pair_dists(d_xx, d_yy, d_xy), min_bandwidth)
    else:
        h = torch.as_tensor(bandwidth, dtype=x.dtype, device=x.device)
    h = h[..., None, None]  # one bandwidth per pair, broadcast over its distance matrix
    k_xx = rbf_kernel(d_xx, h, scales)
    k_yy = rbf_kernel(d_yy, h, scales)
    k_xy = rbf_kernel(d_xy, h, scales)
    cross = k_xy.mean(dim=(-2, -1))
    if unbiased:
        return _off_diagonal_mean(k_xx) + _off_diagonal_mean(k_yy) - 2.0 * cross
    return k_xx.mean(dim=(-2, -1)) + k_yy.mean(dim=(-2, -1)) - 2.0 * cross


def pairwise_dists(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distances between the rows of ``x`` and ``y`` (``y=None``: within ``x``).

    Parameters
    ----------
    x
        ``(n, d)`` tensor.
    y
        ``(m, d)`` tensor or ``None``.

    Returns
    -------
    torch.Tensor
        ``(n, m)`` tensor of ``||x_i - y_j||``.

    Notes
    -----
    Computed from coordinate differences, not from the matrix-product expansion used by
    :func:`pairwise_sq_dists`: the square root turns the expansion's rounding error (~1e-16 on a
    squared distance) into ~1e-8 on a distance, which would make identical sets look apart.
    The gradient through coincident points is 0, not NaN.
    """
    _check_pair(x, y, batched=False)
    return torch.cdist(x, x if y is None else y, compute_mode="donot_use_mm_for_euclid_dist")


def edistance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E-distance ``2 E||X-Y|| - E||X-X'|| - E||Y-Y'||`` (Euclidean norms, all pairs averaged).

    This is the *squared* energy distance (scipy's ``energy_distance`` is its square root in
    1-D). Self-pairs are included in the within-sample means (V-statistic), as in pertpy and
    cell-eval, so identical sets give exactly 0 and the value is always >= 0 up to rounding.

    Parameters
    ----------
    x
        ``(n, d)`` sample, ``n >= 1``.
    y
        ``(m, d)`` sample, ``m >= 1``.

    Returns
    -------
    torch.Tensor
        0-d tensor, differentiable with respect to ``x`` and ``y`` (zero gradient through
        coincident points).
    """
    _check_pair(x, y, batched=False)
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("E-distance needs non-empty samples")
    between = pairwise_dists(x, y).mean()
    within_x = pairwise_dists(x).mean()
    within_y = pairwise_dists(y).mean()
    return 2.0 * between - within_x - within_y
