"""The workflow verbs over files: train, predict, evaluate, and the real side they are scored against."""

import anndata as ad
import numpy as np
import pytest

from pertflow.api import evaluate_split, evaluation_inputs, predict, train
from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.eval.evaluator import EvalConfig
from pertflow.data.view import SplitView

FAST = EvalConfig(skip_cell_eval_metrics=("clustering_agreement",))


@pytest.fixture(scope="module")
def data_split(synthetic_file):
    data = PerturbationData.read(synthetic_file)
    return data, make_split(data, "combinations", seen=[2])


def test_real_side_holds_test_cells_and_visible_controls(data_split):
    data, split = data_split
    real = SplitView(data, split).real_test_anndata()
    is_ctrl = real.obs["perturbation"].astype(str) == "control"
    assert int((~is_ctrl).sum()) == len(split.test)
    assert set(real.obs_names[is_ctrl]) == set(split.test_controls)
    assert list(real.var_names) == split.genes
    inputs = evaluation_inputs(data, split)
    assert inputs.context_col == "cell_type" and set(inputs.train.obs_names) == set(split.train)


def test_a_perfect_prediction_beats_a_baseline_through_the_files(data_split, tmp_path):
    data, split = data_split
    train("additive", data, split, tmp_path / "additive")
    pred = predict(tmp_path / "additive", data, split, tmp_path / "pred.h5ad", seed=0)
    assert ad.read_h5ad(tmp_path / "pred.h5ad").shape == pred.shape
    real = SplitView(data, split).real_test_anndata()
    perfect = real.copy()
    perfect.obs_names = [f"p{i}" for i in range(perfect.n_obs)]
    scored = evaluate_split(data, split, tmp_path / "pred.h5ad", out=tmp_path / "eval", config=FAST, de_cache=tmp_path / "de")
    best = evaluate_split(data, split, perfect, config=FAST, de_cache=tmp_path / "de")
    assert (tmp_path / "eval" / "results.csv").is_file() and (tmp_path / "eval" / "agg_results.csv").is_file()
    for metric, better in (("pearson_delta", np.greater), ("edistance_pca", np.less)):
        assert better(best.aggregate.loc["mean", metric], scored.aggregate.loc["mean", metric]), metric
    # each result beside its yardstick: the baselines and the ceiling on the same cells (cached per split)
    table = scored.yardstick
    assert set(table.index) == {"no-change", "mean", "additive", "linear", "context-shift", "ceiling"}
    assert table.loc["additive", "pearson_delta"] == pytest.approx(scored.aggregate.loc["mean", "pearson_delta"], abs=1e-6)
    assert any("ties with the strongest baseline" in line for line in scored.verdict)  # additive is a baseline
    assert any("beats every baseline" in line and "E-distance" in line and "lower is better" in line for line in best.verdict)
    written = (tmp_path / "eval" / "yardstick.csv").read_text()
    assert "E-distance (lower is better)" in written and "ceiling" in written
    assert len(list((tmp_path / "de").glob("yardstick-*.csv"))) == 1  # the second call read the first's
    plain = evaluate_split(data, split, perfect, config=FAST, baselines=False)
    assert plain.yardstick is None and plain.verdict == ()


def test_evaluate_split_is_quiet_unless_verbose(data_split, monkeypatch, capsys):
    """Other libraries' bars and warnings (cell-eval's) are dropped from the API's evaluation
    unless verbose=True, as the CLI drops them unless --verbose (issue 31, item 9)."""
    import sys

    import pertflow.eval.evaluator as evaluator

    data, split = data_split
    real = SplitView(data, split).real_test_anndata()
    original = evaluator.evaluate

    def chatty(*args, **kwargs):
        print("a library's bar", file=sys.stderr)
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluator, "evaluate", chatty)
    monkeypatch.delenv("PERTFLOW_VERBOSE", raising=False)
    evaluate_split(data, split, real, config=FAST, baselines=False)
    assert "a library's bar" not in capsys.readouterr().err
    evaluate_split(data, split, real, config=FAST, baselines=False, verbose=True)
    assert "a library's bar" in capsys.readouterr().err
