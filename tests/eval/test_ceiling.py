"""The noise ceiling: disjoint halves of the real cells scored against each other."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from evaldata import CONTROL, TEST_PERTS

from pertflow.eval.ceiling import noise_ceiling, spearman_brown, split_halves
from pertflow.eval.evaluator import EvalConfig, evaluate

pytest.importorskip("cell_eval")

FAST = EvalConfig(num_threads=1, skip_cell_eval_metrics=("clustering_agreement",), cell_eval_profile="minimal")
KW = dict(pert_col="condition", control=CONTROL, context_col="cell_type")


def _keys(adata):
    return adata.obs["cell_type"].astype(str) + "/" + adata.obs["condition"].astype(str)


def test_halves_are_disjoint_and_balanced(synthetic):
    real = synthetic.real[:-1].copy()  # one group with an odd number of cells
    a, b = split_halves(real, "condition", "cell_type", seed=3)
    assert not set(a.obs_names) & set(b.obs_names)
    sizes = _keys(real).value_counts()
    for half in (a, b):
        counts = _keys(half).value_counts()
        assert counts.sort_index().to_dict() == (sizes // 2).sort_index().to_dict()
    again, _ = split_halves(real, "condition", "cell_type", seed=3)
    assert list(again.obs_names) == list(a.obs_names)  # seeded
    other, _ = split_halves(real, "condition", "cell_type", seed=4)
    assert list(other.obs_names) != list(a.obs_names)


def _thin(real, n_per_group, seed=0):
    """At most n cells of each (context, perturbation), all controls."""
    rng = np.random.default_rng(seed)
    keys, labels = _keys(real).to_numpy(), real.obs["condition"].astype(str).to_numpy()
    keep = []
    for key in np.unique(keys):
        rows = np.flatnonzero(keys == key)
        keep.append(rows if labels[rows[0]] == CONTROL else rng.choice(rows, size=n_per_group, replace=False))
    return real[np.sort(np.concatenate(keep))].copy()


def test_ceiling_sits_between_perfect_and_noise_and_falls_with_fewer_cells(synthetic, tmp_path):
    real = synthetic.real
    ceiling = noise_ceiling(real, train=synthetic.train, config=FAST, outdir=tmp_path / "ceiling", **KW)
    table = ceiling.per_perturbation
    assert len(table) == 2 * len(TEST_PERTS) and (table["n_cells_real"] == table["n_cells_pred"]).all()
    assert (tmp_path / "ceiling" / "agg_results.csv").is_file()
    assert any("noise ceiling" in note for note in ceiling.notes)
    mean = ceiling.aggregate.loc["mean"]
    # Real against real: far above chance, but below the perfect score because of sampling noise.
    assert 0.5 < mean["pearson_delta"] < 0.999
    assert 0.5 < mean["pearson_delta_top20_de"] < 0.999
    assert mean["mse"] > 0
    # A model that predicts no change scores far below the ceiling.
    nochange = real.copy()
    labels, contexts = nochange.obs["condition"].astype(str).to_numpy(), nochange.obs["cell_type"].astype(str).to_numpy()
    for c in np.unique(contexts):
        ctrl = np.flatnonzero((contexts == c) & (labels == CONTROL))
        test = np.flatnonzero((contexts == c) & (labels != CONTROL))
        nochange.X[test] = nochange.X[np.resize(ctrl, test.size)]
    worse = evaluate(real, nochange, train=synthetic.train, config=FAST, **KW).aggregate.loc["mean"]
    assert worse["pearson_delta_top20_de"] < mean["pearson_delta_top20_de"] - 0.3
    # Fewer cells, more sampling noise, a lower ceiling.
    thin = noise_ceiling(_thin(real, 8), train=synthetic.train, config=FAST, **KW).aggregate.loc["mean"]
    assert thin["pearson_delta"] < mean["pearson_delta"] - 0.05
    assert thin["mse"] > mean["mse"]


def test_spearman_brown_corrects_only_positive_pearson_deltas():
    table = pd.DataFrame({"pearson_delta": [0.5, -0.2, np.nan], "pearson_delta_top20_de": [1.0, 0.0, 0.6], "mse": [0.5, 0.5, 0.5]})
    out = spearman_brown(table)
    np.testing.assert_allclose(out["pearson_delta"], [2 / 3, -0.2, np.nan])
    np.testing.assert_allclose(out["pearson_delta_top20_de"], [1.0, 0.0, 0.75])
    assert out["mse"].tolist() == [0.5, 0.5, 0.5] and table["pearson_delta"][0] == 0.5


def test_benchmark_table_has_a_ceiling_row_never_marked_best():
    from pertflow.benchmark import markdown_table

    summary = pd.DataFrame(
        {"pearson_delta": [0.2, 0.6, 0.9], "edistance_pca": [0.5, 0.3, 0.1]},
        index=pd.MultiIndex.from_tuples([("t", "mean"), ("t", "additive"), ("t", "ceiling")], names=["task", "model"]),
    )
    table = markdown_table(summary)
    assert "| additive | **0.600** | **0.300** |" in table
    assert "| *ceiling* | *0.900* | *0.100* |" in table
    assert "| model | pearson_delta ↑ | edistance_pca ↓ |" in table  # each column says which way is better
