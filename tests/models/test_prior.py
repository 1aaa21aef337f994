"""Flows anchored on a baseline: zero velocity is the baseline, auto never reads test cells, and a
combination whose effects add up needs almost no residual."""

from types import SimpleNamespace

import anndata as ad
import numpy as np
import pytest
import torch

from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.synthetic import make_synthetic
from pertflow.data.view import SplitView
from pertflow.models.base import PerturbationModel
from pertflow.models.baselines import Additive
from pertflow.models.cfm.config import CFMConfig
from pertflow.models.cfm.model import CFM
from pertflow.models.config import PredictConfig
from pertflow.models.predict import predict_split
from pertflow.models.inner_split import inner_split
from pertflow.models.prior import PRIOR_BASELINES, PRIOR_STRENGTHS, Prior, strongest_within
from pertflow.models.validation import ValidationSet
from pertflow.train import TrainConfig

TINY = dict(d_model=16, n_heads=2, n_layers=1, dropout=0.0, source="control", center=True, genes_per_step=60)


@pytest.fixture(scope="module")
def combo_view(synthetic_adata):
    data = PerturbationData.from_anndata(synthetic_adata)
    return SplitView(data, make_split(data, "combinations", seen=[2]))


def test_zero_velocity_reproduces_the_prior_exactly(combo_view, tmp_path):
    # Euler: a zero velocity leaves every solver's cells where they start; 3 network calls, not RK4's 12
    model = CFM.from_view(combo_view, CFMConfig(**TINY, prior="additive", source_noise=0.0),
                          PredictConfig(ode_steps=3, ode_method="euler"))
    model.fit(combo_view, TrainConfig(max_steps=2, batch_size=8, val_every=2, progress=False), tmp_path)
    model.prediction_mode = "flow"
    with torch.no_grad():  # the decoder's last layer at zero: the network's velocity is 0 everywhere
        model.module.decoder.fc[4].weight.zero_()
        model.module.decoder.fc[4].bias.zero_()
    baseline = Additive.from_view(combo_view)
    baseline.fit(combo_view)
    ours, theirs = predict_split(model, combo_view, seed=3), predict_split(baseline, combo_view, seed=3)
    np.testing.assert_allclose(ours.X, theirs.X, rtol=0, atol=1e-5)  # the same control cells, the same shift
    assert model.prior.name == "additive"
    model.save(tmp_path / "run")  # the prior is saved with the run and used the same way after loading
    again = PerturbationModel.load(tmp_path / "run")
    np.testing.assert_allclose(predict_split(again, combo_view, seed=3).X, theirs.X, rtol=0, atol=1e-5)


def test_training_shifts_leave_the_perturbations_own_response_out(combo_view):
    prior = Prior.fit("mean", combo_view)
    key = next(iter(prior.baseline.keys))
    left_out = prior.baseline.without(key).predicted_delta(*key)
    np.testing.assert_allclose(prior.training_delta(*key), left_out, atol=1e-6)
    assert not np.allclose(prior.training_delta(*key), prior.delta(*key))  # its own response is really out


def test_the_additive_prior_builds_on_measured_singles():
    data = PerturbationData.from_anndata(_exactly_additive())
    prior = Prior.fit("additive", SplitView(data, make_split(data, "combinations", seen=[2], fraction=0.5, seed=1)))
    single = next(p for p, _ in prior.baseline.keys if "+" not in p)
    context = next(c for p, c in prior.baseline.keys if p == single)
    # a measured single is the additive prior's input, not its prediction: its own response
    np.testing.assert_allclose(prior.training_delta(single, context), prior.baseline.response(single, context), atol=1e-6)
    combo = next(p for p, _ in prior.baseline.keys if "+" in p)
    ctx = next(c for p, c in prior.baseline.keys if p == combo)
    a, b = prior.baseline.components(combo)
    expected = prior.baseline.response(a, ctx) + prior.baseline.response(b, ctx)
    np.testing.assert_allclose(prior.training_delta(combo, ctx), expected, atol=1e-5)  # never its own response


@pytest.mark.parametrize("name", ["mean", "linear", "context-shift", "additive", "additive-mean"])
def test_a_measured_single_enters_a_combination_once_whatever_the_prior(name):
    """The model learns each single's residual against the shift its batches start from, and a
    combination's condition is the sum of its singles': so the prior of a combination of measured
    singles plus those learnt residuals must be the singles' responses added, each once (a
    linear or mean prior of the combination itself, plus the residuals, counted them twice)."""
    data = PerturbationData.from_anndata(_exactly_additive())
    view = SplitView(data, make_split(data, "combinations", seen=[2], fraction=0.5, seed=1))
    prior = Prior.fit(name, view)
    test = sorted({p for p, _ in view.test_groups() if "+" in p})
    assert test
    for combo in test:
        comps = prior.baseline.components(combo)
        context = next(c for p, c in view.test_groups() if p == combo)
        responses = [prior.baseline.response(c, context) for c in comps]
        residuals = [r - prior.training_delta(c, context) for c, r in zip(comps, responses)]  # what the model learns
        np.testing.assert_allclose(prior.delta(combo, context) + np.sum(residuals, 0), np.sum(responses, 0), atol=1e-5)
    # a component never measured as a single is the baseline's estimate of it
    if name not in ("additive", "additive-mean"):
        single, context = next((p, c) for p, c in prior.baseline.keys if "+" not in p)
        unseen = f"{single}+NEVER_MEASURED"
        expected = prior.training_delta(single, context) + prior.baseline.predicted_delta("NEVER_MEASURED", context)
        np.testing.assert_allclose(prior.delta(unseen, context), expected, atol=1e-5)
        np.testing.assert_allclose(prior.held_out_delta(unseen, context), expected, atol=1e-5)


def test_validation_never_scores_a_prior_on_a_response_it_read():
    # one context, singles only: left out, an additive single is unseen (no shift), so on
    # validation additive must score exactly as "none"; it trains on its own response only
    adata = make_synthetic(n_genes=40, n_singles=6, n_combos=0, cells_per_group=40, controls_per_context=80,
                           n_effect_genes=10, n_contexts=1, seed=2)
    data = PerturbationData.from_anndata(adata)
    view = SplitView(data, make_split(data, "random", test_fraction=0.2))
    validation = ValidationSet(view)
    assert len(validation) > 0
    prior = Prior.fit("auto", view, validation)
    assert prior.scores["additive"]["score"] == pytest.approx(prior.scores["none"]["score"])
    additive = Prior.fit("additive", view)
    single, context = next(iter(additive.baseline.keys))
    np.testing.assert_allclose(additive.held_out_delta(single, context), 0.0, atol=1e-6)
    np.testing.assert_allclose(additive.training_delta(single, context), additive.baseline.response(single, context), atol=1e-6)


def _poisoned(adata, split):
    bad = adata.copy()
    test = bad.obs_names.isin(split.test)
    X = bad.X.toarray() if hasattr(bad.X, "toarray") else np.array(bad.X)
    X[test] = X[test] * 50 + 100  # nothing a model sees may change
    bad.X = X
    return bad


def test_auto_chooses_on_validation_and_never_reads_test_cells(synthetic_adata):
    data = PerturbationData.from_anndata(synthetic_adata)
    split = make_split(data, "combinations", seen=[2])
    clean = SplitView(data, split)
    poisoned_data = PerturbationData.from_anndata(_poisoned(synthetic_adata, split))
    poisoned = SplitView(poisoned_data, split)
    a = Prior.fit("auto", clean, ValidationSet(clean))
    b = Prior.fit("auto", poisoned, ValidationSet(poisoned))
    assert a.label == b.label and a.scores == b.scores
    assert {label.split(" x ")[0] for label in a.scores} == set(PRIOR_BASELINES)
    assert "mean x 0.5" not in a.scores  # one strength unless the config gives more
    assert a.reason == b.reason
    if a.reason == "the best validation score":
        assert a.scores[a.label]["score"] == max(s["score"] for s in a.scores.values())
    else:  # here every combination of measured singles is a test one (see the test below)
        assert a.name == "additive" and not ValidationSet(clean).of_test_kind
    assert a.scores["none"]["score"] < max(s["score"] for s in a.scores.values())  # something beats no change here


def test_validation_score_ranks_no_change_below_the_truth(combo_view):
    validation = ValidationSet(combo_view)
    assert len(validation) > 0
    truth = {(g.perturbation, g.context): g.real for g in validation.groups}
    perfect = validation.score(lambda p, c, controls: truth[(p, c)])
    nothing = validation.score(lambda p, c, controls: controls)
    assert perfect.pearson_top20_de > 0.99 and perfect.edistance < 1e-9
    assert nothing.edistance / validation._no_change == pytest.approx(1.0)
    assert perfect.score > nothing.score


def _exactly_additive(seed: int = 7) -> ad.AnnData:
    """Log-expression where every combination is its singles' effects added, plus noise."""
    adata = make_synthetic(n_genes=40, n_singles=6, n_combos=6, cells_per_group=40, controls_per_context=80,
                           n_effect_genes=10, n_contexts=1, seed=4)
    rng = np.random.default_rng(seed)
    perts = adata.obs["perturbation"].astype(str).to_numpy()
    singles = sorted({q for p in set(perts) if p != "control" for q in p.split("+")})
    effect = {q: np.zeros(40) for q in singles}
    for q in singles:
        effect[q][rng.choice(40, 10, replace=False)] = rng.normal(0, 1.0, 10)
    base = rng.uniform(2.5, 4.0, 40)  # far enough from 0 that clipping does not bend the sums
    X = np.stack([base + sum((effect[q] for q in p.split("+")), np.zeros(40)) if p != "control" else base for p in perts])
    adata.X = np.clip(X + rng.normal(0, 0.3, X.shape), 0, None).astype(np.float32)
    adata.uns["log1p"] = {"base": None}  # already log-expression
    return adata


def test_an_additive_combination_needs_almost_no_residual(tmp_path):
    data = PerturbationData.from_anndata(_exactly_additive())
    view = SplitView(data, make_split(data, "combinations", seen=[2], fraction=0.5, seed=1))
    assert any("+" in p for p in view.training_perturbations)  # some additive combinations to learn from
    config = CFMConfig(**{**TINY, "d_model": 32, "n_heads": 4, "genes_per_step": 40}, prior="additive", source_noise=0.05)
    model = CFM.from_view(view, config, PredictConfig(ode_steps=2, ode_method="midpoint"))
    model.fit(view, TrainConfig(max_steps=300, batch_size=32, lr=2e-3, val_every=100, progress=False), tmp_path)
    rng = np.random.default_rng(0)
    for combo, context in view.test_groups():
        controls = view.expression.get(view.control_rows(context))
        shift = model.prior.delta(combo, context)
        cells = model.own_cells(controls, combo, context, shift, rng, model.predict_config)
        residual = cells.mean(0) - np.clip(controls + shift, 0, None).mean(0)
        assert np.linalg.norm(residual) < 0.25 * np.linalg.norm(shift), (combo, np.linalg.norm(residual), np.linalg.norm(shift))


def test_predict_mode_overrides_the_mode_chosen_on_validation(combo_view, tmp_path):
    model = CFM.from_view(combo_view, CFMConfig(**TINY, prior="additive", source_noise=0.0), PredictConfig(ode_steps=2))
    model.fit(combo_view, TrainConfig(max_steps=2, batch_size=8, val_every=2, progress=False), tmp_path)
    model.prediction_mode = "prior"
    (combo, context), _ = next(iter(combo_view.test_groups().items()))
    controls = combo_view.expression.get(combo_view.control_rows(context))
    prior_cells = np.clip(controls + model.prior.delta(combo, context), 0, None)
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(model.generate(controls, combo, context, rng), prior_cells)  # auto: the saved mode
    flow = model.generate(controls, combo, context, rng, PredictConfig(ode_steps=2, mode="flow"))
    assert np.abs(flow - prior_cells).max() > 1e-3  # the untrained flow's own cells


def test_validation_scores_the_kind_of_perturbation_the_split_predicts():
    data = PerturbationData.from_anndata(_exactly_additive())
    view = SplitView(data, make_split(data, "combinations", seen=[2], fraction=0.5, seed=1))
    assert all("+" in p for p in view.split.test_perturbations)
    groups = {g.perturbation for g in ValidationSet(view).groups}
    assert groups and all("+" in p for p in groups)  # the training combinations' validation cells, not singles
    prior = Prior.fit("auto", view, ValidationSet(view))
    assert prior.name == "additive"  # exactly additive combinations: additive wins where it is judged on them


def test_validation_scores_combinations_as_seen_as_the_test_ones():
    adata = _exactly_additive()
    perts = adata.obs["perturbation"].astype(str)
    combos = sorted({p for p in perts if "+" in p})
    unmeasured = combos[0].split("+")[0]  # drop this single's own cells: combinations with it have one measured single
    adata = adata[perts != unmeasured].copy()
    data = PerturbationData.from_anndata(adata)
    view = SplitView(data, make_split(data, "combinations", seen=[2], fraction=0.5, seed=1))
    assert all(unmeasured not in p.split("+") for p in view.split.test_perturbations)
    with_unmeasured = {p for p, _ in view.groups(view.rows.val) if unmeasured in p.split("+")}
    assert with_unmeasured  # validation has combinations with the unmeasured single ...
    groups = {g.perturbation for g in ValidationSet(view).groups}
    assert groups and all("+" in p for p in groups) and not groups & with_unmeasured  # ... and does not score them


def test_auto_takes_additive_where_validation_has_no_combination_of_measured_singles(capsys):
    adata = _exactly_additive()
    perts = adata.obs["perturbation"].astype(str)
    unmeasured = sorted({p for p in perts if "+" in p})[0].split("+")[0]
    data = PerturbationData.from_anndata(adata[(perts != unmeasured).to_numpy()].copy())
    # every combination of two measured singles is a test one: those left to train on have an unmeasured single
    view = SplitView(data, make_split(data, "combinations", seen=[2], fraction=1.0, seed=1))
    validation = ValidationSet(view)
    assert len(validation) and all(unmeasured in g.perturbation.split("+") for g in validation.groups)
    assert not validation.of_test_kind
    prior = Prior.fit("auto", view, validation)
    assert prior.name == "additive" and "measured singles" in prior.reason
    assert "auto' chose additive" in capsys.readouterr().out
    # with strengths to choose from: the strongest additive; a prior the config names stays itself
    assert Prior.fit("auto", view, validation, PRIOR_STRENGTHS).label == "additive"
    assert Prior.fit("mean", view, validation, PRIOR_STRENGTHS).name == "mean"


def test_a_flow_that_validation_cannot_judge_predicts_as_its_additive_prior(tmp_path):
    adata = _exactly_additive()
    perts = adata.obs["perturbation"].astype(str)
    unmeasured = sorted({p for p in perts if "+" in p})[0].split("+")[0]
    data = PerturbationData.from_anndata(adata[(perts != unmeasured).to_numpy()].copy())
    view = SplitView(data, make_split(data, "combinations", seen=[2], fraction=1.0, seed=1))
    model = CFM.from_view(view, CFMConfig(**TINY, prior="auto"), PredictConfig(ode_steps=1, ode_method="euler"))
    model.fit(view, TrainConfig(max_steps=10, batch_size=16, val_every=5, progress=False), tmp_path)
    assert model.prior.name == "additive" and model.prediction_mode == "prior"
    assert model.fit_report["validation"]  # scored all the same, for the record


def _partly_transferring(held_out_response: float, seed: int = 3) -> SplitView:
    """Four cell types, one stimulus raising genes 0-9 by 1.5 in c0 and c1 and by
    ``held_out_response`` in c2 and c3, whose controls are alike (so the inner split holds out c2,
    the nearest to the test's c3)."""
    rng = np.random.default_rng(seed)
    n_genes, rows, obs = 40, [], []
    base = {c: rng.uniform(2.0, 4.0, n_genes) for c in ("c0", "c1", "c2")}
    base["c3"] = base["c2"] + rng.normal(0, 0.05, n_genes)
    for context, level in base.items():
        response = np.zeros(n_genes)
        response[:10] = 1.5 if context in ("c0", "c1") else held_out_response
        for condition, shift in (("control", 0.0), ("stim", response)):
            rows.append(level + shift + rng.normal(0, 0.3, (60, n_genes)))
            obs += [(condition, context)] * 60
    adata = ad.AnnData(np.clip(np.concatenate(rows), 0, None).astype(np.float32))
    adata.obs["perturbation"] = [o[0] for o in obs]
    adata.obs["cell_type"] = [o[1] for o in obs]
    adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
    adata.var_names = [f"g{i}" for i in range(n_genes)]
    adata.uns["log1p"] = {"base": None}
    data = PerturbationData.from_anndata(adata, pert_col="perturbation", control="control", context_cols=["cell_type"])
    return SplitView(data, make_split(data, "context", test_context="c3"))


@pytest.mark.parametrize("held_out_response, strength", [(1.5, 1.0), (0.75, 0.5), (0.375, 0.25)])
def test_auto_scales_the_prior_by_how_much_the_response_transfers(held_out_response, strength):
    """Where the held-out cell type responds as the training ones, the prior keeps its full
    shift; where it responds half or a quarter as much, auto scales it so, and the prior's
    prediction for the test cell type is scaled with it."""
    view = _partly_transferring(held_out_response)
    inner = inner_split(view, "auto", 0, 0)
    assert inner.held_out == ["c2"]
    validation = ValidationSet(inner.view, seed=0)
    prior = Prior.fit("auto", inner.view, validation, PRIOR_STRENGTHS)
    assert prior.strength == strength, prior.scores
    assert {"mean", "mean x 0.75", "mean x 0.5", "mean x 0.25", "none"} <= set(prior.scores)
    assert "none x 0.5" not in prior.scores
    assert Prior.fit("mean", inner.view, validation, PRIOR_STRENGTHS).strength == strength  # a named baseline too
    assert Prior.fit("auto", inner.view, validation).strength == 1.0  # the default: the baseline as it is
    full = prior.at_strength(1.0)
    np.testing.assert_allclose(prior.delta("stim", "c3"), strength * full.delta("stim", "c3"), rtol=1e-6)
    refitted = prior.refitted(view)
    assert (refitted.label, refitted.strength) == (prior.label, strength)
    owner = SimpleNamespace(genes=refitted.baseline.genes, vocab=refitted.baseline.vocab, spec=refitted.baseline.spec)
    loaded = Prior.from_state(refitted.extra_state(), refitted.state_tensors(), owner)
    np.testing.assert_allclose(loaded.delta("stim", "c3"), refitted.delta("stim", "c3"), rtol=1e-6)


def test_prior_strengths_must_be_factors_in_zero_one():
    from pertflow.models.latent_shift.config import LatentShiftConfig

    with pytest.raises(ValueError, match="prior_strengths"):
        CFMConfig(prior_strengths=(1.0, 1.5))
    with pytest.raises(ValueError, match="prior_strengths"):
        LatentShiftConfig(prior_strengths=())
    with pytest.raises(ValueError, match="strength_margin"):
        LatentShiftConfig(strength_margin=-0.01)


def test_strongest_within_takes_the_strongest_candidate_inside_the_margin():
    scores = {"none": -0.880, "mean": -1.245, "mean x 0.5": -0.893, "mean x 0.25": -0.874, "linear": -1.30}
    scales = {"none": 0.0, "mean": 1.0, "mean x 0.5": 0.5, "mean x 0.25": 0.25, "linear": 1.0}
    assert strongest_within(scores, scales, 0.0) == "mean x 0.25"  # the best score
    assert strongest_within(scores, scales, 0.01) == "mean x 0.25"  # none is within, and weaker
    assert strongest_within(scores, scales, 0.02) == "mean x 0.5"
    assert strongest_within(scores, scales, 0.5) == "mean"  # equal strengths: the better score
    # no change leads by more than the margin: it stays
    assert strongest_within({**scores, "none": -0.85}, scales, 0.02) == "none"
    # exact ties (one perturbation: mean = linear) go to the first, with or without a margin
    tied = {"mean": -0.5, "linear": -0.5, "mean x 0.75": -0.6}
    tied_scales = {"mean": 1.0, "linear": 1.0, "mean x 0.75": 0.75}
    assert strongest_within(tied, tied_scales, 0.0) == strongest_within(tied, tied_scales, 0.2) == "mean"


def test_a_strength_margin_keeps_the_stronger_prior_where_validation_cannot_tell_them_apart():
    """The held-out cell type responds at 0.6 of the training ones (0.9 against 1.5): between half
    and three quarters of the shift, so validation's lead of the nearer strength is small. With a margin
    wider than that lead the stronger prior is kept, and the report says why; a clear lead (a
    quarter of the response) still shrinks the prior."""
    view = _partly_transferring(0.9)
    inner = inner_split(view, "auto", 0, 0)
    validation = ValidationSet(inner.view, seed=0)
    plain = Prior.fit("auto", inner.view, validation, PRIOR_STRENGTHS)
    scores = {label: s["score"] for label, s in plain.scores.items()}
    assert plain.strength in (0.5, 0.75) and plain.reason == "the best validation score"
    strength = {label: float(label.split(" x ")[1]) if " x " in label else 1.0 for label in scores if label != "none"}
    lead = scores[plain.label] - max(scores[label] for label in strength if strength[label] > plain.strength)
    assert 0 < lead < 0.1
    kept = Prior.fit("auto", inner.view, validation, PRIOR_STRENGTHS, margin=lead + 1e-6)
    assert kept.strength > plain.strength and "strongest prior within" in kept.reason
    clear = _partly_transferring(0.375)
    inner = inner_split(clear, "auto", 0, 0)
    shrunk = Prior.fit("auto", inner.view, ValidationSet(inner.view, seed=0), PRIOR_STRENGTHS, margin=0.02)
    assert shrunk.strength == 0.25


def _shared_response_screen(seed: int = 5) -> ad.AnnData:
    """Singles that share one common response (what every knock-down of the screen does) plus a
    specific one each, and combinations that add their singles' specific parts to that common
    response once."""
    adata = make_synthetic(n_genes=40, n_singles=8, n_combos=6, cells_per_group=40, controls_per_context=80,
                           n_effect_genes=10, n_contexts=1, seed=seed)
    rng = np.random.default_rng(seed)
    perts = adata.obs["perturbation"].astype(str).to_numpy()
    singles = sorted({q for p in set(perts) if p != "control" for q in p.split("+")})
    common = np.zeros(40)
    common[:12] = rng.choice([-1.0, 1.0], 12) * rng.uniform(0.8, 1.2, 12)
    specific = {q: np.zeros(40) for q in singles}
    for q in singles:
        specific[q][rng.choice(np.arange(12, 40), 4, replace=False)] = rng.normal(0, 0.5, 4)
    base = rng.uniform(2.5, 4.0, 40)
    X = np.stack([base if p == "control" else base + common + sum(specific[q] for q in p.split("+")) for p in perts])
    adata.X = np.clip(X + rng.normal(0, 0.3, X.shape), 0, None).astype(np.float32)
    adata.uns["log1p"] = {"base": None}
    return adata


def test_additive_mean_predicts_an_unmeasured_single_as_the_measured_singles_average():
    data = PerturbationData.from_anndata(_shared_response_screen())
    view = SplitView(data, make_split(data, "combinations", seen=[2], fraction=0.5, seed=1))
    prior = Prior.fit("additive-mean", view)
    baseline = prior.baseline
    singles = [(p, c) for p, c in baseline.keys if "+" not in p]
    context = singles[0][1]
    average = np.mean([baseline.response(p, c) for p, c in singles], axis=0)
    np.testing.assert_allclose(baseline.predicted_delta("NEVER_MEASURED", context), average, atol=1e-5)
    # a measured single is its own response; in a combination an unmeasured gene adds nothing
    single = singles[0][0]
    np.testing.assert_allclose(baseline.predicted_delta(single, context), baseline.response(single, context), atol=1e-6)
    np.testing.assert_allclose(baseline.predicted_delta(f"{single}+NEVER_MEASURED", context),
                               baseline.response(single, context), atol=1e-6)
    # left out, a single is unmeasured: the other singles' average
    others = np.mean([baseline.response(p, c) for p, c in singles[1:]], axis=0)
    np.testing.assert_allclose(prior.held_out_delta(single, context), others, atol=1e-5)
    np.testing.assert_allclose(prior.training_delta(single, context), baseline.response(single, context), atol=1e-6)


def test_auto_chooses_additive_mean_where_unseen_singles_share_the_screens_response():
    """Validation that holds out training singles (with their combinations) sees that an unseen
    single still moves the common genes: it takes additive-mean over additive (which predicts
    no change for it), and on the test's unseen singles that prior is closer to the truth."""
    data = PerturbationData.from_anndata(_shared_response_screen())
    singles = sorted({p for p in map(str, data.perturbations) if p != "control" and "+" not in p})
    unseen = singles[:2]
    view = SplitView(data, make_split(data, "perturbations", test_perturbations=unseen))
    inner = inner_split(view, "auto", 0, 0)
    assert inner.kind == "perturbations"
    chosen = Prior.fit("auto", inner.view, ValidationSet(inner.view, seed=0))
    assert chosen.name == "additive-mean", chosen.scores
    assert chosen.scores["additive-mean"]["score"] > chosen.scores["additive"]["score"]
    X = np.asarray(data.adata.X)  # the test's truth, read here only to judge
    truth = X[data.perturbations == unseen[0]].mean(0) - X[data.is_control].mean(0)
    fitted = {name: Prior.fit(name, view) for name in ("additive", "additive-mean")}
    context = next(c for _, c in view.test_groups())
    error = {name: np.abs(p.delta(unseen[0], context) - truth).mean() for name, p in fitted.items()}
    assert error["additive-mean"] < 0.5 * error["additive"], error


def test_a_model_chooses_its_prior_with_the_configs_strength_margin(tmp_path):
    """``strength_margin`` of a model's config reaches the choice of its prior, and the fit report
    says which rule chose it."""
    from pertflow.models.latent_shift.config import LatentShiftConfig
    from pertflow.models.latent_shift.model import LatentShift

    view = _partly_transferring(0.9)
    short = TrainConfig(max_steps=5, batch_size=16, val_every=5, checkpoint_every=5, progress=False)
    tiny = dict(n_components=4, hidden=16, decoder_hidden=16, decoder_steps=5, groups_per_step=2, prior="auto",
                prior_strengths=PRIOR_STRENGTHS)
    chosen = {}
    for margin in (0.0, 0.2):
        model = LatentShift.from_view(view, LatentShiftConfig(**tiny, strength_margin=margin))
        model.fit(view, short, tmp_path / str(margin))
        chosen[margin] = (model.prior.strength, model.fit_report["prior_reason"])
    assert chosen[0.0] == (0.5, "the best validation score")
    assert chosen[0.2][0] == 0.75 and chosen[0.2][1].startswith("the strongest prior within 0.2")
