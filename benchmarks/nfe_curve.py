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

from pertflow.analysis import fold_view, solver_scores
from pertflow.data.tasks import find_tasks, resolve_data_dir
from pertflow.eval.plots import plot_solver_curves
from pertflow.io import atomic_path

GRID = {"euler": (1, 2, 4, 8, 20), "midpoint": (1, 2, 4, 10), "rk4": (1, 2, 5, 20)}


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
    plot_solver_curves(table, out / "nfe.png")


if __name__ == "__main__":
    main()
