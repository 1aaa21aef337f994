"""Each prior's validation score with one training single held out at a time (no training).

For a task whose test holds out perturbations, each training single in turn leaves training
with every training combination that contains it (as an inner split of the test's kind does,
:func:`pertflow.models.inner_split.hold_out`), and every prior is scored on it leave-one-out
(:meth:`pertflow.models.prior.Prior.score`). One CSV row per (held-out single, prior): the
validation score and its two parts, and whether the single is a component of training
combinations (the pool the inner split draws from where the test has combinations)::

    python benchmarks/prior_per_single.py norman-unseen-single \\
        --out benchmarks/results/additive-mean/prior_per_single.csv

(the data is read from ``../shared/data`` beside the repository, or ``$PERTFLOW_DATA``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd

from pertflow.api import split_view
from pertflow.benchmark import fold_split
from pertflow.data.tasks import find_tasks
from pertflow.io import write_text
from pertflow.models.inner_split import hold_out
from pertflow.models.prior import Prior
from pertflow.models.validation import ValidationSet
from pertflow.runtime import set_threads

PRIORS = ("none", "mean", "additive", "additive-mean", "linear")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task")
    p.add_argument("--fold", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    set_threads(2)
    data_dir = Path(os.environ.get("PERTFLOW_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    task = find_tasks()[args.task]
    rows = []
    with task.open_data(data_dir) as data:
        view = split_view(data, fold_split(task, data, args.fold, data_dir / "splits"))
        train = view.rows.train
        names = sorted(set(map(str, data.perturbations[train[~data.is_control[train]]])))
        singles = [n for n in names if len(data.components(n)) == 1]
        in_combos = {c for n in names if len(data.components(n)) > 1 for c in data.components(n)}
        for single in singles:
            inner = hold_out(view, "perturbations", [n for n in names if single in data.components(n)])
            validation = ValidationSet(inner.view, seed=0)
            for name in PRIORS:
                score = Prior(name, Prior._baseline(name, inner.view)).score(validation)
                rows.append({"held_out": single, "in_combinations": single in in_combos, "prior": name,
                             "score": round(score.score, 4), "top20": round(score.pearson_top20_de, 4),
                             "edistance": round(score.edistance, 4)})
            print(single, flush=True)
    write_text(args.out, pd.DataFrame(rows).to_csv(index=False))


if __name__ == "__main__":
    main()
