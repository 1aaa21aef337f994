"""Every result beside its yardstick: the baselines and the noise ceiling on the same test cells.

A model's scores alone say little: 0.83 top-20 DE Pearson delta is excellent on one split and
below the training mean on another. :func:`yardstick` fits the five baselines on the split's
training cells (seconds: they are tables of mean responses), predicts the same test cells from
the same control draws as any model (:func:`~pertflow.models.predict.predict_split`), scores them
with the same evaluator, and adds the noise ceiling (half of the real cells against the other
half, :func:`~pertflow.eval.ceiling.noise_ceiling`). :func:`verdict` reads a model's scores
against that table: its rank, and whether it beats the strongest baseline on each headline
metric, in the metric's own direction.

``pertflow evaluate`` and :func:`pertflow.api.evaluate_split` do this by default
(``--no-baselines`` / ``baselines=False`` skip it); with a DE cache folder the table is kept
there per split and read back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pertflow.data.view import SplitView
from pertflow.eval.ceiling import CEILING, noise_ceiling
from pertflow.eval.config import EvalConfig
from pertflow.eval.evaluator import evaluate, metric_direction, strongest
from pertflow.io import atomic_path
from pertflow.models.predict import predict_split
from pertflow.models.registry import BASELINES, model_class

#: The metrics a verdict reads, and their names in words.
HEADLINE = {"pearson_delta_top20_de": "top-20 DE Pearson delta", "edistance_pca": "E-distance"}
#: Differences within this are a tie.
TIE = 0.01


def yardstick(view: SplitView, inputs: Any, config: EvalConfig | None = None, de_cache: str | Path | None = None,
              progress: bool = False) -> pd.DataFrame:
    """The baselines' and the noise ceiling's mean scores on the split's test cells.

    Returns a table indexed by baseline name and ``ceiling``, one column per metric (the means
    over the test perturbations). ``inputs``: the real side
    (:func:`pertflow.api.evaluation_inputs`); with ``de_cache`` the table is cached there under
    the split's digest and read back by a later call on the same split.
    """
    config = config or EvalConfig()
    cache = (None if de_cache is None
             else Path(de_cache) / f"yardstick-{view.split.digest()}-{config.cell_eval_profile}.csv")
    if cache is not None and cache.is_file():
        return pd.read_csv(cache, index_col=0)
    rows = {}
    for name in BASELINES:
        baseline = model_class(name).from_view(view)
        baseline.fit(view)
        pred = predict_split(baseline, view)
        result = evaluate(inputs.real, pred, pert_col=inputs.pert_col, control=inputs.control,
                          context_col=inputs.context_col, dose_col=inputs.dose_col, train=inputs.train,
                          de_cache=de_cache, config=config, progress=progress)
        rows[name] = result.aggregate.loc["mean"]
    ceiling = noise_ceiling(inputs.real, pert_col=inputs.pert_col, control=inputs.control,
                            context_col=inputs.context_col, train=inputs.train, de_cache=de_cache, config=config,
                            progress=progress)
    rows[CEILING] = ceiling.aggregate.loc["mean"]
    table = pd.DataFrame(rows).T
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            table.to_csv(tmp)
    return table


def verdict(model: str, scores: pd.Series, table: pd.DataFrame) -> list[str]:
    """Sentences reading ``scores`` (a model's mean per metric) against :func:`yardstick`'s table:
    per headline metric, its rank among the baselines and whether it beats the strongest one."""
    lines = []
    baselines = [b for b in table.index if b != CEILING]
    for metric, words in HEADLINE.items():
        if metric not in scores or metric not in table.columns or pd.isna(scores[metric]):
            continue
        base = table.loc[baselines, metric].astype(float).dropna()
        if base.empty:
            continue
        best, reference, sign = strongest(base, metric)
        value = float(scores[metric])
        gain = (value - reference) * sign
        rank = 1 + int(np.sum((base.to_numpy() - value) * sign > 0))  # baselines better than the prediction
        way = "higher" if sign > 0 else "lower"
        if abs(gain) <= TIE:
            said = f"ties with the strongest baseline, {best}"
        elif gain > 0:
            said = f"beats every baseline (the strongest, {best}: {reference:.3f})"
        else:
            said = f"loses to {best} ({reference:.3f})"
        lines.append(f"{model} {said} on {words}: {value:.3f}, {way} is better; rank {rank} of {len(base) + 1}")
    return lines


def table_with_directions(scores: pd.Series | None, table: pd.DataFrame, model: str = "model") -> pd.DataFrame:
    """The model's row over the baselines' and the ceiling's, on the headline metrics, the columns
    named with their direction (``E-distance (lower is better)``)."""
    rows = table[[m for m in HEADLINE if m in table.columns]]
    if scores is not None:
        rows = pd.concat([scores[rows.columns].to_frame(model).T, rows])
    names = {m: f"{HEADLINE[m]} ({'higher' if metric_direction(m) == 'higher' else 'lower'} is better)"
             for m in rows.columns}
    return rows.astype(float).rename(columns=names)
