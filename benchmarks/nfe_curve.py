"""Quality against the number of network evaluations (NFE) of a trained flow model's ODE solver.

For each benchmark run folder given (``<out>/runs/<split>/<model>`` of ``pertflow benchmark``),
predicts the split's test cells again with Euler, midpoint and RK4 at several step counts and
scores them with the evaluator (top-20 DE Pearson delta, E-distance; cell-eval's DE-based metrics
are skipped: they do not depend on the solver more than these). Writes ``nfe.csv`` and
``nfe.png``. The predictions are the flow's own cells (``predict.mode=flow``), whatever mode the
run chose on validation: a run that predicts with its prior's cells does not depend on the solver.

    python benchmarks/nfe_curve.py --data-dir ../shared/data --out benchmarks/results/nfe \\
        RESULTS/runs/norman-combo-seen2/cfm RESULTS/runs/zhao-patient-transfer__PW030/cfm
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd

from pertflow.api import EvalConfig, evaluate_split, evaluation_inputs, predict, split_view
from pertflow.benchmark import fold_split
from pertflow.data.view import SplitView
from pertflow.data.tasks import find_tasks, resolve_data_dir
from pertflow.flows import EVALUATIONS_PER_STEP
from pertflow.io import atomic_path

GRID = {"euler": (1, 2, 4, 8, 20), "midpoint": (1, 2, 4, 10), "rk4": (1, 2, 5, 20)}
METRICS = ("pearson_delta_top20_de", "edistance_pca", "mmd_rbf_pca")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders <out>/runs/<task>[__<fold>]/<model>")
    p.add_argument("--data-dir", help="the datasets (default: $PERTFLOW_DATA_DIR)")
    p.add_argument("--tasks-dir", default=str(Path(__file__).parent / "tasks"))
    p.add_argument("--out", required=True, help="folder for nfe.csv and nfe.png")
    args = p.parse_args()
    data_dir = resolve_data_dir(args.data_dir)
    tasks = find_tasks(args.tasks_dir)
    rows = []
    for run in map(Path, args.runs):
        with fold_view(run, tasks, data_dir) as view:
            rows += solver_scores(run, view, GRID)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "nfe.csv") as tmp:
        table.to_csv(tmp, index=False)
    plot(table, out / "nfe.png")


@contextmanager
def fold_view(run: Path, tasks: dict, data_dir: Path) -> Iterator[SplitView]:
    """The split view of a benchmark run folder ``<out>/runs/<task>[__<fold>]/<model>``."""
    task_name, _, fold = run.parent.name.partition("__")
    if task_name not in tasks:
        raise SystemExit(f"{run}: '{task_name}' is not a task of the tasks folder (a run folder is <out>/runs/<task>[__<fold>]/<model>)")
    task = tasks[task_name]
    with task.open_data(data_dir) as data:
        yield split_view(data, fold_split(task, data, fold or None, data_dir / "splits"))


def solver_scores(run: Path, view: SplitView, grid: dict[str, tuple[int, ...]], sets: tuple[str, ...] = ()) -> list[dict]:
    """One row per (solver, steps) of ``grid``: the run's own flow cells of the split's test
    perturbations (``predict.mode=flow``), scored by the evaluator, with the seconds the
    prediction took (model loading included) and the cells it predicted."""
    inputs = evaluation_inputs(view)
    rows = []
    for method, steps_list in grid.items():
        for steps in steps_list:
            start = time.perf_counter()
            pred = predict(run, view, None, sets=[f"predict.ode_method={method}", f"predict.ode_steps={steps}", "predict.mode=flow", *sets])
            seconds = time.perf_counter() - start
            cells = int((pred.obs[inputs.pert_col].astype(str) != inputs.control).sum())
            result = evaluate_split(None, None, pred, inputs=inputs, config=EvalConfig(cell_eval_profile="anndata"))
            agg = result.aggregate.loc["mean"]
            rows.append({"split": run.parent.name, "model": run.name, "method": method, "steps": steps,
                         "nfe": steps * EVALUATIONS_PER_STEP[method], **{m: agg[m] for m in METRICS},
                         "predict_seconds": seconds, "predicted_cells": cells})
            print(rows[-1], flush=True)
    return rows


def plot(table: pd.DataFrame, path: Path, xlabel: str = "network evaluations per sample") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
