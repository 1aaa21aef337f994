"""The validation that imitates the test (pertflow.models.inner_split) and the anchored contract on it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from pertflow.configs import build
from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.synthetic import make_synthetic
from pertflow.data.view import SplitView
from pertflow.errors import InputError
from pertflow.models.inner_split import inner_split, kind_of_test, rotations
from pertflow.models.latent_shift.config import LatentShiftConfig
from pertflow.models.latent_shift.model import LatentShift
from pertflow.models.prior import PRIOR_STRENGTHS, Prior
from pertflow.models.validation import ValidationSet
from pertflow.train import TrainConfig


@pytest.fixture(scope="module")
def data():
    adata = make_synthetic(n_genes=40, n_singles=6, n_combos=3, n_contexts=4, cells_per_group=15,
                           controls_per_context=40, n_effect_genes=8, seed=3)
    return PerturbationData.from_anndata(adata)


def _perturbed(view, rows):
    return rows[~view.data.is_control[rows]]


def test_a_context_transfer_is_validated_on_a_held_out_training_context(data):
    view = SplitView(data, make_split(data, "context", test_context="line_A"))
    assert kind_of_test(view)[0] == "contexts"
    inner = inner_split(view, "auto")
    assert inner.kind == "contexts" and len(inner.held_out) == 1 and inner.held_out[0] != "line_A"
    held = inner.held_out[0]
    contexts = data.contexts
    # no perturbed cell of the held-out context is trained on; all of them (train and val) validate
    assert not (contexts[_perturbed(view, inner.view.rows.train)] == held).any()
    val = _perturbed(view, inner.view.rows.val)
    assert set(contexts[val]) == {held}
    outer_visible = _perturbed(view, view.visible)
    assert len(val) == int((contexts[outer_visible] == held).sum())
    # its controls stay visible, so it can be predicted from them; the outer view is untouched
    assert len(inner.view.control_rows(held)) == len(view.control_rows(held))
    assert (contexts[_perturbed(view, view.rows.train)] == held).any()
    np.testing.assert_array_equal(inner.view.rows.test, view.rows.test)
    # the held-out context is the training context whose controls are nearest the test context's
    means = {c: view.expression.get(view.control_rows(c)).mean(0) for c in ("line_A", "line_B", "line_C", "line_D")}
    nearest = min(("line_B", "line_C", "line_D"), key=lambda c: np.linalg.norm(means[c] - means["line_A"]))
    assert held == nearest
    # validation then scores exactly the held-out context's groups
    validation = ValidationSet(inner.view)
    assert len(validation) and {g.context for g in validation.groups} == {held}


def test_unseen_perturbations_are_validated_on_held_out_training_perturbations(data):
    split = make_split(data, "perturbations", n_test=2, seed=0)
    view = SplitView(data, split)
    assert kind_of_test(view)[0] == "perturbations"
    inner = inner_split(view, "auto", n_held_out=1)
    assert inner.kind == "perturbations"
    singles = [p for p in inner.held_out if len(data.components(p)) == 1]
    assert len(singles) == 1
    single = singles[0]
    # the test holds combinations with an unseen component: so does validation
    assert any(len(data.components(p)) > 1 for p in view.split.test_perturbations)
    assert any(len(data.components(p)) > 1 for p in inner.held_out)
    trained = set(data.perturbations[_perturbed(view, inner.view.rows.train)])
    # the single and every combination containing it leave training together
    assert not any(single in data.components(p) for p in trained)
    assert {p for p in set(data.perturbations[_perturbed(view, view.rows.train)]) if single in data.components(p)} \
        == set(inner.held_out)
    assert set(data.perturbations[_perturbed(view, inner.view.rows.val)]) == set(inner.held_out)


def test_combinations_of_measured_singles_keep_the_splits_own_validation(data):
    view = SplitView(data, make_split(data, "combinations", seen=[2], fraction=0.5, seed=1))
    inner = inner_split(view, "auto")
    assert inner.kind == "cells" and inner.held_out == [] and inner.view is view
    forced = inner_split(view, "perturbations", n_held_out=1)
    assert forced.kind == "perturbations" and forced.held_out


def test_an_anchored_model_chooses_on_the_inner_split_and_refits_its_prior_on_every_cell(data, tmp_path):
    view = SplitView(data, make_split(data, "context", test_context="line_A"))
    config = LatentShiftConfig(n_components=8, hidden=32, decoder_hidden=32, decoder_steps=20, groups_per_step=4,
                               prior="context-shift")
    model = LatentShift.from_view(view, config)
    model.fit(view, TrainConfig(max_steps=20, batch_size=16, val_every=20, checkpoint_every=20, progress=False), tmp_path)
    report = model.fit_report["validation_split"]
    assert report["kind"] == "contexts" and report["groups"] > 0
    held = report["held_out"][0]
    assert "without the held-out" in report["model_trained_on"]
    # the prior that predicts the test read every training cell, the held-out context's too
    assert any(ctx == held for _, ctx in model.prior.baseline.keys)
    assert model.prediction_mode in ("flow", "prior-mean", "prior")
    assert set(model.fit_report["validation"]) == {"flow", "prior-mean", "prior"}  # every mode scored on it


def test_refit_trains_again_on_every_training_cell(data, tmp_path):
    view = SplitView(data, make_split(data, "context", test_context="line_A"))
    config = LatentShiftConfig(n_components=8, hidden=32, decoder_hidden=32, decoder_steps=20, groups_per_step=4,
                               prior="context-shift", refit=True)
    model = LatentShift.from_view(view, config)
    model.fit(view, TrainConfig(max_steps=20, batch_size=16, val_every=20, checkpoint_every=20, progress=False), tmp_path)
    assert model.fit_report["validation_split"]["model_trained_on"] == "all training cells"
    assert "inner_fit" in model.fit_report and "decoder" in model.fit_report["inner_fit"]
    assert (tmp_path / "refit").is_dir()
    model.save(tmp_path / "saved")  # the report of both fits is a plain record
    assert "inner_fit" in json.loads((tmp_path / "saved" / "model.json").read_text())["fit_report"]


def test_validation_weighs_each_kind_as_the_test_does(data):
    view = SplitView(data, make_split(data, "perturbations", n_test=2, seed=0))
    inner = inner_split(view, "perturbations", n_held_out=2)
    validation = ValidationSet(inner.view)
    shares = validation.test_kinds.shares
    kinds = [validation.test_kinds.kind(data, g.perturbation, (g.perturbation, g.context)) for g in validation.groups]
    assert len(set(kinds)) >= 2 and set(kinds) <= set(shares)  # held-out singles and combinations with one of them
    total = sum(shares[k] for k in set(kinds))
    for kind in set(kinds):  # a kind weighs its share of the test perturbations, however many groups it has
        weight = sum(w for w, k in zip(validation.weights, kinds) if k == kind)
        assert weight == pytest.approx(shares[kind] / total)
    assert validation.weights.sum() == pytest.approx(1.0)


def _cell_types(levels: dict[str, float]) -> PerturbationData:
    """One stimulus in cell types whose control cells differ only by a level on genes 0-19."""
    import anndata as ad

    rng = np.random.default_rng(0)
    rows, obs = [], []
    for context, level in levels.items():
        base = np.full(40, 2.0)
        base[:20] += level
        for condition in ("control", "stim"):
            rows.append(base + (condition == "stim") + rng.normal(0, 0.2, (30, 40)))
            obs += [(condition, context)] * 30
    adata = ad.AnnData(np.clip(np.concatenate(rows), 0, None).astype(np.float32))
    adata.obs["perturbation"] = [o[0] for o in obs]
    adata.obs["cell_type"] = [o[1] for o in obs]
    adata.obs_names = [f"c{i}" for i in range(adata.n_obs)]
    adata.var_names = [f"g{i}" for i in range(40)]
    adata.uns["log1p"] = {"base": None}
    return PerturbationData.from_anndata(adata, pert_col="perturbation", control="control", context_cols=["cell_type"])


def test_validation_contexts_nearest_as_novel_or_both():
    """A test cell type (level 2.8) 0.8 from its nearest training one ("near", 2.0), two training
    siblings (0, 0.1) and a lone type (0.9, also 0.8 from its nearest, while "near" is 1.1 from
    its own): 'nearest' holds out "near", 'as-novel' the one as far from the rest of training as
    the test is from training (the lone one, not a sibling), 'both' one of each."""
    data = _cell_types({"sib_a": 0.0, "sib_b": 0.1, "lone": 0.9, "near": 2.0, "test": 2.8})
    view = SplitView(data, make_split(data, "context", test_context="test"))
    assert inner_split(view, "auto").held_out == ["near"]
    assert inner_split(view, "auto", contexts="as-novel").held_out == ["lone"]
    assert sorted(inner_split(view, "auto", contexts="both").held_out) == ["lone", "near"]
    with pytest.raises(ValueError, match="as-novel"):
        inner_split(view, "auto", contexts="farthest")


def test_rotations_hold_out_other_contexts_and_perturbations_in_turn(data):
    """Each rotation holds out as many training contexts (perturbations) as the first split, none
    held out before, in the order the first was chosen by; a split of the split's own cells has none."""
    cell_types = _cell_types({"sib_a": 0.0, "sib_b": 0.1, "lone": 0.9, "near": 2.0, "test": 2.8})
    view = SplitView(cell_types, make_split(cell_types, "context", test_context="test"))
    first = inner_split(view, "auto")
    splits = rotations(view, first, 3)
    assert [s.held_out for s in splits] == [["near"], ["lone"], ["sib_b"]]  # nearest the test first
    assert rotations(view, first, 9)[-1].held_out == ["sib_a"] and len(rotations(view, first, 9)) == 4
    for split in splits[1:]:
        held = split.held_out[0]
        assert not (cell_types.contexts[_perturbed(view, split.view.rows.train)] == held).any()
        assert {g.context for g in ValidationSet(split.view).groups} == {held}

    unseen = SplitView(data, make_split(data, "perturbations", n_test=2, seed=0))
    first = inner_split(unseen, "auto", n_held_out=1)
    splits = rotations(unseen, first, 3)
    assert len(splits) == 3
    singles = [[p for p in s.held_out if len(data.components(p)) == 1] for s in splits]
    assert all(len(s) == 1 for s in singles) and len({s[0] for s in singles}) == 3  # one other single each
    for split, (single,) in zip(splits, singles):
        trained = set(data.perturbations[_perturbed(unseen, split.view.rows.train)])
        assert not any(single in data.components(p) for p in trained)  # with its combinations

    combos = SplitView(data, make_split(data, "combinations", seen=[2], fraction=0.5, seed=1))
    assert rotations(combos, inner_split(combos, "auto"), 3) == [inner_split(combos, "auto")]


def test_the_prior_and_mode_are_chosen_on_the_mean_over_rotations(tmp_path):
    cell_types = _cell_types({"sib_a": 0.0, "sib_b": 0.1, "lone": 0.9, "near": 2.0, "test": 2.8})
    view = SplitView(cell_types, make_split(cell_types, "context", test_context="test"))
    first = inner_split(view, "auto")
    second = rotations(view, first, 2)[1]
    splits = [(s.view, ValidationSet(s.view, seed=0)) for s in (first, second)]
    one = [Prior.fit("auto", v, val, PRIOR_STRENGTHS) for v, val in splits]
    both = Prior.fit("auto", *splits[0], PRIOR_STRENGTHS, more=[splits[1]])
    for label, scores in both.scores.items():
        assert scores["score"] == pytest.approx((one[0].scores[label]["score"] + one[1].scores[label]["score"]) / 2)
    assert both.label == max(both.scores, key=lambda label: both.scores[label]["score"])
    assert "over 2 inner splits" in both.reason

    config = LatentShiftConfig(n_components=8, hidden=32, decoder_hidden=32, decoder_steps=20, groups_per_step=4,
                               prior="auto", validation_rotations=2)
    model = LatentShift.from_view(view, config)
    model.fit(view, TrainConfig(max_steps=20, batch_size=16, val_every=20, checkpoint_every=20, progress=False), tmp_path)
    report = model.fit_report
    assert report["validation_split"]["held_out"] == ["near"]
    (rotation,) = report["validation_rotations"]
    assert rotation["held_out"] == ["lone"] and set(rotation["validation"]) == {"flow", "prior-mean", "prior"}
    assert (tmp_path / "stages" / "rotation-1").is_dir()  # trained once more, on the second split
    assert report["prior"] == both.label
    means = {m: s["score"] for m, s in report["validation"].items()}
    for mode, mean in means.items():  # each mode's score is its mean over the two splits
        assert mean == pytest.approx((report["validation_first_split"][mode]["score"]
                                      + rotation["validation"][mode]["score"]) / 2)
    splits = [report["validation_first_split"], rotation["validation"]]  # mode_rule every-split (the default)
    allowed = [m for m in means if all(split[m]["score"] >= split["prior"]["score"] for split in splits)]
    assert model.prediction_mode == max(allowed, key=means.get)
    model.save(tmp_path / "saved")
    assert "validation_rotations" in json.loads((tmp_path / "saved" / "model.json").read_text())["fit_report"]


def test_every_split_keeps_a_mode_that_leads_on_the_mean_only_by_one_split():
    """``mode_rule: every-split``: the flow's cells lead the prior's on the mean of two inner splits
    but lose on one, so the prior's cells (or a mode that leads on both) are chosen instead."""
    from pertflow.models.prior import choose_prediction_mode
    from pertflow.models.validation import ValidationScore, mean_score

    def scores(flow, prior_mean, prior):
        return {m: ValidationScore(0.0, 0.0, v) for m, v in zip(("flow", "prior-mean", "prior"), (flow, prior_mean, prior))}

    splits = [scores(0.9, 0.25, 0.2), scores(0.1, 0.25, 0.2)]  # the flow: +0.7 on one split, -0.1 on the other
    prior = SimpleNamespace(reason="the best validation score", label="mean")  # what the choice reads of a prior

    def mean(mode):
        return mean_score([split[mode] for split in splits])

    def every(mode):
        return all(split[mode].score >= split["prior"].score for split in splits)

    assert choose_prediction_mode(mean, prior)[0] == "flow"  # mode_rule: mean
    mode, report = choose_prediction_mode(mean, prior, allowed=every)
    assert mode == "prior-mean" and report["modes_not_allowed"] == ["flow"]
    splits[1]["prior-mean"] = ValidationScore(0.0, 0.0, 0.1)
    assert choose_prediction_mode(mean, prior, allowed=every)[0] == "prior"


def test_rotations_only_on_the_kinds_named(tmp_path):
    """``validation_rotations_on: [perturbations]`` leaves a context transfer on its one inner split."""
    cell_types = _cell_types({"sib_a": 0.0, "sib_b": 0.1, "lone": 0.9, "near": 2.0, "test": 2.8})
    view = SplitView(cell_types, make_split(cell_types, "context", test_context="test"))
    config = LatentShiftConfig(n_components=8, hidden=32, decoder_hidden=32, decoder_steps=20, groups_per_step=4,
                               prior="auto", validation_rotations=2, validation_rotations_on=("perturbations",))
    model = LatentShift.from_view(view, config)
    model.fit(view, TrainConfig(max_steps=20, batch_size=16, val_every=20, checkpoint_every=20, progress=False), tmp_path)
    assert model.fit_report["validation_split"]["held_out"] == ["near"]
    assert "validation_rotations" not in model.fit_report and not (tmp_path / "stages" / "rotation-1").exists()
    assert "leaves out 'contexts'" in model.fit_report["validation_split"]["rotations"]
    with pytest.raises(InputError, match="validation_rotations_on"):
        build(LatentShiftConfig, {"validation_rotations_on": ["cells"]}, "model")
    with pytest.raises(ValueError, match="validation_rotations_on is empty"):
        LatentShiftConfig(validation_rotations=3, validation_rotations_on=())


def test_rotations_of_a_dose_screen_hold_out_other_drugs():
    """A drug at several doses is one single (drugA@1's component is drugA): a rotation holds out
    another drug, never the first split's again at its other doses."""
    adata = make_synthetic(n_genes=30, n_singles=6, n_combos=0, n_contexts=1, cells_per_group=10,
                           controls_per_context=40, n_effect_genes=6, doses=(0.1, 1.0, 10.0), seed=2)
    data = PerturbationData.from_anndata(adata, dose_col="dose")
    drugs = sorted({data.components(p)[0] for p in map(str, data.perturbations) if p != data.spec.control})
    view = SplitView(data, make_split(data, "perturbations", test_perturbations=[p for p in set(map(
        str, data.perturbations)) if p.startswith(drugs[0])]))
    splits = rotations(view, inner_split(view, "auto", n_held_out=1), 3)
    held = [{data.components(p)[0] for p in s.held_out} for s in splits]
    assert len(splits) == 3 and all(len(h) == 1 for h in held) and len(set().union(*held)) == 3
