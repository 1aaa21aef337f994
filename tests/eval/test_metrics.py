"""Each pertflow metric on small cases computed by hand (or against a reference implementation)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from pertflow.eval import metrics as M


def test_pearson_r_hand_and_constant():
    assert M.pearson_r([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson_r([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = [0, 1, 0], y = [0, 1, 1]: centred x = [-1/3, 2/3, -1/3], y = [-2/3, 1/3, 1/3];
    # sum xy = 1/3, |x|^2 = 2/3, |y|^2 = 2/3 -> r = 0.5.
    assert M.pearson_r([0, 1, 0], [0, 1, 1]) == pytest.approx(0.5)
    assert np.isnan(M.pearson_r([1, 1, 1], [1, 2, 3]))


def test_welch_t_scores_hand():
    pert = np.array([[1.0, 5.0], [3.0, 5.0]])  # gene 0: mean 2, var 2; gene 1: constant 5
    ctrl = np.array([[0.0, 5.0], [0.0, 5.0], [0.0, 5.0]])  # gene 0: mean 0, var 0; gene 1: constant 5
    t = M.welch_t_scores(pert, ctrl)
    assert t[0] == pytest.approx(2.0 / np.sqrt(2.0 / 2 + 0.0 / 3))
    assert t[1] == 0.0  # 0 / 0 -> 0, as in scanpy


def test_top_de_genes_ranks_by_abs_t_and_skips_dropouts():
    rng = np.random.default_rng(0)
    ctrl = rng.normal(2.0, 0.5, size=(30, 5))
    pert = rng.normal(2.0, 0.5, size=(30, 5))
    pert[:, 1] -= 1.5  # strong down
    pert[:, 3] += 0.8  # weaker up
    pert[:, 4] = 0.0  # gene 4 "drops out": zero in pert, expressed in ctrl -> skipped
    top = M.top_de_genes(pert, ctrl, k=2)
    assert top.tolist() == [1, 3]
    assert 4 in M.top_de_genes(pert, ctrl, k=5, exclude_dropouts=False).tolist()[:1]
    assert 4 not in M.top_de_genes(pert, ctrl, k=5).tolist()


def test_top_de_genes_matches_scanpy_t_test_ranking():
    sc = pytest.importorskip("scanpy")
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(1)
    n_genes = 40
    ctrl = rng.gamma(2.0, 1.0, size=(50, n_genes))
    pert = rng.gamma(2.0, 1.0, size=(40, n_genes)) * np.exp(rng.normal(0, 0.6, size=n_genes))
    adata = ad.AnnData(
        X=np.log1p(np.vstack([pert, ctrl])),
        obs=pd.DataFrame({"g": ["p"] * 40 + ["ctrl"] * 50}, index=[str(i) for i in range(90)]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]),
    )
    sc.tl.rank_genes_groups(
        adata, "g", groups=["p"], reference="ctrl", method="t-test", rankby_abs=True, n_genes=20
    )
    expected = [int(name[1:]) for name in adata.uns["rank_genes_groups"]["names"]["p"]]
    ours = M.top_de_genes(adata.X[:40], adata.X[40:], k=20, exclude_dropouts=False)
    assert ours.tolist() == expected


def test_pearson_delta_vs_reference_hand():
    ctrl = np.array([1.0, 1.0, 1.0, 1.0])
    real = np.array([2.0, 0.0, 1.0, 3.0])  # delta [1, -1, 0, 2]
    pred = np.array([3.0, -1.0, 1.0, 5.0])  # delta [2, -2, 0, 4] = 2 x real delta
    assert M.pearson_delta_vs_reference(pred, real, ctrl) == pytest.approx(1.0)
    # Restricted to genes 0 and 1 the deltas are [2, -2] and [1, -1]: r = 1; genes 2, 3: also 1.
    assert M.pearson_delta_vs_reference(pred, real, ctrl, np.array([0, 1])) == pytest.approx(1.0)
    # Against the reference = real itself, the real delta is constant -> NaN.
    assert np.isnan(M.pearson_delta_vs_reference(pred, real, real))


def test_mse_relative_to_no_change_hand():
    ctrl = np.array([0.0, 0.0])
    real = np.array([2.0, 2.0])  # no-change MSE = (4 + 4) / 2 = 4
    pred = np.array([1.0, 2.0])  # model MSE = (1 + 0) / 2 = 0.5
    assert M.mean_squared_error(pred, real) == pytest.approx(0.5)
    assert M.mse_relative_to_no_change(pred, real, ctrl) == pytest.approx(0.125)
    assert M.mse_relative_to_no_change(ctrl, real, ctrl) == pytest.approx(1.0)
    assert M.mse_relative_to_no_change(pred, real, ctrl, np.array([1])) == pytest.approx(0.0)
    assert np.isnan(M.mse_relative_to_no_change(pred, ctrl, ctrl))


def test_r2_delta_hand_and_sklearn():
    ctrl = np.zeros(3)
    real = np.array([1.0, 2.0, 3.0])  # y mean 2, SS_tot = 2
    pred = np.array([1.0, 2.0, 4.0])  # SS_res = 1
    assert M.r2_delta(pred, real, ctrl) == pytest.approx(0.5)
    # No change: 1 - sum y^2 / SS_tot = 1 - 14 / 2 = -6.
    assert M.r2_delta(ctrl, real, ctrl) == pytest.approx(-6.0)
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    c, r, p = rng.normal(size=(3, 25))
    assert M.r2_delta(p, r, c) == pytest.approx(skm.r2_score(r - c, p - c))


def test_perturbation_centroid_weights_perturbations_equally():
    x = np.array([[0.0, 0.0], [2.0, 2.0], [2.0, 2.0], [2.0, 2.0], [10.0, 10.0]])
    labels = np.array(["A", "B", "B", "B", "ctrl"])
    # Means: A = 0, B = 2 -> centroid 1 (a cell-weighted mean would give 1.5).
    np.testing.assert_allclose(M.perturbation_centroid(x, labels, "ctrl"), [1.0, 1.0])
    np.testing.assert_allclose(M.perturbation_centroid(sp.csr_matrix(x), labels, "ctrl"), [1.0, 1.0])


def test_centroid_accuracy_hand():
    real = np.array([[0.0], [10.0], [20.0]])
    pred = np.array([[1.0], [14.0], [19.0]])
    # pred 0: own 1, others 9, 19 -> 2/2; pred 1: own 4, others 14, 6 -> 2/2; pred 2: own 1,
    # others 19, 9 -> 2/2.
    np.testing.assert_allclose(M.centroid_accuracy(pred, real), [1.0, 1.0, 1.0])
    pred_bad = np.array([[1.0], [18.0], [19.0]])
    # pred 1 = 18: own |18-10| = 8; others |18-0| = 18 (> 8), |18-20| = 2 (< 8) -> 1/2.
    np.testing.assert_allclose(M.centroid_accuracy(pred_bad, real), [1.0, 0.5, 1.0])
    assert np.isnan(M.centroid_accuracy(pred[:1], real[:1])).all()


def test_knn_purity_hand():
    real_pert = np.array([[10.0], [11.0], [12.0]])
    real_ctrl = np.array([[0.0], [1.0], [2.0]])
    # A predicted cell at 10.5 has neighbours 10, 11 (k=2): all perturbed -> 1.
    assert M.knn_purity(np.array([[10.5]]), real_pert, real_ctrl, k=2) == pytest.approx(1.0)
    # At 6.4 with k=2: distances 3.6 (10), 4.4 (2), 4.6 (11) -> {10, 2}: 1/2.
    assert M.knn_purity(np.array([[6.4]]), real_pert, real_ctrl, k=2) == pytest.approx(0.5)
    # Two predicted cells, one near each group, k=3: (3/3 + 0/3) / 2.
    assert M.knn_purity(np.array([[11.0], [1.0]]), real_pert, real_ctrl, k=3) == pytest.approx(0.5)


def test_edistance_and_mmd_wrappers():
    x = np.array([[0.0], [2.0]])
    y = np.array([[1.0]])
    assert M.edistance(x, y) == pytest.approx(1.0)
    assert M.edistance(x, x) == pytest.approx(0.0)
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(100, 3)), rng.normal(size=(100, 3))
    assert abs(M.mmd_rbf(a, b)) < 0.02
    assert M.mmd_rbf(a, b + 1.5) > 10 * abs(M.mmd_rbf(a, b))
    assert M.mmd_rbf(a, a, unbiased=False) == pytest.approx(0.0, abs=1e-12)


def test_fit_pca_matches_svd_and_is_deterministic():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(80, 12)) @ rng.normal(size=(12, 12))
    pca = M.fit_pca(x, 5)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(pca.explained_variance, s[:5] ** 2 / 79)
    np.testing.assert_allclose(np.abs(pca.components @ vt[:5].T), np.eye(5), atol=1e-8)
    coords = pca.transform(x)
    np.testing.assert_allclose(coords.var(axis=0, ddof=1), pca.explained_variance)
    np.testing.assert_allclose(pca.transform(sp.csr_matrix(x)), coords)
    again = M.fit_pca(sp.csr_matrix(x), 5)
    np.testing.assert_allclose(again.components, pca.components, atol=1e-10)
    assert M.fit_pca(x, 500).n_components == 12  # capped by the genes


def test_fit_pca_sparse_solver_agrees_with_dense(monkeypatch):
    rng = np.random.default_rng(5)
    dense = rng.poisson(0.3, size=(120, 90)).astype(float)
    dense_pca = M.fit_pca(dense, 4)
    monkeypatch.setattr(M, "_DENSE_SVD_MAX_DIM", 50)  # route this small matrix to ARPACK
    sparse_pca = M.fit_pca(sp.csr_matrix(dense), 4)
    np.testing.assert_allclose(sparse_pca.explained_variance, dense_pca.explained_variance, rtol=1e-6)
    np.testing.assert_allclose(sparse_pca.components, dense_pca.components, atol=1e-6)
