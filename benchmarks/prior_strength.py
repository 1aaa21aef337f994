"""The prior alone at each strength: what validation chooses, and each scaled baseline on the test.

No model is trained. For each fold of a context-transfer or unseen-perturbation task, the inner
split of an anchored model (``validation_contexts`` as the model's config names it) chooses the
prior and its strength among :data:`~pertflow.models.prior.PRIOR_STRENGTHS` (as ``Prior.fit`` does in fitting), and the baselines
``none``, ``mean``, ``linear`` and ``context-shift`` at every strength are scored on the fold's
held-out test cells (top-20 DE Pearson delta, E-distance). One JSON line per fold: ``chosen``,
``val`` (each candidate's validation scores) and ``test`` (label -> [top-20, E-distance]; empty
with ``notest``). The figures of ``benchmarks/results/NOTES.md`` "Validation scales the prior"::

    python benchmarks/prior_strength.py kang-celltype-transfer B,CD4T,CD8T,NK nearest > kang.jsonl
    python benchmarks/prior_strength.py zhao-patient-transfer PW030,PW032 both notest > zhao-both.jsonl

``rotate`` (context transfer) holds out every training context in turn instead, and chooses on
the validation scores averaged over the rotations (``rotations``: each one's own choice)::

    python benchmarks/prior_strength.py gbm-cellline-transfer A172,T98G,U87MG rotate > gbm-rotate.jsonl

(the data is read from ``../shared/data`` beside the repository, or ``$PERTFLOW_DATA``).
"""
import json
import os
import sys
from pathlib import Path

import numpy as np

from pertflow.api import EvalConfig, evaluate_split, evaluation_inputs, split_view
from pertflow.benchmark import fold_split
from pertflow.data.tasks import find_tasks
from pertflow.models.inner_split import hold_out, inner_split
from pertflow.models.predict import predict_split
from pertflow.models.prior import PRIOR_STRENGTHS, Prior
from pertflow.models.validation import ValidationSet
from pertflow.runtime import set_threads

set_threads(2)
data_dir = Path(os.environ.get("PERTFLOW_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
tasks = find_tasks()
task_name, folds, vc = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
for fold in folds:
    task = tasks[task_name]
    with task.open_data(data_dir) as data:
        view = split_view(data, fold_split(task, data, fold or None, data_dir / "splits"))
        if vc == "rotate":
            train = view.rows.train
            contexts = sorted(set(map(str, data.contexts[train[~data.is_control[train]]])))
            rotations = {}
            for held in contexts:
                inner = hold_out(view, "contexts", [held])
                prior = Prior.fit("auto", inner.view, ValidationSet(inner.view, seed=0), PRIOR_STRENGTHS)
                rotations[held] = {"chosen": prior.label, "val": {k: v["score"] for k, v in prior.scores.items()}}
            labels = list(rotations[contexts[0]]["val"])
            val = {label: float(np.mean([r["val"][label] for r in rotations.values()])) for label in labels}
            row = {"task": task_name, "fold": fold, "chosen": max(labels, key=val.get), "val": val,
                   "rotations": rotations}
        else:
            inner = inner_split(view, "auto", 0, 0, vc)
            val = ValidationSet(inner.view, seed=0)
            prior = Prior.fit("auto", inner.view, val, PRIOR_STRENGTHS)
            row = {"task": task_name, "fold": fold, "chosen": prior.label, "val": prior.scores}
        inputs = evaluation_inputs(view)
        test = {}
        for name in (("none", "mean", "linear", "context-shift") if len(sys.argv) < 5 else ()):
            full = Prior(name, Prior._baseline(name, view))
            for s in (PRIOR_STRENGTHS if name != "none" else (1.0,)):
                p = full.at_strength(s)
                b = p.baseline  # the baseline's own shift times the strength, for this one prediction
                unscaled = type(b).predicted_delta
                b.predicted_delta = lambda pert, ctx, _b=b, _s=s, _f=unscaled: _s * _f(_b, pert, ctx)
                pred = predict_split(b, view)
                agg = evaluate_split(None, None, pred, inputs=inputs,
                                     config=EvalConfig(cell_eval_profile="anndata")).aggregate.loc["mean"]
                test[p.label] = (round(float(agg["pearson_delta_top20_de"]), 3), round(float(agg["edistance_pca"]), 3))
                del b.predicted_delta
        row["test"] = test
        print(json.dumps(row), flush=True)
