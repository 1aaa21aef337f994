"""What a margin on the prediction mode would have done: an analysis of the committed selection tables.

A model anchored on a prior predicts with the mode that scores best on validation
(``flow``, ``prior-mean`` or ``prior``; :func:`pertflow.models.prior.choose_prediction_mode`), by
however little. With a margin ``m`` it would predict with its prior's cells unless another mode
beat the prior's validation score by at least ``m``. Each shipped model's runs
(``shipped.yaml``, a later run's fold first) whose folder holds a ``selection.csv``
(``benchmarks/selection.py``: every mode's validation score and its test metrics) give, per margin,
the folds within the bar of the strongest baseline (``shipped.csv``: 0.02 top-20, 10% E-distance),
the folds won, and the folds where the mode picked is the best on the test. The test metrics of
a mode are the selection table's (each mode predicted again), so a fold's figure can differ a
little from the benchmark's. An analysis of the test folds, never a way to choose: a margin read
off this table is fitted to them::

    python benchmarks/mode_margin.py benchmarks/results/shipped.yaml --margins 0,0.02,0.05,0.1,0.2 \\
        --out benchmarks/results/mode-margin
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

from pertflow.models.prior import best_mode

MODES = {"flow": "flow", "prior-mean": "prior_mean", "prior": "prior"}  # mode -> its column suffix


def pick(row: pd.Series, margin: float) -> str:
    """The mode validation picks (ties to the first mode), or ``prior`` where the pick beats the
    prior's validation score by less than ``margin``."""
    scores = {m: row[f"val_score_{column}"] for m, column in MODES.items()}
    return best_mode(scores, lambda m: scores[m] - scores["prior"] >= margin)


def selection_rows(spec: dict, results: Path) -> pd.DataFrame:
    """Each shipped model's selection rows, one per fold (a later run's first), with the fold's bar."""
    bars = pd.read_csv(results / "shipped.csv")
    bars["fold"] = bars["fold"].fillna("-").astype(str)
    rows = []
    for model, runs in spec["models"].items():
        latest: dict[str, pd.Series] = {}
        for run in runs:
            path = results / run["folder"] / "selection.csv"
            if not path.is_file():
                continue
            table = pd.read_csv(path)
            table = table[table["model"] == run["label"]]
            if run.get("tasks"):
                table = table[table["split"].str.split("__").str[0].isin(run["tasks"])]
            latest.update({row["split"]: row for _, row in table.iterrows()})
        for split, row in latest.items():
            task, fold = (split.split("__") + ["-"])[:2]
            bar = bars[(bars["model"] == model) & (bars["task"] == task) & (bars["fold"] == fold)]
            if len(bar):
                rows.append({**row.to_dict(), "model": model, "task": task, "fold": fold,
                             "best_top20": bar["best_top20"].iloc[0], "best_edist": bar["best_edist"].iloc[0]})
    return pd.DataFrame(rows)


def outcome(row: pd.Series, mode: str) -> dict[str, bool]:
    top20, edist = row[f"top20_{MODES[mode]}"], row[f"edist_{MODES[mode]}"]
    return {"within": bool(top20 >= row["best_top20"] - 0.02 and edist <= 1.1 * row["best_edist"]),
            "wins": bool(top20 > row["best_top20"] and edist < row["best_edist"]),
            "right": mode == row["best_on_test"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="shipped.yaml (its folder holds shipped.csv and the runs)")
    parser.add_argument("--margins", default="0,0.02,0.05,0.1,0.2")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = selection_rows(yaml.safe_load(args.spec.read_text()), args.spec.parent)
    margins = [float(m) for m in args.margins.split(",")]
    summary, changes = [], []
    for margin in margins:
        for model, block in rows.groupby("model", sort=False):
            outcomes = [outcome(row, pick(row, margin)) for _, row in block.iterrows()]
            summary.append({"margin": margin, "model": model, "folds": len(block),
                            **{k: sum(o[k] for o in outcomes) for k in ("within", "wins", "right")}})
        for _, row in rows.iterrows():
            before, after = pick(row, 0.0), pick(row, margin)
            if before != after:
                changes.append({"margin": margin, "model": row["model"], "task": row["task"], "fold": row["fold"],
                                "mode": before, "with_margin": after,
                                "validation_lead": round(row[f"val_score_{MODES[before]}"] - row["val_score_prior"], 4),
                                **{f"{k}_before": v for k, v in outcome(row, before).items()},
                                **{f"{k}_after": v for k, v in outcome(row, after).items()}})
    args.out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(summary).to_csv(args.out / "margins.csv", index=False)
    pd.DataFrame(changes).to_csv(args.out / "changes.csv", index=False)
    print(pd.DataFrame(summary).pivot(index="model", columns="margin", values="within").to_string())
    print(f"wrote {args.out / 'margins.csv'} and {args.out / 'changes.csv'}")


if __name__ == "__main__":
    main()
