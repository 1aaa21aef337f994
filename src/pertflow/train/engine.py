"""The one training loop every model family uses.

A model hands the :class:`Trainer` a module whose ``loss(batch)`` returns a
:class:`~pertflow.nn.loss.LossOutput`, a source of training batches and (optionally) a fixed list
of validation batches. The trainer owns everything else: Adam/AdamW with a cosine schedule,
gradient clipping, the finite-value guard, validation and best-step selection, resumable
checkpoints, device placement and mixed precision through ``accelerate``, a progress bar and the
loss log ``history.csv``.

SIGINT (Ctrl-C) and SIGTERM during :meth:`Trainer.fit` do not kill the run: the step in progress
is finished, a checkpoint of it is written, and :class:`~pertflow.errors.TrainingInterrupted`
is raised (a second signal acts at once, as without pertflow). The run then resumes exactly where
it stopped.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from pertflow.errors import InputError, TrainingInterrupted
from pertflow.faults import crash_point
from pertflow.io import write_text
from pertflow.runtime import progress_bar
from pertflow.train.checkpoint import CheckpointDir, load_tensors, restore_rng
from pertflow.train.config import RESUME_MAY_CHANGE, TrainConfig
from pertflow.train.ema import ExponentialMovingAverage

Batch = dict[str, torch.Tensor]
VAL_SEED = 1234


class BatchSource(Protocol):
    """Training batches: ``next_batch()`` plus a state that a checkpoint saves."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Shardable(Protocol):
    """A batch source that takes its own share of the batches in multi-process training."""

    def shard(self, process_index: int, num_processes: int) -> None: ...


@runtime_checkable
class GradCheckpointing(Protocol):
    """A network that can recompute its activations in the backward pass (``train.grad_checkpointing``)."""

    def set_grad_checkpointing(self, on: bool) -> None: ...


class _LossModule(torch.nn.Module):
    """``forward(batch) = network.loss(batch)``: what accelerate wraps, so that under DDP the
    gradients of every process are averaged (a call to ``network.loss`` would go around DDP)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, batch: Batch) -> Any:
        return self.network.loss(batch)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingDiverged(RuntimeError):
    """Raised when the finite-value guard stops a run."""


@dataclass
class TrainResult:
    """What a finished run reports."""

    steps: int
    best_step: int | None
    best_criterion: float | None  # the validation loss, or minus the selector's score, at best_step
    skipped_steps: list[int] = field(default_factory=list)
    history: Path | None = None
    processes: int = 1
    # the training loop's rate in this call, validation excluded (resumed: since resuming)
    steps_per_s: float | None = None

    @property
    def first_nonfinite_step(self) -> int | None:
        """The first step skipped by the finite-value guard (0-based, as ``skipped_steps``), or None."""
        return self.skipped_steps[0] if self.skipped_steps else None


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """While inside: SIGINT and SIGTERM are recorded in the yielded list instead of acting.

    The first signal restores the previous handlers, so that a second one acts at once. The
    previous handlers are restored on leaving. Outside the main thread (where Python cannot
    install handlers) nothing is installed and the list stays empty.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def record(signum: int, frame: Any) -> None:
        received.append(signum)
        restore()
        # os.write, not print: the handler may run while tqdm is inside a write to sys.stderr
        note = (f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint (send it again to "
                "stop at once)\n")
        with contextlib.suppress(OSError):
            os.write(sys.stderr.fileno(), note.encode())

    for s in STOP_SIGNALS:
        signal.signal(s, record)
    try:
        yield received
    finally:
        restore()


def make_optimizer(params: Any, config: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): warm-up, then cosine decay."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Train ``module`` with ``config``, writing checkpoints and the log under ``run_dir``.

    Parameters
    ----------
    module
        An ``nn.Module`` with ``loss(batch) -> LossOutput``.
    config
        The training configuration.
    run_dir
        Output folder: ``checkpoints/``, ``history.csv``.
    train_batches
        The training batch source (its state is checkpointed).
    val_batches
        Fixed validation batches (never test cells); None disables validation.
    metadata
        JSON-ready run description stored in every checkpoint (model config, data spec, ...).
    selector
        Optional model selection on validation metrics: called with the network at every
        validation, returns named metrics with a ``"val_score"`` (higher is better) that chooses
        the best step instead of the validation loss. It must not touch the training RNG state
        (the trainer forks it around the call).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        config: TrainConfig,
        run_dir: str | Path,
        train_batches: BatchSource,
        val_batches: list[Batch] | None = None,
        metadata: dict[str, Any] | None = None,
        selector: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    ):
        self.config = config
        self.selector = selector
        self.run_dir = Path(run_dir)
        self.train_batches = train_batches
        self.val_batches = val_batches or []
        self.metadata = metadata or {}
        self.checkpoints = CheckpointDir(self.run_dir)
        cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
        if config.device == "cuda" and not torch.cuda.is_available():
            raise InputError("train.device is 'cuda' but no GPU is visible. Use train.device=auto or cpu.")
        # accelerate keeps one state per process: a second run in this process (another precision)
        # starts from a fresh one; the process group (PartialState), if any, is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=config.mixed_precision)
        self.network = module
        if config.grad_checkpointing:
            if not isinstance(module, GradCheckpointing):
                raise InputError(f"{type(module).__name__} has no gradient checkpointing: set "
                                 "train.grad_checkpointing=false.")
            module.set_grad_checkpointing(True)
        self.optimizer = make_optimizer(module.parameters(), config)
        self.module, self.optimizer = self.accelerator.prepare(_LossModule(module), self.optimizer)
        if self.accelerator.num_processes > 1:
            # Every process must take its own share of the batches (and say which it is).
            if not isinstance(train_batches, Shardable):
                raise InputError("multi-process training needs a batch source with shard(process_index, "
                                 "num_processes).")
            train_batches.shard(self.accelerator.process_index, self.accelerator.num_processes)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.ema = ExponentialMovingAverage(module, config.ema_decay) if config.ema_decay > 0 else None
        self.step = 0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.skipped: list[int] = []
        self._history_rows: list[dict[str, Any]] = []
        self._saved_step: int | None = None  # the step of the latest checkpoint written or loaded
        self._weights_checked = 0  # the step of the last finite check of the weights that passed

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def processes(self) -> int:
        return self.accelerator.num_processes

    def _seed_process(self, step: int) -> None:
        """Process r > 0 of a multi-process run draws its own noise (process 0 keeps the run's
        seed, so that one process trains as before)."""
        rank = self.accelerator.process_index
        if rank:
            torch.manual_seed((self.config.seed * 1_000_003 + rank * 7_919 + step) % 2**63)

    def _announce(self) -> None:
        """One line on standard error, from the main process: how the run is spread."""
        if not self.accelerator.is_main_process:
            return
        acc = self.accelerator
        backend = getattr(acc.state, "backend", None)
        spread = f" ({backend})" if acc.num_processes > 1 and backend else ""
        print(f"training: processes: {acc.num_processes}{spread}, "
              f"device: {acc.device.type}, mixed precision: {self.config.mixed_precision}, "
              f"batches per step: {acc.num_processes * self.config.accumulate} x {self.config.batch_size}",
              file=sys.stderr, flush=True)

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _weights(self) -> dict[str, torch.Tensor]:
        return self.network.state_dict()

    def _evaluated_weights(self) -> contextlib.AbstractContextManager:
        """The weights validation and prediction read: the moving average when there is one."""
        return self.ema.applied(self.network) if self.ema is not None else contextlib.nullcontext()

    def _kept_weights(self) -> dict[str, torch.Tensor]:
        """What a run keeps (best and final weights): the moving average when there is one."""
        return self.ema.weights() if self.ema is not None else {k: v.detach().cpu() for k, v in self._weights().items()}

    def _nonfinite_gradients(self) -> str:
        """What made a step's gradient non-finite: the parameters whose gradient is (a few named)."""
        names = [n for n, p in self.network.named_parameters() if p.grad is not None
                 and not torch.isfinite(p.grad).all()]
        if not names:
            return "gradient"
        return "gradient of " + " ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")

    def _check_weights(self) -> None:
        """The finite-value check of the weights (every ``nan_check_interval`` steps and before a
        checkpoint): a non-finite weight stops the run, naming the tensors and the steps between
        which it went bad, so that no checkpoint ever holds one."""
        bad = [n for n, p in self.network.named_parameters() if not torch.isfinite(p).all()]
        if not bad:
            self._weights_checked = self.step
            return
        self._history_rows.append({"step": self.step, "skipped": 0, "nonfinite": f"weights of {' '.join(bad[:3])}"})
        self._write_history()
        raise TrainingDiverged(
            f"non-finite weights at step {self.step} (finite at step {self._weights_checked}, the previous check): "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. Lower train.lr or check the data for extreme "
            "values; the last good checkpoint is in checkpoints/."
        )

    def _loss(self, batch: Batch, train: bool = True):
        with self.accelerator.autocast():
            return self.module(batch) if train else self.network.loss(batch)

    def validate(self) -> float | None:
        """Mean loss over the fixed validation batches, with fixed noise; training RNG untouched."""
        if not self.val_batches:
            return None
        self.network.eval()
        total = 0.0
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), self._evaluated_weights():
            torch.manual_seed(VAL_SEED)
            for batch in self.val_batches:
                total += float(self._loss(self._to_device(batch), train=False).loss)
        self.network.train()
        return total / len(self.val_batches)

    def select(self) -> dict[str, float]:
        """The selector's validation metrics (empty without one); training RNG untouched."""
        if self.selector is None:
            return {}
        self.network.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), self._evaluated_weights():
            torch.manual_seed(VAL_SEED)
            crash_point("validation")
            out = dict(self.selector(self.network))
        self.network.train()
        return out

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> None:
        if not self.accelerator.is_main_process:
            return
        self._check_weights()
        state = {
            "sampler": self.train_batches.state_dict(),
            "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
            "best_criterion": self.best_val,
            "best_step": self.best_step,
            "skipped_steps": self.skipped,
            "train_config": {k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
            "metadata": self.metadata,
        }
        if self.accelerator.scaler is not None:
            state["grad_scaler"] = self.accelerator.scaler.state_dict()
        weights = dict(self._weights())
        if self.ema is not None:
            state["ema_updates"] = self.ema.updates
            weights.update({f"ema.{k}": v for k, v in self.ema.weights().items()})
        self.checkpoints.save(self.step, weights, self.optimizer.state_dict(), state, self.config.keep_checkpoints)
        self._saved_step = self.step
        self._write_history()

    def _stop(self, signum: int) -> None:
        """Checkpoint the step reached (unless just written) and raise :class:`TrainingInterrupted`."""
        if self._saved_step != self.step:
            self._save()
        name = signal.Signals(signum).name
        raise TrainingInterrupted(self.step, self.checkpoints.root, name, 128 + int(signum))

    def _resume(self) -> None:
        model_state, optimizer_state, rng, state = self.checkpoints.load_latest()
        self._check_same_run(state)
        self.network.load_state_dict({k: v for k, v in model_state.items() if not k.startswith("ema.")})
        if self.ema is not None:
            if "ema_updates" not in state:
                raise InputError(f"the checkpoint in {self.run_dir} holds no moving average of the weights (it was "
                                 "trained without train.ema_decay): resume with --set train.ema_decay=0, or start a "
                                 "new run.")
            self.ema.load({k.removeprefix("ema."): v for k, v in model_state.items() if k.startswith("ema.")},
                          state["ema_updates"])
        if self.accelerator.scaler is not None and "grad_scaler" in state:
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        self.optimizer.load_state_dict(optimizer_state)
        scheduler_state = dict(state["scheduler"])
        scheduler_state["lr_lambdas"] = [None]
        self.scheduler.load_state_dict(scheduler_state)
        self.train_batches.load_state_dict(state["sampler"])
        restore_rng(rng)
        self.step = self._saved_step = self._weights_checked = int(state["step"])
        self.best_val, self.best_step = state["best_criterion"], state["best_step"]
        self.skipped = list(state["skipped_steps"])
        self._history_rows = [r for r in self._read_history() if int(r["step"]) <= self.step]

    def _check_same_run(self, state: dict[str, Any]) -> None:
        """A resumed run must be the run that was interrupted: same training settings, same model."""
        now = {k: getattr(self.config, k) for k in self.config.__dataclass_fields__}
        before = state.get("train_config", {})
        changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and k in before and before[k] != now[k])
        if json.loads(json.dumps(self.metadata)) != state.get("metadata", {}):
            changed.append("the model (its config, genes, vocabulary or data spec)")
        if changed:
            raise InputError(
                f"cannot resume {self.run_dir}: it was started with other settings ({', '.join(map(str, changed))}). "
                "Resume with the original config, or train into a new --out."
            )

    def _read_history(self) -> list[dict[str, Any]]:
        path = self.run_dir / "history.csv"
        if not path.is_file():
            return []
        with path.open() as f:
            return list(csv.DictReader(f))

    def _write_history(self) -> None:
        if not self._history_rows:
            return
        keys: list[str] = []
        for row in self._history_rows:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self._history_rows)
        write_text(self.run_dir / "history.csv", buf.getvalue())

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> TrainResult:
        """Train to ``max_steps`` (continuing from the latest checkpoint with ``resume``).

        Raises
        ------
        TrainingInterrupted
            On SIGINT or SIGTERM, after finishing the step in progress and checkpointing it (a
            step-0 checkpoint when no step was done), so that ``resume`` continues exactly there.
        """
        cfg = self.config
        if self.checkpoints.exists():
            if not resume:
                raise InputError(
                    f"{self.run_dir} already holds a training run. Resume it with --resume, or choose a new --out."
                )
            self._resume()
        else:
            if resume:  # stopped (killed) before its first checkpoint: nothing was lost but those steps
                print(f"note: no checkpoint was written in {self.run_dir} before the run stopped; training starts from "
                      "step 0.", flush=True)
            torch.manual_seed(cfg.seed)
        self._seed_process(self.step)
        self._announce()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.module.train()
        consecutive_bad = 0
        stage = self.metadata.get("stage")  # a model trained in stages names each bar
        bar = progress_bar(cfg.max_steps, f"training {stage}" if stage else "training", "step", initial=self.step,
                           enabled=cfg.progress and self.accelerator.is_main_process)
        first_step, started, val_seconds = self.step, time.perf_counter(), 0.0
        with stop_requests() as stop, contextlib.closing(bar):
            while True:
                if self._stopping(stop):
                    self._stop(stop[0] if stop else signal.SIGTERM)
                if self.step >= cfg.max_steps:
                    break
                loss, metrics, bad = self._accumulate_gradients()
                grad_norm = float("nan")
                if not bad:
                    if cfg.grad_clip > 0:
                        grad_norm = float(self.accelerator.clip_grad_norm_(self.module.parameters(), cfg.grad_clip))
                    else:
                        squares = [(p.grad.float() ** 2).sum() for p in self.module.parameters() if p.grad is not None]
                        grad_norm = float(torch.sqrt(sum(squares)))
                    if self.accelerator.scaler is not None:
                        # fp16: the grad scaler owns overflowing steps (it skips them and lowers its scale).
                        self.optimizer.step()
                        bad = self.accelerator.optimizer_step_was_skipped
                    else:
                        bad = not math.isfinite(grad_norm)
                nonfinite = ""
                if bad:
                    # The finite-value guard: record the step and what was not finite, drop its
                    # gradients, keep the weights.
                    nonfinite = "loss" if not math.isfinite(loss) else self._nonfinite_gradients()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.skipped.append(self.step)
                    consecutive_bad += 1
                    if cfg.nonfinite == "stop" or consecutive_bad >= cfg.max_nonfinite:
                        self._history_rows.append({"step": self.step + 1, "loss": loss, "skipped": 1,
                                                   "nonfinite": nonfinite})
                        self._write_history()
                        raise TrainingDiverged(
                            f"non-finite loss or gradient at step {self.step} ({nonfinite}; {consecutive_bad} in a "
                            f"row; skipped steps {self.skipped[-10:]}). Lower train.lr, check the data for extreme "
                            "values, or use train.mixed_precision=no. The last good checkpoint is in checkpoints/."
                        )
                else:
                    consecutive_bad = 0
                    if self.accelerator.scaler is None:
                        self.optimizer.step()
                    if self.ema is not None:
                        self.ema.update(self.network)
                self.scheduler.step()
                self.step += 1
                bar.update(1)
                if self.step % cfg.nan_check_interval == 0:
                    self._check_weights()
                crash_point("train-step")
                val, selected = None, {}
                if self.step % cfg.val_every == 0 or self.step == cfg.max_steps:
                    val_started = time.perf_counter()
                    val = self.validate()
                    selected = self.select()
                    val_seconds += time.perf_counter() - val_started
                    # lower is better: the validation loss, or minus the selector's score
                    criterion = -selected["val_score"] if selected else val
                    if criterion is not None and (self.best_val is None or criterion < self.best_val):
                        self.best_val, self.best_step = criterion, self.step
                        if self.accelerator.is_main_process:
                            self.checkpoints.save_best(self._kept_weights(),
                                                       {"step": self.step, "val_loss": val, **selected})
                if self.step % cfg.log_every == 0 or val is not None or bad:
                    row = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                           "grad_norm": grad_norm, "skipped": int(bad)}
                    if bad:
                        row["nonfinite"] = nonfinite
                    row.update(metrics)
                    if val is not None:
                        row["val_loss"] = val
                    row.update(selected)
                    self._history_rows.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", **({"val": f"{val:.4f}"} if val is not None else {}))
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                    self._save()
        return TrainResult(
            steps=self.step,
            best_step=self.best_step,
            best_criterion=self.best_val,
            skipped_steps=list(self.skipped),
            history=self.run_dir / "history.csv",
            processes=self.processes,
            steps_per_s=(self.step - first_step) / max(1e-9, time.perf_counter() - started - val_seconds),
        )

    def _stopping(self, received: list[int]) -> bool:
        """Whether to stop now: a signal was received (by any process of a multi-process run,
        so that all stop after the same step)."""
        if self.processes == 1:
            return bool(received)
        flag = torch.tensor([float(bool(received))], device=self.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _accumulate_gradients(self) -> tuple[float, dict[str, float], bool]:
        """The gradients of ``accumulate`` batches (their mean loss's), averaged over processes by DDP.

        Returns the mean loss over batches and processes, this process's mean metrics, and
        whether a loss was not finite (in any process). A non-finite loss is still
        back-propagated, so that every process takes part in DDP's averaging; its gradients are
        then not finite in every process, and every process skips the step alike.
        """
        n = self.config.accumulate
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        metrics: dict[str, float] = {}
        for i in range(n):
            batch = self._to_device(self.train_batches.next_batch())
            # DDP averages gradients over processes after the last batch's backward only
            sync = contextlib.nullcontext() if i == n - 1 else self.accelerator.no_sync(self.module)
            with sync:
                out = self._loss(batch)
                self.accelerator.backward(out.loss / n if n > 1 else out.loss)
            losses.append(out.loss.detach().float())
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / n
        loss = torch.stack(losses).mean()
        if self.processes > 1:
            loss = self.accelerator.reduce(loss.to(self.device), reduction="mean")
        loss = float(loss)
        return loss, metrics, not math.isfinite(loss)

    def final_weights(self) -> dict[str, torch.Tensor]:
        """The best validation step's weights when validation ran, else the last weights."""
        if self.best_step is not None and self.checkpoints.best_weights.is_file():
            return load_tensors(self.checkpoints.best_weights)
        return self._kept_weights()

