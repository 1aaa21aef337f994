"""CCFM on a cell-level latent (``ccfm`` with ``latent_stream: cell``): the config selects the
variant, its second stage learns what the embedding misses, and a saved run predicts alike."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from pertflow.configs import build
from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.view import SplitView
from pertflow.models.base import PerturbationModel
from pertflow.models.ccfm.cell_cascade import CellCascade
from pertflow.models.ccfm.config import CCFMConfig, CellCascadeConfig
from pertflow.models.ccfm.model import CCFM
from pertflow.models.config import PredictConfig
from pertflow.models.registry import model_class
from pertflow.train import TrainConfig

TINY = {"latent_stream": "cell", "n_components": 1, "hidden": 32, "decoder_hidden": 32, "decoder_steps": 150,
        "groups_per_step": 2, "prior": "none", "decode": "residual", "expression_hidden": 64, "expression_steps": 300,
        "expression_batch_size": 32}
SHORT = TrainConfig(max_steps=100, batch_size=32, val_every=100, checkpoint_every=100, progress=False)
HIDDEN_GENE = 15  # the perturbations move this gene, outside the one-component embedding


@pytest.fixture(scope="module")
def hidden_effect_view():
    """Two contexts whose cells vary strongly along genes 0-9 (one factor: the PCA's first
    component) and two perturbations that raise gene 15 four-fold, a direction one component misses."""
    rng = np.random.default_rng(0)
    n_genes, rows, labels = 20, [], []
    for context in ("A", "B"):
        for perturbation, n in (("control", 160), ("P1", 120), ("P2", 120)):
            factor = rng.normal(size=(n, 1))
            rate = np.full((n, n_genes), 4.0)
            rate[:, :10] *= np.exp(1.2 * factor)
            if perturbation != "control":
                rate[:, HIDDEN_GENE] *= 4.0
            rows.append(rng.poisson(rate))
            labels += [(perturbation, context)] * n
    obs = pd.DataFrame(labels, columns=["perturbation", "cell_type"], index=[f"c{i}" for i in range(len(labels))])
    adata = ad.AnnData(np.concatenate(rows).astype(np.float32), obs=obs,
                       var=pd.DataFrame(index=[f"G{i:02d}" for i in range(n_genes)]))
    data = PerturbationData.from_anndata(adata)
    return SplitView(data, make_split(data, "random", test_fraction=0.2))


def test_the_config_selects_the_cell_cascade_under_the_ccfm_name():
    assert model_class("ccfm") is CCFM and model_class("ccfm", {"latent_stream": "gene-features"}) is CCFM
    cls = model_class("ccfm", {"latent_stream": "cell"})
    assert cls is CellCascade and cls.name == "ccfm"
    assert isinstance(build(cls.config_class, {"latent_stream": "cell"}, "model"), CellCascadeConfig)
    with pytest.raises(ValueError, match="CellCascadeConfig"):
        CCFMConfig(latent_stream="cell")


def test_stage_two_learns_the_response_the_embedding_misses_and_a_saved_run_predicts_alike(hidden_effect_view, tmp_path):
    view = hidden_effect_view
    model = CellCascade.from_view(view, build(CellCascadeConfig, TINY, "model"))
    model.fit(view, SHORT, tmp_path)
    controls = view.expression.get(view.control_rows("A"))
    real = view.expression.get(view.groups(view.rows.train)[("P1", "A")])
    settings = PredictConfig(ode_method="midpoint", ode_steps=5)
    no_shift = np.zeros(len(view.genes), np.float32)
    stage_one = model.predicted_cells(controls, "P1", "A", no_shift, np.random.default_rng(1), settings)[1]
    cascade = model.own_cells(controls, "P1", "A", no_shift, np.random.default_rng(1), settings)
    true_change = real[:, HIDDEN_GENE].mean() - controls[:, HIDDEN_GENE].mean()
    assert true_change > 0.8  # the effect is there, and outside the embedding:
    assert abs(stage_one[:, HIDDEN_GENE].mean() - controls[:, HIDDEN_GENE].mean()) < 0.3 * true_change
    assert abs(cascade[:, HIDDEN_GENE].mean() - real[:, HIDDEN_GENE].mean()) < 0.3 * true_change
    assert (cascade >= 0).all() and model.fit_report["expression_flow"]["steps"] == TINY["expression_steps"]

    model.save(tmp_path)
    again = PerturbationModel.load(tmp_path)
    assert isinstance(again, CellCascade) and again.prediction_mode == model.prediction_mode
    a = model.generate(controls[:20], "P2", "B", np.random.default_rng(3))
    b = again.generate(controls[:20], "P2", "B", np.random.default_rng(3))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_expression_flow_cannot_leave_each_genes_range(hidden_effect_view, tmp_path, monkeypatch):
    view = hidden_effect_view
    model = CellCascade.from_view(view, build(CellCascadeConfig, {**TINY, "expression_steps": 5, "decoder_steps": 5}, "model"))
    model.fit(view, TrainConfig(max_steps=5, batch_size=16, val_every=5, checkpoint_every=5, progress=False), tmp_path)
    monkeypatch.setattr(model.expression_flow, "predict", lambda start, z, **k: start + 1e3)  # a flow gone astray
    controls = view.expression.get(view.control_rows("A"))
    settings, no_shift = PredictConfig(ode_steps=2), np.zeros(len(view.genes), np.float32)
    cells = model.own_cells(controls, "P1", "A", no_shift, np.random.default_rng(0), settings)
    start = model.predicted_cells(controls, "P1", "A", no_shift, np.random.default_rng(0), settings)[1]
    assert (cells <= np.maximum(model.expression_max, start.max(0)) + 1e-6).all() and cells.max() < 50
