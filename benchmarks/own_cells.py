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

import pandas as pd

from nfe_curve import solver_scores
from pertflow.benchmark import fold_view
from pertflow.data.tasks import find_tasks, resolve_data_dir
from pertflow.io import atomic_path, read_json
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
    done = pd.read_csv(out) if out.is_file() else pd.DataFrame(columns=["split", "model"])
    rows = done.to_dict("records")
    splits = sorted(p.name for p in (Path(args.bench) / "runs").iterdir() if p.is_dir())
    for split in [s for s in splits if not args.splits or s in args.splits.split(",")]:
        runs = [Path(args.bench) / "runs" / split / m for m in models]
        todo = [r for r in runs if (r / "model.json").is_file() and not ((done["split"] == split) & (done["model"] == r.name)).any()]
        if not todo:
            continue
        with fold_view(todo[0], tasks, data_dir) as view:
            for run in todo:
                meta = read_json(run / "model.json")
                report, solver = meta.get("fit_report", {}), meta["predict_config"]
                scores = solver_scores(run, view, {solver["ode_method"]: (solver["ode_steps"],)})[0]
                validation = report.get("validation", {})
                rows.append({**scores, "prior": report.get("prior"), "prediction_mode": report.get("prediction_mode"),
                             **{f"val_score_{mode.replace('-', '_')}": round(v["score"], 4) for mode, v in validation.items()}})
                out.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(out) as tmp:  # after every run: an interrupted pass keeps what it scored
                    pd.DataFrame(rows).to_csv(tmp, index=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
