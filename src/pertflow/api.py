"""The workflow verbs over files, as the CLI and the benchmark runner use them.

``train`` fits a registered model on a split and writes a run folder; ``predict`` writes a
cell-eval-ready prediction of a split's test cells. Both take paths, so they are what another
tool scripts against; the classes underneath (:class:`~pertflow.data.dataset.PerturbationData`,
:class:`~pertflow.data.splits.Split`, the models) are the Python API.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad

from pertflow.configs import build, load_sections
from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import Split
from pertflow.errors import InputError
from pertflow.io import write_h5ad
from pertflow.models.base import FitData, PerturbationModel, predict_split
from pertflow.models.registry import model_class
from pertflow.train.config import TrainConfig


def train(
    model: str,
    data: str | Path | PerturbationData,
    split: str | Path | Split,
    out: str | Path,
    config: str | Path | None = None,
    sets: list[str] | None = None,
    resume: bool = False,
    backed: bool = False,
    spec: Any = None,
    **spec_keys: Any,
) -> PerturbationModel:
    """Train ``model`` on the training cells of ``split`` and save it into the run folder ``out``."""
    out = Path(out)
    if (out / "model.json").is_file() and not resume:
        raise InputError(f"{out} already holds a trained model. Choose a new --out, or delete that folder first.")
    cls = model_class(model)
    sections = load_sections(config, sets)
    model_config = build(cls.config_class, sections["model"], "model")
    train_config = build(TrainConfig, sections["train"], "train")
    own = not isinstance(data, PerturbationData)
    dataset = PerturbationData.read(data, backed=backed, spec=spec, **spec_keys) if own else data
    try:
        split = split if isinstance(split, Split) else Split.load(split)
        fit_data = FitData.prepare(dataset, split)
        instance = cls.from_fit_data(fit_data, model_config)
        instance.fit(fit_data, train_config, out, resume=resume)
        instance.save(out)
    finally:
        if own:
            dataset.close()
    return instance


def predict(
    run: str | Path | PerturbationModel,
    data: str | Path | PerturbationData,
    split: str | Path | Split,
    out: str | Path | None = None,
    seed: int = 0,
    sets: list[str] | None = None,
    backed: bool = False,
    spec: Any = None,
    **spec_keys: Any,
) -> ad.AnnData:
    """Predict the test cells of ``split`` with a trained model; write them to ``out`` if given."""
    model = run if isinstance(run, PerturbationModel) else PerturbationModel.load(run)
    changes = load_sections(None, sets)
    if changes["train"]:
        raise InputError("prediction takes only model.* settings (e.g. model.ode_steps=10).")
    if changes["model"]:
        build(type(model.config), {**model.config.__dict__, **changes["model"]}, "model")
        model.replace_config(**changes["model"])
    own = not isinstance(data, PerturbationData)
    dataset = PerturbationData.read(data, backed=backed, spec=spec or model.spec, **spec_keys) if own else data
    try:
        split = split if isinstance(split, Split) else Split.load(split)
        pred = predict_split(model, dataset, split, seed=seed)
    finally:
        if own:
            dataset.close()
    if out is not None:
        write_h5ad(out, pred)
    return pred


@dataclass
class EvaluationInputs:
    """The real side of an evaluation of a split: what every prediction of it is scored against.

    Attributes
    ----------
    split
        The split.
    real
        The real test cells plus the test contexts' visible control cells (dense log1p).
    train
        The real training cells (CSR log1p), for the PCA and the Systema reference.
    context_col
        The context column to evaluate by: the split's, else the spec's when the test cells span
        several contexts, else None.
    """

    split: Split
    real: ad.AnnData
    train: ad.AnnData
    context_col: str | None


def evaluation_inputs(data: PerturbationData, split: Split) -> EvaluationInputs:
    """Build the real cells a prediction of ``split`` is scored against (shared across models)."""
    from pertflow.models.base import real_test_anndata

    real = real_test_anndata(data, split)
    rows = split.rows(data)
    genes = data.gene_indices(split.genes) if split.genes is not None else None
    train_cells = data.to_anndata(rows.train, genes, sparse=True)
    train_cells.var_names = real.var_names
    return EvaluationInputs(split, real, train_cells, split.context_col or data.single_context_col(rows.test))


def evaluate_split(
    data: str | Path | PerturbationData,
    split: str | Path | Split,
    pred: str | Path | ad.AnnData,
    out: str | Path | None = None,
    de_cache: str | Path | None = None,
    config: Any = None,
    backed: bool = False,
    spec: Any = None,
    inputs: EvaluationInputs | None = None,
    **spec_keys: Any,
):
    """Score a prediction file of a split's test cells (pertflow's or another tool's).

    Returns the :class:`~pertflow.eval.evaluator.EvalResult`; with ``out``, writes
    ``results.csv`` (one row per perturbation and context) and ``agg_results.csv`` there.
    ``inputs`` (from :func:`evaluation_inputs`) skips rebuilding the real side.
    """
    from pertflow.eval.evaluator import EvalConfig, evaluate

    own = not isinstance(data, PerturbationData)
    dataset = PerturbationData.read(data, backed=backed, spec=spec, **spec_keys) if own else data
    try:
        if inputs is None:
            inputs = evaluation_inputs(dataset, split if isinstance(split, Split) else Split.load(split))
        pert_col, control = dataset.spec.pert_col, dataset.spec.control
    finally:
        if own:
            dataset.close()
    if not isinstance(pred, ad.AnnData):
        pred = ad.read_h5ad(pred)
    return evaluate(
        inputs.real, pred, pert_col=pert_col, control=control, context_col=inputs.context_col, train=inputs.train,
        outdir=out, de_cache=de_cache, config=config or EvalConfig(),
    )
