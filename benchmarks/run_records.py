"""One row per fold of a trained model's benchmark runs: the prior it chose, the prediction mode
chosen on validation (and the validation scores of each mode), the best step and the seconds
of training and prediction, read from ``OUT/runs/<split>/<model>/`` (``model.json``'s fit report
and ``timing.csv``); and the fold's scores (mean over its perturbations of top-20 DE Pearson delta
and E-distance, from each run's ``eval/results.csv``) beside the best baseline's of the same fold.
Runs not trained yet are left out, so it can be read while a benchmark is still running.

    python benchmarks/run_records.py OUT cfmvc --out benchmarks/results/cfmvc/runs.csv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from pertflow.io import write_text
from pertflow.models.registry import BASELINES

SCORES = {"pearson_delta_top20_de": max, "edistance_pca": min}  # metric -> how the best is chosen


def fold_scores(split_dir: Path, model: str) -> dict[str, float]:
    """The model's fold means of :data:`SCORES` and the best baseline's (and its name) in that fold."""
    means = {}
    for name in (model, *BASELINES):
        path = split_dir / name / "eval" / "results.csv"
        if path.is_file():
            means[name] = pd.read_csv(path)[list(SCORES)].mean()
    row = {}
    for metric, best in SCORES.items():
        short = "top20" if metric.startswith("pearson") else "edist"
        row[short] = round(float(means[model][metric]), 3) if model in means else float("nan")
        baselines = {b: float(m[metric]) for b, m in means.items() if b != model}
        if baselines:
            winner = best(baselines, key=baselines.get)
            row[f"best_baseline_{short}"] = f"{winner} {baselines[winner]:.3f}"
    return row


def run_records(out: Path, model: str) -> pd.DataFrame:
    rows = []
    for run in sorted((out / "runs").glob(f"*/{model}")):
        if not (run / "model.json").is_file():  # not trained yet (or still training)
            continue
        report = json.loads((run / "model.json").read_text()).get("fit_report", {})
        timing = pd.read_csv(run / "timing.csv").iloc[0] if (run / "timing.csv").is_file() else {}
        validation = report.get("validation", {})
        rows.append({
            "split": run.parent.name,
            "prior": report.get("prior"),
            "prior_reason": report.get("prior_reason"),
            "prediction_mode": report.get("prediction_mode"),
            "best_step": report.get("best_step"),
            **{f"val_score_{mode.replace('-', '_')}": round(s["score"], 3) for mode, s in validation.items()},
            "train_s": round(float(timing.get("train_seconds", float("nan"))), 0),
            "predict_s": round(float(timing.get("predict_seconds", float("nan"))), 1),
            **fold_scores(run.parent, model),
        })
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", type=Path, help="a `pertflow benchmark --out` folder")
    p.add_argument("model")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    table = run_records(args.bench, args.model)
    if table.empty:
        raise SystemExit(f"no runs of {args.model} under {args.bench / 'runs'}")
    write_text(args.out, table.to_csv(index=False))
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
