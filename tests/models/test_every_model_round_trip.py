"""Every registered model, and every variant a config selects, trains through the API, saves, loads
and predicts what it predicted before saving: one place, so that a new model cannot skip it."""

import numpy as np
import pytest

from pertflow.api import train
from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.models.base import PerturbationModel
from pertflow.models.registry import model_names

SHORT = {"train.max_steps": 4, "train.batch_size": 8, "train.val_every": 2, "train.checkpoint_every": 2,
         "train.progress": False, "predict.ode_steps": 2, "predict.ode_method": "euler"}
FLOW = {"model.d_model": 16, "model.n_heads": 2, "model.n_layers": 1, "model.genes_per_step": 60}
#: tiny settings of each trained model (a model with no entry here fails the coverage test below)
TINY: dict[str, dict] = {
    "no-change": {}, "mean": {}, "additive": {}, "additive-mean": {}, "linear": {}, "context-shift": {},
    "target-effect": {},
    "cfm": FLOW,
    "ccfm": {**FLOW, "model.foundation_d_model": 16, "model.foundation_layers": 1, "model.foundation_steps": 2,
             "model.foundation_batch_size": 8, "model.bottleneck_dim": 16, "model.dh_depth": 1, "model.warmup_batches": 2},
    "ccfm@cell": {"model.latent_stream": "cell", "model.n_components": 4, "model.hidden": 16, "model.decoder_hidden": 16,
                  "model.decoder_steps": 3, "model.expression_hidden": 16, "model.expression_steps": 3},
    "latent-shift": {"model.n_components": 4, "model.hidden": 16, "model.decoder_hidden": 16, "model.decoder_steps": 3},
    "latent-shift@cfm-vc": {"model.embedding": "cfm-vc", "model.n_components": 4, "model.vae_steps": 3, "model.hidden": 16,
                            "model.decoder_hidden": 16, "model.decoder_steps": 3},
    "cfmvc": {"model.n_latent": 4, "model.n_tech": 2, "model.hidden": 16, "model.n_layers": 1, "model.flow_hidden": 16,
              "model.d_context": 8, "model.n_basis": 2, "model.vae_steps": 3},
    "scgpt-generator": {"model.d_model": 16, "model.nhead": 2, "model.d_hid": 32, "model.nlayers": 1,
                        "model.genes_per_step": 40},
}


def test_every_registered_model_has_tiny_settings_here():
    assert set(model_names()) <= {name.split("@")[0] for name in TINY}, "add the new model's tiny settings to TINY"


@pytest.fixture(scope="module")
def data_and_split(synthetic_adata):
    data = PerturbationData.from_anndata(synthetic_adata)
    return data, make_split(data, "random", test_fraction=0.25)


@pytest.mark.parametrize("name", sorted(TINY))
def test_train_save_load_predict(name, data_and_split, tmp_path):
    data, split = data_and_split
    sets = [f"{k}={v}" for k, v in {**SHORT, **TINY[name]}.items()]
    model = train(name.split("@")[0], data, split, tmp_path / "run", sets=sets, config=None)
    again = PerturbationModel.load(tmp_path / "run")
    assert type(again) is type(model) and again.name == name.split("@")[0]
    controls = data.log_expression(np.flatnonzero(data.is_control)[:12])
    context = str(data.contexts[np.flatnonzero(data.is_control)[0]])
    perturbation = data.perturbation_names[0]
    before = model.generate(controls, perturbation, context, np.random.default_rng(7))
    after = again.generate(controls, perturbation, context, np.random.default_rng(7))
    assert before.shape == controls.shape and np.isfinite(before).all() and (before >= 0).all()
    np.testing.assert_allclose(after, before, atol=1e-5)
