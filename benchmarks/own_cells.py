"""The flows' own cells on every fold of a benchmark, whatever each run chose to predict with.

A flow run of ``pertflow benchmark`` predicts with the flow's cells, its prior's cells with the
flow's spread, or its prior's cells, whichever scored best on the split's validation cells
(``prediction_mode`` in ``model.json``). Where two flow models both fall back to their prior, the
benchmark's table cannot tell them apart. This predicts each fold's test perturbations again with
every given model's own flow cells (``predict.mode=flow``, the run's solver) and scores them
with the evaluator (top-20 DE Pearson delta, E-distance, MMD), beside the mode the run chose and
its validation scores. It is an analysis of the test set, for comparing models (CCFM against its
ablation ``cfm``, issue 14), never a way to choose one: the benchmark's choice stays validation's.

    python benchmarks/own_cells.py OUT --models cfm,ccfm --data-dir ../shared/data \\
        --out benchmarks/results/ccfm/own_cells.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pertflow.benchmark import score_runs, solver_scores
from pertflow.data.tasks import find_tasks, resolve_data_dir
from pertflow.io import read_json
from pertflow.runtime import set_threads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", help="a pertflow benchmark output folder (its runs/<split>/<model>)")
    p.add_argument("--models", required=True, help="flow models to score (comma-separated)")
    p.add_argument("--data-dir", help="the datasets (default: $PERTFLOW_DATA_DIR)")
    p.add_argument("--tasks-dir", default=str(Path(__file__).parent / "tasks"))
    p.add_argument("--out", required=True, help="the CSV to write (rows already there are kept, not redone)")
    p.add_argument("--splits", help="only these run folders' splits (comma-separated; default: all)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    set_threads(args.threads)
    data_dir, tasks = resolve_data_dir(args.data_dir), find_tasks(args.tasks_dir)
    models = [m for m in args.models.split(",") if m]
    out = Path(args.out)

    def score(run: Path, view) -> dict:
        meta = read_json(run / "model.json")
        report, solver = meta.get("fit_report", {}), meta["predict_config"]
        scores = solver_scores(run, view, {solver["ode_method"]: (solver["ode_steps"],)})[0]
        validation = report.get("validation", {})
        return {**scores, "prior": report.get("prior"), "prediction_mode": report.get("prediction_mode"),
                **{f"val_score_{mode.replace('-', '_')}": round(v["score"], 4) for mode, v in validation.items()}}

    score_runs(Path(args.bench), models, tasks, data_dir, out, score, args.splits.split(",") if args.splits else None)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
