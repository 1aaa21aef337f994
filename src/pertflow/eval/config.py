"""Settings of the evaluator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
    mask_undefined: bool = True
    flat_correlation_is_zero: bool = True
    seed: int = 0
