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

from pertflow.api import EvalConfig, evaluate_split, evaluation_inputs, predict, split_view
from pertflow.benchmark import fold_split
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
        split_name, model = run.parent.name, run.name
        task_name, _, fold = split_name.partition("__")
        task = tasks[task_name]
        with task.open_data(data_dir) as data:
            view = split_view(data, fold_split(task, data, fold or None, data_dir / "splits"))
            inputs = evaluation_inputs(view)
            for method, steps_list in GRID.items():
                for steps in steps_list:
                    pred = predict(run, view, None, sets=[f"predict.ode_method={method}", f"predict.ode_steps={steps}", "predict.mode=flow"])
                    result = evaluate_split(None, None, pred, inputs=inputs, config=EvalConfig(cell_eval_profile="anndata"))
                    agg = result.aggregate.loc["mean"]
                    rows.append({"split": split_name, "model": model, "method": method, "steps": steps,
                                 "nfe": steps * EVALUATIONS_PER_STEP[method], **{m: agg[m] for m in METRICS}})
                    print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "nfe.csv") as tmp:
        table.to_csv(tmp, index=False)
    plot(table, out / "nfe.png")


def plot(table: pd.DataFrame, path: Path) -> None:
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
            ax.set_xlabel("network evaluations per sample")
            ax.set_title(f"{split}: {metric}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
