"""The bridge to Arc Institute's cell-eval: its ``MetricsEvaluator`` on one context, the real DE
table cached across models, and cell-eval's placeholders for undefined values made NaN.

See :mod:`pertflow.eval.evaluator` for how and why cell-eval is driven this way.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertflow.eval.config import EvalConfig
from pertflow.io import atomic_path
from pertflow.runtime import torch_threads_kept

# cell-eval metrics that compare perturbations with each other.
NEED_TWO_PERTURBATIONS = ("pearson_edistance", "clustering_agreement")


def cell_eval_adata(x: Any, labels: np.ndarray, genes: pd.Index, pert_col: str) -> ad.AnnData:
    """A minimal AnnData that cell-eval cannot trip over: str labels, float32, unique names."""
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32)
    else:
        x = np.array(x, dtype=np.float32)
    obs = pd.DataFrame(
        {pert_col: np.asarray(labels, dtype=object)}, index=[f"cell{i}" for i in range(len(labels))]
    )
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=object)))


def run_cell_eval(
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
) -> CellEvalOutput:
    import polars as pl
    from cell_eval import MetricsEvaluator

    skip_de = cfg.cell_eval_profile in ("anndata", "pds")
    cache_path = None
    de_real = None
    if de_cache is not None and not skip_de:
        cache_path = de_cache / f"real_de_{real_de_key(real_ad, pert_col, control)}.parquet"
        if cache_path.is_file():
            de_real = pl.read_parquet(cache_path)
    with warnings.catch_warnings(), _CellEvalErrors() as errors, torch_threads_kept():
        # cell-eval 0.8.2 calls polars' string cache, deprecated in polars 2: noise users cannot act on.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="cell_eval")
        evaluator = MetricsEvaluator(
            adata_pred=pred_ad,
            adata_real=real_ad,
            de_real=de_real,
            control_pert=control,
            pert_col=pert_col,
            num_threads=numba_threads(cfg.num_threads),
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
    for message in errors.messages:
        # cell-eval logs a failing metric and leaves its column out; say so instead of hiding it.
        explained = explain_cell_eval_error(message)
        warnings.warn(f"cell-eval: {explained}", UserWarning, stacklevel=5)
        notes.append(f"cell-eval{where}: {explained}")
    n_sig_real = None
    if evaluator.de_comparison is not None:
        # Same threshold as cell-eval's overlap metrics (fdr_threshold default 0.05).
        significant = evaluator.de_comparison.real.filter_to_significant(fdr_threshold=0.05)
        counts = significant.group_by("target").len()
        n_sig_real = {str(t): int(n) for t, n in counts.iter_rows()}
    return CellEvalOutput(table=_polars_to_pandas(results), n_sig_real=n_sig_real)


_FAILED_METRIC = re.compile(r"Error computing metric '([^']+)': (.*)", re.S)


def explain_cell_eval_error(message: str) -> str:
    """cell-eval's log line for a metric it could not compute, as what happened and what to do:
    the metric's column is left out, the others stand, and how to stop asking for it."""
    found = _FAILED_METRIC.match(message.strip())
    if found is None:
        return message
    metric, why = found.group(1), found.group(2).strip()
    return (f"cell-eval could not compute '{metric}' on these cells ({why}); its column is left out and every other "
            f"metric stands. To skip it: EvalConfig(skip_cell_eval_metrics=('{metric}',)), or "
            f"pertflow evaluate --skip-metric {metric}.")


def numba_threads(wanted: int) -> int:
    """``wanted``, but no more than numba allows (``NUMBA_NUM_THREADS``): pdex sets numba's
    threads and raises above that limit."""
    try:
        from numba import config
    except ImportError:
        return wanted
    return max(1, min(wanted, int(config.NUMBA_NUM_THREADS)))


@dataclass(frozen=True)
class CellEvalOutput:
    """cell-eval's per-perturbation table and the real significant-gene counts."""

    table: pd.DataFrame
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


def mask_undefined(
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
