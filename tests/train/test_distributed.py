"""Several training processes (DDP over gloo on CPU): the same global batch gives the same training.

Tolerances: with a deterministic toy network, two processes and one process accumulating two
batches per step see the same batches, so their losses and weights agree to float rounding
(rtol 1e-4). The flow model draws noise per process, so there its loss curve agrees with the
one-process curve only statistically: the mean loss over the run within 25%.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pertflow.nn.loss import LossOutput
from pertflow.train import TrainConfig, Trainer
from pertflow.train.checkpoint import load_tensors
from pertflow.train.launch import run_processes


class Linear(nn.Module):
    """A network without randomness: the loss is a function of the weights and the batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def loss(self, batch):
        loss = ((self.net(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        return LossOutput(loss, {})


class Stream:
    """Batch k of one seeded stream; process r of N takes batches r, r + N, ..."""

    w = np.array([1.0, -2.0, 0.5, 3.0])

    def __init__(self):
        self.cursor, self.rank, self.n = 0, 0, 1

    def shard(self, rank, n):
        self.rank, self.n = rank, n

    def next_batch(self):
        rng = np.random.default_rng([7, self.cursor + self.rank])
        self.cursor += self.n
        x = rng.normal(size=(16, 4))
        return {"x": torch.tensor(x, dtype=torch.float32), "y": torch.tensor(x @ self.w, dtype=torch.float32)}

    def state_dict(self):
        return {"cursor": self.cursor}

    def load_state_dict(self, state):
        self.cursor = state["cursor"]


def fit(run_dir, max_steps, accumulate, resume=False):
    config = TrainConfig(max_steps=max_steps, accumulate=accumulate, lr=1e-2, val_every=100, checkpoint_every=5,
                         log_every=1, progress=False, device="cpu")
    Trainer(Linear(), config, run_dir, Stream()).fit(resume=resume)


def history(run_dir):
    return pd.read_csv(run_dir / "history.csv")


def final_weights(run_dir):
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    return load_tensors(run_dir / "checkpoints" / latest["dir"] / "model.safetensors")


def test_two_processes_train_as_one_accumulating_two_batches_and_resume_with_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    fit(one, 10, accumulate=2)
    run_processes(2, fit, two, 10, 1)
    a, b = history(one), history(two)
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)
    fit(tmp_path / "half", 10, accumulate=1)  # one process without accumulating sees only process 0's batches
    assert not np.allclose(history(tmp_path / "half")["loss"], b["loss"], rtol=1e-2)
    # resumed in one process (accumulating two batches: the same global batch) from where two stopped
    fit(one, 16, accumulate=2, resume=True)
    fit(two, 16, accumulate=2, resume=True)
    np.testing.assert_allclose(history(two)["loss"], history(one)["loss"], rtol=1e-4)
    wa, wb = final_weights(one), final_weights(two)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)
    state = json.loads((two / "checkpoints" / json.loads((two / "checkpoints" / "latest.json").read_text())["dir"]
                        / "state.json").read_text())
    assert state["sampler"]["cursor"] == 16 * 2  # 10 steps of 2 processes, 6 of 1 process x 2: no batch twice


TINY = {
    "model": {"d_model": 16, "n_heads": 2, "n_layers": 1, "dropout": 0.0, "genes_per_step": 32, "source": "control",
              "coupling": "independent", "prior": "none"},
    "train": {"max_steps": 12, "batch_size": 8, "lr": 1.0e-3, "val_every": 12, "checkpoint_every": 6, "val_batches": 2,
              "log_every": 1, "progress": False, "device": "cpu"},
    "predict": {"gene_chunk": 32, "ode_method": "euler", "ode_steps": 2},
}


@pytest.fixture(scope="module")
def split_file(synthetic_file, tmp_path_factory):
    from pertflow.data.dataset import PerturbationData
    from pertflow.data.splits import make_split

    path = tmp_path_factory.mktemp("split") / "split.json"
    with PerturbationData.read(synthetic_file) as data:
        make_split(data, "random", test_fraction=0.2).save(path)
    return path


def test_cli_trains_in_two_processes_like_one(synthetic_file, split_file, tmp_path, capsys):
    import yaml

    from pertflow import api
    from pertflow.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    two = tmp_path / "two"
    assert main(["train", "--model", "cfm", "--data", str(synthetic_file), "--split", str(split_file), "--out", str(two),
                 "--config", str(config), "--processes", "2"]) == 0
    out = capsys.readouterr()
    assert "processes 2" in out.out
    assert json.loads((two / "model.json").read_text())["fit_report"]["processes"] == 2
    one = api.train("cfm", synthetic_file, split_file, tmp_path / "one", config=config, sets=["train.accumulate=2"])
    assert one.fit_report["processes"] == 1
    a, b = history(tmp_path / "one")["loss"], history(two)["loss"]
    assert len(a) == len(b) == 12 and np.isfinite(b).all()
    assert abs(b.mean() - a.mean()) < 0.25 * a.mean()
