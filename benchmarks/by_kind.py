"""Each model's headline metrics per kind of test perturbation: singles and combinations.

The mean over a fold's perturbations of one kind (``+`` in the name: a combination), then over
folds, of the top-20 DE Pearson delta and the PCA E-distance, from the ``results.csv`` of one or
more benchmark folders (a later folder's rows of a (task, fold, model) replace an earlier one's),
beside the best baseline of each metric::

    python benchmarks/by_kind.py benchmarks/results/descriptors benchmarks/results/descriptor-auto \
        --task norman-unseen-single --out benchmarks/results/descriptor-auto/by_kind.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

BASELINES = ("no-change", "mean", "additive", "linear", "context-shift", "target-effect")
METRICS = {"pearson_delta_top20_de": "top20", "edistance_pca": "edist"}


def by_kind(folders: list[Path], task: str) -> pd.DataFrame:
    frames = []
    for folder in folders:
        rows = pd.read_csv(folder / "results.csv")
        frames.append(rows[rows["task"] == task].assign(order=len(frames)))
    rows = pd.concat(frames)
    rows = rows[rows["model"] != "ceiling"]
    rows["fold"] = rows["fold"].fillna("").astype(str)
    latest = rows.groupby(["fold", "model"])["order"].transform("max")
    rows = rows[rows["order"] == latest]
    rows["kind"] = ["combination" if "+" in str(p) else "single" for p in rows["perturbation"]]
    per_fold = rows.groupby(["kind", "model", "fold"])[list(METRICS)].mean()
    table = per_fold.groupby(["kind", "model"]).mean().rename(columns=METRICS).reset_index()
    table["n_perturbations"] = rows.groupby(["kind", "model"])["perturbation"].nunique().to_numpy()
    best = table[table["model"].isin(BASELINES)].groupby("kind").agg(best_top20=("top20", "max"),
                                                                    best_edist=("edist", "min"))
    table = table.join(best, on="kind")
    table["wins"] = (table["top20"] > table["best_top20"]) & (table["edist"] < table["best_edist"])
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="benchmark result folders (each with results.csv), older first")
    p.add_argument("--task", required=True)
    p.add_argument("--out", type=Path, help="write the table as CSV here")
    args = p.parse_args()
    table = by_kind(args.folders, args.task)
    if args.out:
        table.to_csv(args.out, index=False)
    print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
