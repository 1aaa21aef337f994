"""Small synthetic perturbation data for the evaluation tests.

A plain module with a unique name (not conftest) so that test modules can import it directly."""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd

N_GENES = 60
CONTEXTS = ("c1", "c2")
TEST_PERTS = ("A", "B", "C")
TRAIN_PERTS = ("D", "E", "F")
CONTROL = "ctrl"
N_TEST_CELLS = 40
N_CTRL_CELLS = 60


@dataclass(frozen=True)
class SyntheticData:
    """Real test cells + controls, training cells, and the generator's ground truth."""

    real: ad.AnnData
    train: ad.AnnData
    log_fold: dict[str, np.ndarray]
    base: dict[str, np.ndarray]


def _draw(rng: np.random.Generator, mean: np.ndarray, n: int) -> np.ndarray:
    """Negative-binomial counts (dispersion 5), normalised to 1e3 per cell, then log1p."""
    counts = rng.negative_binomial(5, 5 / (5 + mean), size=(n, mean.size))
    return np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) * 1e3)


def make_cells(
    rng: np.random.Generator,
    base: dict[str, np.ndarray],
    log_fold: dict[str, np.ndarray],
    plan: list[tuple[str, str, int]],
    effect_scale: float = 1.0,
) -> ad.AnnData:
    """Cells for (context, perturbation, count) triples; effect_scale < 1 weakens the effects."""
    blocks, perts, ctxs = [], [], []
    for context, pert, n in plan:
        mean = base[context] * (np.exp(effect_scale * log_fold[pert]) if pert != CONTROL else 1.0)
        blocks.append(_draw(rng, mean, n))
        perts += [pert] * n
        ctxs += [context] * n
    obs = pd.DataFrame(
        {"condition": pd.Categorical(perts), "cell_type": pd.Categorical(ctxs)},
        index=[f"cell{i}" for i in range(len(perts))],
    )
    var = pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)])
    return ad.AnnData(X=np.vstack(blocks).astype(np.float32), obs=obs, var=var)


def build_synthetic(seed: int = 0) -> SyntheticData:
    rng = np.random.default_rng(seed)
    base = {c: rng.gamma(2.0, 2.0, size=N_GENES) * (1.0 + 0.5 * i) for i, c in enumerate(CONTEXTS)}
    log_fold = {}
    for p in TEST_PERTS + TRAIN_PERTS:
        lf = np.zeros(N_GENES)
        idx = rng.choice(N_GENES, size=10, replace=False)
        lf[idx] = rng.choice([-1.6, 1.4], size=10)
        log_fold[p] = lf
    real_plan = [(c, p, N_TEST_CELLS) for c in CONTEXTS for p in TEST_PERTS]
    real_plan += [(c, CONTROL, N_CTRL_CELLS) for c in CONTEXTS]
    train_plan = [(c, p, N_TEST_CELLS) for c in CONTEXTS for p in TRAIN_PERTS]
    train_plan += [(c, CONTROL, N_CTRL_CELLS) for c in CONTEXTS]
    real = make_cells(rng, base, log_fold, real_plan)
    train = make_cells(rng, base, log_fold, train_plan)
    return SyntheticData(real=real, train=train, log_fold=log_fold, base=base)
