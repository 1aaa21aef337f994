"""scGPT as a perturbation model (scgpt-generator) and pretraining through the shared engine."""

import numpy as np
import pandas as pd
import pytest
import torch

from pertflow.cli import main
from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.view import SplitView
from pertflow.foundation.scgpt import FrozenScGPTExtractor, load_pretrained
from pertflow.models.base import PerturbationModel
from pertflow.models.config import PredictConfig
from pertflow.models.scgpt_generator.model import GeneratorConfig, GeneratorModule, ScGPTGenerator
from pertflow.train import TrainConfig

TINY = GeneratorConfig(d_model=32, nhead=4, d_hid=64, nlayers=2, dropout=0.0, genes_per_step=40)
CHUNKED = PredictConfig(batch_size=64, gene_chunk=25)


@pytest.fixture(scope="module")
def view(synthetic_adata):
    data = PerturbationData.from_anndata(synthetic_adata)
    return SplitView(data, make_split(data, "random", test_fraction=0.25))


def test_generator_learns_and_round_trips(view, tmp_path):
    model = ScGPTGenerator.from_view(view, TINY, CHUNKED)
    model.fit(view, TrainConfig(max_steps=150, batch_size=32, lr=2e-3, val_every=50, checkpoint_every=150, log_every=5, progress=False), tmp_path)
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["loss"].tail(5).mean() < 0.7 * history["loss"].head(2).mean()
    data, test = view.data, view.rows.test
    pert = view.data.perturbation_names[0]
    rows = test[(data.perturbations[test] == pert) & (data.contexts[test] == "line_A")]
    controls = view.expression.get(view.control_rows("line_A")[: len(rows)])
    pred = model.generate(controls, pert, "line_A", np.random.default_rng(0))
    real_delta = data.log_expression(rows).mean(0) - controls.mean(0)
    assert np.corrcoef(pred.mean(0) - controls.mean(0), real_delta)[0, 1] > 0.5
    model.save(tmp_path)
    again = PerturbationModel.load(tmp_path)
    np.testing.assert_array_equal(again.generate(controls, pert, "line_A", np.random.default_rng(0)), pred)


def test_generator_inputs_flag_genes_and_append_other_tokens():
    module = GeneratorModule(TINY, torch.arange(3, 13), n_tokens=16, pad_id=0, unk_id=2)
    control = torch.rand(2, 10)
    pert_ids = torch.tensor([[5, 0], [14, 5]])  # gene token 5 (column 2); a drug token 14 with gene 5
    ids, values, flags, padding = module.inputs(control, torch.arange(10), pert_ids)
    assert ids.shape == (2, 12)
    assert flags[0, 2] == 1 and flags[0, :10].sum() == 1 and flags[1, 2] == 1
    assert ids[1, 10] == 14 and flags[1, 10] == 1 and not padding[1, 10]  # the drug as an extra token
    assert padding[0, 10:].all() and padding[1, 11]  # no extra token: padded and masked
    torch.testing.assert_close(values[:, :10], control)


def test_pretrain_cli_mlm_learns_and_loads(synthetic_file, tmp_path):
    out = tmp_path / "pre"
    sets = ["train.max_steps=60", "train.batch_size=16", "train.val_every=20", "train.lr=1e-3", "train.progress=false",
            "model.max_seq_len=64", "model.d_model=32", "model.d_hid=64"]
    assert main(["pretrain", "--data", str(synthetic_file), "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    history = pd.read_csv(out / "history.csv")
    assert history["val_loss"].dropna().iloc[-1] < history["val_loss"].dropna().iloc[0]
    loaded = load_pretrained(out)
    assert set(loaded.vocab) >= {"<pad>", "<cls>", "G0000"}
    extractor = FrozenScGPTExtractor(loaded.model, loaded.vocab, n_bins=51, warmup_batches=1)
    genes = ["G0001", "G0002", "NOT_A_GENE"]
    feats = extractor.extract(torch.rand(3, 3), genes)
    assert feats.features.shape == (3, 3, 32) and feats.mask.tolist() == [True, True, False]
    assert torch.equal(feats.features[:, 2], torch.zeros(3, 32))


def test_pretrain_accepts_a_file_without_perturbation_labels(synthetic_adata, tmp_path):
    adata = synthetic_adata.copy()
    del adata.obs["perturbation"]
    path = tmp_path / "atlas.h5ad"
    adata.write_h5ad(path)
    sets = ["train.max_steps=2", "train.batch_size=4", "train.progress=false", "model.max_seq_len=32", "model.d_model=16", "model.d_hid=32"]
    assert main(["pretrain", "--data", str(path), "--out", str(tmp_path / "pre"), *[a for s in sets for a in ("--set", s)]]) == 0
    assert (tmp_path / "pre" / "best_model.pt").is_file()


@pytest.mark.parametrize("name", ["norman19_mcfaline23_devel.h5ad", "kang18_pbmc_ifnb.h5ad", "zhao21_gbm_panobinostat.h5ad", "norman19_gears_micro.h5ad"])
def test_pretrain_runs_on_each_shared_dataset(shared_data, tmp_path, name):
    sets = ["train.max_steps=2", "train.batch_size=4", "train.val_batches=1", "train.progress=false",
            "model.max_seq_len=32", "model.d_model=16", "model.d_hid=32"]
    assert main(["pretrain", "--data", str(shared_data / name), "--out", str(tmp_path / "pre"), *[a for s in sets for a in ("--set", s)]]) == 0
    assert load_pretrained(tmp_path / "pre").config.ntoken > 3


def test_pretraining_batches_are_padded_to_their_longest_cell(synthetic_adata):
    from pertflow.data.view import ExpressionCache
    from pertflow.foundation.scgpt.pretrain import MaskedCellBatches, PretrainConfig

    data = PerturbationData.from_anndata(synthetic_adata)
    rows = np.arange(40)
    expr = ExpressionCache(data, rows, np.arange(data.adata.n_vars)).get(rows)
    expr[:, 30:] = 0  # every cell has at most 30 non-zero genes: a 61-long sequence would be half padding
    cache = type("Cache", (), {"get": lambda self, r: expr[np.searchsorted(rows, r)]})()
    config = PretrainConfig(d_model=16, nhead=2, d_hid=16, max_seq_len=61)
    scgpt = config.architecture(ntoken=data.adata.n_vars + 3, pad_token_id=0, cls_token_id=1)
    batch = MaskedCellBatches(cache, rows, np.arange(3, data.adata.n_vars + 3), config, scgpt, 8, seed=0).next_batch()
    longest = 1 + max(int((expr[r] > 0).sum()) for r in range(40))
    assert batch["gene_ids"].shape[1] <= longest <= 31
    padding = batch["src_key_padding_mask"]
    assert not padding[:, 0].any() and (~padding).sum(1).max() == batch["gene_ids"].shape[1]  # the longest cell fills it
    short = PretrainConfig(d_model=16, nhead=2, d_hid=16, max_seq_len=11)  # cells with more genes are still sampled down
    batch = MaskedCellBatches(cache, rows, np.arange(3, data.adata.n_vars + 3), short, scgpt, 8, seed=0).next_batch()
    assert batch["gene_ids"].shape[1] == 11
