"""latent-shift (SPEC 2.5): predictors in an embedding space, a frozen decoder, KNN purity in latent space."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pertflow.api import evaluate_split, predict, train
from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.view import SplitView
from pertflow.errors import InputError
from pertflow.eval.config import EvalConfig
from pertflow.eval.context_metrics import latent_knn_purity
from pertflow.models.base import PerturbationModel
from pertflow.models.ccfm.config import CellCascadeConfig
from pertflow.models.config import PredictConfig
from pertflow.models.latent_shift.config import LatentShiftConfig
from pertflow.models.latent_shift.model import LatentShift
from pertflow.models.latent_shift.vae_embedding import CountVAEEmbedding
from pertflow.models.latent_shift.predictors import FlowPredictor, LatentPredictor, MLPPredictor
from pertflow.models.prior import Prior
from pertflow.train import TrainConfig

TINY = LatentShiftConfig(n_components=8, hidden=32, decoder_hidden=32, decoder_steps=40, groups_per_step=4)
SHORT = TrainConfig(max_steps=30, batch_size=16, val_every=30, checkpoint_every=30, progress=False)
FAST_EVAL = EvalConfig(cell_eval_profile="anndata")  # no DE tests: pertflow's metrics are what is checked here


@pytest.fixture(scope="module")
def view(synthetic_adata):
    data = PerturbationData.from_anndata(synthetic_adata)
    return SplitView(data, make_split(data, "random", test_fraction=0.25))


def shifted_latents(n_per: int = 120, k: int = 6, c: int = 5, n_pert: int = 4, seed: int = 0):
    """Control embeddings and perturbed ones moved by a known shift per perturbation (a linear
    function of its descriptor), as the seed's tutorial: (ctrl, pert, cov, shifts, descriptors)."""
    rng = np.random.default_rng(seed)
    descriptors = rng.normal(size=(n_pert, c)).astype(np.float32)
    weight = rng.normal(0, 0.8, size=(c, k)).astype(np.float32)
    shifts = descriptors @ weight
    ctrl = rng.normal(size=(n_pert * n_per, k)).astype(np.float32)
    which = np.repeat(np.arange(n_pert), n_per)
    pert = ctrl + shifts[which] + 0.1 * rng.normal(size=ctrl.shape).astype(np.float32)
    return ctrl, pert, descriptors[which], shifts, descriptors


class MeanShift:
    """A predictor of one's own: the mean shift of each covariate vector (numpy only)."""

    def train(self, ctrl_emb, pert_emb, pert_cov):
        keys, inverse = np.unique(pert_cov, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        self.table = {tuple(key): (pert_emb[inverse == i] - ctrl_emb[inverse == i]).mean(0) for i, key in enumerate(keys)}
        self.fallback = (pert_emb - ctrl_emb).mean(0)

    def predict(self, ctrl_emb, pert_cov):
        return np.stack([c + self.table.get(tuple(v), self.fallback) for c, v in zip(ctrl_emb, pert_cov)])


class FarAway(MeanShift):
    """A predictor that learnt nothing useful: every cell moved far from any real one."""

    def predict(self, ctrl_emb, pert_cov):
        return ctrl_emb + 40.0


def test_a_predictor_that_loses_to_its_prior_on_validation_predicts_as_the_prior(view, tmp_path):
    model = LatentShift.from_view(view, LatentShiftConfig(**{**TINY.__dict__, "prior": "mean"})).use_predictor(FarAway())
    model.fit(view, SHORT, tmp_path)
    scores = model.fit_report["validation"]
    assert set(scores) == {"flow", "prior-mean", "prior"}
    assert scores["prior"]["score"] > scores["flow"]["score"] + 0.5, scores
    assert model.prediction_mode != "flow" and model.fit_report["prediction_mode"] == model.prediction_mode
    controls = view.expression.get(view.control_rows("line_A")[:20])
    pert = view.training_perturbations[0]
    anchor = np.clip(controls + model.prior.delta(pert, "line_A"), 0, None)
    auto = model.generate(controls, pert, "line_A", np.random.default_rng(0))
    own = model.generate(controls, pert, "line_A", np.random.default_rng(0), PredictConfig(mode="flow"))
    # the chosen mode carries the prior's mean; the predictor's own cells (forced) are far from it
    assert np.abs(auto.mean(0) - anchor.mean(0)).mean() < 0.1 * np.abs(own.mean(0) - anchor.mean(0)).mean()
    np.testing.assert_array_equal(model.generate(controls, pert, "line_A", np.random.default_rng(0), PredictConfig(mode="prior")),
                                  anchor)


def test_any_class_with_the_two_methods_is_a_predictor(view, tmp_path):
    assert isinstance(MeanShift(), LatentPredictor)
    assert not isinstance(object(), LatentPredictor)
    model = LatentShift.from_view(view, TINY).use_predictor(MeanShift())
    model.fit(view, SHORT, tmp_path)
    controls = view.expression.get(view.control_rows("line_A")[:12])
    pert = view.training_perturbations[0]
    cells = model.generate(controls, pert, "line_A", np.random.default_rng(0))
    assert cells.shape == controls.shape and (cells >= 0).all()
    assert model.fit_report["predictor"]["class"] == "MeanShift"
    with pytest.raises(TypeError, match="train.*predict"):
        LatentShift.from_view(view, TINY).use_predictor(object())
    with pytest.raises(InputError, match="not saved"):
        model.save(tmp_path / "own")


# the flow as latent-shift@flow-cpu.yaml sets it: more source noise, no start point, a group-mean term
SHIPPED_FLOW = {"source_noise": 0.5, "reads_start": False, "mean_weight": 1.0}


@pytest.mark.parametrize("kind,options", [(MLPPredictor, {}), (FlowPredictor, {}), (FlowPredictor, SHIPPED_FLOW)],
                         ids=["mlp", "flow", "flow-as-shipped"])
def test_predictors_learn_a_known_latent_shift(kind, options):
    ctrl, pert, cov, shifts, descriptors = shifted_latents()
    config = TrainConfig(max_steps=300, batch_size=32, lr=3e-3, warmup_steps=20, val_every=300, checkpoint_every=300, progress=False)
    predictor = kind(ctrl.shape[1], cov.shape[1], hidden=64, groups_per_step=4, train_config=config, **options)
    predictor.train(ctrl, pert, cov)
    rng = np.random.default_rng(1)
    for shift, descriptor in zip(shifts, descriptors):
        fresh = rng.normal(size=(200, ctrl.shape[1])).astype(np.float32)
        pred = predictor.predict(fresh, np.repeat(descriptor[None], len(fresh), axis=0), generator=torch.Generator().manual_seed(0))
        error = np.linalg.norm((pred - fresh).mean(0) - shift)
        assert error < 0.25 * np.linalg.norm(shift), (kind.name, error, np.linalg.norm(shift))
        # each cell keeps its own place: the prediction follows its control cell, not only the mean
        assert np.corrcoef(pred[:, 0], fresh[:, 0])[0, 1] > 0.8


def test_the_decoder_is_trained_once_then_frozen(view, tmp_path):
    model = LatentShift.from_view(view, TINY)
    model.fit_report = {}
    model.fit_embedding(view, SHORT)
    latent = model.embed_visible(view)
    model.fit_decoder(view, latent, SHORT, tmp_path)
    frozen = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    assert model.decoder.frozen and not model.decoder.training
    assert model.fit_report["decoder"]["steps"] == TINY.decoder_steps
    model.prior = Prior.fit("mean", view)
    model.fit_predictor(view, latent, SHORT, tmp_path)
    for key, value in model.decoder.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    # non-negative expression whatever the embedding
    assert (model.decoder.decode(np.random.default_rng(0).normal(0, 5, size=(50, 8)).astype(np.float32)) >= 0).all()
    # the decoder reconstructs the training cells better than their mean does
    x = view.expression.get(view.rows.train)
    assert model.fit_report["decoder"]["train_mse"] < ((x - x.mean(0)) ** 2).mean()


def test_knn_purity_in_latent_space_is_one_for_perfect_and_a_half_for_random():
    rng = np.random.default_rng(0)
    cfg = EvalConfig(knn_k=10)
    pert = rng.normal(size=(300, 5)) + 6.0
    ctrl = rng.normal(size=(300, 5))
    assert latent_knn_purity(pert.copy(), pert, ctrl, cfg, np.random.default_rng(1)) == 1.0
    assert latent_knn_purity(ctrl.copy(), pert, ctrl, cfg, np.random.default_rng(1)) == 0.0
    same = rng.normal(size=(300, 5))  # real perturbed cells no different from the controls
    random = latent_knn_purity(rng.normal(size=(300, 5)), same, ctrl, cfg, np.random.default_rng(1))
    assert abs(random - 0.5) < 0.08, random


@pytest.mark.parametrize("predictor", ["mlp", "flow"])
def test_save_load_reproduces_predictions(view, tmp_path, predictor):
    config = LatentShiftConfig(**{**TINY.__dict__, "predictor": predictor, "prior": "linear", "decode": "residual"})
    model = LatentShift.from_view(view, config)
    model.fit(view, SHORT, tmp_path)
    model.save(tmp_path)
    again = PerturbationModel.load(tmp_path)
    assert isinstance(again, LatentShift) and again.decoder.frozen
    controls = view.expression.get(view.control_rows("line_B")[:10])
    pert = view.data.perturbation_names[0]
    a = model.generate(controls, pert, "line_B", np.random.default_rng(5))
    b = again.generate(controls, pert, "line_B", np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.embed(controls), again.embed(controls))
    assert (a >= 0).all()
    assert again.prediction_mode == model.prediction_mode
    # a run saved before the prediction modes predicts as the model itself
    meta = json.loads((tmp_path / "model.json").read_text())
    del meta["extra_state"]["prediction_mode"]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    assert PerturbationModel.load(tmp_path).prediction_mode == "flow"


def test_prior_residual_decoding_keeps_the_priors_whole_shift(view, tmp_path):
    """``decode: prior-residual``: an embedding the predictor leaves at its prior's is decoded to the
    prior's cells exactly (``residual`` loses the part of the shift outside the 8-d embedding)."""
    config = LatentShiftConfig(**{**TINY.__dict__, "prior": "mean", "decode": "prior-residual"})
    model = LatentShift.from_view(view, config)
    model.fit(view, SHORT, tmp_path)
    controls = view.expression.get(view.control_rows("line_B")[:20])
    latent = model.embedding.encode(controls)
    shift = model.prior.delta(view.data.perturbation_names[0], "line_B")
    assert np.abs(shift).max() > 0.05
    start = model.embedding.shifted(controls, latent, shift)
    np.testing.assert_allclose(model.decode(start, controls, latent, shift), np.clip(controls + shift, 0, None),
                               atol=1e-5)
    residual = LatentShift.from_view(view, LatentShiftConfig(**{**config.__dict__, "decode": "residual"}))
    residual.embedding, residual.decoder = model.embedding, model.decoder
    lost = residual.decode(start, controls, latent, shift) - np.clip(controls + shift, 0, None)
    assert np.abs(lost.mean(0)).max() > 0.01  # what the embedding and the decoder miss of the prior's shift
    moved = latent + 0.3
    np.testing.assert_allclose(model.decode(moved, controls, latent, np.zeros_like(shift)),
                               residual.decode(moved, controls, latent), atol=1e-6)  # no shift: as residual
    # through prediction: a predictor that leaves every embedding where its prior put it
    model.predictor.predict = lambda x, cov, **how: x
    cells = model.own_cells(controls, view.data.perturbation_names[0], "line_B", shift, np.random.default_rng(0),
                            model.predict_config)
    np.testing.assert_allclose(cells, np.clip(controls + shift, 0, None), atol=1e-5)
    with pytest.raises(ValueError, match="prior-residual"):
        CellCascadeConfig(decode="prior-residual")


def test_descriptors_from_a_file(view, tmp_path):
    components = sorted({c for p in view.training_perturbations for c in view.data.components(p)})
    table = pd.DataFrame(np.random.default_rng(0).normal(size=(len(components), 3)), index=components)
    table.index.name = "name"
    table.columns = ["a", "b", "c"]
    path = tmp_path / "descriptors.parquet"
    table.reset_index().to_parquet(path)
    model = LatentShift.from_view(view, LatentShiftConfig(**{**TINY.__dict__, "descriptor": "file", "descriptor_file": str(path)}))
    model.fit(view, SHORT, tmp_path / "run")
    assert model.descriptors.dim == 3 and model.descriptors.knows(components[0])
    table.index = [f"other{i}" for i in range(len(table))]
    table.to_csv(tmp_path / "unrelated.csv")
    wrong = LatentShift.from_view(view, LatentShiftConfig(**{**TINY.__dict__, "descriptor": "file",
                                                             "descriptor_file": str(tmp_path / "unrelated.csv")}))
    with pytest.raises(InputError, match="names none of the training perturbations"):
        wrong.fit(view, SHORT, tmp_path / "wrong")


def test_scgpt_embedding_and_gene_descriptor(view, tmp_path):
    from pertflow.foundation.scgpt import ScGPTConfig, TransformerModel, export_pretrained

    genes = list(view.vocab.expression_genes)
    vocab = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, **{g: i + 3 for i, g in enumerate(genes)}}
    torch.manual_seed(0)
    scgpt = TransformerModel(ScGPTConfig(ntoken=len(vocab), pad_token_id=0, cls_token_id=1, d_model=16, nhead=2, d_hid=16,
                                         nlayers=1, dropout=0.0, pad_value=-2, mask_value=-1))
    export_pretrained(scgpt, vocab, scgpt.config, tmp_path / "scgpt")
    config = LatentShiftConfig(**{**TINY.__dict__, "embedding": "scgpt", "scgpt_checkpoint": str(tmp_path / "scgpt"),
                                  "scgpt_max_seq_len": 64, "descriptor": "gene"})
    model = LatentShift.from_view(view, config)
    model.fit(view, SHORT, tmp_path / "run")
    assert model.latent_dim == 16 and model.descriptors.dim == 16  # scGPT's gene embeddings
    model.save(tmp_path / "run")
    again = PerturbationModel.load(tmp_path / "run")
    controls = view.expression.get(view.control_rows("line_A")[:6])
    pert = view.training_perturbations[0]
    np.testing.assert_array_equal(model.generate(controls, pert, "line_A", np.random.default_rng(0)),
                                  again.generate(controls, pert, "line_A", np.random.default_rng(0)))


def test_unavailable_embeddings_are_refused_clearly():
    with pytest.raises(ValueError, match="no gene vectors|gene vectors"):
        LatentShiftConfig(embedding="cfm-vc", descriptor="gene")
    with pytest.raises(ValueError, match="scgpt_checkpoint"):
        LatentShiftConfig(embedding="scgpt")


def test_the_cfmvc_latent_is_an_embedding_that_learns_the_counts(view, tmp_path):
    """The count VAE behind ``embedding: cfm-vc`` learns (its negative ELBO on the training cells
    falls well below its untrained value), and a latent-shift model on it saves and loads."""
    rows = view.rows.train
    x, counts = torch.from_numpy(view.expression.get(rows)), torch.from_numpy(view.counts().get(rows))
    zeros = torch.zeros(len(rows), dtype=torch.long)

    def neg_elbo(steps: int) -> float:
        vae = CountVAEEmbedding.fit(view, 4, steps, None, seed=0).vae
        with torch.no_grad():
            rec, kl = vae.elbo_terms(x, counts, zeros, zeros)
        return float(-(rec - kl).mean()) / counts.shape[1]

    assert neg_elbo(150) < 0.8 * neg_elbo(1)
    config = LatentShiftConfig(**{**TINY.__dict__, "embedding": "cfm-vc", "n_components": 4, "vae_steps": 60,
                                  "decode": "residual", "prior": "mean"})
    model = LatentShift.from_view(view, config)
    model.fit(view, SHORT, tmp_path)
    assert model.fit_report["embedding"]["kind"] == "cfm-vc" and model.latent_dim == 4
    model.save(tmp_path)
    again = PerturbationModel.load(tmp_path)
    controls = view.expression.get(view.control_rows("line_B")[:10])
    pert = view.data.perturbation_names[0]
    np.testing.assert_array_equal(model.embed(controls), again.embed(controls))
    np.testing.assert_array_equal(model.generate(controls, pert, "line_B", np.random.default_rng(5)),
                                  again.generate(controls, pert, "line_B", np.random.default_rng(5)))


def test_train_predict_evaluate_through_the_api(synthetic_file, tmp_path):
    data = PerturbationData.read(synthetic_file)
    split = make_split(data, "combinations", seen=[2])
    sets = ["model.embedding=pca", "model.n_components=8", "model.hidden=32", "model.decoder_hidden=32",
            "model.decoder_steps=40", "model.prior=additive", "train.max_steps=40", "train.batch_size=16", "train.progress=false"]
    train("latent-shift", data, split, tmp_path / "run", sets=sets)
    assert (tmp_path / "run" / "checkpoints" / "decoder" / "history.csv").is_file()
    assert (tmp_path / "run" / "checkpoints" / "predictor" / "history.csv").is_file()
    pred = predict(tmp_path / "run", data, split, tmp_path / "pred.h5ad")
    view = SplitView(data, split)  # a group is generated from every control of its context (predict.control_cells)
    generated = sum(PredictConfig().cells_to_generate(len(rows), len(view.control_rows(ctx)))
                    for (_, ctx), rows in view.test_groups().items())
    assert pred.n_obs == generated + int((pred.obs["perturbation"] == "control").sum())
    result = evaluate_split(data, split, pred, config=FAST_EVAL, run=tmp_path / "run", baselines=False)
    purity = result.per_perturbation["knn_purity_latent"]
    assert purity.notna().all() and purity.between(0, 1).all()
    train("mean", data, split, tmp_path / "mean")
    with pytest.raises(InputError, match="no latent space"):  # refused before any scoring
        evaluate_split(data, split, pred, config=FAST_EVAL, run=tmp_path / "mean", baselines=False)
