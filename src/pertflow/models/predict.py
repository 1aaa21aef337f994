"""A cell-eval-ready prediction of a split's test cells, from any model."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from pertflow.data.view import SplitView
from pertflow.errors import InputError
from pertflow.models.base import PerturbationModel
from pertflow.models.config import PredictConfig


def predict_split(
    model: PerturbationModel,
    view: SplitView,
    seed: int = 0,
    settings: PredictConfig | None = None,
    progress: bool = False,
) -> ad.AnnData:
    """A cell-eval-ready prediction of a split's test cells.

    For every (perturbation, context) of the test cells, as many control cells of that context
    as there are real test cells are drawn (without replacement when there are enough) from the
    visible controls, and the model generates one cell from each. The control cells drawn depend
    only on the split and ``seed``, not on the model (a model draws its noise from a generator of
    its own), so every model of a benchmark starts from the same cells. The file holds the predicted
    cells and, under the control label, the real control cells of every test context; ``X`` is
    non-negative log1p expression on the split's genes, in their order. Test cells are never
    read: only their labels and counts.
    """
    from tqdm.auto import tqdm

    data = view.data
    if model.spec.pert_col != data.spec.pert_col:
        raise InputError(
            f"the model was trained with perturbation column '{model.spec.pert_col}', the data spec uses "
            f"'{data.spec.pert_col}'. Pass --pert-col {model.spec.pert_col}."
        )
    if view.genes != list(model.genes):
        missing = [g for g in model.genes if g not in set(view.genes)]
        raise InputError(
            f"the split's genes differ from the model's ({len(view.genes)} vs {len(model.genes)}; e.g. missing "
            f"{missing[:5]}). Predict with the split the model was trained on, or retrain."
        )
    test_groups = view.test_groups()
    pools = {ctx: view.control_rows(ctx) for ctx in view.test_contexts}
    rng = np.random.default_rng(seed)  # the control cells drawn
    model_rng = np.random.default_rng([seed, 1])  # the model's noise
    blocks, obs_rows = [], []
    context_cols = list(data.spec.context_cols)
    items = sorted(test_groups.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    for (pert, ctx), group in tqdm(items, desc="predicting", unit="group", disable=None if progress else True):
        pool = pools[ctx]
        chosen = rng.choice(pool, size=len(group), replace=len(pool) < len(group))
        pred = model.generate(view.expression.get(chosen), pert, ctx, model_rng, settings)
        if pred.shape != (len(group), len(model.genes)) or not np.isfinite(pred).all():
            raise RuntimeError(f"model '{model.name}' returned a bad prediction for {pert} in {ctx}: shape {pred.shape}")
        blocks.append(np.clip(pred, 0, None).astype(np.float32))
        first = data.adata.obs.iloc[group[0]]
        obs_rows += [{data.spec.pert_col: pert, **{c: str(first[c]) for c in context_cols}, "source": "predicted"}] * len(group)
    for ctx, pool in pools.items():
        blocks.append(view.expression.get(pool))
        ctx_obs = data.adata.obs.iloc[pool]
        obs_rows += [{data.spec.pert_col: data.spec.control, **{c: str(v[c]) for c in context_cols}, "source": "control"} for _, v in ctx_obs.iterrows()]
    obs = pd.DataFrame(obs_rows)
    obs.index = [f"pred_{i}" for i in range(len(obs))]
    for col in obs.columns:
        obs[col] = pd.Categorical(obs[col])
    out = ad.AnnData(X=np.concatenate(blocks), obs=obs, var=pd.DataFrame(index=model.genes))
    out.uns["pertflow"] = {"model": model.name, "split": view.split.name or "", "seed": seed}
    return out
