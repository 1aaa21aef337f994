"""The noise ceiling of a results table: the real cells scored against themselves.

Each (context, perturbation) group of the real test cells, and each context's real control
cells, is split at random into two disjoint halves of ``floor(n/2)`` cells. One half is scored as
"real", the other as "prediction", with the same evaluator and metrics as a model. The result is
what a model that knew the true distribution could reach given the sampling noise of the data:
read a model's 0.85 against the ceiling's value, not against 1.

The halves are at half depth (n/2 cells a side; a model's prediction is scored against all n).
The correlations of mean shifts (:data:`CORRECTED`) are brought to full depth with the
Spearman-Brown correction ``2r / (1 + r)`` (where ``r > 0``), as cell-eval's ``compute_ceiling``
does for ``pearson_delta``: the correlation a model that samples n cells from the true
distribution would reach. Every other metric is reported as measured at half depth, so its
ceiling is conservative (errors and distances somewhat higher than with all cells).
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from pertflow.eval.config import EvalConfig
from pertflow.eval.evaluator import EvalResult, context_labels, evaluate

CEILING = "ceiling"
#: Correlations of mean shifts, Spearman-Brown corrected to full depth (``{k}`` = ``top_k_de``).
CORRECTED = ("pearson_delta", "pearson_delta_top{k}_de", "systema_pearson_delta", "systema_pearson_delta_top{k}_de")


def split_halves(
    real: ad.AnnData, pert_col: str, context_col: str | None, seed: int = 0
) -> tuple[ad.AnnData, ad.AnnData]:
    """Two disjoint random halves of every (context, label) group of ``real`` (controls included).

    A group of ``n`` cells gives ``floor(n/2)`` cells to each half (an odd cell is left out);
    a group of fewer than 2 cells is left out of both.

    Returns
    -------
    (half_a, half_b)
        Copies of ``real``'s rows, in ``real``'s order within each half.
    """
    rng = np.random.default_rng(seed)
    labels = real.obs[pert_col].astype(str).to_numpy()
    contexts = context_labels(real, context_col)
    a_rows, b_rows = [], []
    keys = np.char.add(np.char.add(contexts.astype(str), "\x1f"), labels.astype(str))
    for key in np.unique(keys):
        rows = rng.permutation(np.flatnonzero(keys == key))
        half = rows.size // 2
        a_rows.append(rows[:half])
        b_rows.append(rows[half : 2 * half])
    a, b = np.sort(np.concatenate(a_rows)), np.sort(np.concatenate(b_rows))
    return real[a].copy(), real[b].copy()


def noise_ceiling(
    real: ad.AnnData,
    *,
    pert_col: str,
    control: str,
    context_col: str | None = None,
    train: ad.AnnData | None = None,
    outdir: str | Path | None = None,
    de_cache: str | Path | None = None,
    config: EvalConfig | None = None,
    progress: bool = False,
) -> EvalResult:
    """Score one half of the real cells against the other (see the module docstring).

    Parameters are those of :func:`~pertflow.eval.evaluator.evaluate` for the real side; the
    result has the same tables as a model's, so it stands in a results table as the row
    :data:`CEILING`. ``config.seed`` draws the halves.
    """
    from pertflow.eval.evaluator import aggregate_table, write_tables

    cfg = config or EvalConfig()
    half_a, half_b = split_halves(real, pert_col, context_col, seed=cfg.seed)
    result = evaluate(
        half_a, half_b, pert_col=pert_col, control=control, context_col=context_col, train=train,
        outdir=outdir, de_cache=de_cache, config=cfg, controls="own", progress=progress,
    )
    table = spearman_brown(result.per_perturbation, cfg.top_k_de)
    aggregate = aggregate_table(table)
    if outdir is not None:
        write_tables(Path(outdir), table, aggregate)
    note = ("noise ceiling: two disjoint random halves of the real cells (controls too) scored against each other; "
            "Pearson deltas Spearman-Brown corrected to full depth, other metrics at half depth")
    return EvalResult(per_perturbation=table, aggregate=aggregate, notes=(note, *result.notes))


def spearman_brown(table: pd.DataFrame, top_k_de: int = 20) -> pd.DataFrame:
    """The :data:`CORRECTED` columns of a split-half table brought to full depth: ``2r/(1+r)`` where ``r > 0``."""
    out = table.copy()
    for name in CORRECTED:
        column = name.format(k=top_k_de)
        if column in out.columns:
            r = pd.to_numeric(out[column], errors="coerce")
            out[column] = r.where(~(r > 0), 2 * r / (1 + r))
    return out
