"""The selection table: per fold, which prediction mode validation chose and which was better on the test.

A model anchored on a prior (cfm, ccfm, cfmvc, latent-shift) predicts with its own cells
(``flow``), them moved onto its prior's mean (``prior-mean``) or its prior's cells (``prior``),
whichever scored best on validation (``prediction_mode`` in ``model.json``; what validation held
out is ``validation_split``). This predicts every fold's test perturbations again in each of the
three modes, scores them with the evaluator (top-20 DE Pearson delta, E-distance) and ranks them
with validation's own formula::

    score = top-20 DE Pearson delta - E-distance / E-distance of no change

(no change's E-distance from the same fold's ``no-change`` run). A row says whether validation
chose the mode that is best on the test. It is an analysis of the test set, never a way to
choose: the benchmark's choice stays validation's.

    python benchmarks/selection.py OUT --models latent-shift,latent-shift@flow --data-dir ../shared/data \\
        --out benchmarks/results/selection/latent-shift.csv
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pertflow.analysis import analysis_inputs, analysis_parser, rescore, score_runs
from pertflow.io import read_json

MODES = ("flow", "prior-mean", "prior")
METRICS = ("pearson_delta_top20_de", "edistance_pca")


def no_change_edistance(bench: Path, split: str) -> float:
    table = pd.read_csv(bench / "runs" / split / "no-change" / "eval" / "results.csv")
    return float(table["edistance_pca"].mean())


def main() -> None:
    parser = analysis_parser(__doc__, "anchored models to score (each fold needs its no-change run)")
    inputs = analysis_inputs(parser.parse_args())
    bench, out = inputs.bench, inputs.out

    def score(run: Path, view) -> dict:
        e_none = no_change_edistance(bench, run.parent.name)
        report = read_json(run / "model.json").get("fit_report", {})
        row = {"prior": report.get("prior"), "validation": report.get("validation_split", {}).get("kind", "cells"),
               "held_out": ";".join(report.get("validation_split", {}).get("held_out", [])),
               "chosen": report.get("prediction_mode")}
        test_score = {}
        for mode in MODES:
            scores = rescore(run, view, [f"predict.mode={mode}"], METRICS)
            key = mode.replace("-", "_")
            row[f"top20_{key}"] = round(scores["pearson_delta_top20_de"], 4)
            row[f"edist_{key}"] = round(scores["edistance_pca"], 4)
            test_score[mode] = scores["pearson_delta_top20_de"] - scores["edistance_pca"] / e_none
            val = report.get("validation", {}).get(mode, {})
            row[f"val_score_{key}"] = round(val["score"], 4) if "score" in val else None
        best = max(MODES, key=lambda m: (test_score[m], -MODES.index(m)))
        return {**row, "best_on_test": best, "right": row["chosen"] == best,
                "test_loss_of_choice": round(test_score[best] - test_score[row["chosen"]], 4)}

    score_runs(bench, inputs.models, inputs.tasks, inputs.data_dir, out, score)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
