"""Plots of benchmark results: key metrics per model, and predicted vs real mean shift per gene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pertflow.data.dataset import SINGLE_CONTEXT
from pertflow.eval.evaluator import metric_direction

PLOT_METRICS = ("pearson_delta_top20_de", "mse_top20_de_rel_nochange", "edistance_pca", "systema_pearson_delta")


def plot_metrics(summary: pd.DataFrame, plots: Path) -> None:
    """Bars of the key metrics per model, one figure per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    plots.mkdir(parents=True, exist_ok=True)
    for task, block in summary.groupby(level="task", sort=False):
        block = block.droplevel("task")
        cols = [m for m in PLOT_METRICS if m in block.columns and block[m].notna().any()]
        fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols), 3.4), squeeze=False)
        colors = plt.cm.tab10(np.arange(len(block)) % 10)
        for ax, m in zip(axes[0], cols):
            ax.bar(range(len(block)), block[m].to_numpy(), color=colors)
            ax.set_xticks(range(len(block)), block.index, rotation=45, ha="right", fontsize=8)
            arrow = {"higher": "↑", "lower": "↓"}.get(metric_direction(m), "")
            ax.set_title(f"{m} {arrow}", fontsize=9)
            ax.axhline(0, color="black", lw=0.5)
        fig.suptitle(task)
        fig.tight_layout()
        fig.savefig(plots / f"{task}_metrics.png", dpi=110)
        plt.close(fig)


def plot_deltas(results: pd.DataFrame, out: Path, models: list[str], max_panels: int = 12) -> None:
    """Predicted vs real mean shift per gene, for each held-out perturbation (rows) and model (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for task, block in results.groupby("task", sort=False):
        cases = block[["fold", "context", "perturbation"]].drop_duplicates().head(max_panels)
        fig, axes = plt.subplots(len(cases), len(models), figsize=(2.4 * len(models), 2.3 * len(cases)), squeeze=False)
        for col, model in enumerate(models):
            for row, (_, case) in enumerate(cases.iterrows()):
                ax = axes[row, col]
                split_name = task if case["fold"] in ("", None) or pd.isna(case["fold"]) else f"{task}__{case['fold']}"
                path = out / "runs" / split_name / model / "deltas.npz"
                if not path.is_file():
                    ax.axis("off")
                    continue
                with np.load(path) as d:
                    hit = np.flatnonzero((d["perturbation"] == case["perturbation"]) & (d["context"] == str(case["context"])))
                    if not len(hit):
                        ax.axis("off")
                        continue
                    real, pred = d["real"][hit[0]], d["pred"][hit[0]]
                ax.scatter(real, pred, s=3, alpha=0.5)
                lim = max(np.abs(real).max(), np.abs(pred).max(), 1e-3) * 1.05
                ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.5)
                ax.set_xlim(-lim, lim)
                ax.set_ylim(-lim, lim)
                r = np.corrcoef(real, pred)[0, 1] if min(real.std(), pred.std()) > 1e-6 else float("nan")
                label = case["perturbation"] + ("" if case["context"] == SINGLE_CONTEXT else f" / {case['context']}")
                ax.set_title(f"{model}\n{label}  r={r:.2f}", fontsize=7)
                ax.tick_params(labelsize=6)
                if col == 0:
                    ax.set_ylabel("predicted shift", fontsize=7)
                if row == len(cases) - 1:
                    ax.set_xlabel("real shift", fontsize=7)
        fig.suptitle(f"{task}: predicted vs real mean shift vs control, per gene", fontsize=9)
        fig.tight_layout()
        fig.savefig(plots / f"{task}_deltas.png", dpi=100)
        plt.close(fig)
