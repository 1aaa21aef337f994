"""Plots of benchmark results: one summary figure per task (models x headline metrics, baselines
and the noise ceiling marked), and predicted vs real mean shift per gene, a page at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pertflow.data.dataset import SINGLE_CONTEXT
from pertflow.eval.evaluator import metric_direction

#: The headline metrics of the summary figure.
PLOT_METRICS = ("pearson_delta_top20_de", "mse_top20_de_rel_nochange", "edistance_pca", "systema_pearson_delta")
CEILING = "ceiling"  # the row of pertflow.eval.ceiling
#: Perturbations per page of the scatter grid (the rest go to further pages, further files).
ROWS_PER_PAGE = 5


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_deltas(results: pd.DataFrame, out: Path, models: list[str]) -> list[Path]:
    """Predicted vs real mean shift per gene: a row per held-out perturbation, a column per model,
    :data:`ROWS_PER_PAGE` perturbations a page (``<task>_deltas.png``, then ``_deltas_2.png`` ...)."""
    plt = _pyplot()
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    models = [m for m in models if m != CEILING]
    written = []
    for task, block in results.groupby("task", sort=False):
        cases = block[["fold", "context", "perturbation"]].drop_duplicates()
        for page, start in enumerate(range(0, len(cases), ROWS_PER_PAGE)):
            chunk = cases.iloc[start:start + ROWS_PER_PAGE]
            path = plots / (f"{task}_deltas.png" if page == 0 else f"{task}_deltas_{page + 1}.png")
            _delta_page(plt, out, task, chunk, models, path, f"{page + 1}/{-(-len(cases) // ROWS_PER_PAGE)}")
            written.append(path)
    return written


def _delta_page(plt, out: Path, task: str, cases: pd.DataFrame, models: list[str], path: Path, page: str) -> None:
    size = min(1.9, 10.5 / max(len(models), 1))
    fig, axes = plt.subplots(len(cases), len(models), figsize=(size * len(models) + 0.6, size * len(cases) + 0.7),
                             squeeze=False)
    for col, model in enumerate(models):
        axes[0, col].set_title(model, fontsize=8, fontweight="bold")
        for row, (_, case) in enumerate(cases.iterrows()):
            ax = axes[row, col]
            ax.tick_params(labelsize=5)
            label = case["perturbation"] + ("" if case["context"] == SINGLE_CONTEXT else f"\n{case['context']}")
            if col == 0:
                ax.set_ylabel(f"{label}\npredicted", fontsize=6)
            split_name = task if case["fold"] in ("", None) or pd.isna(case["fold"]) else f"{task}__{case['fold']}"
            found = _deltas_of(out / "runs" / split_name / model / "deltas.npz", case)
            if found is None:
                ax.axis("off")
                continue
            real, pred, bounds = found
            if bounds is not None:  # the predicted shift's interval (predict.interval), a bar per gene
                ax.vlines(real, bounds[0], bounds[1], color="tab:blue", alpha=0.25, lw=0.4)
            ax.scatter(real, pred, s=2, alpha=0.5, linewidths=0)
            lim = max(np.abs(real).max(), np.abs(pred).max(), 1e-3) * 1.05
            ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.5)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            r = np.corrcoef(real, pred)[0, 1] if min(real.std(), pred.std()) > 1e-6 else float("nan")
            ax.text(0.04, 0.92, f"r={r:.2f}", transform=ax.transAxes, fontsize=6, va="top")
            if row == len(cases) - 1:
                ax.set_xlabel("real shift", fontsize=6)
    fig.suptitle(f"{task}: predicted vs real mean shift vs control, per gene (page {page}; bars: the predicted "
                 "shift's interval where predict.interval was set)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
