import time

import numpy as np

from pertflow.data.dataset import PerturbationData
from pertflow.data.synthetic import make_synthetic


def test_default_is_fast_and_seeded():
    start = time.perf_counter()
    a = make_synthetic()
    assert time.perf_counter() - start < 5
    b = make_synthetic()
    assert (a.X != b.X).nnz == 0
    assert (make_synthetic(seed=1).X != a.X).nnz > 0
    assert a.n_obs == 3 * (100 + 15 * 50)


def test_ground_truth_is_visible_in_the_counts(synthetic_adata):
    truth = synthetic_adata.uns["synthetic"]
    data = PerturbationData.from_anndata(synthetic_adata)
    names, contexts = list(truth["perturbations"]), list(truth["contexts"])
    X = data.log_expression(np.arange(data.n_cells))
    ctx = "line_A"
    ctrl_mean = X[data.is_control & (data.contexts == ctx)].mean(0)
    pooled_observed, pooled_lfc = [], []
    for pert in data.perturbation_names:
        mask = (data.perturbations == pert) & (data.contexts == ctx)
        observed = X[mask].mean(0) - ctrl_mean
        lfc = truth["lfc"][names.index(pert), contexts.index(ctx)]
        moved = lfc != 0
        # 20 cells of lowly expressed genes: each perturbation's shift is noisy, but it is there.
        assert np.corrcoef(observed[moved], lfc[moved])[0, 1] > 0.4, pert
        pooled_observed += list(observed[moved])
        pooled_lfc += list(lfc[moved])
        if "+" not in pert:
            target = list(data.gene_names).index(pert)
            assert observed[target] < -0.2  # knock-down moves its own gene down
    assert np.corrcoef(pooled_observed, pooled_lfc)[0, 1] > 0.7


def test_combinations_have_additive_and_interaction_parts(synthetic_adata):
    truth = synthetic_adata.uns["synthetic"]
    names = list(truth["perturbations"])
    combos = [p for p in names if "+" in p]
    assert len(combos) == 3
    for j, combo in enumerate(combos):
        a, b = combo.split("+")
        additive = truth["lfc"][names.index(a)] + truth["lfc"][names.index(b)]
        inter = truth["lfc"][names.index(combo)] - additive
        np.testing.assert_allclose(inter, truth["combo_interaction"][j], atol=1e-5)
        assert np.abs(inter).max() > 0


def test_contexts_differ_but_share_part_of_the_response(synthetic_adata):
    lfc = synthetic_adata.uns["synthetic"]["lfc"]
    base = synthetic_adata.uns["synthetic"]["base_log_mean"]
    assert not np.allclose(base[0], base[1])
    single = lfc[1]
    moved = single[0] != 0
    r = np.corrcoef(single[0][moved], single[1][moved])[0, 1]
    assert 0.3 < r < 0.999


def test_drug_perturbations():
    a = make_synthetic(n_genes=40, n_singles=3, n_combos=1, cells_per_group=10, controls_per_context=10, n_effect_genes=5, genetic=False)
    data = PerturbationData.from_anndata(a)
    assert not data.spec.genetic
    assert all(p.startswith("drug_") for p in data.perturbation_names if "+" not in p)
