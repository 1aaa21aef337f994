"""Which descriptor validation chose per fold (``descriptor: auto``), and which was better on the test.

Reads the chosen descriptor and its validation scores from each fold's saved run of MODEL in an
``auto`` benchmark folder (``runs/<task>__<fold>/<model>/model.json``; a refitted run keeps the
choice in its ``inner_fit``), and the test's top-20 DE Pearson delta and E-distance of the same
model trained with each descriptor alone (``--onehot FOLDER:MODEL``, ``--gene FOLDER:MODEL``).
"Better" ranks as validation does: top-20 minus the E-distance relative to no change's::

    python benchmarks/descriptor_selection.py /tmp/auto latent-shift --task tapseq-unseen-target \
        --onehot benchmarks/results/descriptors:latent-shift --gene benchmarks/results/descriptors:latent-shift@gene
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def fold_means(folder: Path, model: str, task: str) -> pd.DataFrame:
    rows = pd.read_csv(folder / "results.csv")
    rows = rows[(rows["task"] == task) & (rows["model"] == model)]
    return rows.groupby(rows["fold"].fillna("").astype(str))[["pearson_delta_top20_de", "edistance_pca"]].mean()


def chosen(folder: Path, task: str, fold: str, model: str) -> dict:
    name = f"{task}__{fold}" if fold else task
    report = json.loads((folder / "runs" / name / model / "model.json").read_text())["fit_report"]
    return report.get("descriptor") or report.get("inner_fit", {}).get("descriptor") or {"chosen": "onehot"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("auto", type=Path, help="the benchmark folder of the auto runs")
    p.add_argument("model")
    p.add_argument("--task", required=True)
    p.add_argument("--onehot", required=True, help="FOLDER:MODEL trained with descriptor onehot")
    p.add_argument("--gene", required=True, help="FOLDER:MODEL trained with descriptor gene")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    tests = {}
    for kind in ("onehot", "gene"):
        folder, model = getattr(args, kind).rsplit(":", 1)
        tests[kind] = fold_means(Path(folder), model, args.task)
    nochange = fold_means(args.auto, "no-change", args.task)["edistance_pca"]
    out = []
    for fold in tests["onehot"].index:
        report = chosen(args.auto, args.task, fold, args.model)
        row = {"fold": fold, "chosen": report["chosen"], "inner_splits": report.get("inner_splits", 1)}
        score = {}
        for kind, table in tests.items():
            top20, edist = table.loc[fold]
            row[f"{kind}_top20"], row[f"{kind}_edist"] = round(top20, 3), round(edist, 3)
            score[kind] = top20 - edist / nochange.loc[fold]
        row["better_on_test"] = max(score, key=score.get)
        row["right"] = row["better_on_test"] == row["chosen"]
        out.append(row)
    table = pd.DataFrame(out)
    if args.out:
        table.to_csv(args.out, index=False)
    print(table.to_string(index=False))
    print(f"validation chose the better descriptor on {int(table['right'].sum())} of {len(table)} folds")


if __name__ == "__main__":
    main()
