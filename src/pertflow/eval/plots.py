"""Plots of benchmark results: one summary figure per task (models x headline metrics, baselines
and the noise ceiling marked); per held-out perturbation, predicted vs real mean shift per gene and
predicted and real cells in a shared 2-D PCA, a page at a time; a run's training losses.

The per-perturbation grids read what the benchmark wrote beside each run (``deltas.npz``,
``embedding.npz``); :func:`shared_pca` and :func:`project` are the embedding's one definition."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pertflow.data.dataset import SINGLE_CONTEXT
from pertflow.eval.ceiling import CEILING
from pertflow.eval.evaluator import metric_direction
from pertflow.io import atomic_path

#: The headline metrics of the summary figure.
PLOT_METRICS = ("pearson_delta_top20_de", "mse_top20_de_rel_nochange", "edistance_pca", "systema_pearson_delta")
#: Perturbations per page of the per-perturbation grids (the rest go to further pages, further files).
ROWS_PER_PAGE = 5
#: The loss streams of a two-stream model (CCFM) in its ``history.csv`` and their titles; other
#: runs plot ``loss``.
LOSS_STREAMS = {"mse_expr": "expression stream (mse_expr)", "mse_latent": "latent stream (mse_latent)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, dpi: int) -> None:
    """Write a figure atomically (a reader never sees half a PNG) and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def plot_metrics(summary: pd.DataFrame, plots: Path, baselines: tuple[str, ...] = ()) -> list[Path]:
    """The summary figure of each task: a bar per model and headline metric; baselines grey, the
    other models coloured, the noise ceiling a dashed line. Returns the files written."""
    plt = _pyplot()
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for task, block in summary.groupby(level="task", sort=False):
        block = block.droplevel("task")
        ceiling = block.loc[CEILING] if CEILING in block.index else None
        block = block.drop(CEILING, errors="ignore")
        cols = [m for m in PLOT_METRICS if m in block.columns and block[m].notna().any()]
        if not cols:
            continue
        fig, axes = plt.subplots(1, len(cols), figsize=(min(11.0, 2.7 * len(cols)), 3.3), squeeze=False)
        others = [m for m in block.index if m not in baselines]
        palette = dict(zip(others, plt.cm.tab10(np.arange(len(others)) % 10)))
        colors = [(0.72, 0.72, 0.72, 1.0) if m in baselines else palette[m] for m in block.index]
        for ax, m in zip(axes[0], cols):
            ax.bar(range(len(block)), block[m].to_numpy(), color=colors, edgecolor="black", linewidth=0.4)
            ax.set_xticks(range(len(block)), block.index, rotation=45, ha="right", fontsize=7)
            arrow = {"higher": "higher is better", "lower": "lower is better"}.get(metric_direction(m), "")
            ax.set_title(f"{m}\n({arrow})", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            ax.axhline(0, color="black", lw=0.5)
            if ceiling is not None and np.isfinite(ceiling.get(m, np.nan)):
                ax.axhline(ceiling[m], color="tab:red", ls="--", lw=1, label="noise ceiling")
        handles = [plt.Rectangle((0, 0), 1, 1, color=(0.72, 0.72, 0.72))] if baselines else []
        labels = ["baseline"] if baselines else []
        if ceiling is not None:
            handles.append(plt.Line2D([0], [0], color="tab:red", ls="--"))
            labels.append("noise ceiling (real vs real)")
        if handles:
            fig.legend(handles, labels, loc="upper right", fontsize=7, frameon=False)
        fig.suptitle(f"{task}: mean over held-out perturbations", fontsize=9, x=0.02, ha="left")
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        path = plots / f"{task}_metrics.png"
        _save(plt, fig, path, dpi=110)
        written.append(path)
    return written


def plot_solver_curves(table: pd.DataFrame, path: Path, xlabel: str = "network evaluations per sample") -> Path:
    """Quality against the ODE solver's network evaluations: one column per split, top-20 DE
    Pearson delta above E-distance, one line per solver (``table``: columns ``split``, ``method``,
    ``nfe`` and the two metrics, as :func:`pertflow.analysis.solver_scores` writes them)."""
    plt = _pyplot()
    splits = list(dict.fromkeys(table["split"]))
    fig, axes = plt.subplots(2, len(splits), figsize=(4 * len(splits), 6), squeeze=False)
    for col, split in enumerate(splits):
        block = table[table["split"] == split]
        for row, metric in enumerate(("pearson_delta_top20_de", "edistance_pca")):
            ax = axes[row, col]
            for method, part in block.groupby("method"):
                ax.plot(part["nfe"], part[metric], marker="o", label=method)
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_title(f"{split}: {metric}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(plt, fig, path, 110)
    return path


def plot_deltas(results: pd.DataFrame, out: Path, models: list[str]) -> list[Path]:
    """Predicted vs real mean shift per gene: a row per held-out perturbation, a column per model,
    :data:`ROWS_PER_PAGE` perturbations a page (``<task>_deltas.png``, then ``_deltas_2.png`` ...)."""

    def draw(ax, case: pd.Series, run: Path, last_row: bool) -> bool:
        found = _deltas_of(run / "deltas.npz", case)
        if found is None:
            return False
        real, pred, bounds = found
        if bounds is not None:  # the predicted shift's interval (predict.interval), a bar per gene
            ax.vlines(real, bounds[0], bounds[1], color="tab:blue", alpha=0.25, lw=0.4)
        ax.scatter(real, pred, s=2, alpha=0.5, linewidths=0)
        lim = max(np.abs(real).max(), np.abs(pred).max(), 1e-3) * 1.05
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.5)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        tick = float(f"{lim * 0.6:.1g}")  # three fixed ticks: matplotlib's automatic ones cost most of a page's time
        ax.set_xticks([-tick, 0, tick])
        ax.set_yticks([-tick, 0, tick])
        r = np.corrcoef(real, pred)[0, 1] if min(real.std(), pred.std()) > 1e-6 else float("nan")
        ax.text(0.04, 0.92, f"r={r:.2f}", transform=ax.transAxes, fontsize=6, va="top")
        if last_row:
            ax.set_xlabel("real shift", fontsize=6)
        return True

    return _case_grids(results, out, models, "deltas", "predicted", draw,
                       "predicted vs real mean shift vs control, per gene (bars: the predicted shift's interval, "
                       "for a prediction asked for one)")


def plot_embeddings(results: pd.DataFrame, out: Path, models: list[str]) -> list[Path]:
    """Predicted and real cells in a shared 2-D embedding: per held-out perturbation, the PCA of its
    context's real cells (controls and perturbed, :func:`shared_pca`), the model's predicted cells
    projected into it (:func:`project`, not refitted). A row per perturbation, a column per model,
    pages as :func:`plot_deltas` (``<task>_embedding.png``, ``_embedding_2.png`` ...)."""
    loaded: dict[Path, dict[str, np.ndarray] | None] = {}

    def read(path: Path) -> dict[str, np.ndarray] | None:
        if path not in loaded:
            loaded[path] = dict(np.load(path)) if path.is_file() else None
        return loaded[path]

    def draw(ax, case: pd.Series, run: Path, last_row: bool) -> bool:
        real, pred = read(run.parent / "embedding.npz"), read(run / "embedding.npz")
        if real is None or pred is None:
            return False
        real_xy, kind = _case_rows(real, case, "kind")
        pred_xy, _ = _case_rows(pred, case)
        if not len(real_xy) or not len(pred_xy):
            return False
        ax.scatter(*real_xy[kind == 0].T, s=2, c="lightgrey", linewidths=0, label="real control")
        ax.scatter(*real_xy[kind == 1].T, s=3, c="tab:blue", alpha=0.6, linewidths=0, label="real perturbed")
        ax.scatter(*pred_xy.T, s=3, c="tab:orange", alpha=0.6, linewidths=0, label="predicted")
        ax.set_xticks([])
        ax.set_yticks([])
        if last_row:
            ax.set_xlabel("PC1 of the real cells", fontsize=6)
        return True

    return _case_grids(results, out, models, "embedding", "PC2", draw,
                       "cells in the PCA of each perturbation's real cells (grey: real control, blue: real "
                       "perturbed, orange: predicted, projected)", legend=True)


def _case_rows(found: dict[str, np.ndarray], case: pd.Series, extra: str | None = None):
    """The rows of an ``embedding.npz`` that belong to a case: their coordinates (and ``extra``)."""
    same = (found["perturbation"] == str(case["perturbation"])) & (found["context"] == str(case["context"]))
    hit = np.flatnonzero(same)
    rows = np.isin(found["case"], hit)
    return found["xy"][rows], (found[extra][rows] if extra else None)


def _case_grids(results: pd.DataFrame, out: Path, models: list[str], kind: str, ylabel: str,
                draw: Callable[..., bool], title: str, legend: bool = False) -> list[Path]:
    """A grid per page and task: a row per held-out (fold, context, perturbation), a column per
    model; ``draw(ax, case, run_dir, last_row)`` fills a panel (False: nothing to show)."""
    plt = _pyplot()
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    models = [m for m in models if m != CEILING]
    written = []
    for task, block in results.groupby("task", sort=False):
        cases = block[["fold", "context", "perturbation"]].drop_duplicates()
        pages = -(-len(cases) // ROWS_PER_PAGE)
        for page, start in enumerate(range(0, len(cases), ROWS_PER_PAGE)):
            chunk = cases.iloc[start:start + ROWS_PER_PAGE]
            size = min(1.9, 10.5 / max(len(models), 1))
            # fixed margins in inches (tight_layout draws every panel once more: a third of the time)
            left, right, top, bottom = 0.75, 0.15, 0.75, 0.45 + 0.25 * legend
            width, height = size * len(models) + left + right, size * len(chunk) + top + bottom
            fig, axes = plt.subplots(len(chunk), len(models), figsize=(width, height), squeeze=False)
            fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height,
                                bottom=bottom / height, wspace=0.25, hspace=0.2)
            for col, model in enumerate(models):
                axes[0, col].set_title(model, fontsize=8, fontweight="bold")
                for row, (_, case) in enumerate(chunk.iterrows()):
                    ax = axes[row, col]
                    ax.tick_params(labelsize=5)
                    if col == 0:
                        own_context = "" if case["context"] == SINGLE_CONTEXT else f"\n{case['context']}"
                        label = str(case["perturbation"]) + own_context
                        ax.set_ylabel(f"{label}\n{ylabel}", fontsize=6)
                    fold = case["fold"]
                    split_name = task if fold in ("", None) or pd.isna(fold) else f"{task}__{fold}"
                    if not draw(ax, case, out / "runs" / split_name / model, row == len(chunk) - 1):
                        ax.axis("off")
            if legend:
                handles, labels = next((a.get_legend_handles_labels() for a in axes.flat if a.collections), ([], []))
                if handles:
                    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False,
                               markerscale=3)
            fig.suptitle(textwrap.fill(f"{task}: {title} (page {page + 1}/{pages})", width=max(40, int(width * 15))),
                         fontsize=8, y=1 - 0.08 / height, va="top")
            path = plots / (f"{task}_{kind}.png" if page == 0 else f"{task}_{kind}_{page + 1}.png")
            _save(plt, fig, path, dpi=100)
            written.append(path)
    return written


def _deltas_of(path: Path, case: pd.Series) -> tuple[np.ndarray, np.ndarray, tuple | None] | None:
    """Real and predicted shift of a case, and the predicted shift's interval (lower, upper) when
    the prediction had one (else None)."""
    if not path.is_file():
        return None
    with np.load(path) as d:
        hit = np.flatnonzero((d["perturbation"] == case["perturbation"]) & (d["context"] == str(case["context"])))
        if not len(hit):
            return None
        bounds = (d["lower"][hit[0]], d["upper"][hit[0]]) if "lower" in d.files else None
        return d["real"][hit[0]], d["pred"][hit[0]], bounds


# ---------------------------------------------------------------------------- the shared embedding
#: Cells of each set (a context's real controls, a perturbation's real cells, a model's predicted
#: cells of it) placed in the shared embedding, sampled with a fixed seed where there are more.
EMBED_CELLS = 500
#: Genes of the shared embedding: the perturbation's largest real mean shifts from control. On all
#: genes, the noise of the many unaffected ones hides a response on a few (on the demo's data the
#: perturbed cells' centroid was 0.2-0.6 pooled SDs from the controls' in the 2-D PCA of all 200
#: genes, 1.5-2.4 on these 50).
EMBED_GENES = 50


@dataclass(frozen=True)
class Projection:
    """A 2-D PCA: ``(x - mean) @ components.T``; ``components`` (2, G), ``mean`` (G,)."""

    mean: np.ndarray
    components: np.ndarray


def shared_pca(control: np.ndarray, perturbed: np.ndarray, n_genes: int | None = EMBED_GENES,
               seed: int = 0) -> Projection:
    """The 2-D embedding of one perturbation: the first two principal components (scanpy's PCA)
    of its real cells and its context's real controls, (n, G) each, on the ``n_genes`` genes whose
    mean differs most between the two (all genes: None); a projection that other cells (a model's
    prediction) are placed in without refitting. Its components are zero on the other genes."""
    import scanpy as sc

    real = np.vstack([control, perturbed]).astype(np.float64)
    genes = np.arange(real.shape[1])
    if n_genes is not None and n_genes < real.shape[1] and len(control) and len(perturbed):
        shift = np.abs(np.mean(perturbed, axis=0) - np.mean(control, axis=0))
        genes = np.sort(np.argsort(-shift, kind="stable")[:n_genes])
    if real.shape[0] < 3 or genes.size < 3:
        raise ValueError(f"a 2-D PCA needs at least 3 cells and 3 genes, got {real.shape[0]} cells, {genes.size} genes")
    _, loadings, _, _ = sc.pp.pca(real[:, genes], n_comps=2, svd_solver="arpack", random_state=seed, return_info=True,
                                  dtype="float64")
    components = np.zeros((2, real.shape[1]))
    components[:, genes] = loadings
    return Projection(mean=real.mean(axis=0), components=components)


def project(x: np.ndarray, projection: Projection) -> np.ndarray:
    """Cells (n, G) in a :class:`Projection`'s two dimensions: (n, 2)."""
    return (np.asarray(x, dtype=np.float64) - projection.mean) @ projection.components.T


# ---------------------------------------------------------------------------- training
def plot_training(run_dir: Path, path: Path, title: str) -> Path | None:
    """A run's training losses from its ``history.csv``: a panel per stream of a two-stream model
    (:data:`LOSS_STREAMS`: CCFM's expression and latent velocity losses), else the loss; and the
    foundation's pretraining loss where the run pretrained one (``foundation/history.csv``).
    Returns the file written, None for a run without a history (a baseline)."""
    panels = []
    history = run_dir / "history.csv"
    if history.is_file():
        table = pd.read_csv(history)
        streams = [c for c in LOSS_STREAMS if c in table.columns] or ["loss"]
        panels += [(table, column, LOSS_STREAMS.get(column, column)) for column in streams]
    foundation = run_dir / "foundation" / "history.csv"
    if foundation.is_file():
        panels.append((pd.read_csv(foundation), "loss", "foundation pretraining loss"))
    panels = [(t, c, name) for t, c, name in panels if c in t.columns
              and pd.to_numeric(t[c], errors="coerce").notna().any()]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.6), squeeze=False)
    for ax, (table, column, name) in zip(axes[0], panels):
        values = pd.to_numeric(table[column], errors="coerce")
        ax.plot(table["step"], values, color="tab:blue", alpha=0.35, lw=0.8)
        ax.plot(table["step"], values.rolling(5, min_periods=1).mean(), color="tab:blue", lw=1.4)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9, x=0.02, ha="left")
    fig.tight_layout()
    _save(plt, fig, path, dpi=100)
    return path
