"""The training configuration shared by every model family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pertflow.configs import require_at_least_one

# What a resumed run may set differently: the progress bar, the length (a longer max_steps
# extends even a finished run; the cosine schedule is then recomputed for the new length, so the
# learning rate rises again from where the old schedule had brought it), gradient
# checkpointing (the same gradients, computed with less memory), and the batches per process
# and step (``accumulate``: a run resumed on fewer processes may accumulate to keep its global
# batch; the number of processes is not a setting and may change too).
RESUME_MAY_CHANGE = ("progress", "max_steps", "grad_checkpointing", "accumulate")


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained (the ``train`` section of a run config).

    Attributes
    ----------
    max_steps
        Optimizer steps.
    batch_size
        B: perturbed cells (and as many control cells) per step.
    lr, weight_decay, optimizer
        Adam or AdamW.
    schedule, warmup_steps, min_lr_ratio
        ``cosine``: linear warm-up, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``.
    grad_clip
        Clip the global gradient norm (0 disables).
    nonfinite
        What to do with a step whose loss or gradient is NaN/Inf: ``skip`` it (recorded in the
        history, with what was not finite) or ``stop`` the run. ``max_nonfinite`` consecutive bad
        steps always stop it.
    nan_check_interval
        Every this many steps (and before every checkpoint) the weights themselves are checked:
        a non-finite weight stops the run, naming the tensors and the step (the loss and the
        gradient norm are checked at every step).
    val_every, val_batches
        Validation loss on the split's validation cells every ``val_every`` steps over
        ``val_batches`` fixed batches; the best step's weights are kept.
    checkpoint_every, keep_checkpoints
        Resumable checkpoints; the newest ``keep_checkpoints`` are kept.
    log_every
        Steps between rows of ``history.csv``.
    ema_decay
        0: the run keeps its last (or best) weights. Otherwise an exponential moving average of
        the weights with this decay (e.g. 0.999) is what validation reads and what the run keeps
        (see :mod:`pertflow.train.ema`).
    seed
        Seeds weights, batches and noise.
    weighting, include_controls
        Batch sampling (see :class:`pertflow.data.sampler.PairedBatchSampler`): ``epoch`` visits
        every training cell once per epoch.
    accumulate
        Batches whose gradients are summed per optimizer step. Per step a run of N processes
        sees ``N * accumulate`` batches (one stream, shared out: see
        :class:`pertflow.data.batches.PairedBatches`); one process with ``accumulate: N`` sees
        the same batches as N processes with ``accumulate: 1``.
    mixed_precision
        ``no``, ``bf16`` or ``fp16`` through accelerate (``bf16``: autocast to bfloat16 on CPU
        and GPU, weights and optimizer state in float32).
    grad_checkpointing
        Recompute the network's layer activations in the backward pass instead of keeping them
        (less memory, about a third more compute); a network that supports it has
        ``set_grad_checkpointing(on)`` (the gene-space flow models).
    device
        ``auto`` (accelerate's choice), ``cpu`` or ``cuda``.
    progress
        Show a progress bar.
    """

    max_steps: int = 2000
    batch_size: int = 48
    lr: float = 5e-5
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw"] = "adam"
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    nonfinite: Literal["skip", "stop"] = "skip"
    max_nonfinite: int = 20
    nan_check_interval: int = 10
    val_every: int = 250
    val_batches: int = 8
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    ema_decay: float = 0.0
    seed: int = 0
    weighting: Literal["cells", "uniform", "epoch"] = "cells"
    include_controls: bool = False
    accumulate: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    grad_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        require_at_least_one(self, "max_steps", "batch_size", "val_every", "checkpoint_every", "log_every",
                             "keep_checkpoints", "max_nonfinite", "nan_check_interval", "accumulate")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


#: The settings of how the engine runs (not what it optimises): a stage of a run keeps the run's.
ENGINE_FIELDS = ("grad_clip", "nonfinite", "max_nonfinite", "nan_check_interval", "keep_checkpoints", "seed",
                 "accumulate", "mixed_precision", "device", "progress")


def stage_config(run: TrainConfig, **schedule: Any) -> TrainConfig:
    """The settings of one stage of a run trained in stages (a decoder, a VAE, a foundation): the
    stage's own schedule (``max_steps``, ``lr``, ``batch_size``, ...; the rest at their defaults)
    with the run's engine settings (:data:`ENGINE_FIELDS`: gradient clipping, the non-finite
    policy, accumulation, seed, device, precision, progress), so that ``--set train.grad_clip=...``
    reaches every stage. The one helper for stage overrides."""
    return TrainConfig(**{**{name: getattr(run, name) for name in ENGINE_FIELDS}, **schedule})
