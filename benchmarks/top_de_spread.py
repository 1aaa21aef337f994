"""How much the real shift varies across a test group's top-20 DE genes (what their Pearson can see).

The top-20 DE Pearson delta correlates a prediction's shift with the real one over the 20 genes
most changed in the real cells. Where the real shift is about the same on all 20 (every gene up
by about one log1p unit, say), their Pearson measures the order of small differences inside a
near-constant vector: a prediction with the right sign and size on every gene can score below 0,
and no change scores 0 (a constant vector has no correlation; the evaluator writes 0). One row per
test group of each fold: the real shift's minimum, maximum, mean and standard deviation over its
top-20 genes, ``cv`` = sd / |mean|, and how many of the 20 move the way the mean does::

    python benchmarks/top_de_spread.py zhao-patient-transfer --data-dir ../shared/data \\
        --out benchmarks/results/draw-noise/zhao/top_de_spread.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from pertflow.api import evaluation_inputs, split_view
from pertflow.benchmark import fold_split
from pertflow.data.tasks import find_tasks
from pertflow.eval.metrics import top_de_genes
from pertflow.io import atomic_path


def spread(pert: np.ndarray, ctrl: np.ndarray, k: int = 20) -> dict[str, float]:
    """The real shift of ``pert`` against ``ctrl`` (cells x genes, log1p) on their top ``k`` DE genes."""
    genes = top_de_genes(pert, ctrl, k)
    delta = pert[:, genes].mean(0) - ctrl[:, genes].mean(0)
    mean = float(delta.mean())
    return {"min": float(delta.min()), "max": float(delta.max()), "mean": mean, "sd": float(delta.std(ddof=1)),
            "cv": float(delta.std(ddof=1) / abs(mean)) if mean else float("inf"),
            "same_sign": int((np.sign(delta) == np.sign(mean)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    task = find_tasks()[args.task]
    rows = []
    with task.open_data(args.data_dir) as data:
        for fold in task.fold_names:
            inputs = evaluation_inputs(split_view(data, fold_split(task, data, fold, args.data_dir / "splits")))
            obs, x = inputs.real.obs, np.asarray(inputs.real.X)
            contexts = obs[inputs.context_col].astype(str) if inputs.context_col else pd.Series("", index=obs.index)
            perts = obs[inputs.pert_col].astype(str)
            for (pert, context), _ in obs.groupby([perts, contexts], observed=True):
                if pert == inputs.control:
                    continue
                ctrl = ((perts == inputs.control) & (contexts == context)).to_numpy()
                group = ((perts == pert) & (contexts == context)).to_numpy()
                rows.append({"task": args.task, "fold": fold, "perturbation": pert, "context": context,
                             **spread(x[group], x[ctrl])})
    with atomic_path(args.out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.4f")


if __name__ == "__main__":
    main()
