"""The prediction mode each rule of ``mode_rule`` picks, replayed on benchmark runs with several inner splits.

A model anchored on a prior with ``validation_rotations`` > 1 keeps every inner split's
validation score of each mode in its fit report (``validation_first_split``,
``validation_rotations``). ``mean`` picks the mode with the best mean over the splits;
``every-split`` the same among the prior's cells and the modes that score at least the prior's
cells on every split (:class:`pertflow.models.config.AnchoredConfig`). This reads each run's fit
report, picks with both rules, and looks the two picks up in the folder's ``selection.csv``
(``benchmarks/selection.py``: every mode predicted again and scored on the test), beside the bar
of the strongest baseline (0.02 top-20, 10% E-distance). An analysis of the test folds, not a way
to choose::

    python benchmarks/mode_rule.py OUT [OUT ...] --models latent-shift@flowrot3,ccfm@rot3 \\
        --out benchmarks/results/mode-rule/replay.csv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from pertflow.io import write_text
from pertflow.models.prior import PREDICTION_MODES, best_mode, led_on_every_split

COLUMN = {"flow": "flow", "prior-mean": "prior_mean", "prior": "prior"}
BASELINES = ("no-change", "mean", "additive", "linear", "context-shift")


def picks(report: dict) -> tuple[str, str, list[dict]]:
    """(the ``mean`` rule's mode, the ``every-split`` rule's mode, each split's scores) of a fit report."""
    splits = [report["validation_first_split"]] + [r["validation"] for r in report["validation_rotations"]]
    scores = [{m: s[m]["score"] for m in PREDICTION_MODES} for s in splits]
    mean = {m: sum(s[m] for s in scores) / len(scores) for m in PREDICTION_MODES}
    return best_mode(mean), best_mode(mean, led_on_every_split(scores)), splits


def bar(out: Path, split: str) -> tuple[float, float]:
    """The strongest baseline's top-20 and E-distance on a fold (its baseline runs in ``out``)."""
    best_top20, best_edist = float("-inf"), float("inf")
    for name in BASELINES:
        path = out / "runs" / split / name / "eval" / "results.csv"
        if path.is_file():
            table = pd.read_csv(path)
            best_top20 = max(best_top20, float(table["pearson_delta_top20_de"].mean()))
            best_edist = min(best_edist, float(table["edistance_pca"].mean()))
    return best_top20, best_edist


def replay(out: Path, models: list[str]) -> list[dict]:
    selection = pd.read_csv(out / "selection.csv")
    rows = []
    for model in models:
        for path in sorted((out / "runs").glob(f"*/{model}/model.json")):
            split = path.parent.parent.name
            report = json.loads(path.read_text()).get("fit_report", {})
            chosen = selection[(selection["split"] == split) & (selection["model"] == model)]
            if "validation_rotations" not in report or chosen.empty:
                continue
            row = chosen.iloc[0]
            by_mean, every, splits = picks(report)
            best_top20, best_edist = bar(out, split)
            entry = {"folder": out.name, "split": split, "model": model, "mean": by_mean, "every_split": every,
                     "best_on_test": row["best_on_test"],
                     "lead_of_mean_pick": ";".join(f"{s[by_mean]['score'] - s['prior']['score']:+.3f}" for s in splits)}
            for rule, mode in (("mean", by_mean), ("every_split", every)):
                top20, edist = row[f"top20_{COLUMN[mode]}"], row[f"edist_{COLUMN[mode]}"]
                entry.update({f"top20_{rule}": round(top20, 4), f"edist_{rule}": round(edist, 4),
                              f"within_{rule}": bool(top20 >= best_top20 - 0.02 and edist <= 1.1 * best_edist)})
            rows.append(entry)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+", help="benchmark output folders, each with selection.csv")
    parser.add_argument("--models", required=True, help="comma-separated run labels")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    models = args.models.split(",")
    table = pd.DataFrame([row for folder in args.folders for row in replay(folder, models)])
    write_text(args.out, table.to_csv(index=False))
    print(table.groupby("model")[["within_mean", "within_every_split"]].sum().to_string())
    print(f"right: mean {int((table['mean'] == table['best_on_test']).sum())}, every-split "
          f"{int((table['every_split'] == table['best_on_test']).sum())} of {len(table)}; wrote {args.out}")


if __name__ == "__main__":
    main()
