"""AnnData first: model.predict(controls, conditions) without a split file; short reprs."""

from __future__ import annotations

import numpy as np
import pytest

from pertflow.api import train
from pertflow.data import PerturbationData, make_split
from pertflow.errors import InputError


@pytest.fixture(scope="module")
def fitted(synthetic_adata, tmp_path_factory):
    data = PerturbationData.from_anndata(synthetic_adata.copy())
    split = make_split(data, "combinations", seen=[2])
    model = train("additive", data, split, tmp_path_factory.mktemp("run") / "additive")
    return data, split, model


def _log_cells(data, mask):
    return data.to_anndata(np.flatnonzero(mask))


def test_predict_from_anndata_controls_moves_towards_the_real_cells(fitted):
    data, split, model = fitted
    line = data.contexts == "line_A"
    controls = _log_cells(data, line & data.is_control)
    single = next(p for p in data.perturbations[~data.is_control] if "+" not in p)
    pred = model.predict(controls, [single, split.test_perturbations[0]], n_cells=30, seed=1)
    assert pred.shape == (60, len(model.genes)) and list(pred.var_names) == model.genes
    assert (pred.obs[data.spec.pert_col].astype(str).value_counts() == 30).all()
    assert set(pred.obs["cell_type"]) == {"line_A"}  # the context read from the controls' obs
    real = _log_cells(data, line & (data.perturbations == single)).X.mean(axis=0)
    ctrl = controls.X.mean(axis=0)
    mine = pred.X[pred.obs[data.spec.pert_col].astype(str).to_numpy() == single].mean(axis=0)
    assert np.abs(mine - real).sum() < 0.5 * np.abs(ctrl - real).sum()
    again = model.predict(controls, [single, split.test_perturbations[0]], n_cells=30, seed=1)
    np.testing.assert_array_equal(again.X, pred.X)


def test_predict_from_anndata_refuses_what_it_cannot_read(fitted):
    data, _, model = fitted
    controls = _log_cells(data, data.is_control)  # three lines
    with pytest.raises(InputError, match="give the controls' context"):
        model.predict(controls, ["G0001"])
    one = controls[controls.obs["cell_type"] == "line_B"].copy()
    with pytest.raises(InputError, match="lack 1 of the model's genes"):
        model.predict(one[:, 1:].copy(), ["G0001"])
    counts = one.copy()
    counts.X = np.round(np.expm1(counts.X))
    with pytest.raises(InputError, match="log1p"):
        model.predict(counts, ["G0001"])
    assert model.predict(controls, "G0001", context="line_B", n_cells=5).n_obs == 5


def test_reprs_are_short(fitted):
    data, split, model = fitted
    for obj in (data, split, model):
        text = repr(obj)
        assert len(text) < 300 and "\n" not in text, text
    assert "test perturbations" in repr(split) and "additive" in repr(model)
