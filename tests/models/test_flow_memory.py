"""Gradient checkpointing and bf16 autocast of the gene-space flow models (run on CPU)."""

import pandas as pd
import pytest
import torch

from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.view import SplitView
from pertflow.models.cfm.config import CFMConfig
from pertflow.models.cfm.model import CFM
from pertflow.models.config import PredictConfig
from pertflow.train import TrainConfig


@pytest.fixture(scope="module")
def view(synthetic_adata):
    data = PerturbationData.from_anndata(synthetic_adata)
    return SplitView(data, make_split(data, "random", test_fraction=0.25))


@pytest.mark.parametrize("backbone", ["dense", "latent"])
def test_checkpointed_layers_give_the_same_gradients(view, backbone):
    config = CFMConfig(d_model=16, n_heads=2, n_layers=2, genes_per_step=24, dropout=0.1, backbone=backbone)
    model = CFM.from_view(view, config, PredictConfig(ode_steps=2))
    batch = view.paired_batches(view.rows.train, 8, seed=0, max_components=2).next_batch()
    grads = []
    for on in (False, True):
        module = model.module
        module.set_grad_checkpointing(on)
        module.zero_grad()
        torch.manual_seed(3)
        module.loss(batch).loss.backward()
        grads.append({k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_with_checkpointing_trains_like_float32(view, tmp_path):
    config = CFMConfig(d_model=16, n_heads=2, n_layers=1, genes_per_step=32, dropout=0.0, source="control", center=True)
    losses = {}
    for precision in ("no", "bf16"):
        model = CFM.from_view(view, config, PredictConfig(ode_steps=2))
        train = TrainConfig(max_steps=40, batch_size=16, lr=1e-2, val_every=40, checkpoint_every=40, log_every=1,
                            progress=False, device="cpu", mixed_precision=precision, grad_checkpointing=precision == "bf16")
        model.fit(view, train, tmp_path / precision)
        assert model.fit_report["skipped_steps"] == []
        losses[precision] = pd.read_csv(tmp_path / precision / "history.csv")["loss"]
    fp32, bf16 = losses["no"], losses["bf16"]
    assert bf16.notna().all() and len(bf16) == 40
    assert bf16.iloc[-10:].mean() < bf16.iloc[:5].mean()  # it learns under bf16
    assert abs(bf16.mean() - fp32.mean()) < 0.1 * fp32.mean()  # as float32 does (bf16 keeps ~3 digits)
