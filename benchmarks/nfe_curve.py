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
from pathlib import Path

import pandas as pd

from pertflow.benchmark import fold_view, rescore
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


def solver_scores(run: Path, view: SplitView, grid: dict[str, tuple[int, ...]], sets: tuple[str, ...] = ()) -> list[dict]:
    """One row per (solver, steps) of ``grid``: the run's own flow cells of the split's test
    perturbations (``predict.mode=flow``), scored by the evaluator, with the seconds the
    prediction took (model loading included) and the cells it predicted."""
    rows = []
    for method, steps_list in grid.items():
        for steps in steps_list:
            scores = rescore(run, view, [f"predict.ode_method={method}", f"predict.ode_steps={steps}", "predict.mode=flow", *sets],
                             METRICS)
            rows.append({"split": run.parent.name, "model": run.name, "method": method, "steps": steps,
                         "nfe": steps * EVALUATIONS_PER_STEP[method], **scores})
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
