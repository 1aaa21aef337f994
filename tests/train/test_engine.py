import json
import signal
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pertflow.errors import InputError, TrainingInterrupted
from pertflow.nn.loss import LossOutput
from pertflow.train import TrainConfig, Trainer, TrainingDiverged


class Regression(nn.Module):
    """y = X w* + noise, with dropout so that resuming must restore the torch RNG too."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
        self.nan_at: set[int] = set()
        self.calls = 0

    def loss(self, batch):
        self.calls += self.training  # count training calls only
        pred = self.net(batch["x"]).squeeze(-1)
        loss = ((pred - batch["y"]) ** 2).mean() + 0.0 * torch.randn(()).abs()
        if self.calls in self.nan_at:
            loss = loss * float("nan")
        return LossOutput(loss, {"mse": float(loss.detach())})


class Source:
    """Seeded numpy batches; can raise an interruption at a given call."""

    w = np.array([1.0, -2.0, 0.5, 3.0])

    def __init__(self, seed=0, interrupt_at=None):
        self.rng = np.random.default_rng(seed)
        self.calls = 0
        self.interrupt_at = interrupt_at

    def next_batch(self):
        self.calls += 1
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        x = self.rng.normal(size=(32, 4))
        y = x @ self.w + 0.1 * self.rng.normal(size=32)
        return {"x": torch.tensor(x, dtype=torch.float32), "y": torch.tensor(y, dtype=torch.float32)}

    def state_dict(self):
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["bit_generator"]


def config(**kw):
    base = dict(max_steps=20, lr=1e-2, batch_size=32, val_every=5, checkpoint_every=5, log_every=1, progress=False, seed=7, warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def val_batches():
    return [Source(seed=99).next_batch() for _ in range(2)]


def make(run_dir, source=None, **kw):
    torch.manual_seed(0)
    return Trainer(Regression(), config(**kw), run_dir, source or Source(), val_batches(), metadata={"model": "toy"})


def weights(trainer):
    return {k: v.clone() for k, v in trainer.network.state_dict().items()}


def test_loss_falls_and_history_is_written(tmp_path):
    t = make(tmp_path, max_steps=200, val_every=50)
    result = t.fit()
    rows = (tmp_path / "history.csv").read_text().splitlines()
    losses = [float(r.split(",")[1]) for r in rows[1:]]
    assert np.mean(losses[-20:]) < 0.1 * np.mean(losses[:5])
    assert result.best_step is not None and result.best_criterion < 1.0
    assert "val_loss" in rows[0]


def test_resume_equals_unbroken_run(tmp_path):
    unbroken = make(tmp_path / "a")
    unbroken.fit()
    broken = make(tmp_path / "b", source=Source(interrupt_at=13))
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
    assert json.loads((tmp_path / "b" / "checkpoints" / "latest.json").read_text())["step"] == 10
    resumed = make(tmp_path / "b")  # a fresh process: new module, new source
    result = resumed.fit(resume=True)
    assert result.steps == 20
    for name, value in weights(unbroken).items():
        torch.testing.assert_close(weights(resumed)[name], value, rtol=0, atol=0)
    assert resumed.best_step == unbroken.best_step and resumed.best_val == unbroken.best_val
    history = (tmp_path / "b" / "history.csv").read_text()
    assert history == (tmp_path / "a" / "history.csv").read_text()


def test_moving_average_is_kept_and_resumes_exactly(tmp_path):
    """ema_decay: the run keeps the moving average of its weights, and a resumed run has the same one."""
    unbroken = make(tmp_path / "a", ema_decay=0.9, val_every=100)
    unbroken.fit()
    last = weights(unbroken)
    kept = unbroken.final_weights()
    assert any(not torch.equal(kept[k], last[k]) for k in last)  # the average, not the last weights
    broken = make(tmp_path / "b", source=Source(interrupt_at=13), ema_decay=0.9, val_every=100)
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
    resumed = make(tmp_path / "b", ema_decay=0.9, val_every=100)
    resumed.fit(resume=True)
    for name, value in kept.items():
        torch.testing.assert_close(resumed.final_weights()[name], value, rtol=0, atol=0)


def test_checkpoints_are_safetensors_and_json(tmp_path):
    make(tmp_path, keep_checkpoints=2).fit()
    ckpt = tmp_path / "checkpoints"
    steps = sorted(p.name for p in ckpt.glob("step-*"))
    assert steps == ["step-00000015", "step-00000020"]
    folder = ckpt / steps[-1]
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "optimizer.safetensors", "state.json"}
    state = json.loads((folder / "state.json").read_text())
    assert state["format_version"] == 1 and state["step"] == 20 and state["metadata"] == {"model": "toy"}
    assert "bit_generator" in state["sampler"]
    assert (ckpt / "best.safetensors").is_file()
    assert not list(ckpt.glob(".*tmp*"))


def test_existing_run_needs_resume(tmp_path):
    make(tmp_path, max_steps=5).fit()
    with pytest.raises(InputError, match="already holds a training run.*resume=True"):
        make(tmp_path, max_steps=5).fit()
    # a run killed before its first checkpoint: resuming starts it from step 0, and says so
    assert make(tmp_path / "empty", max_steps=5).fit(resume=True).steps == 5


def test_nonfinite_steps_are_skipped_and_recorded(tmp_path):
    t = make(tmp_path)
    t.network.nan_at = {3, 4}
    result = t.fit()
    assert result.skipped_steps == [2, 3]
    assert all(torch.isfinite(p).all() for p in t.network.parameters())
    rows = (tmp_path / "history.csv").read_text().splitlines()
    skipped_col = rows[0].split(",").index("skipped")
    assert sum(int(r.split(",")[skipped_col]) for r in rows[1:]) == 2


def test_nonfinite_stop_policy(tmp_path):
    t = make(tmp_path, nonfinite="stop")
    t.network.nan_at = {6}
    with pytest.raises(TrainingDiverged, match="non-finite loss or gradient at step 5"):
        t.fit()


def test_cosine_schedule_reaches_min_lr(tmp_path):
    t = make(tmp_path, max_steps=10, warmup_steps=0, min_lr_ratio=0.1, val_every=100, checkpoint_every=100)
    t.fit()
    assert t.scheduler.get_last_lr()[0] == pytest.approx(1e-3)


def test_resume_refuses_other_settings(tmp_path):
    broken = make(tmp_path, source=Source(interrupt_at=8))
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
    with pytest.raises(InputError, match=r"other settings \(lr\)"):
        make(tmp_path, lr=0.5).fit(resume=True)
    other = make(tmp_path)
    other.metadata = {"model": "another"}
    with pytest.raises(InputError, match="the model"):
        other.fit(resume=True)
    make(tmp_path, progress=True).fit(resume=True)  # a progress bar is not a setting of the run


class Signalling(Source):
    """A source that sends the process a signal (as Ctrl-C or `kill` would) at given calls."""

    def __init__(self, signals, **kw):
        super().__init__(**kw)
        self.signals = signals  # call -> signal numbers

    def next_batch(self):
        for signum in self.signals.get(self.calls + 1, ()):
            # to this (the main) thread: delivered before the call returns, so that its handler has
            # run before a second signal is sent (a process-wide kill may land on another thread
            # later, and two pending SIGINTs merge into one)
            signal.pthread_kill(threading.get_ident(), signum)
        return super().next_batch()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_checkpoints_it_and_the_run_resumes_exactly(tmp_path, signum):
    unbroken = make(tmp_path / "a")
    unbroken.fit()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    broken = make(tmp_path / "b", source=Signalling({13: [signum]}))
    with pytest.raises(TrainingInterrupted) as stop:
        broken.fit()
    assert {s: signal.getsignal(s) for s in before} == before  # the previous handlers are back
    assert stop.value.step == 13 and stop.value.exit_code == 128 + signum  # step 13 finished, not lost
    assert stop.value.checkpoints == tmp_path / "b" / "checkpoints"
    assert json.loads((tmp_path / "b" / "checkpoints" / "latest.json").read_text())["step"] == 13
    resumed = make(tmp_path / "b")
    assert resumed.fit(resume=True).steps == 20
    for name, value in weights(unbroken).items():
        torch.testing.assert_close(weights(resumed)[name], value, rtol=0, atol=0)
    assert (tmp_path / "b" / "history.csv").read_text() == (tmp_path / "a" / "history.csv").read_text()


def test_a_signal_before_the_first_checkpoint_still_leaves_a_resumable_one(tmp_path):
    unbroken = make(tmp_path / "a")
    unbroken.fit()
    with pytest.raises(TrainingInterrupted) as stop:
        make(tmp_path / "b", source=Signalling({1: [signal.SIGINT]})).fit()
    assert stop.value.step == 1 and json.loads((tmp_path / "b" / "checkpoints" / "latest.json").read_text())["step"] == 1
    resumed = make(tmp_path / "b")
    resumed.fit(resume=True)
    for name, value in weights(unbroken).items():
        torch.testing.assert_close(weights(resumed)[name], value, rtol=0, atol=0)


def test_a_second_signal_stops_at_once(tmp_path):
    # from Python's own SIGINT handler, whatever an earlier test's libraries left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _second_signal(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def _second_signal(tmp_path):
    with pytest.raises(KeyboardInterrupt) as stop:
        make(tmp_path, source=Signalling({3: [signal.SIGINT, signal.SIGINT]})).fit()
    assert type(stop.value) is KeyboardInterrupt  # Python's own handler, restored by the first signal
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_max_steps_may_grow_to_extend_a_finished_run(tmp_path):
    make(tmp_path, max_steps=10, warmup_steps=0, min_lr_ratio=0.1).fit()
    longer = make(tmp_path, max_steps=16, warmup_steps=0, min_lr_ratio=0.1)
    assert longer.fit(resume=True).steps == 16
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, 17))
    assert longer.scheduler.get_last_lr()[0] == pytest.approx(1e-3)  # the schedule ends at the new length


# ---------------------------------------------------------------------------- what the guard records
class _Tiny(torch.nn.Module):
    """A one-tensor network whose loss (or a weight) turns non-finite at a chosen training step."""

    def __init__(self, nan_loss_at: int | None = None, nan_weight_at: int | None = None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.calls, self.nan_loss_at, self.nan_weight_at = 0, nan_loss_at, nan_weight_at

    def loss(self, batch):
        if self.training:
            self.calls += 1
            if self.calls - 1 == self.nan_weight_at:
                with torch.no_grad():
                    self.w[1] = float("inf")
        loss = ((self.w - batch["x"]) ** 2).mean()
        if self.training and self.calls - 1 == self.nan_loss_at:
            loss = loss * float("nan")
        return LossOutput(loss)


class _Batches:
    def next_batch(self):
        return {"x": torch.zeros(3)}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_the_guard_records_the_first_bad_step(tmp_path):
    trainer = Trainer(_Tiny(nan_loss_at=7), TrainConfig(max_steps=12, val_every=10, checkpoint_every=10, log_every=100, progress=False), tmp_path, _Batches())
    result = trainer.fit()
    assert result.skipped_steps == [7] and result.first_nonfinite_step == 7
    history = pd.read_csv(tmp_path / "history.csv")
    bad = history[history["skipped"] == 1]
    assert list(bad["step"]) == [8] and list(bad["nonfinite"]) == ["loss"]
    with pytest.raises(TrainingDiverged, match=r"non-finite loss or gradient at step 3 \(loss;"):
        Trainer(_Tiny(nan_loss_at=3), TrainConfig(max_steps=12, nonfinite="stop", progress=False), tmp_path / "stop", _Batches()).fit()
    assert pd.read_csv(tmp_path / "stop" / "history.csv")["nonfinite"].dropna().tolist() == ["loss"]


def test_the_weight_check_names_the_tensor_and_the_steps(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"non-finite weights at step 8 \(finite at step 4.*: w"):
        Trainer(_Tiny(nan_weight_at=5), TrainConfig(max_steps=20, nan_check_interval=4, checkpoint_every=50, progress=False), tmp_path, _Batches()).fit()
