"""The evaluator: agreement with cell-eval, perfect vs wrong predictions, DE cache, input checks."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from evaldata import CONTEXTS, CONTROL, TEST_PERTS, SyntheticData, make_cells

from pertflow.errors import InputError
from pertflow.eval.evaluator import PERTFLOW_METRICS, EvalConfig, evaluate, metric_direction

cell_eval = pytest.importorskip("cell_eval")

# clustering_agreement only costs numba compilation time here; one test keeps the full profile.
FAST = EvalConfig(num_threads=1, skip_cell_eval_metrics=("clustering_agreement",))
KW = dict(pert_col="condition", control=CONTROL, context_col="cell_type")


def _rows(adata: ad.AnnData, mask: np.ndarray) -> ad.AnnData:
    return adata[np.flatnonzero(mask)].copy()


def _labels(adata: ad.AnnData, col: str) -> np.ndarray:
    return adata.obs[col].astype(str).to_numpy()


def _with_real_controls(real: ad.AnnData, predicted: ad.AnnData) -> ad.AnnData:
    """A prediction file: predicted test cells plus the real control cells."""
    controls = _rows(real, _labels(real, "condition") == CONTROL)
    out = ad.concat([predicted, controls], index_unique=None)
    out.obs_names_make_unique()
    return out


@pytest.fixture(scope="module")
def noisy_pred(synthetic: SyntheticData) -> ad.AnnData:
    """An imperfect model: fresh cells with half-sized effects, plus the real controls."""
    rng = np.random.default_rng(11)
    plan = [(c, p, 40) for c in CONTEXTS for p in TEST_PERTS]
    predicted = make_cells(rng, synthetic.base, synthetic.log_fold, plan, effect_scale=0.5)
    return _with_real_controls(synthetic.real, predicted)


@pytest.fixture(scope="module")
def wrong_preds(synthetic: SyntheticData) -> dict[str, ad.AnnData]:
    """Labels shuffled among test cells, and test cells replaced by control cells (no change)."""
    rng = np.random.default_rng(7)
    real = synthetic.real
    labels, contexts = _labels(real, "condition"), _labels(real, "cell_type")
    shuffled = real.copy()
    new_labels = labels.copy()
    nochange = real.copy()
    x = nochange.X.copy()
    for c in CONTEXTS:
        test_rows = np.flatnonzero((contexts == c) & (labels != CONTROL))
        ctrl_rows = np.flatnonzero((contexts == c) & (labels == CONTROL))
        new_labels[test_rows] = rng.permutation(labels[test_rows])
        x[test_rows] = x[rng.choice(ctrl_rows, size=test_rows.size, replace=True)]
    shuffled.obs["condition"] = new_labels
    nochange.X = x
    return {"shuffled": shuffled, "nochange": nochange}


# --- agreement with cell-eval -----------------------------------------------------------------


def test_values_under_cell_eval_names_equal_cell_eval(synthetic, noisy_pred, tmp_path):
    result = evaluate(
        synthetic.real, noisy_pred, train=synthetic.train, de_cache=tmp_path / "de", config=FAST, **KW
    )
    cached = evaluate(
        synthetic.real, noisy_pred, train=synthetic.train, de_cache=tmp_path / "de", config=FAST, **KW
    )
    table = result.per_perturbation
    for context in CONTEXTS:
        real_c = _rows(synthetic.real, _labels(synthetic.real, "cell_type") == context)
        pred_c = _rows(noisy_pred, _labels(noisy_pred, "cell_type") == context)
        evaluator = cell_eval.MetricsEvaluator(
            adata_pred=pred_c,
            adata_real=real_c,
            control_pert=CONTROL,
            pert_col="condition",
            num_threads=1,
            outdir=str(tmp_path / f"direct_{context}"),
        )
        direct, _ = evaluator.compute(profile="full", skip_metrics=["clustering_agreement"], write_csv=False)
        direct = pd.DataFrame(direct.to_dict(as_series=False)).set_index("perturbation").sort_index()
        for ours in (table, cached.per_perturbation):
            mine = ours[ours["context"] == context].set_index("perturbation").sort_index()
            assert list(mine.index) == list(direct.index)
            for column in direct.columns:
                np.testing.assert_allclose(
                    mine[column].to_numpy(float),
                    direct[column].to_numpy(float),
                    rtol=1e-12,
                    equal_nan=True,
                    err_msg=f"{column} in {context}",
                )
    # Sanity: the comparison covered the DE metrics and the pseudobulk metrics.
    assert {"overlap_at_N", "pr_auc", "pearson_delta", "discrimination_score_l1", "mae"} <= set(table.columns)


def test_real_de_is_cached_and_reused(synthetic, noisy_pred, tmp_path):
    first = evaluate(
        synthetic.real, noisy_pred, outdir=tmp_path / "run1", de_cache=tmp_path / "de", config=FAST, **KW
    )
    assert len(list((tmp_path / "de").glob("real_de_*.parquet"))) == len(CONTEXTS)
    # cell-eval writes real_de.csv only when it computes the real DE itself.
    assert len(list((tmp_path / "run1").rglob("real_de.csv"))) == len(CONTEXTS)
    second = evaluate(
        synthetic.real, synthetic.real, outdir=tmp_path / "run2", de_cache=tmp_path / "de", config=FAST, **KW
    )
    assert list((tmp_path / "run2").rglob("real_de.csv")) == []
    assert len(list((tmp_path / "run2").rglob("pred_de.csv"))) == len(CONTEXTS)
    assert (second.per_perturbation["overlap_at_N"] == 1.0).all()
    assert not first.per_perturbation["overlap_at_N"].eq(1.0).all()
    # Different real data: a different key, so a new table.
    changed = synthetic.real.copy()
    changed.X[0] = changed.X[1]
    evaluate(changed, changed, de_cache=tmp_path / "de", config=FAST, **KW)
    assert len(list((tmp_path / "de").glob("real_de_*.parquet"))) == len(CONTEXTS) + 1
    # Outputs on disk mirror the returned tables.
    on_disk = pd.read_csv(tmp_path / "run2" / "results.csv")
    assert list(on_disk.columns) == list(second.per_perturbation.columns)
    assert (tmp_path / "run2" / "agg_results.csv").is_file()


# --- perfect vs wrong predictions -------------------------------------------------------------


def test_perfect_prediction_beats_wrong_ones_on_every_metric(synthetic, wrong_preds):
    config = EvalConfig(num_threads=1)  # the full cell-eval profile, clustering_agreement included
    perfect = evaluate(synthetic.real, synthetic.real, train=synthetic.train, config=config, **KW)
    table = perfect.per_perturbation
    assert set(table["context"]) == set(CONTEXTS)
    assert len(table) == len(CONTEXTS) * len(TEST_PERTS)
    means = {"perfect": perfect.aggregate.loc["mean"]}
    for name, pred in wrong_preds.items():
        means[name] = evaluate(synthetic.real, pred, train=synthetic.train, config=FAST, **KW).aggregate.loc["mean"]

    checked = 0
    for metric, best in means["perfect"].items():
        direction = metric_direction(metric)
        if direction == "none":
            continue
        for name in wrong_preds:
            worse = means[name].get(metric, np.nan)
            if np.isnan(worse):  # e.g. de_spearman_sig when a prediction has no DE gene at all
                continue
            if direction == "higher":
                assert best > worse, f"{metric}: perfect {best} vs {name} {worse}"
            else:
                assert best < worse, f"{metric}: perfect {best} vs {name} {worse}"
            checked += 1
    assert checked > 50

    # Perfect scores sit at the ideal values.
    p = means["perfect"]
    for metric in (
        "pearson_delta",
        "pearson_delta_top20_de",
        "r2_delta",
        "systema_pearson_delta",
        "overlap_at_N",
    ):
        assert p[metric] == pytest.approx(1.0)
    for metric in ("mse", "mse_top20_de_rel_nochange", "edistance_pca"):
        assert p[metric] == pytest.approx(0.0, abs=1e-12)
    # The no-change prediction sits at chance where chance is defined.
    n = means["nochange"]
    assert abs(n["pearson_delta"]) < 0.3
    assert abs(n["pearson_delta_top20_de"]) < 0.3
    assert n["mse_top20_de_rel_nochange"] == pytest.approx(1.0, abs=0.2)
    assert n["r2_delta"] < 0.1
    assert n["overlap_at_N"] == 0.0
    assert n["roc_auc"] == pytest.approx(0.5, abs=0.1) or np.isnan(n["roc_auc"])
    assert n["knn_purity_pca"] < 0.4


def test_metric_columns_and_directions(synthetic, tmp_path):
    synthetic.real.write_h5ad(tmp_path / "real.h5ad")
    path = str(tmp_path / "real.h5ad")  # files are read like AnnData objects
    result = evaluate(path, path, train=synthetic.train, config=FAST, **KW)
    ours = [name.format(k=20) for name in PERTFLOW_METRICS]
    assert set(ours) <= set(result.per_perturbation.columns)
    assert list(result.per_perturbation.columns[:4]) == [
        "context",
        "perturbation",
        "n_cells_real",
        "n_cells_pred",
    ]
    assert list(result.aggregate.columns) == [c for c in result.per_perturbation.columns if c not in ("context", "perturbation", "n_cells_real", "n_cells_pred")]
    assert list(result.aggregate.index) == ["count", "null_count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    assert metric_direction("mse") == "lower"
    assert metric_direction("discrimination_score_l1") == "higher"
    assert metric_direction("de_nsig_counts_pred") == "none"
    assert metric_direction("mse_top20_de_rel_nochange") == "lower"
    with pytest.raises(KeyError):
        metric_direction("no_such_metric")
    with pytest.raises(InputError, match="no such file"):
        evaluate(tmp_path / "missing.h5ad", path, config=FAST, **KW)


# --- Systema reference, PCA fallback, no context ----------------------------------------------


def test_held_out_context_uses_context_shift_reference(synthetic):
    train = synthetic.train
    keep = ~((_labels(train, "cell_type") == "c2") & (_labels(train, "condition") != CONTROL))
    result = evaluate(synthetic.real, synthetic.real, train=_rows(train, keep), config=FAST, **KW)
    c2 = result.per_perturbation[result.per_perturbation["context"] == "c2"]
    assert np.isfinite(c2["systema_pearson_delta"]).all()
    assert any("context 'c2'" in note and "shift" in note for note in result.notes)


def test_without_train_pca_falls_back_and_systema_is_nan(synthetic):
    result = evaluate(synthetic.real, synthetic.real, config=FAST, **KW)
    table = result.per_perturbation
    assert table["systema_pearson_delta"].isna().all()
    assert np.isfinite(table["edistance_pca"]).all()
    assert any("PCA fitted on the real control cells" in note for note in result.notes)


def test_without_a_context_column_everything_is_one_context(synthetic):
    real = _rows(synthetic.real, _labels(synthetic.real, "cell_type") == "c1")
    config = EvalConfig(num_threads=1, skip_cell_eval_metrics=("clustering_agreement",), cell_eval_profile="minimal")
    result = evaluate(real, real, pert_col="condition", control=CONTROL, train=synthetic.train, config=config)
    assert set(result.per_perturbation["context"]) == {"all"}
    assert np.isfinite(result.per_perturbation["pearson_delta"]).all()


# --- degenerate and bad inputs ----------------------------------------------------------------


def test_mean_only_prediction_warns(synthetic):
    pred = synthetic.real.copy()
    labels, contexts = _labels(pred, "condition"), _labels(pred, "cell_type")
    for c in CONTEXTS:
        for p in TEST_PERTS:
            rows = np.flatnonzero((labels == p) & (contexts == c))
            pred.X[rows] = pred.X[rows].mean(axis=0)
    with pytest.warns(UserWarning, match="mean-only prediction"):
        result = evaluate(synthetic.real, pred, train=synthetic.train, config=FAST, **KW)
    assert result.aggregate.loc["mean", "pearson_delta"] == pytest.approx(1.0)


def test_categorical_labels_with_unused_categories_are_fine(synthetic):
    # Subsetting keeps unused categories, which would crash pdex if passed through as they are.
    real = _rows(synthetic.real, _labels(synthetic.real, "condition") != "C")
    real.obs["condition"] = pd.Categorical(
        real.obs["condition"].astype(str), categories=["A", "B", "C", CONTROL]
    )
    result = evaluate(real, real.copy(), train=synthetic.train, config=FAST, **KW)
    assert set(result.per_perturbation["perturbation"]) == {"A", "B"}


def test_sparse_float16_and_duplicate_cell_names(synthetic, noisy_pred):
    dense = evaluate(synthetic.real, noisy_pred, train=synthetic.train, config=FAST, **KW).per_perturbation
    real_sp, pred_sp, train_sp = synthetic.real.copy(), noisy_pred.copy(), synthetic.train.copy()
    for adata in (real_sp, pred_sp, train_sp):
        adata.X = sp.csr_matrix(adata.X)
    pred_sp.obs_names = ["same"] * pred_sp.n_obs  # cell-eval never sees these names
    sparse = evaluate(real_sp, pred_sp, train=train_sp, config=FAST, **KW).per_perturbation
    pd.testing.assert_frame_equal(sparse, dense, rtol=1e-6)
    half = synthetic.real.copy()
    half.X = half.X.astype(np.float16)  # numba cannot use float16; cast before cell-eval
    result = evaluate(synthetic.real, half, config=FAST, **KW)
    assert result.aggregate.loc["mean", "pearson_delta"] > 0.99


def _expect_input_error(synthetic, pred, match, real=None):
    with pytest.raises(InputError, match=match):
        evaluate(synthetic.real if real is None else real, pred, config=FAST, **KW)


def test_gene_order_and_gene_set_mismatch(synthetic):
    pred = synthetic.real[:, synthetic.real.var_names[::-1]].copy()
    _expect_input_error(synthetic, pred, "different order.*pred\\[:, real.var_names\\]")
    _expect_input_error(synthetic, synthetic.real[:, :-1].copy(), "different genes")


def test_negative_nan_counts_and_huge_values(synthetic):
    pred = synthetic.real.copy()
    pred.X[0, 0] = -0.5
    _expect_input_error(synthetic, pred, "negative values.*Clip")
    pred.X[0, 0] = np.nan
    _expect_input_error(synthetic, pred, "NaN")
    pred.X[0, 0] = 20.0
    _expect_input_error(synthetic, pred, "too large for log1p")
    counts = synthetic.real.copy()
    counts.X = np.round(np.expm1(counts.X))
    counts.X = np.minimum(counts.X, 14)
    _expect_input_error(synthetic, counts, "raw counts")


def test_missing_controls_and_perturbation_mismatch(synthetic):
    real = synthetic.real
    labels = _labels(real, "condition")
    _expect_input_error(
        synthetic, _rows(real, labels != CONTROL), "no 'ctrl' cells.*Add the real control cells"
    )
    extra = real.copy()
    extra.obs["condition"] = np.where(labels == "A", "Z", labels)
    _expect_input_error(synthetic, extra, "no real cells.*\\['Z'\\]")
    _expect_input_error(synthetic, _rows(real, labels != "B"), "lacks perturbations.*\\['B'\\]")


def test_altered_controls_are_refused(synthetic):
    pred = synthetic.real.copy()
    ctrl = np.flatnonzero(_labels(pred, "condition") == CONTROL)
    pred.X[ctrl] = pred.X[ctrl] + 0.5
    _expect_input_error(synthetic, pred, "control cells.*unchanged")


def test_missing_column_and_duplicate_genes(synthetic):
    pred = synthetic.real.copy()
    del pred.obs["cell_type"]
    _expect_input_error(synthetic, pred, "no column 'cell_type'")
    dup = synthetic.real.copy()
    dup.var_names = ["G0"] + list(dup.var_names[1:-1]) + ["G0"]
    _expect_input_error(synthetic, dup, "duplicated gene names", real=dup)
    # A test context of real that pred does not predict.
    odd = synthetic.real.copy()
    odd.obs["cell_type"] = np.where(_labels(odd, "cell_type") == "c2", "c3", _labels(odd, "cell_type"))
    _expect_input_error(synthetic, odd, "contexts \\['c2'\\] that pred does not predict")


def test_undefined_cell_eval_values_become_nan(synthetic):
    """One perturbation per context, and a perturbation with no real effect (no significant gene)."""
    rng = np.random.default_rng(3)
    log_fold = dict(synthetic.log_fold, N=np.zeros_like(synthetic.log_fold["A"]))
    plan = [("c1", "A", 40), ("c1", CONTROL, 60), ("c2", "N", 40), ("c2", CONTROL, 60)]
    real = make_cells(rng, synthetic.base, log_fold, plan)
    masked = evaluate(real, real, config=FAST, **KW)
    raw = evaluate(real, real, config=EvalConfig(num_threads=1, mask_undefined=False), **KW)
    m = masked.per_perturbation.set_index("perturbation")
    r = raw.per_perturbation.set_index("perturbation")
    # cell-eval's placeholders: a perfect prediction gets overlap 0 without real DE genes, and
    # any prediction gets discrimination 1 when it is the context's only perturbation.
    assert r.loc["N", "de_nsig_counts_real"] == 0
    assert r.loc["N", "overlap_at_N"] == 0.0
    assert (r["discrimination_score_l1"] == 1.0).all()
    assert np.isnan(m.loc["N", "overlap_at_N"]) and m.loc["A", "overlap_at_N"] == 1.0
    assert m["discrimination_score_l1"].isna().all()
    assert any("discrimination scores are undefined" in n for n in masked.notes)
    assert any("no significant real DE gene" in n and "'N'" in n for n in masked.notes)
    # Metrics that need two perturbations are skipped quietly instead of failing inside cell-eval.
    assert not any("Error computing metric" in n for n in masked.notes + raw.notes)
    assert np.isnan(m["centroid_accuracy"]).all()


def test_evaluation_leaves_torch_threads_as_they_were(synthetic, noisy_pred):
    # cell-eval's DE tests run on numba's OpenMP layer, which shares torch's libgomp: it once set
    # torch, at one thread (--threads 1), to every core for the rest of the process
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        evaluate(synthetic.real, noisy_pred, config=FAST, **KW)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
