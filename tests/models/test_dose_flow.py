"""Dose end to end: a tiny cfm trained on a dose-response predicts an unseen middle dose between its
neighbours; the baselines interpolate an unmeasured dose (leave-one-out safe); the flow models that
do not read dose refuse such data; prediction files and the evaluator keep one group per dose."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.synthetic import make_synthetic
from pertflow.data.view import SplitView
from pertflow.errors import InputError
from pertflow.eval.evaluator import _dose_conditions
from pertflow.models import registry
from pertflow.models.base import PerturbationModel
from pertflow.models.baselines import Additive, Linear
from pertflow.models.ccfm.config import CCFMConfig
from pertflow.models.ccfm.model import CCFM
from pertflow.models.cfm.config import CFMConfig
from pertflow.models.cfm.model import CFM
from pertflow.models.config import PredictConfig
from pertflow.models.predict import predict_split
from pertflow.models.prior import Prior
from pertflow.train import TrainConfig

DOSES = (0.1, 0.3, 1.0, 3.0, 10.0)
DRUGS = ("drug_00", "drug_01", "drug_02")
CTX = "line_A"  # make_synthetic's one cell line
# the flow anchored on the additive prior, which gives an unmeasured dose the log-dose interpolation
# of its drug's measured ones (a tiny flow with no prior learns each drug's mean response over its
# doses in a few hundred steps, but not yet how the dose moves it: see the report of issue 19)
TINY = CFMConfig(d_model=16, n_heads=2, n_layers=1, genes_per_step=30, dropout=0.0, source="control", source_noise=0.1,
                 prior="additive", unknown_perturbation_p=0.0)
FLOW = PredictConfig(ode_steps=4, ode_method="midpoint", mode="prior-mean")  # the flow's cells on the prior's mean


@pytest.fixture(scope="module")
def dosed():
    adata = make_synthetic(n_genes=30, n_contexts=1, n_singles=3, n_combos=0, cells_per_group=60, n_effect_genes=12,
                           controls_per_context=200, genetic=False, doses=DOSES, effect_scale=1.2, seed=2)
    data = PerturbationData.from_anndata(adata)
    view = SplitView(data, make_split(data, "dose", val_fraction=0.0))  # every drug's middle dose, 1, held out
    control = data.log_expression(np.flatnonzero(data.is_control)).mean(0)
    shifts = {p: data.log_expression(np.flatnonzero(data.perturbations == p)).mean(0) - control
              for p in set(data.perturbations) - {"control"}}
    strong = {d: np.abs(adata.uns["synthetic"]["lfc"][1 + i, 0]) > 0.6 for i, d in enumerate(DRUGS)}  # clearly moved genes
    return view, shifts, strong


def log_weight(low: float, dose: float, high: float) -> float:
    return (np.log10(dose) - np.log10(low)) / (np.log10(high) - np.log10(low))


def test_a_tiny_cfm_predicts_an_unseen_middle_dose_between_its_neighbours(dosed, tmp_path):
    view, shifts, strong = dosed
    assert view.split.test_perturbations == [f"{d}@1" for d in DRUGS]
    model = CFM.from_view(view, TINY, FLOW)
    model.fit(view, TrainConfig(max_steps=200, batch_size=32, lr=3e-3, val_every=10**6, checkpoint_every=10**6,
                                log_every=50, progress=False), tmp_path)
    assert float(model.module.perturbation_encoder.dose[-1].weight.detach().abs().sum()) > 0  # the loss reached the dose embedding
    pred = predict_split(model, view, settings=FLOW)
    predicted = (pred.obs["source"] == "predicted").to_numpy()
    assert set(pred.obs.loc[predicted, "perturbation"].astype(str)) == set(view.split.test_perturbations)
    assert (pred.obs.loc[predicted, "dose"] == 1.0).all() and (pred.obs.loc[~predicted, "dose"] == 0).all()
    control = pred.X[~predicted].mean(0)
    between, error, no_change = [], [], []
    for d in DRUGS:
        cells = pred.X[(pred.obs["perturbation"].astype(str) == f"{d}@1").to_numpy()]
        middle, g = cells.mean(0) - control, strong[d]
        low, high, truth = shifts[f"{d}@0.3"][g], shifts[f"{d}@3"][g], shifts[f"{d}@1"][g]
        between.append((np.minimum(low, high) <= middle[g]) & (middle[g] <= np.maximum(low, high)))
        error.append(np.abs(middle[g] - truth).mean())
        no_change.append(np.abs(truth).mean())
    assert np.concatenate(between).mean() > 0.65, np.concatenate(between).mean()  # most (1 in 15 genes is 0.07)
    assert np.mean(error) < np.mean(no_change), (error, no_change)  # closer to the truth than no change

    # any dose can be asked for: the same drug's cells move further at a higher dose, along its response
    controls = view.expression.get(view.control_rows(CTX)[:60])
    size = {v: [(np.sign(shifts[f"{d}@10"][strong[d]]) * (model.generate(controls, f"{d}@{v:g}", CTX,
             np.random.default_rng(0), FLOW).mean(0) - controls.mean(0))[strong[d]]).mean() for d in DRUGS] for v in (0.3, 3.0)}
    assert np.mean(size[3.0]) > np.mean(size[0.3]) + 0.2, size

    model.save(tmp_path / "run")
    again = PerturbationModel.load(tmp_path / "run")
    a = model.generate(controls[:10], "drug_01@1", CTX, np.random.default_rng(3), FLOW)
    np.testing.assert_array_equal(a, again.generate(controls[:10], "drug_01@1", CTX, np.random.default_rng(3), FLOW))


def test_the_flow_reads_the_dose_in_its_loss_and_its_sampling(dosed):
    view = dosed[0]
    model = CFM.from_view(view, CFMConfig(d_model=16, n_heads=2, n_layers=1, dropout=0.0), PredictConfig(ode_steps=2))
    module, dose_net = model.module, model.module.perturbation_encoder.dose
    batches = view.paired_batches(view.rows.train, 16, 0, model.max_components)
    batch = batches.next_batch()
    assert "dose" in batch
    module.loss(batch).loss.backward()
    assert dose_net[-1].weight.grad.abs().sum() > 0  # the loss reaches the dose embedding
    module.zero_grad()
    module.loss({k: v for k, v in batch.items() if k != "dose"}).loss.backward()
    assert dose_net[-1].weight.grad is None or dose_net[-1].weight.grad.abs().sum() == 0  # no dose: nothing reaches it
    torch.nn.init.normal_(dose_net[-1].weight)  # a trained dose embedding: another dose, other cells
    controls = view.expression.get(view.control_rows(CTX)[:8])
    shift = np.zeros(len(model.genes), np.float32)
    cells = {v: model.own_cells(controls, f"drug_00@{v:g}", CTX, shift, np.random.default_rng(0), model.predict_config, module=module)
             for v in (0.3, 3.0)}
    assert np.abs(cells[0.3] - cells[3.0]).mean() > 1e-3


def test_baselines_interpolate_an_unmeasured_dose_in_log_dose(dosed):
    view = dosed[0]
    additive = Additive.from_view(view)
    additive.fit(view)
    low, high = additive.predicted_delta("drug_00@0.3", CTX), additive.predicted_delta("drug_00@3", CTX)
    w = log_weight(0.3, 1.0, 3.0)
    np.testing.assert_allclose(additive.predicted_delta("drug_00@1", CTX), (1 - w) * low + w * high, atol=1e-6)
    np.testing.assert_allclose(additive.predicted_delta("drug_00@30", CTX), additive.predicted_delta("drug_00@10", CTX))
    # leave one out: a trained dose's shift is rebuilt from the other doses (1 is held out: 0.3 and 10)
    w = log_weight(0.3, 3.0, 10.0)
    rebuilt = (1 - w) * low + w * additive.predicted_delta("drug_00@10", CTX)
    np.testing.assert_allclose(additive.without(("drug_00@3", CTX)).predicted_delta("drug_00@3", CTX), rebuilt, atol=1e-6)
    prior = Prior.fit("additive", view)
    np.testing.assert_allclose(prior.training_delta("drug_00@3", CTX), rebuilt, atol=1e-6)  # never its own response
    linear = Linear.from_view(view)
    linear.fit(view)  # its features name the drug: one fit over the drug's doses
    np.testing.assert_allclose(linear.predicted_delta("drug_00@1", CTX), linear.predicted_delta("drug_00@0.3", CTX))


def test_models_that_do_not_read_dose_refuse_it_and_predictions_must_agree_on_it(dosed):
    view = dosed[0]
    with pytest.raises(InputError, match="does not condition on dose"):
        CCFM.from_view(view, CCFMConfig(d_model=16, n_heads=2, n_layers=1, foundation_d_model=16, foundation_layers=1))
    # every registered model either reads dose or refuses it (latent-shift and scgpt-generator
    # once read drugA@1 as a drug of its own): only cfm, the baselines, target-effect (the mean
    # over conditions where no target is a measured gene) and additive-mean read it
    readers = {name for name in registry.model_names() if registry.model_class(name).reads_dose}
    assert readers == {"cfm", "target-effect", "additive-mean", *registry.BASELINES}
    for name in registry.model_names():
        if name not in readers:
            with pytest.raises(InputError, match="does not condition on dose"):
                registry.model_class(name).from_view(view)
    data = view.data
    plain = PerturbationData.from_anndata(data.adata, spec=data.spec.replace(dose_col=None))
    undosed = CFM.from_view(SplitView(plain, make_split(plain, "random")), CFMConfig(d_model=16, n_heads=2, n_layers=1))
    with pytest.raises(InputError, match="dose column"):
        predict_split(undosed, view)


def test_a_run_saved_before_doses_were_modelled_loads_without_them(dosed, tmp_path):
    # pertflow recorded any column named dose in the run's spec before it modelled doses (norman's
    # dose column holds '1' and '1+1'); such a run's network has no dose embedding
    data = dosed[0].data
    plain = PerturbationData.from_anndata(data.adata, spec=data.spec.replace(dose_col=None))
    view = SplitView(plain, make_split(plain, "random"))
    # one Euler step for the fit's validation (the default, RK4 x 20, is 80 network calls a cell); FLOW predicts
    model = CFM.from_view(view, CFMConfig(d_model=16, n_heads=2, n_layers=1), PredictConfig(ode_steps=1, ode_method="euler"))
    model.fit(view, TrainConfig(max_steps=2, batch_size=16, val_every=10**6, checkpoint_every=10**6, progress=False), tmp_path)
    model.save(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    meta["spec"]["dose_col"] = "dose"
    (tmp_path / "run" / "model.json").write_text(json.dumps(meta))
    again = PerturbationModel.load(tmp_path / "run")
    assert again.spec.dose_col is None
    controls = view.expression.get(view.control_rows(CTX)[:10])
    np.testing.assert_array_equal(model.generate(controls, "drug_01", CTX, np.random.default_rng(3), FLOW),
                                  again.generate(controls, "drug_01", CTX, np.random.default_rng(3), FLOW))


def test_the_evaluator_scores_each_dose_as_its_own_group():
    obs = pd.DataFrame({"drug": ["control", "a", "a", "b@3"], "dose": [0.0, 1.0, 10.0, 3.0]})
    adata = ad.AnnData(np.zeros((4, 2), np.float32), obs=obs)
    notes: list[str] = []
    out = _dose_conditions(adata, "pred", "drug", "control", "dose", notes)
    assert list(out.obs["drug"]) == ["control", "a@1", "a@10", "b@3"] and notes
    assert list(adata.obs["drug"]) == ["control", "a", "a", "b@3"]  # the caller's object is left alone
    with pytest.raises(InputError, match="no obs\\['dose'\\]"):
        _dose_conditions(ad.AnnData(np.zeros((4, 2), np.float32), obs=obs[["drug"]]), "pred", "drug", "control", "dose", [])
