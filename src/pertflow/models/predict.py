"""A cell-eval-ready prediction of a split's test cells, from any model."""

from __future__ import annotations

from typing import Any, Callable

import anndata as ad
import numpy as np
import pandas as pd

from pertflow.faults import crash_point
from pertflow.data.dose import dose_label
from pertflow.data.spec import split_components
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
    control_map: Callable[[np.ndarray, str], np.ndarray] | None = None,
    shift_back: bool = False,
    control_unmap: Callable[[np.ndarray, str], np.ndarray] | None = None,
    label_map: dict[str, str] | None = None,
) -> ad.AnnData:
    """A cell-eval-ready prediction of a split's test cells.

    For every (perturbation, context) of the test cells, the model generates one cell from each of
    the context's visible control cells, each the same number of times (once, or as often as it
    takes to reach the group's real cells), where there are no more than ``predict.control_cells``
    of them: then the predicted mean shift carries no noise of a draw. Otherwise as many control
    cells as there are real test cells are drawn (without replacement when there are enough). The
    control cells drawn depend only on the split and ``seed``, not on the model (a model draws its
    noise from a generator of its own), so every model of a benchmark starts from the same cells.
    The file holds the predicted cells and, under the control label, the real control cells of
    every test context; ``X`` is non-negative log1p expression on the split's genes, in their
    order. Test cells are never read: only their labels and counts.

    With ``settings.interval`` (e.g. 0.9), ``uns["pertflow_interval"]`` holds per-gene intervals of
    each predicted mean shift (:func:`shift_intervals`): ``perturbation``, ``context`` (K,),
    ``mean``, ``lower``, ``upper`` (K, genes in the file's order), ``level``, ``n_seeds``. The
    written cells are the same with or without it.

    A test perturbation with a component the model knows nothing of (never trained on, no
    descriptor: :meth:`~pertflow.models.base.PerturbationModel.unread_components`) is predicted as
    "some perturbation"; ``uns["pertflow_unread"]`` names those perturbations (``perturbation``)
    and their unread components (``components``, ``;``-joined), and :func:`unread_note` says it in
    a sentence.

    The view's genes must be the model's, matched by name (in any order: the model reads them in
    its own order, the file has them in the view's).

    With a dose column (``spec.dose_col``), a test group is a condition: ``obs[pert_col]`` holds its
    label, ``drugA@1`` (what the evaluator scores as one group), and ``obs[dose_col]`` its dose (0
    for the controls).

    Parameters
    ----------
    control_map
        ((n, G), context) -> (n, G) on the model's genes: maps the control cells of a context (the
        file's label) that the model reads, e.g. an adapter's transport
        (:meth:`pertflow.adapt.Adapter.apply`: a shift, an affine or a quantile map onto the
        training data's scale, one per context where it was fitted so). The real control cells
        written to the file are not mapped: they are the evaluator's reference.
    label_map
        {file label: the model's label} for perturbations (whole labels or components) and
        contexts named differently in this file than in the model's training file; the file's
        column names may differ from the model's (labels are matched by value). The written
        prediction keeps the file's names and labels.
    shift_back
        Carry the predicted cells back onto the data's own scale: each predicted cell is its
        control cell *unmapped* plus the change the model predicted from the mapped one, read on
        the data's scale through ``control_unmap``: ``unmap(predicted) - unmap(mapped)`` (then
        clipped at 0); without ``control_unmap`` the change is added as it is. (Unmapping the
        predicted cells alone does not do: the mapped controls were clipped at 0, and on
        zero-inflated genes the shift that matches the source is several times the difference of
        the means.) A control cell's 0 is read through the map too, so that a gene induced from
        nothing gets the data's scale: on kang thinned to 30% of its depth
        (`benchmarks/adapter_thinned.py`, per-context quantile maps) adding a 0's change as it is
        left monocytes' interferon genes at the training file's scale: CD14+Mono held out,
        E-distance 4.82 that way against 2.30 through the map, at a cost in top-20 DE Pearson
        delta (0.957 against 0.926); CD4T, E-distance 0.466 against 0.357.
    control_unmap
        The inverse of ``control_map`` (:meth:`pertflow.adapt.Adapter.invert`): for a scale change
        (an affine or quantile map) a gene's change is divided by its scale, or read through the
        quantile map run backwards.
    """
    from pertflow.runtime import progress_bar

    data = view.data
    to_label = model_labels(data.spec, model.spec, label_map)
    if model.spec.pert_col != data.spec.pert_col or list(model.spec.context_cols) != list(data.spec.context_cols):
        print(f"note: the file's perturbation column '{data.spec.pert_col}' and context columns "
              f"{list(data.spec.context_cols)} are read as the model's '{model.spec.pert_col}' and "
              f"{list(model.spec.context_cols)} (labels matched by value"
              f"{', with the label map ' + str(label_map) if label_map else ''}).", flush=True)
    if set(view.genes) != set(model.genes) or len(view.genes) != len(model.genes):
        missing = [g for g in model.genes if g not in set(view.genes)]
        raise InputError(
            f"the split's genes differ from the model's ({len(view.genes)} vs {len(model.genes)}; e.g. missing "
            f"{missing[:5]}). Predict with the split the model was trained on, or retrain."
        )
    if model.spec.dose_col != data.spec.dose_col:
        raise InputError(
            f"the model was trained with dose column {model.spec.dose_col!r}, the data spec has "
            f"{data.spec.dose_col!r}: conditions with and without doses do not match. "
            + (f"Pass --dose-col {model.spec.dose_col}." if model.spec.dose_col
               else "Predict data without a dose column, or retrain.")
        )
    to_model = pd.Index(view.genes).get_indexer(model.genes)  # the view's columns, in the model's order
    check_known_labels(model, view, to_label)

    def model_controls(own: np.ndarray, context: str) -> np.ndarray:
        """The control cells the model reads: the data's own, or mapped by ``control_map``."""
        if control_map is None:
            return own
        mapped = np.asarray(control_map(own, context), dtype=np.float32)
        if mapped.shape != own.shape:
            raise InputError(f"the control map returned shape {mapped.shape} for controls of shape {own.shape}.")
        return mapped
    test_groups = view.test_groups()
    pools = {ctx: view.control_rows(ctx) for ctx in view.test_contexts}
    rng = np.random.default_rng(seed)  # the control cells drawn
    model_rng = np.random.default_rng([seed, 1])  # the model's noise
    config = settings or model.predict_config
    want_interval = config.interval is not None
    intervals: dict[str, list] = {"perturbation": [], "context": [], "mean": [], "lower": [], "upper": []}
    blocks, obs_rows = [], []
    context_cols = list(data.spec.context_cols)
    dose_col = data.spec.dose_col
    dose_of = (lambda label: {dose_col: data.spec.split_dose(label)[1] or 0.0}) if dose_col else (lambda label: {})
    items = sorted(test_groups.items(), key=lambda kv: (kv[0][1], kv[0][0]))

    def to_file(pred: np.ndarray, own: np.ndarray, controls: np.ndarray, context: str) -> np.ndarray:
        if shift_back and control_map is not None:
            change = (pred - controls if control_unmap is None  # read on the data's scale where it can be
                      else control_unmap(pred, context) - control_unmap(controls, context))
            pred = own + change
        cells = np.empty_like(pred, dtype=np.float32)
        cells[:, to_model] = np.clip(pred, 0, None)
        return cells

    sizes = {key: config.cells_to_generate(len(group), len(pools[key[1]])) for key, group in items}
    bar = progress_bar(sum(sizes.values()), "predicting", "cell", enabled=progress)

    def draw(pool: np.ndarray, n: int, generator: np.random.Generator) -> np.ndarray:
        """``n`` control rows of ``pool``: every one of them ``n / len(pool)`` times where every control is read."""
        if config.reads_every_control(len(pool)):  # n is then a whole multiple of the pool
            return np.tile(pool, n // len(pool))
        return generator.choice(pool, size=n, replace=len(pool) < n)

    for (pert, ctx), group in items:
        pool = pools[ctx]
        n_cells = sizes[(pert, ctx)]
        own_cells = view.expression.get(draw(pool, n_cells, rng))  # in the view's gene order
        own = own_cells[:, to_model]
        controls = model_controls(own, ctx)
        crash_point("predict")
        pred = model.generate(controls, to_label(pert), to_label(ctx), model_rng, settings)
        if pred.shape != (n_cells, len(model.genes)) or not np.isfinite(pred).all():
            raise RuntimeError(f"model '{model.name}' returned a bad prediction for {pert} in {ctx}: shape "
                               f"{pred.shape}")
        cells = to_file(pred, own, controls, ctx)
        blocks.append(cells)
        if want_interval:
            changes = [cells - own_cells]
            for extra in range(1, config.n_seeds):  # own generators: the written cells do not change
                extra_cells = view.expression.get(draw(pool, n_cells, np.random.default_rng([seed, 2, extra])))
                own = extra_cells[:, to_model]
                controls = model_controls(own, ctx)
                more = model.generate(controls, to_label(pert), to_label(ctx), np.random.default_rng([seed, 3, extra]),
                                      settings)
                changes.append(to_file(more, own, controls, ctx) - extra_cells)
            mean, lower, upper = shift_intervals(np.concatenate(changes), config.interval, config.n_bootstrap,
                                                 np.random.default_rng([seed, 4]))
            for key, value in zip(intervals, (pert, ctx, mean, lower, upper)):
                intervals[key].append(value)
        bar.update(n_cells)
        first = data.adata.obs.iloc[group[0]]
        obs_rows += [{data.spec.pert_col: pert, **dose_of(pert), **{c: str(first[c]) for c in context_cols},
                      "source": "predicted"}] * n_cells
    bar.close()
    for ctx, pool in pools.items():
        blocks.append(view.expression.get(pool))
        ctx_obs = data.adata.obs.iloc[pool]
        obs_rows += [{data.spec.pert_col: data.spec.control, **dose_of(data.spec.control),
                      **{c: str(v[c]) for c in context_cols}, "source": "control"} for _, v in ctx_obs.iterrows()]
    obs = pd.DataFrame(obs_rows)
    obs.index = [f"pred_{i}" for i in range(len(obs))]
    for col in obs.columns:
        if col != dose_col:
            obs[col] = pd.Categorical(obs[col])
    out = ad.AnnData(X=np.concatenate(blocks), obs=obs, var=pd.DataFrame(index=list(view.genes)))  # the view's order
    out.uns["pertflow"] = {"model": model.name, "split": view.split.name or "", "seed": seed}
    unread = {pert: model.unread_components(to_label(pert)) for pert in sorted({p for p, _ in test_groups})}
    unread = {pert: components for pert, components in unread.items() if components}
    if unread:
        out.uns["pertflow_unread"] = {"perturbation": np.array(list(unread), dtype=str),
                                      "components": np.array([";".join(c) for c in unread.values()], dtype=str)}
    if want_interval:
        out.uns["pertflow_interval"] = {
            "perturbation": np.array(intervals["perturbation"], dtype=str),
            "context": np.array(intervals["context"], dtype=str),
            **{k: np.stack(intervals[k]).astype(np.float32) for k in ("mean", "lower", "upper")},
            "level": float(config.interval), "n_seeds": int(config.n_seeds),
        }
    return out


def unread_note(pred: ad.AnnData, shown: int = 5) -> str | None:
    """A sentence naming the predicted perturbations with components the model knows nothing of
    (``uns["pertflow_unread"]`` of :func:`predict_split`), or None where there are none."""
    found = pred.uns.get("pertflow_unread")
    if found is None or len(found["perturbation"]) == 0:
        return None
    pairs = [f"{p} ({c.replace(';', ', ')})" for p, c in zip(found["perturbation"], found["components"])]
    more = f" and {len(pairs) - shown} more" if len(pairs) > shown else ""
    return (f"{len(pairs)} test perturbation(s) hold components the model was never trained on and has no "
            f"descriptor for, predicted as 'some perturbation': {', '.join(pairs[:shown])}{more} "
            "(uns['pertflow_unread']). Descriptor vectors give a model something to read: model.descriptor=gene "
            "(a target that is a measured gene), latent-shift's model.descriptor=file, or the data's descriptors in "
            "uns (data spec descriptors_key) for the token-reading models.")


def shift_intervals(changes: np.ndarray, level: float, n_bootstrap: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-gene percentile-bootstrap interval of the predicted mean shift ``mean(changes)``.

    ``changes`` (n, G) are generated cells minus the control cells they were generated from (of
    one or several generations, pooled): paired so, the spread of the control cells themselves is
    not read as uncertainty of the model's shift (where a group is generated from every control of
    its context, the written cells' mean shift against those controls' mean is exactly this mean).
    Returns the mean shift and the interval's lower and upper ends, each (G,)."""
    changes = np.asarray(changes, dtype=np.float64)
    n = len(changes)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap) / n  # (B, n): one resample a row
    boot = weights @ changes
    tail = (1 - level) / 2
    lower, upper = np.quantile(boot, [tail, 1 - tail], axis=0)
    return changes.mean(axis=0), lower, upper


def interval_table(pred: ad.AnnData) -> pd.DataFrame | None:
    """The intervals of a prediction (:func:`predict_split` with ``predict.interval``) as a long
    table: perturbation, context, gene, mean, lower, upper; None when it has none."""
    found = pred.uns.get("pertflow_interval")
    if found is None:
        return None
    k, genes = len(found["perturbation"]), pred.var_names.astype(str)
    return pd.DataFrame({
        "perturbation": np.repeat(np.asarray(found["perturbation"], dtype=str), len(genes)),
        "context": np.repeat(np.asarray(found["context"], dtype=str), len(genes)),
        "gene": np.tile(genes, k),
        **{key: np.asarray(found[key]).reshape(-1) for key in ("mean", "lower", "upper")},
    })


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


def predict_cells(
    model: PerturbationModel,
    controls: ad.AnnData,
    conditions: str | list[str],
    *,
    context: str | None = None,
    n_cells: int | None = None,
    seed: int = 0,
    settings: PredictConfig | None = None,
) -> ad.AnnData:
    """Cells of each condition generated from the control cells of an AnnData: no split file needed.

    Parameters
    ----------
    controls
        Control cells of one context: log1p-normalised expression in ``X``, genes by name in
        ``var_names`` (the model's genes must all be there; others are ignored).
    conditions
        Perturbation names as the model knows them (``"KLF1"``, ``"CEBPE+KLF1"``); for a model
        trained with a dose column, conditions at a dose: ``"drugA@1"`` (any dose).
    context
        The context (cell type, line, donor) the controls are from, as in the training data;
        found in ``controls.obs`` (the model's context columns) or, for a model trained without
        contexts, not needed.
    n_cells
        Cells per condition (default: one per control cell; controls are drawn with replacement
        when fewer).
    seed
        Seed of the control draw and the model's noise.

    Returns
    -------
    ad.AnnData
        The generated cells: ``obs[pert_col]`` the condition, ``var_names`` the model's genes.
    """
    import scipy.sparse as sp

    from pertflow.data.dataset import CONTEXT_JOIN, SINGLE_CONTEXT

    if isinstance(conditions, str):
        conditions = [conditions]
    if not isinstance(controls, ad.AnnData) or controls.n_obs == 0:
        raise InputError("controls must be an AnnData with at least one control cell (log1p expression in X).")
    genes = pd.Index(controls.var_names.astype(str))
    missing = [g for g in model.genes if g not in genes]
    if missing:
        raise InputError(f"the controls lack {len(missing)} of the model's genes (e.g. {missing[:5]}). Give control "
                         "cells with the genes the model was trained on.")
    x = controls.X[:, genes.get_indexer(model.genes)]
    x = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)
    if x.size and (x.min() < 0 or x.max() >= 15 or np.all(np.modf(x)[0] == 0)):
        raise InputError("the controls' X does not look like log1p-normalised expression (negative, >= 15, or whole "
                         "numbers like raw counts). Apply sc.pp.normalize_total and sc.pp.log1p first.")
    cols = list(model.spec.context_cols)
    if context is None and not cols:
        context = SINGLE_CONTEXT
    if context is None and all(c in controls.obs for c in cols):
        found = pd.unique(pd.Series([CONTEXT_JOIN.join(map(str, v)) for v in zip(*(controls.obs[c] for c in cols))]))
        if len(found) == 1:
            context = str(found[0])
    if context is None:
        raise InputError(f"give the controls' context (context=..., values of {cols} joined by '{CONTEXT_JOIN}'): the "
                         "model was trained on several, and the controls do not name a single one.")
    rng, model_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    n = n_cells or controls.n_obs
    blocks, labels = [], []
    for condition in conditions:
        chosen = rng.choice(controls.n_obs, size=n, replace=controls.n_obs < n)
        cells = model.generate(x[chosen], condition, context, model_rng, settings)
        blocks.append(np.clip(cells, 0, None).astype(np.float32))
        labels += [condition] * n
    obs = pd.DataFrame({model.spec.pert_col: pd.Categorical(labels)}, index=[f"gen_{i}" for i in range(len(labels))])
    if model.spec.dose_col is not None:
        obs[model.spec.dose_col] = [model.spec.split_dose(label)[1] or 0.0 for label in labels]
    for col, value in zip(cols, context.split(CONTEXT_JOIN) if cols else []):
        obs[col] = value
    return ad.AnnData(X=np.concatenate(blocks), obs=obs, var=pd.DataFrame(index=list(model.genes)))


def model_labels(spec: Any, model_spec: Any, label_map: dict[str, str] | None) -> Callable[[str], str]:
    """File label -> the model's label: ``label_map`` (file label -> model label) for a whole label,
    else for each component of a combination; a label without an entry stays as it is."""
    label_map = dict(label_map or {})

    def to_label(label: str) -> str:
        if label in label_map or not label_map:
            return label_map.get(label, label)
        name, dose = spec.split_dose(label)
        parts = split_components(name, spec)
        if not parts:  # the control label
            return label
        mapped = (model_spec.combo_delim or "+").join(label_map.get(c, c) for c in parts)
        return mapped if dose is None else dose_label(mapped, dose)

    return to_label


def check_known_labels(model: PerturbationModel, view: SplitView, to_label: Callable[[str], str] = str) -> None:
    """Say, per label, which test perturbations the model has never seen (a component that is
    neither a perturbation nor a gene of the file it was trained on, after ``to_label``), or refuse
    them for a model that can only predict no change for such a label (``predicts_unknown_labels``)."""
    tests = sorted({p for p, _ in view.test_groups()})
    spec = model.spec  # to_label gives the model's labels
    unknown = {p: [c for c in split_components(to_label(p), spec) if c not in model.vocab] for p in tests}
    unknown = {p: parts for p, parts in unknown.items() if parts}
    if not unknown:
        return
    names = sorted({c for parts in unknown.values() for c in parts})
    if not model.predicts_unknown_labels:
        raise InputError(
            f"model '{model.name}' has never seen {names[:5]}{' ...' if len(names) > 5 else ''} (not a perturbation or "
            "gene of the file it was trained on) and can only predict no change for them. If they are training labels "
            "under other names, map them (--map-labels MODEL_LABEL=FILE_LABEL); else predict them with a model that "
            "reads unseen perturbations (mean, linear, a flow).")
    for pert, parts in unknown.items():
        print(f"note: '{pert}': the model has never seen {parts} (not a perturbation or gene of the file it was "
              "trained on); predicted as an unseen perturbation. If it is a training label under another name, map it "
              "(--map-labels MODEL_LABEL=FILE_LABEL).", flush=True)
