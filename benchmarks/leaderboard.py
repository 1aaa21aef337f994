"""The leaderboard: task x model, top-20 DE Pearson delta and E-distance, beside the strongest
baseline of the task and the noise ceiling, from the ``results.csv`` of benchmark folders.

Per task and fold the figures are means over the fold's test perturbations; a model's row is
the mean over folds, and ``folds won`` counts the folds where it beats the fold's strongest
baseline on both metrics (the strongest by each metric: the highest top-20 DE Pearson delta,
the lowest E-distance, among no-change, mean, additive, linear and context-shift). A model's
figures are those of the folder given last that holds it, so a rerun overrides an older one.

    python benchmarks/leaderboard.py benchmarks/results/baselines benchmarks/results/anchored-validation \\
        --out benchmarks/results/leaderboard.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from pertflow.io import write_text
from pertflow.models.registry import BASELINES

TOP20, EDIST = "pearson_delta_top20_de", "edistance_pca"


def fold_means(folders: list[Path]) -> pd.DataFrame:
    """(task, fold, model) -> the two metrics' means over the fold's perturbations, later folders first."""
    tables = []
    for rank, folder in enumerate(folders):
        table = pd.read_csv(folder / "results.csv", usecols=["task", "fold", "model", TOP20, EDIST])
        table["fold"] = table["fold"].fillna("").astype(str)
        means = table.groupby(["task", "fold", "model"])[[TOP20, EDIST]].mean()
        means["rank"], means["source"] = rank, folder.name
        tables.append(means.reset_index())
    every = pd.concat(tables).sort_values("rank")
    return every.drop_duplicates(["task", "fold", "model"], keep="last").set_index(["task", "fold", "model"])


#: Differences below this (relative to the baseline's figure) are a tie, not a win: a model that
#: predicts its prior's cells repeats a baseline's figures up to float32 rounding (~1e-8).
TIE = 1e-6


def wins(top20: float, edist: float, best_top20: float, best_edist: float) -> bool:
    """Better than the strongest baseline on both metrics (by more than :data:`TIE`)."""
    return bool(top20 > best_top20 + TIE * max(abs(best_top20), 1.0) and edist < best_edist * (1 - TIE))


def within(top20: float, edist: float, best_top20: float, best_edist: float) -> bool:
    """The issue's bar: top-20 no more than 0.02 below the strongest baseline, E-distance no more than 10% above."""
    return bool(top20 >= best_top20 - 0.02 and edist <= 1.1 * best_edist)


def leaderboard(folds: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (task, fold), block in folds.groupby(level=["task", "fold"]):
        block = block.droplevel(["task", "fold"])
        base = block.loc[[b for b in BASELINES if b in block.index]]
        best_top20, best_edist = base[TOP20].max(), base[EDIST].min()
        for model, row in block.iterrows():
            rows.append({"task": task, "fold": fold, "model": model, "top20": row[TOP20], "edist": row[EDIST],
                         "best_top20": best_top20, "best_edist": best_edist, "source": row["source"],
                         "wins": wins(row[TOP20], row[EDIST], best_top20, best_edist),
                         "within": within(row[TOP20], row[EDIST], best_top20, best_edist)})
    return pd.DataFrame(rows)


def markdown(board: pd.DataFrame) -> str:
    lines = []
    for task, block in board.groupby("task", sort=True):
        n_folds = block["fold"].nunique()
        lines += [f"### {task} ({n_folds} fold{'s' if n_folds > 1 else ''})", "",
                  "| model | top-20 DE Pearson Δ ↑ | E-distance ↓ | folds won (both metrics) | folds within 0.02 / 10% | from |",
                  "|---|---|---|---|---|---|"]
        per_model = block.groupby("model").agg(top20=("top20", "mean"), edist=("edist", "mean"), wins=("wins", "sum"),
                                               within=("within", "sum"), n=("fold", "nunique"), source=("source", "first"))
        best = block.groupby("fold")[["best_top20", "best_edist"]].first().mean()
        order = [m for m in BASELINES if m in per_model.index] + sorted(set(per_model.index) - set(BASELINES) - {"ceiling"})
        for model in order + (["ceiling"] if "ceiling" in per_model.index else []):
            r = per_model.loc[model]
            name = "*ceiling*" if model == "ceiling" else model
            counts = "" if model in BASELINES or model == "ceiling" else f"{int(r.wins)}/{int(r.n)}"
            within = "" if model in BASELINES or model == "ceiling" else f"{int(r.within)}/{int(r.n)}"
            lines.append(f"| {name} | {r.top20:.3f} | {r.edist:.3f} | {counts} | {within} | {r.source} |")
        lines += [f"| *strongest baseline per fold* | {best.best_top20:.3f} | {best.best_edist:.3f} | | | |", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="benchmark result folders (each with results.csv), older first")
    p.add_argument("--out", required=True, help="the markdown file to write")
    p.add_argument("--csv", help="also the per-fold table as CSV")
    args = p.parse_args()
    board = leaderboard(fold_means([Path(f) for f in args.folders]))
    write_text(args.out, markdown(board))
    if args.csv:
        write_text(args.csv, board.to_csv(index=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
