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

from pathlib import Path

from pertflow.analysis import analysis_inputs, analysis_parser, score_runs, solver_scores
from pertflow.io import read_json


def main() -> None:
    p = analysis_parser(__doc__, "flow models to score")
    p.add_argument("--splits", help="only these run folders' splits (comma-separated; default: all)")
    args = p.parse_args()
    inputs = analysis_inputs(args)

    def score(run: Path, view) -> dict:
        meta = read_json(run / "model.json")
        report, solver = meta.get("fit_report", {}), meta["predict_config"]
        scores = solver_scores(run, view, {solver["ode_method"]: (solver["ode_steps"],)})[0]
        validation = report.get("validation", {})
        return {**scores, "prior": report.get("prior"), "prediction_mode": report.get("prediction_mode"),
                **{f"val_score_{mode.replace('-', '_')}": round(v["score"], 4) for mode, v in validation.items()}}

    score_runs(inputs.bench, inputs.models, inputs.tasks, inputs.data_dir, inputs.out, score,
               args.splits.split(",") if args.splits else None)
    print(f"wrote {inputs.out}")


if __name__ == "__main__":
    main()
