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
    control_shift: np.ndarray | None = None,
    shift_back: bool = False,
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

    The view's genes must be the model's, matched by name (in any order: the model reads them in
    its own order, the file has them in the view's).

    Parameters
    ----------
    control_shift
        (G,) on the model's genes: added to the control cells the model reads (then clipped at 0),
        e.g. an adapter's shift (:mod:`pertflow.adapt`). The real control cells written to the
        file are not shifted: they are the evaluator's reference.
    shift_back
        Carry the predicted cells back onto the data's own scale: each predicted cell is its
        control cell *unshifted* plus the change the model predicted from the shifted one (then
        clipped at 0). (Subtracting the shift instead does not undo it: the shifted controls were
        clipped at 0, and on zero-inflated genes the shift that matches the source is several
        times the difference of the means.)
    """
    from tqdm.auto import tqdm

    data = view.data
    if model.spec.pert_col != data.spec.pert_col:
        raise InputError(
            f"the model was trained with perturbation column '{model.spec.pert_col}', the data spec uses "
            f"'{data.spec.pert_col}'. Pass --pert-col {model.spec.pert_col}."
        )
    if set(view.genes) != set(model.genes) or len(view.genes) != len(model.genes):
        missing = [g for g in model.genes if g not in set(view.genes)]
        raise InputError(
            f"the split's genes differ from the model's ({len(view.genes)} vs {len(model.genes)}; e.g. missing "
            f"{missing[:5]}). Predict with the split the model was trained on, or retrain."
        )
    to_model = pd.Index(view.genes).get_indexer(model.genes)  # the view's columns, in the model's order
    if control_shift is not None:
        control_shift = np.asarray(control_shift, dtype=np.float32)
        if control_shift.shape != (len(model.genes),):
            raise InputError(f"the control shift has shape {control_shift.shape}; the model has {len(model.genes)} genes.")
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
        controls = own = view.expression.get(chosen)[:, to_model]
        if control_shift is not None:
            controls = np.clip(own + control_shift, 0, None)
        pred = model.generate(controls, pert, ctx, model_rng, settings)
        if pred.shape != (len(group), len(model.genes)) or not np.isfinite(pred).all():
            raise RuntimeError(f"model '{model.name}' returned a bad prediction for {pert} in {ctx}: shape {pred.shape}")
        if shift_back and control_shift is not None:
            pred = own + (pred - controls)
        cells = np.empty_like(pred, dtype=np.float32)
        cells[:, to_model] = np.clip(pred, 0, None)
        blocks.append(cells)
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
    out = ad.AnnData(X=np.concatenate(blocks), obs=obs, var=pd.DataFrame(index=list(view.genes)))  # the view's order
    out.uns["pertflow"] = {"model": model.name, "split": view.split.name or "", "seed": seed}
    return out


def prediction_means(pred: ad.AnnData, pert_col: str, context_col: str | None = None) -> pd.DataFrame:
    """Mean predicted cell of every perturbation (perturbation x gene; rows per perturbation and
    context when the predicted cells span several values of ``context_col``), from a file of
    :func:`predict_split` (the real control cells it holds are left out)."""
    predicted = (pred.obs["source"] == "predicted").to_numpy() if "source" in pred.obs else np.ones(pred.n_obs, bool)
    several = context_col is not None and pred.obs.loc[predicted, context_col].nunique() > 1
    keys = [pert_col] + ([context_col] if several else [])
    obs = pred.obs.loc[predicted, keys].astype(str)
    x = pred.X[predicted]
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    means = pd.DataFrame(x, columns=pred.var_names.astype(str)).groupby([obs[k].to_numpy() for k in keys]).mean()
    means.index.names = keys
    return means
