"""Validation per held-out context: would another rule over the contexts choose the better mode?

A model anchored on a prior chooses its prediction mode (``flow``, ``prior-mean``, ``prior``) by
the mean validation score over the validation groups; for a context transfer those are the
perturbed cells of the held-out training contexts (``validation_contexts``). This scores each
mode on each held-out context alone (the saved run, its inner split and its prior rebuilt as in
fitting; the network is the one kept, so a run trained with ``refit`` is not what validation
judged and is skipped), then says which mode three rules would choose, beside the mode best on
the test (from ``benchmarks/selection.py``'s table of the same runs):

* ``mean``: the best mean over the contexts of each context's score;
* ``worst``: the best worst-context score;
* ``every``: a mode other than ``prior`` only where it beats ``prior`` on every context (the
  best mean among those).

    python benchmarks/validation_by_context.py OUT --models cfm,cfmvc --data-dir ../shared/data \\
        --selection OUT/selection.csv --out benchmarks/results/.../validation_by_context.csv
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd

from pertflow.api import split_view
from pertflow.analysis import analysis_inputs, analysis_parser, score_runs
from pertflow.models.anchored import VALIDATION_SEED
from pertflow.models.base import PerturbationModel
from pertflow.models.inner_split import inner_split
from pertflow.models.prior import PREDICTION_MODES, Prior
from pertflow.models.validation import ValidationSet

RULES = ("mean", "worst", "every")


def context_scores(run: Path, view) -> dict:
    """Each mode's validation score (and its two metrics) on each held-out context of a run."""
    model = PerturbationModel.load(run)
    config = model.config
    if config.refit:
        return {"skipped": "refit: the network is not the one validation judged"}
    genes_view = split_view(view.data, view.split, genes=list(model.genes))
    inner = inner_split(genes_view, config.validation, config.validation_held_out, VALIDATION_SEED,
                        config.validation_contexts)
    validation = ValidationSet(inner.view, seed=VALIDATION_SEED)
    model.prior = Prior.fit(config.prior, inner.view, validation, config.prior_strengths)  # as in fitting
    row: dict = {"chosen": model.prediction_mode}
    for context in sorted({g.context for g in validation.groups}):
        keep = [i for i, g in enumerate(validation.groups) if g.context == context]
        alone = copy.copy(validation)
        alone.groups = [validation.groups[i] for i in keep]
        alone.weights = validation.weights[keep] / validation.weights[keep].sum()
        alone._no_change = alone._edistance(lambda p, c, controls: controls)
        for mode in PREDICTION_MODES:
            score = model.validation_score(alone, mode)
            row[f"{context}|{mode}|top20"] = score.pearson_top20_de
            row[f"{context}|{mode}|edist"] = score.edistance
            row[f"{context}|{mode}|score"] = score.score
    return row


def rule_choices(row: pd.Series) -> dict[str, str]:
    """The mode each of :data:`RULES` chooses from a row of :func:`context_scores`."""
    contexts = sorted({c.split("|")[0] for c in row.index if c.count("|") == 2 and pd.notna(row[c])})
    score = {m: [row[f"{c}|{m}|score"] for c in contexts] for m in PREDICTION_MODES}
    mean = {m: float(np.mean(v)) for m, v in score.items()}
    beats_prior = [m for m in PREDICTION_MODES
                   if m == "prior" or all(a > b for a, b in zip(score[m], score["prior"]))]
    return {"mean": max(PREDICTION_MODES, key=lambda m: mean[m]),
            "worst": max(PREDICTION_MODES, key=lambda m: min(score[m])),
            "every": max(beats_prior, key=lambda m: mean[m])}


def main() -> None:
    p = analysis_parser(__doc__, "anchored models")
    p.add_argument("--selection", required=True, help="selection.csv of the same runs (benchmarks/selection.py)")
    args = p.parse_args()
    inputs = analysis_inputs(args)
    out = inputs.out
    score_runs(inputs.bench, inputs.models, inputs.tasks, inputs.data_dir, out, context_scores)
    table = pd.read_csv(out)
    table = table[table.get("skipped", pd.Series(np.nan, index=table.index)).isna()]
    best = pd.read_csv(args.selection).set_index(["split", "model"])["best_on_test"]
    rows = []
    for _, row in table.iterrows():
        key = (row["split"], row["model"])
        rows.append({"split": key[0], "model": key[1], "best_on_test": best.get(key), **rule_choices(row)})
    rules = pd.DataFrame(rows)
    print(rules.to_string(index=False))
    print("\nfolds where the rule chooses the mode best on the test:")
    for rule in RULES:
        right = rules.assign(right=rules[rule] == rules["best_on_test"]).groupby("model")["right"].sum()
        print(f"  {rule}: " + ", ".join(f"{m} {n}/{(rules.model == m).sum()}" for m, n in right.items()))


if __name__ == "__main__":
    main()
