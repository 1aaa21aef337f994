"""A consensus prior for context transfer, scored on the test without training (not built).

A baseline's shift for a held-out context is scaled gene by gene by how much the training
contexts agree on that gene's response: with ``m_c`` the mean response of context ``c`` (over
its perturbations), ``mu`` their mean over the ``C`` contexts and ``s2`` their variance,
``james-stein`` = ``(1 - s2 / (C mu^2))+`` and ``wiener`` = ``mu^2 / (mu^2 + s2 / C)``. One JSON
line per fold: each baseline and its two shrunk versions, (top-20 DE Pearson delta, E-distance)
on the fold's test cells, and the mean factor. An analysis of the test (it reads its cells), not a
way to choose; the figures of ``benchmarks/results/NOTES.md`` ("a consensus prior")::

    python benchmarks/consensus_prior.py gbm-cellline-transfer A172,T98G,U87MG mean,linear,context-shift \\
        > benchmarks/results/consensus-prior/gbm.jsonl
    python benchmarks/consensus_prior.py zhao-patient-transfer PW030,PW032,PW034,PW036,PW040 mean \\
        > benchmarks/results/consensus-prior/zhao.jsonl

(the data is read from ``../shared/data`` beside the repository, or ``$PERTFLOW_DATA``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from pertflow.api import EvalConfig, evaluate_split, evaluation_inputs, split_view
from pertflow.benchmark import fold_split
from pertflow.data.tasks import find_tasks
from pertflow.models.baselines import DeltaModel
from pertflow.models.predict import predict_split
from pertflow.models.prior import Prior
from pertflow.runtime import set_threads


def agreement(baseline: DeltaModel) -> dict[str, np.ndarray]:
    """(G,) factors of each shrinkage from the training contexts' mean responses."""
    contexts = sorted({c for _, c in baseline.keys})
    m = np.stack([baseline.responses[[i for i, k in enumerate(baseline.keys) if k[1] == c]].mean(0)
                  for c in contexts])
    n, mu = len(contexts), m.mean(0)
    s2 = m.var(0, ddof=1) if n > 1 else np.zeros_like(mu)
    return {"james-stein": np.clip(1 - s2 / (n * mu ** 2 + 1e-12), 0, 1),
            "wiener": mu ** 2 / (mu ** 2 + s2 / n + 1e-12)}


def main() -> None:
    task_name, folds, names = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
    set_threads(2)
    data_dir = Path(os.environ.get("PERTFLOW_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    task = find_tasks()[task_name]
    for fold in folds:
        with task.open_data(data_dir) as data:
            view = split_view(data, fold_split(task, data, fold, data_dir / "splits"))
            inputs = evaluation_inputs(view)
            test, factors = {}, {}
            for name in names:
                baseline = Prior._baseline(name, view)
                unscaled = type(baseline).predicted_delta
                shrunk = agreement(baseline)
                for label, factor in {name: 1.0, **{f"{name} x {k}": v for k, v in shrunk.items()}}.items():
                    baseline.predicted_delta = lambda p, c, _f=factor, _b=baseline: _f * unscaled(_b, p, c)
                    agg = evaluate_split(None, None, predict_split(baseline, view), inputs=inputs,
                                         config=EvalConfig(cell_eval_profile="anndata")).aggregate.loc["mean"]
                    test[label] = [round(float(agg["pearson_delta_top20_de"]), 3), round(float(agg["edistance_pca"]), 3)]
                factors[name] = {k: round(float(v.mean()), 3) for k, v in shrunk.items()}
            print(json.dumps({"task": task_name, "fold": fold, "mean_factor": factors, "test": test}), flush=True)


if __name__ == "__main__":
    main()
