"""The baselines compute what they claim, on data whose responses are known."""

import numpy as np
import pytest

from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.synthetic import make_synthetic
from pertflow.data.view import SplitView
from pertflow.models.base import PerturbationModel
from pertflow.models.config import PredictConfig
from pertflow.models.predict import predict_split
from pertflow.models.baselines import Additive, ContextShift, Linear, LinearConfig, NoChange, TrainingMean
from pertflow.models.registry import BASELINES, model_class


@pytest.fixture(scope="module")
def combo(synthetic_adata):
    data = PerturbationData.from_anndata(synthetic_adata)
    fit = SplitView(data, make_split(data, "combinations", seen=[2]))
    return data, fit


def observed_response(fit, pert, ctx):
    groups = fit.groups(fit.rows.train)
    return fit.expression.get(groups[(pert, ctx)]).mean(0) - fit.expression.get(groups[("control", ctx)]).mean(0)


def test_responses_are_means_against_the_same_contexts_controls(combo):
    data, fit = combo
    model = NoChange.from_view(fit)
    model.fit(fit)
    pert = next(p for p in data.perturbation_names if "+" not in p)
    np.testing.assert_allclose(model.response(pert, "line_B"), observed_response(fit, pert, "line_B"), rtol=1e-5, atol=1e-6)
    assert not np.any(model.predicted_delta(pert, "line_B"))


def test_additive_sums_the_singles_and_mean_averages_the_training_perturbations(combo):
    data, fit = combo
    additive, mean = Additive.from_view(fit), TrainingMean.from_view(fit)
    additive.fit(fit)
    mean.fit(fit)
    held = fit.split.test_perturbations[0]
    a, b = held.split("+")
    expected = observed_response(fit, a, "line_A") + observed_response(fit, b, "line_A")
    np.testing.assert_allclose(additive.predicted_delta(held, "line_A"), expected, rtol=1e-5, atol=1e-6)
    in_ctx = [observed_response(fit, p, "line_A") for p, c in mean.keys if c == "line_A"]
    np.testing.assert_allclose(mean.predicted_delta(held, "line_A"), np.mean(in_ctx, axis=0), rtol=1e-5, atol=1e-6)


def test_context_shift_averages_the_other_contexts(synthetic_adata):
    data = PerturbationData.from_anndata(synthetic_adata)
    fit = SplitView(data, make_split(data, "context", test_context="line_C"))
    model = ContextShift.from_view(fit)
    model.fit(fit)
    pert = data.perturbation_names[0]
    expected = (observed_response(fit, pert, "line_A") + observed_response(fit, pert, "line_B")) / 2
    np.testing.assert_allclose(model.predicted_delta(pert, "line_C"), expected, rtol=1e-5, atol=1e-6)
    assert not np.any(model.predicted_delta("never-seen", "line_C"))


def test_linear_fits_its_training_responses_and_falls_back_to_the_mean():
    adata = make_synthetic(n_genes=80, n_singles=30, n_combos=0, cells_per_group=30, controls_per_context=60,
                           n_effect_genes=10, n_contexts=1, seed=3)
    data = PerturbationData.from_anndata(adata)
    fit = SplitView(data, make_split(data, "random", test_fraction=0.2))
    model = Linear(LinearConfig(n_components=20, ridge=0.01), fit.genes, fit.vocab, data.spec)
    model.fit(fit)
    fitted = [np.corrcoef(model.predicted_delta(p, c), model.responses[i])[0, 1] for i, (p, c) in enumerate(model.keys)]
    assert np.mean(fitted) > 0.8  # G W p reproduces the responses it was fitted on
    weak = Linear(LinearConfig(n_components=20, ridge=1e6), fit.genes, fit.vocab, data.spec)
    weak.fit(fit)
    np.testing.assert_allclose(weak.predicted_delta(model.keys[0][0], "line_A"), weak.offset, atol=1e-4)  # ridge -> mean
    # a perturbation without features (an unmeasured gene) gets the mean training response b
    np.testing.assert_allclose(model.predicted_delta("UNMEASURED", "line_A"), model.offset, atol=1e-6)


def predicted_cells(view, settings=PredictConfig()):
    """How many cells predict_split writes for the view's test groups (``predict.control_cells``)."""
    return sum(settings.cells_to_generate(len(rows), len(view.control_rows(ctx)))
               for (_, ctx), rows in view.test_groups().items())


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_predicts_cells_and_round_trips(combo, tmp_path, name):
    data, fit = combo
    model = model_class(name).from_view(fit)
    model.fit(fit)
    pred = predict_split(model, fit, seed=2)
    assert (pred.X >= 0).all() and pred.n_obs == predicted_cells(fit) + len(fit.split.test_controls)
    model.save(tmp_path)
    again = PerturbationModel.load(tmp_path)
    np.testing.assert_array_equal(predict_split(again, fit, seed=2).X, pred.X)
    predicted = pred[pred.obs["source"] == "predicted"]
    assert predicted.X.std(axis=0).max() > 0  # cells, not a repeated mean


def test_test_cells_never_reach_a_model(combo):
    data, fit = combo
    with pytest.raises(RuntimeError, match="not visible to the model"):
        fit.expression.get(fit.rows.test[:3])


def _assert_each_group_is_every_control_shifted(model, view, pred):
    x, obs = np.asarray(pred.X), pred.obs
    for (pert, ctx), rows in view.test_groups().items():
        pool = view.control_rows(ctx)
        mine = x[((obs["perturbation"] == pert) & (obs["cell_type"] == ctx)).to_numpy()]
        assert len(mine) % len(pool) == 0 and len(rows) <= len(mine) < len(rows) + len(pool)
        controls = view.expression.get(pool)
        expected = np.clip(controls + model.predicted_delta(pert, ctx), 0, None).mean(0) - controls.mean(0)
        np.testing.assert_allclose(mine.mean(0) - controls.mean(0), expected, atol=1e-5)


def test_a_group_is_generated_from_every_control_so_its_mean_shift_is_the_models(combo):
    """Where a context's controls are few enough, each test group is predicted from all of them,
    each as often (once here, where the groups are smaller than the pools): the written cells' mean
    shift against those controls is the baseline's shift exactly (no draw noise). With
    ``control_cells: null``, or above it, as many cells as the real group are drawn, as before."""
    data, fit = combo
    model = TrainingMean.from_view(fit)
    model.fit(fit)
    pred = predict_split(model, fit, seed=5)
    _assert_each_group_is_every_control_shifted(model, fit, pred)
    assert pred.n_obs > len(fit.split.test) + len(fit.split.test_controls)  # the pools are larger than the groups
    drawn = predict_split(model, fit, seed=5, settings=PredictConfig(control_cells=None))
    assert drawn.n_obs == len(fit.split.test) + len(fit.split.test_controls)
    few = PredictConfig(control_cells=1)  # fewer than any pool: drawn as many as the real cells
    assert predict_split(model, fit, seed=5, settings=few).n_obs == len(fit.split.test) + len(fit.split.test_controls)


def test_a_pool_smaller_than_its_group_is_used_whole_as_often_as_it_takes():
    adata = make_synthetic(n_genes=30, n_singles=4, n_combos=0, cells_per_group=25, controls_per_context=9,
                           n_effect_genes=6, n_contexts=2, seed=4)
    data = PerturbationData.from_anndata(adata)
    view = SplitView(data, make_split(data, "random", test_fraction=0.5))
    model = TrainingMean.from_view(view)
    model.fit(view)
    pred = predict_split(model, view, seed=1)
    assert any(len(rows) > len(view.control_rows(ctx)) for (_, ctx), rows in view.test_groups().items())
    _assert_each_group_is_every_control_shifted(model, view, pred)


def test_control_cells_is_checked():
    with pytest.raises(ValueError, match="control_cells must be at least 1"):
        PredictConfig(control_cells=0)
