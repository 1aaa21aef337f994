"""How much the control cells drawn for a prediction move a fold's scores, and the bar with them.

``predict_split`` builds each predicted group from as many control cells as the group has real
cells, drawn by the prediction's ``seed`` (the same draw for every model of a benchmark). Its
mean differs from the mean of all the context's controls, the reference of the top-20 DE
Pearson delta, by sampling noise, which the prediction carries into its shift. Where the
responses are small (the gbm knock-downs), that noise is as large as the differences between
models, and the benchmark's figures are those of one draw (seed 0).

This script re-predicts the trained runs of a finished ``pertflow benchmark`` folder (baselines
and models, loaded from ``OUT/runs/<split>/<model>``; nothing is retrained) with the draw seeds
``0 .. K-1`` and scores each prediction (top-20 DE Pearson delta, E-distance; the same figures as
the benchmark's at seed 0). Two tables:

* ``draws.csv``: one row per task, fold, model and seed.
* ``bar.csv``: per task, fold and model the mean and standard deviation over the seeds; the
  fraction of seeds on which the model is within the bar (top-20 no more than 0.02 below the best
  baseline of the *same* draw, E-distance no more than 10% above it); and whether the seed means
  are within the bar of the baselines' seed means; the same for a win (better than the best
  baseline on both metrics).

``--tables-only`` rebuilds ``bar.csv`` from an existing ``draws.csv`` in ``--out``.

Run (after the benchmark whose folder it reads)::

    python benchmarks/draw_noise.py OUT --task gbm-cellline-transfer --models ccfm,cfm --seeds 10 \\
        --data-dir ../shared/data --out benchmarks/results/draw-noise/gbm
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from leaderboard import EDIST, TOP20, wins, within  # noqa: E402  (a sibling script: one home for the bar)

from pertflow.api import EvalConfig, evaluate_split, evaluation_inputs, predict, split_view  # noqa: E402
from pertflow.benchmark import fold_split  # noqa: E402
from pertflow.data.tasks import find_tasks  # noqa: E402
from pertflow.io import atomic_path  # noqa: E402
from pertflow.models.registry import BASELINES  # noqa: E402
from pertflow.runtime import set_threads  # noqa: E402

METRICS = {"top20": TOP20, "edist": EDIST}


def score(run_dir: Path, view, inputs, seed: int) -> dict[str, float]:
    """One prediction of ``run_dir``'s model with the draw ``seed``, scored on the fold's test cells."""
    pred = predict(run_dir, view, None, None, seed=seed)
    agg = evaluate_split(None, None, pred, inputs=inputs,
                         config=EvalConfig(cell_eval_profile="anndata")).aggregate.loc["mean"]
    return {key: float(agg[column]) for key, column in METRICS.items()}


def bar_table(draws: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """Per task, fold and model: seed means and sds, the share of draws within the bar, the means' verdict."""
    rows = []
    for (task, fold), fold_draws in draws.groupby(["task", "fold"], sort=False):
        base = fold_draws[fold_draws.model.isin(BASELINES)]
        best = base.groupby("seed").agg(top20=("top20", "max"), edist=("edist", "min"))
        means = base.groupby("model")[["top20", "edist"]].mean()
        for model in list(BASELINES) + models:
            own = fold_draws[fold_draws.model == model].set_index("seed")
            if own.empty:
                continue
            per_draw = [within(own.top20[s], own.edist[s], best.top20[s], best.edist[s]) for s in own.index]
            won = [wins(own.top20[s], own.edist[s], best.top20[s], best.edist[s]) for s in own.index]
            rows.append({
                "task": task, "fold": fold, "model": model, "seeds": len(own),
                "top20_mean": own.top20.mean(), "top20_sd": own.top20.std(ddof=1),
                "edist_mean": own.edist.mean(), "edist_sd": own.edist.std(ddof=1),
                "best_top20_seed0": best.top20.get(0, np.nan), "best_edist_seed0": best.edist.get(0, np.nan),
                "within_seed0": per_draw[list(own.index).index(0)] if 0 in own.index else None,
                "within_share": float(np.mean(per_draw)),
                "best_top20_of_means": means.top20.max(), "best_edist_of_means": means.edist.min(),
                "within_on_means": within(own.top20.mean(), own.edist.mean(), means.top20.max(), means.edist.min()),
                "wins_share": float(np.mean(won)),
                "wins_on_means": wins(own.top20.mean(), own.edist.mean(), means.top20.max(), means.edist.min()),
            })
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench", type=Path, help="a finished pertflow benchmark folder (its runs/ are read)")
    parser.add_argument("--task", required=True)
    parser.add_argument("--folds", default=None, help="comma-separated folds (default: every fold of the task)")
    parser.add_argument("--models", default="", help="comma-separated trained models beside the baselines")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for draws.csv and bar.csv")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tables-only", action="store_true", help="rebuild bar.csv from --out's draws.csv")
    args = parser.parse_args()
    set_threads(args.threads)
    task = find_tasks()[args.task]
    models = [m for m in args.models.split(",") if m]
    if args.tables_only:
        write_tables(pd.read_csv(args.out / "draws.csv"), models, args.out)
        return
    folds = args.folds.split(",") if args.folds else task.fold_names
    rows = []
    with task.open_data(args.data_dir) as data:
        for fold in folds:
            view = split_view(data, fold_split(task, data, fold, args.data_dir / "splits"))
            inputs = evaluation_inputs(view)
            for model in list(BASELINES) + models:
                run_dir = args.bench / "runs" / view.split.name / model
                if not (run_dir / "model.json").is_file():
                    raise SystemExit(f"no trained run {run_dir}: run the benchmark first, or name its models.")
                for seed in range(args.seeds):
                    rows.append({"task": args.task, "fold": fold, "model": model, "seed": seed,
                                 **score(run_dir, view, inputs, seed)})
                    print(rows[-1], flush=True)
    write_tables(pd.DataFrame(rows), models, args.out)


def write_tables(draws: pd.DataFrame, models: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, table in (("draws.csv", draws), ("bar.csv", bar_table(draws, models))):
        with atomic_path(out / name) as tmp:
            table.to_csv(tmp, index=False, float_format="%.4f")


if __name__ == "__main__":
    main()
