"""agg_results.csv in cell-eval's own layout, read by cell-eval's own code; a prediction of one
context without the context column."""

from __future__ import annotations

import numpy as np
import pytest
from evaldata import CONTROL

from pertflow.eval.cell_eval_bridge import cell_eval_adata
from pertflow.eval.evaluator import EvalConfig, evaluate

cell_eval = pytest.importorskip("cell_eval")
pl = pytest.importorskip("polars")

# cell-eval's exact numbers (no NaN for its placeholders), without the slow numba metric.
EXACT = EvalConfig(num_threads=1, skip_cell_eval_metrics=("clustering_agreement",), mask_undefined=False)
KW = dict(pert_col="condition", control=CONTROL, context_col="cell_type")


def _one_context(adata, context="c1"):
    return adata[np.flatnonzero(adata.obs["cell_type"].astype(str).to_numpy() == context)].copy()


def _half_effect(real):
    """A worse prediction: each perturbed cell moved half-way to the control mean."""
    pred = real.copy()
    labels = pred.obs["condition"].astype(str).to_numpy()
    ctrl_mean = pred.X[labels == CONTROL].mean(axis=0)
    pred.X[labels != CONTROL] = 0.5 * (pred.X[labels != CONTROL] + ctrl_mean)
    return pred


def test_agg_results_is_cell_eval_layout_and_cell_eval_reads_it(synthetic, tmp_path):
    real = _one_context(synthetic.real)
    pred = _half_effect(real)
    result = evaluate(real, pred, train=synthetic.train, outdir=tmp_path / "ours", config=EXACT, **KW)
    ours = pl.read_csv(tmp_path / "ours" / "agg_results.csv")

    # cell-eval's own output for the same cells, written by cell-eval itself.
    labels = lambda a: a.obs["condition"].astype(str).to_numpy()  # noqa: E731
    evaluator = cell_eval.MetricsEvaluator(
        adata_pred=cell_eval_adata(pred.X, labels(pred), pred.var_names, "condition"),
        adata_real=cell_eval_adata(real.X, labels(real), real.var_names, "condition"),
        control_pert=CONTROL, pert_col="condition", num_threads=1, outdir=str(tmp_path / "theirs"),
    )
    evaluator.compute(profile="full", skip_metrics=["clustering_agreement"], write_csv=True)
    theirs = pl.read_csv(tmp_path / "theirs" / "agg_results.csv")

    assert ours.columns[0] == theirs.columns[0] == "statistic"
    assert ours["statistic"].to_list() == theirs["statistic"].to_list()
    # Every cell-eval column is there, in cell-eval's order, with cell-eval's values; pertflow's beside them.
    assert ours.columns[: len(theirs.columns)] == theirs.columns
    assert {"pearson_delta_top20_de", "edistance_pca", "systema_pearson_delta"} <= set(ours.columns)
    compared = 0
    for column in theirs.columns[1:]:
        a, b = ours[column].to_numpy().astype(float), theirs[column].to_numpy().astype(float)
        both = np.isfinite(a) & np.isfinite(b)
        np.testing.assert_allclose(a[both], b[both], rtol=1e-9, atol=1e-12, err_msg=column)
        compared += int(both.all())
    assert compared > 20
    assert result.aggregate.loc["mean", "pearson_delta"] == pytest.approx(
        theirs.filter(pl.col("statistic") == "mean")["pearson_delta"][0]
    )

    # cell-eval's scoring reads two agg files as it reads its own: a perfect prediction scores above the worse one.
    evaluate(real, real, train=synthetic.train, outdir=tmp_path / "perfect", config=EXACT, **KW)
    score = cell_eval.score_agg_metrics(
        str(tmp_path / "perfect" / "agg_results.csv"), str(tmp_path / "ours" / "agg_results.csv")
    )
    scores = dict(zip(score["metric"].to_list(), score["from_baseline"].to_list()))
    # "zero is best" metrics: 1 - perfect / worse, i.e. 1 for the perfect prediction's zero error.
    assert scores["mse"] == pytest.approx(1.0) and scores["mse_delta"] == pytest.approx(1.0)


def test_single_context_prediction_without_context_column(synthetic):
    real = _one_context(synthetic.real)
    pred = _half_effect(real)
    with_column = evaluate(real, pred, train=synthetic.train, config=EXACT, **KW)
    bare = pred.copy()
    del bare.obs["cell_type"]
    filled = evaluate(real, bare, train=synthetic.train, config=EXACT, **KW)
    assert "cell_type" not in bare.obs  # the caller's object is left as it was
    assert any("was taken to be in 'c1'" in note for note in filled.notes)
    assert not any("was taken" in note for note in with_column.notes)
    np.testing.assert_allclose(
        filled.per_perturbation["pearson_delta"], with_column.per_perturbation["pearson_delta"]
    )
    assert set(filled.per_perturbation["context"]) == {"c1"}
    # With several test contexts the column is still required.
    two = synthetic.real.copy()
    del two.obs["cell_type"]
    from pertflow.errors import InputError

    with pytest.raises(InputError, match="no column 'cell_type'"):
        evaluate(synthetic.real, two, config=EXACT, **KW)
