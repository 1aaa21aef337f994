"""target-effect: an unseen knock-down of a measured gene, from the target's control level and its
co-expressed genes, on a synthetic screen with a known co-expression module."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.view import SplitView
from pertflow.errors import InputError
from pertflow.models.base import PerturbationModel
from pertflow.models.cfm.config import CFMConfig
from pertflow.models.cfm.model import CFM
from pertflow.models.cfmvc.config import CFMVCConfig
from pertflow.models.cfmvc.model import CFMVC
from pertflow.models.config import PredictConfig
from pertflow.models.inner_split import inner_split
from pertflow.models.latent_shift.config import LatentShiftConfig
from pertflow.models.latent_shift.model import LatentShift
from pertflow.models.prior import Prior
from pertflow.models.target_effect import TargetEffect
from pertflow.train import TrainConfig
from pertflow.train.checkpoint import holds_checkpoint

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


def test_latent_shift_chooses_its_descriptor_on_held_out_perturbations(screen, tmp_path):
    """``descriptor: auto``: one predictor per descriptor, scored on validation's held-out training
    perturbations; the one kept is the predictor a run with that descriptor alone trains."""
    tiny = dict(n_components=8, hidden=32, decoder_hidden=32, decoder_steps=40, groups_per_step=4, prior="mean",
                validation_held_out=3)
    short = TrainConfig(max_steps=40, batch_size=32, val_every=40, checkpoint_every=40, progress=False)
    auto = LatentShift.from_view(screen, LatentShiftConfig(descriptor="auto", descriptor_rotations=2, **tiny))
    auto.fit(screen, short, tmp_path / "auto")
    report = auto.fit_report["descriptor"]
    assert report["candidates"] == ["onehot", "gene"] and report["inner_splits"] == 2
    top = max(report["scores"][k]["score"] for k in report["candidates"])
    assert report["chosen"] == next(k for k in report["candidates"] if report["scores"][k]["score"] >= top - 0.01)
    for kind in report["candidates"]:  # the first inner split's predictor, and the second's
        assert (tmp_path / "auto" / "checkpoints" / f"predictor-{kind}").is_dir()
        assert (tmp_path / "auto" / "checkpoints" / f"predictor-{kind}-rotation1").is_dir()
    alone = LatentShift.from_view(screen, LatentShiftConfig(descriptor=report["chosen"], **tiny))
    alone.fit(screen, short, tmp_path / "alone")
    controls = screen.data.log_expression(screen.control_rows("K562")[:50])
    for model in (auto, alone):
        model.prediction_mode = "flow"
    np.testing.assert_allclose(auto.generate(controls, "G04", "K562", np.random.default_rng(0)),
                               alone.generate(controls, "G04", "K562", np.random.default_rng(0)), atol=1e-5)
    auto.save(tmp_path / "saved")
    again = PerturbationModel.load(tmp_path / "saved")
    assert again.descriptor_kind == report["chosen"] and again.descriptors.names == auto.descriptors.names


def test_latent_shift_auto_keeps_onehot_where_every_test_component_is_trained(synthetic_adata, tmp_path):
    data = PerturbationData.from_anndata(synthetic_adata)
    view = SplitView(data, make_split(data, "random", test_fraction=0.25))
    model = LatentShift.from_view(view, LatentShiftConfig(n_components=8, hidden=32, decoder_hidden=32,
                                                          decoder_steps=20, descriptor="auto"))
    model.fit(view, TrainConfig(max_steps=10, batch_size=16, val_every=10, checkpoint_every=10, progress=False),
              tmp_path)
    assert model.descriptor_kind == "onehot" and "descriptor" not in model.fit_report
    assert not (tmp_path / "checkpoints" / "predictor-gene").exists()


def test_cfm_chooses_its_descriptor_and_a_gene_descriptor_run_loads(screen, tmp_path):
    """cfm with ``descriptor: auto``: one network per descriptor on the inner split, the best on
    held-out perturbations kept; a run with the gene descriptor (PCA loadings of the training
    cells) predicts the same once loaded."""
    tiny = dict(d_model=16, n_heads=2, n_layers=1, genes_per_step=30, dropout=0.0, source="control",
                prior="mean", validation_held_out=3)
    short = TrainConfig(max_steps=6, batch_size=16, val_every=3, checkpoint_every=3, val_batches=1, progress=False)
    few = PredictConfig(ode_steps=2, ode_method="euler")
    auto = CFM.from_view(screen, CFMConfig(descriptor="auto", **tiny), few)
    auto.fit(screen, short, tmp_path / "auto")
    report = auto.fit_report["descriptor"]
    assert report["candidates"] == ["onehot", "gene"] and auto.descriptor_kind == report["chosen"]
    assert holds_checkpoint(tmp_path / "auto")  # each candidate under stages/: resume and overwrite find it
    top = max(report["scores"][k]["score"] for k in report["candidates"])
    assert report["chosen"] == next(k for k in report["candidates"] if report["scores"][k]["score"] >= top - 0.01)
    gene = CFM.from_view(screen, CFMConfig(descriptor="gene", **tiny), few)
    gene.fit(screen, short, tmp_path / "gene")
    descriptors = gene.module.perturbation_encoder.descriptors
    assert descriptors.shape[0] == len(gene.vocab) and descriptors.abs().sum() > 0
    assert torch.count_nonzero(descriptors[gene.vocab.id_of("G04")]) > 0  # an unseen target has a vector
    gene.save(tmp_path / "saved")
    again = PerturbationModel.load(tmp_path / "saved")
    assert again.descriptor_kind == "gene"
    controls = screen.data.log_expression(screen.control_rows("K562")[:20])
    np.testing.assert_allclose(again.generate(controls, "G04", "K562", np.random.default_rng(0)),
                               gene.generate(controls, "G04", "K562", np.random.default_rng(0)), atol=1e-5)


def test_cfmvc_reads_an_unseen_measured_target_through_its_gene_descriptor(screen, tmp_path):
    tiny = dict(n_latent=4, n_tech=2, hidden=16, n_layers=1, dropout=0.0, flow_hidden=16, flow_layers=1, d_context=8,
                n_basis=2, vae_steps=4, prior="none", validation="cells")
    short = TrainConfig(max_steps=4, batch_size=16, val_every=2, checkpoint_every=2, val_batches=1, progress=False)
    onehot = CFMVC.from_view(screen, CFMVCConfig(**tiny))
    assert onehot.known_components("G04") == ["<unk>"]  # never trained, no descriptor
    model = CFMVC.from_view(screen, CFMVCConfig(descriptor="gene", **tiny), PredictConfig(ode_steps=2))
    model.fit(screen, short, tmp_path / "run")
    assert model.known_components("G04") == ["G04"] and model.unread_components("enh9") == ["enh9"]
    model.save(tmp_path / "saved")
    again = PerturbationModel.load(tmp_path / "saved")
    controls = screen.data.log_expression(screen.control_rows("K562")[:20])
    np.testing.assert_allclose(again.generate(controls, "G04", "K562", np.random.default_rng(0)),
                               model.generate(controls, "G04", "K562", np.random.default_rng(0)), atol=1e-4)


def test_a_descriptor_choice_within_the_tie_goes_to_onehot():
    from pertflow.models.descriptor_choice import choose
    from pertflow.models.validation import ValidationScore

    def scored(values):
        return lambda kind: (ValidationScore(0.0, 0.0, values[kind]), kind)

    assert choose(["onehot", "gene"], scored({"onehot": -1.0, "gene": -0.995}), "it")[0] == "onehot"
    best, kept, report = choose(["onehot", "gene"], scored({"onehot": -1.0, "gene": -0.9}), "it")
    assert best == kept == "gene" and report["scores"]["gene"]["score"] == -0.9


def test_cfmvc_reads_the_datas_descriptors_and_loads_a_run_saved_before_it_did(tmp_path):
    adata = module_screen(enhancers=("enh1",))
    names = ["enh1", *TRAINED, *UNSEEN]
    adata.uns["desc"] = pd.DataFrame(np.random.default_rng(0).normal(size=(len(names), 3)), index=names)
    data = PerturbationData.from_anndata(adata, descriptors_key="desc")
    view = SplitView(data, make_split(data, "perturbations", test_perturbations=["enh1"]))
    tiny = CFMVCConfig(n_latent=4, n_tech=2, hidden=16, n_layers=1, dropout=0.0, flow_hidden=16, flow_layers=1,
                       d_context=8, n_basis=2, vae_steps=4, prior="none", validation="cells")
    model = CFMVC.from_view(view, tiny, PredictConfig(ode_steps=2))
    model.fit(view, TrainConfig(max_steps=4, batch_size=16, val_every=2, checkpoint_every=2, val_batches=1,
                                progress=False), tmp_path)
    assert model.known_components("enh1") == ["enh1"]  # never trained, but described
    assert model.module.context_encoder.descriptors.shape == (len(model.vocab), 3)
    # a run saved before CFM-VC read descriptors has no descriptor weights: it loads without them
    tensors = {k: v for k, v in model.state_tensors().items() if not k.startswith("context_encoder.descriptor")}
    old = CFMVC.from_view(view, tiny, PredictConfig(ode_steps=2))
    old.load_state(tensors, model.extra_state())
    assert old.module.context_encoder.descriptors is None and old.known_components("enh1") == ["<unk>"]
    controls = data.log_expression(view.control_rows("K562")[:10])
    assert np.isfinite(old.generate(controls, "G03", "K562", np.random.default_rng(0))).all()


def test_auto_with_a_descriptor_file_naming_no_training_perturbation_stops_before_training(screen, tmp_path):
    path = tmp_path / "vectors.csv"
    pd.DataFrame(np.ones((2, 3)), index=["drugX", "drugY"]).to_csv(path)
    model = LatentShift.from_view(screen, LatentShiftConfig(n_components=8, hidden=16, decoder_hidden=16,
                                                            decoder_steps=5, descriptor="auto",
                                                            descriptor_file=str(path), validation_held_out=3))
    short = TrainConfig(max_steps=5, batch_size=16, val_every=5, checkpoint_every=5, progress=False)
    with pytest.raises(InputError, match="names none of the training perturbations"):
        model.fit(screen, short, tmp_path / "run")
    assert not list((tmp_path / "run" / "checkpoints").glob("predictor-*"))
