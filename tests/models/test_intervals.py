"""Uncertainty from samples (predict.interval): per-gene intervals of the predicted mean shift,
a bootstrap over the generated cells (each paired with its control cell) of several generations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pertflow.api import intervals_path, predict, split_view, train
from pertflow.data import PerturbationData, make_split
from pertflow.models.config import PredictConfig
from pertflow.models.predict import shift_intervals

LEVEL = 0.9
#: Coverage of a 90% percentile bootstrap of a mean of 40+ skewed cells, over a few thousand
#: (perturbation, gene) pairs: within this of 0.9 (it runs a little under at small n).
TOLERANCE = 0.05


def test_shift_interval_covers_the_true_shift_and_narrows_with_more_cells():
    rng = np.random.default_rng(0)
    genes = 400
    shift = rng.uniform(0.5, 2.0, genes)
    control_mean = np.full(genes, 1.0)
    widths, covered = {}, {}
    for n in (40, 400):
        hits, width = [], []
        for rep in range(5):  # the generating distribution: control mean + an exponential shift (skewed)
            controls = control_mean + rng.normal(0, 1.0, size=(n, genes))  # a spread the pairing takes out
            cells = controls + rng.exponential(shift, size=(n, genes))
            mean, lower, upper = shift_intervals(cells - controls, LEVEL, 200, np.random.default_rng(rep))
            assert np.all(lower <= mean) and np.all(mean <= upper)
            hits.append((lower <= shift) & (shift <= upper))
            width.append(upper - lower)
        covered[n], widths[n] = np.mean(hits), np.mean(width)
    for n, c in covered.items():
        assert abs(c - LEVEL) < TOLERANCE, f"{n} cells: coverage {c:.3f}"
    assert widths[40] > 2.5 * widths[400]  # ~sqrt(10) wider with ten times fewer cells


@pytest.fixture(scope="module")
def fitted(synthetic_adata, tmp_path_factory):
    data = PerturbationData.from_anndata(synthetic_adata.copy())
    split = make_split(data, "combinations", seen=[2])
    model = train("additive", data, split, tmp_path_factory.mktemp("run") / "additive")
    return data, split, model


def test_predicted_intervals_cover_the_generating_shift(fitted, tmp_path, monkeypatch):
    data, split, model = fitted
    delta = np.random.default_rng(3).uniform(1.0, 3.0, len(model.genes))  # large against the controls' spread

    def generate(controls, pert, ctx, rng, settings=None):
        """A known generating distribution: each control cell plus an exponential shift of mean
        ``delta`` per gene (never negative, so nothing is clipped); its mean shift is ``delta``."""
        return controls + rng.exponential(delta, size=controls.shape)

    monkeypatch.setattr(model, "generate", generate)
    out = tmp_path / "pred.h5ad"
    plain = predict(model, data, split, seed=0)
    pred = predict(model, data, split, out, seed=0, sets=[f"predict.interval={LEVEL}", "predict.n_seeds=1"])
    np.testing.assert_array_equal(plain.X, pred.X)  # the written cells do not change
    found = pred.uns["pertflow_interval"]
    view_delta = pd.Series(delta, index=model.genes)[pred.var_names].to_numpy()
    covered = (found["lower"] <= view_delta) & (view_delta <= found["upper"])
    assert found["lower"].shape == (len(found["perturbation"]), pred.n_vars) and len(found["perturbation"]) >= 3
    assert abs(covered.mean() - LEVEL) < TOLERANCE, f"coverage {covered.mean():.3f}"
    table = pd.read_csv(intervals_path(out))
    assert list(table.columns) == ["perturbation", "context", "gene", "mean", "lower", "upper"]
    assert len(table) == found["lower"].size and (table["lower"] <= table["mean"]).all()
    # several generations pooled: narrower, and still covering
    pooled = predict(model, data, split, seed=0, sets=[f"predict.interval={LEVEL}", "predict.n_seeds=4"])
    more = pooled.uns["pertflow_interval"]
    width_one = (found["upper"] - found["lower"]).mean()
    width_four = (more["upper"] - more["lower"]).mean()
    assert width_four < 0.65 * width_one  # about half: four times the cells
    assert abs(((more["lower"] <= view_delta) & (view_delta <= more["upper"])).mean() - LEVEL) < TOLERANCE


def test_interval_setting_is_checked():
    with pytest.raises(ValueError, match="interval must be a level"):
        PredictConfig(interval=90)


def test_scatter_plot_draws_the_intervals(fitted, tmp_path):
    from pertflow.api import evaluation_inputs
    from pertflow.benchmark import _write_deltas
    from pertflow.eval.plots import plot_deltas

    data, split, model = fitted
    view = split_view(data, split)
    pred = predict(model, view, None, seed=0, sets=[f"predict.interval={LEVEL}"])
    run_dir = tmp_path / "runs" / "task" / "additive"
    run_dir.mkdir(parents=True)
    _write_deltas(run_dir, evaluation_inputs(view), pred)
    with np.load(run_dir / "deltas.npz") as d:
        assert d["lower"].shape == d["pred"].shape
        assert np.all(d["lower"] <= d["pred"] + 1e-5) and np.all(d["pred"] <= d["upper"] + 1e-5)
        results = pd.DataFrame({"task": "task", "fold": "", "context": d["context"], "perturbation": d["perturbation"]})
    paths = plot_deltas(results, tmp_path, ["additive"])
    assert paths and paths[0].stat().st_size > 0
