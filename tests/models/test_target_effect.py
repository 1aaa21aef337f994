"""target-effect: an unseen knock-down of a measured gene, from the target's control level and its
co-expressed genes, on a synthetic screen with a known co-expression module."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.view import SplitView
from pertflow.models.base import PerturbationModel
from pertflow.models.inner_split import inner_split
from pertflow.models.prior import Prior
from pertflow.models.target_effect import TargetEffect

N_GENES, MODULE, COMMON_GENE = 30, range(0, 8), 29
TRAINED = ["G00", "G01", "G02", "G10", "G11", "G12", "G13", "G14", "G15", "G16"]
ENHANCERS = ["enh1", "enh2", "enh3", "enh4"]  # perturbations whose targets are not measured genes
UNSEEN = ["G03", "G04", "G05"]


def module_screen(seed: int = 0, enhancers: tuple[str, ...] = ()) -> ad.AnnData:
    """Counts of a CRISPRi screen: genes 0-7 share a factor u (a co-expression module driven by its
    genes), the others vary alone. Knocking down gene g leaves it at 30%; a module gene's
    knock-down also lowers u by one (the module follows); every perturbation raises gene 29."""
    rng = np.random.default_rng(seed)
    loading = np.zeros(N_GENES)
    loading[list(MODULE)] = rng.uniform(0.5, 1.0, size=len(MODULE))
    base = rng.uniform(3.0, 8.0, size=N_GENES)
    blocks, labels = [], []
    for pert in ["control", *TRAINED, *UNSEEN, *enhancers]:
        n = 400 if pert == "control" else 150
        gene = int(pert[1:]) if pert.startswith("G") else None
        u = rng.normal(size=(n, 1)) - (1.0 if gene in MODULE else 0.0)
        rate = base * np.exp(loading * u)
        if gene is not None:
            rate[:, gene] *= 0.3
        if pert != "control":
            rate[:, COMMON_GENE] *= 2.0
        blocks.append(rng.poisson(rate))
        labels += [pert] * n
    obs = pd.DataFrame({"perturbation": labels, "cell_type": "K562"}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(np.concatenate(blocks).astype(np.float32), obs=obs,
                      var=pd.DataFrame(index=[f"G{i:02d}" for i in range(N_GENES)]))


@pytest.fixture(scope="module")
def screen():
    data = PerturbationData.from_anndata(module_screen())
    return SplitView(data, make_split(data, "perturbations", test_perturbations=UNSEEN))


def true_delta(view, perturbation):
    """The real mean response of a perturbation (held-out cells included: this is the truth)."""
    data = view.data
    rows = np.flatnonzero(data.perturbations == perturbation)
    return data.log_expression(rows).mean(0) - data.log_expression(view.control_rows("K562")).mean(0)


def test_an_unseen_knockdown_in_a_coexpression_module_is_predicted_closer_than_the_mean(screen, tmp_path):
    model = TargetEffect.from_view(screen)
    model.fit(screen)
    mean = Prior.fit("mean", screen).baseline
    assert np.exp(model.log_fold) < 0.5  # a knock-down learnt (on group means of log1p: not exactly 30%)
    assert model.spread > 0  # the module's genes follow their driver
    for pert in UNSEEN:
        truth = true_delta(screen, pert)
        ours, theirs = model.predicted_delta(pert, "K562"), mean.predicted_delta(pert, "K562")
        assert np.mean((ours - truth) ** 2) < 0.5 * np.mean((theirs - truth) ** 2), pert
        gene = int(pert[1:])
        assert abs(ours[gene] - truth[gene]) < 0.25 * abs(theirs[gene] - truth[gene])  # its own knock-down
    assert abs(model.predicted_delta("G03", "K562")[COMMON_GENE] - true_delta(screen, "G03")[COMMON_GENE]) < 0.2
    model.save(tmp_path)
    again = PerturbationModel.load(tmp_path)
    np.testing.assert_allclose(again.predicted_delta("G04", "K562"), model.predicted_delta("G04", "K562"), atol=1e-6)


def test_leaving_one_out_uses_the_others_only(screen):
    model = TargetEffect.from_view(screen)
    model.fit(screen)
    key = ("G01", "K562")
    alone = model.without(key)
    assert key not in alone.keys and len(alone.keys) == len(model.keys) - 1
    own = model.responses[model.keys.index(key)]
    # without its own response the knock-down of G01 is still predicted (from the others), not copied
    left_out = alone.predicted_delta("G01", "K562")
    assert left_out[1] < -0.3 and not np.allclose(left_out, own, atol=1e-3)


def test_a_screen_without_measured_targets_is_the_mean(synthetic_adata):
    adata = synthetic_adata.copy()  # perturbations renamed so that no target is a measured gene
    adata.obs["perturbation"] = ["+".join(f"drug{c}" for c in p.split("+")) if p != "control" else p
                                 for p in adata.obs["perturbation"].astype(str)]
    data = PerturbationData.from_anndata(adata)
    view = SplitView(data, make_split(data, "random", test_fraction=0.25))
    model = TargetEffect.from_view(view)
    model.fit(view)
    mean = Prior.fit("mean", view).baseline
    assert model.targets == [] and model.fit_report["measured_target_singles"] == 0
    for pert in view.data.perturbation_names[:3]:
        # the same numbers, not close ones: `prior: auto` breaks the tie for the simpler mean
        np.testing.assert_array_equal(model.predicted_delta(pert, "line_A"), mean.predicted_delta(pert, "line_A"))


def test_validation_holds_out_measured_targets_when_the_test_asks_for_measured_targets():
    data = PerturbationData.from_anndata(module_screen(enhancers=tuple(ENHANCERS)))
    view = SplitView(data, make_split(data, "perturbations", test_perturbations=UNSEEN))
    for seed in range(6):
        held = inner_split(view, "auto", n_held_out=2, seed=seed).held_out
        assert len(held) == 2 and all(p in TRAINED for p in held), held  # never an enhancer
    # a test of enhancers (no measured target) draws among every training single
    enhancer_test = SplitView(data, make_split(data, "perturbations", test_perturbations=["enh1"]))
    drawn = {p for seed in range(12) for p in inner_split(enhancer_test, "auto", n_held_out=3, seed=seed).held_out}
    assert drawn & set(ENHANCERS) and drawn & set(TRAINED)
