"""CCFM: the cascade's times, a tiny model that learns, inference without the foundation, the
feature cache, and runs that save, load and resume."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from pertflow.api import predict, train
from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.view import SplitView
from pertflow.flows import uniform_time
from pertflow.foundation.scgpt import FrozenScGPTExtractor, TransformerModel
from pertflow.models.base import PerturbationModel
from pertflow.models.ccfm.config import CCFMConfig
from pertflow.models.ccfm.model import CCFM
from pertflow.models.ccfm.module import cascaded_times
from pertflow.models.config import PredictConfig
from pertflow.train import TrainConfig

TINY = dict(d_model=32, n_heads=4, n_layers=1, dropout=0.0, genes_per_step=60, source="control", source_noise=0.1,
            center=True, coupling="ot", reference_cell="other", foundation_d_model=16, foundation_layers=1,
            foundation_steps=30, foundation_batch_size=16, bottleneck_dim=16, dh_depth=1, warmup_batches=4)
SETTINGS = PredictConfig(ode_method="midpoint", ode_steps=2)


def test_cascaded_times_give_each_sample_one_stream():
    torch.manual_seed(0)
    times = cascaded_times(20000, 0.4, uniform_time, torch.device("cpu"))
    assert abs(times.latent.float().mean().item() - 0.4) < 0.02
    assert torch.all(times.t_expr[times.latent] == 0) and torch.all(times.t_latent[~times.latent] == 1)
    for t in (times.t_latent[times.latent], times.t_expr[~times.latent]):  # the trained stream's time is uniform
        assert 0.45 < t.mean().item() < 0.55 and t.min() >= 0 and t.max() <= 1


@pytest.fixture(scope="module")
def view(synthetic_adata):
    data = PerturbationData.from_anndata(synthetic_adata)
    return SplitView(data, make_split(data, "random", test_fraction=0.25))


@pytest.fixture(scope="module")
def trained(view, tmp_path_factory):
    run = tmp_path_factory.mktemp("ccfm")
    model = CCFM.from_view(view, CCFMConfig(**TINY), SETTINGS)
    model.fit(view, TrainConfig(max_steps=200, batch_size=32, lr=2e-3, val_every=100, checkpoint_every=100, log_every=5,
                                progress=False, seed=1), run)
    return model, run


def test_a_tiny_ccfm_learns_both_streams(view, trained):
    model, run = trained
    history = pd.read_csv(run / "history.csv")
    # the expression stream starts near its target (controls); the latent stream from noise, and a
    # target cell's features vary a lot given its perturbation, so its loss has a high floor: the
    # last 10 records against the first 5 gave 0.29-0.33 (expression) and 0.87-0.90 (latent) over
    # seeds 1-5 (2 threads instead of 1 moved them by under 0.01); a stream that stops learning
    # stays at 1 or above
    for stream, ratio in (("mse_expr", 0.7), ("mse_latent", 0.95)):
        assert history[stream].tail(10).mean() < ratio * history[stream].head(5).mean(), stream
    assert (run / "foundation" / "args.json").is_file()  # pretrained on the training cells, in the run folder
    assert model.config.latent_dim == 16
    # End to end, a 200-step tiny CCFM does not yet beat "no change" on these cells (its generated
    # latent is poor; see issue 14's note), so what is checked here is that both streams learn.


def test_inference_never_calls_the_foundation(view, trained, monkeypatch):
    model, run = trained

    def forbidden(*args, **kwargs):
        raise AssertionError("the foundation model was called at inference")

    for name in ("forward", "encode"):
        monkeypatch.setattr(TransformerModel, name, forbidden)
    monkeypatch.setattr(FrozenScGPTExtractor, "extract", forbidden)
    model.prediction_mode = "flow"
    controls = view.expression.get(view.control_rows("line_A")[:8])
    out = model.generate(controls, view.data.perturbation_names[0], "line_A", np.random.default_rng(1))
    assert out.shape == (8, len(view.genes)) and np.isfinite(out).all()


def test_features_are_cached_and_recomputed_when_the_foundation_changes(view, trained, tmp_path, monkeypatch):
    model, run = trained
    extractor = model.frozen_extractor(view, TrainConfig(progress=False, seed=1), run)  # the run's own foundation
    calls = {"n": 0}
    original = FrozenScGPTExtractor.extract

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FrozenScGPTExtractor, "extract", counting)
    first = model.latent_targets(view, extractor, run).get(view.rows.train[:4])
    assert calls["n"] == 0  # the cache the run wrote is reused
    with torch.no_grad():
        next(extractor.model.parameters()).add_(0.5)  # another foundation
    model.latent_targets(view, extractor, run)
    assert calls["n"] > 0  # ... gets its own features
    assert first.shape == (4, len(view.genes), 16) and np.isfinite(first).all()


def test_features_in_blocks_are_another_cache_unless_one_block_holds_every_gene(view, trained, tmp_path):
    model, run = trained
    extractor = model.frozen_extractor(view, TrainConfig(progress=False, seed=1), run)
    genes = view.vocab.expression_genes
    config = model.config
    try:
        plain = model.fingerprint(extractor, genes)
        model.config = dataclasses.replace(config, feature_block=len(genes))
        assert model.fingerprint(extractor, genes) == plain
        model.config = dataclasses.replace(config, feature_block=len(genes) // 2)
        assert model.fingerprint(extractor, genes) != plain
        rows = view.rows.train[:3]
        expr = torch.from_numpy(view.expression.get(rows))
        halves = model.raw_features(extractor, expr, genes)
        first = extractor.extract(expr[:, : len(genes) // 2], genes[: len(genes) // 2], normalize=False)
        assert torch.allclose(halves.features[:, : len(genes) // 2], first.features, atol=1e-6)
    finally:
        model.config = config


def test_runs_save_load_and_resume(synthetic_file, tmp_path, monkeypatch):
    from pertflow.data.batches import PairedBatches

    data = PerturbationData.read(synthetic_file)
    split = make_split(data, "combinations", seen=[2])
    sets = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY.items()] + [
        "model.foundation_steps=10", "train.batch_size=8", "train.max_steps=6", "train.checkpoint_every=3",
        "train.val_every=3", "train.val_batches=2", "train.progress=false", "predict.ode_method=euler", "predict.ode_steps=2"]
    train("ccfm", data, split, tmp_path / "unbroken", sets=sets)
    original = PairedBatches.next_batch
    calls = {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 2 + 5:  # 2 validation batches first; then step 5, after the step-3 checkpoint
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(PairedBatches, "next_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train("ccfm", data, split, tmp_path / "broken", sets=sets)
    monkeypatch.setattr(PairedBatches, "next_batch", original)
    train("ccfm", data, split, tmp_path / "broken", sets=sets, resume=True)
    a = PerturbationModel.load(tmp_path / "unbroken")
    b = PerturbationModel.load(tmp_path / "broken")
    for k, v in a.state_tensors().items():
        torch.testing.assert_close(b.state_tensors()[k], v, rtol=0, atol=0)
    assert isinstance(a, CCFM) and a.config.latent_dim == 16
    one, two = predict(a, data, split, seed=3), predict(tmp_path / "unbroken", data, split, seed=3)
    np.testing.assert_array_equal(one.X, two.X)
