"""Checkpoints as safetensors + JSON, written atomically; no pickles.

A resumable checkpoint is a folder ``checkpoints/step-00000250/`` with

* ``model.safetensors``: the weights;
* ``optimizer.safetensors``: the optimizer's tensors and the torch RNG states;
* ``state.json``: format version, step, the optimizer's non-tensor state, scheduler state,
  the batch sampler's generator state, best validation so far, the count of skipped steps,
  and the run's metadata (model config, data spec, vocabulary, genes).

The folder is written under a temporary name and renamed; ``checkpoints/latest.json`` then
points at it (also replaced atomically), so an interrupted write never leaves a half
checkpoint behind as the latest one. ``state.json`` records the SHA-256 of both tensor files,
checked when a checkpoint is read: a damaged checkpoint (truncated, emptied, its tensors
replaced) is never resumed from. Resuming falls back to the newest complete one and says so, or
stops with one line naming the damaged file when none is left.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pertflow.errors import InputError
from pertflow.faults import crash_point
from pertflow.io import atomic_path, read_json, write_json

FORMAT_VERSION = 1
#: The folder of a run trained in stages (one engine run each): ``<run>/stages/<n>-<name>/``, each
#: with its own ``checkpoints/`` and ``history.csv``, and the stage's name in every checkpoint.
STAGES_DIR = "stages"
#: The tensor files of a checkpoint folder, whose checksums ``state.json`` records.
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    """The folder of stage ``index`` (1-based) named ``name`` of a run trained in stages."""
    return Path(run_dir) / STAGES_DIR / f"{index}-{name}"


def holds_checkpoint(run_dir: Path) -> bool:
    """Whether a run folder holds a resumable checkpoint: its own, or one of a stage's (a stage
    may be trained in stages of its own: a model trained once per candidate descriptor)."""
    run_dir = Path(run_dir)
    stages = run_dir / STAGES_DIR
    if CheckpointDir(run_dir).exists():
        return True
    return stages.is_dir() and any(holds_checkpoint(d) for d in stages.iterdir() if d.is_dir())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors file atomically (contiguous CPU copies)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing or unreadable (damaged) file raises an error naming it."""
    if not path.is_file():
        raise InputError(f"{path}: missing weights file. The run folder is incomplete; train again or resume.")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors' own error type for a truncated or corrupt file
        raise InputError(f"{path} is damaged: it cannot be read as safetensors ({err}). Train the run again, or "
                         "resume it from an earlier checkpoint.") from err


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict`` into tensors and JSON-ready values."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("state."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.torch_cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.torch_cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class CheckpointDir:
    """The ``checkpoints/`` folder of a run: resumable step folders, a latest pointer, the best weights."""

    def __init__(self, run_dir: Path):
        self.root = Path(run_dir) / "checkpoints"

    @property
    def latest_pointer(self) -> Path:
        return self.root / "latest.json"

    @property
    def best_weights(self) -> Path:
        return self.root / "best.safetensors"

    def exists(self) -> bool:
        return self.latest_pointer.is_file() or bool(self.step_folders())

    def step_folders(self) -> list[Path]:
        """The checkpoint folders, newest first (a half-written ``.step-*.tmp`` is not one)."""
        return sorted(self.root.glob("step-*"), reverse=True) if self.root.is_dir() else []

    def latest_step(self) -> int:
        """The step of the latest checkpoint (there must be one: :meth:`exists`)."""
        try:
            return int(read_json(self.latest_pointer)["step"])
        except (InputError, KeyError, TypeError, ValueError):  # a damaged pointer: the newest folder
            return int(self.step_folders()[0].name.removeprefix("step-"))

    def save(
        self,
        step: int,
        model_state: dict[str, torch.Tensor],
        optimizer_state: dict[str, Any],
        state: dict[str, Any],
        keep: int,
    ) -> Path:
        """Write a resumable checkpoint of ``step`` and point ``latest.json`` at it."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        tmp = self.root / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        opt_tensors, opt_meta = optimizer_to_flat(optimizer_state)
        save_tensors(tmp / "model.safetensors", model_state)
        crash_point("checkpoint-write")
        save_tensors(tmp / "optimizer.safetensors", {**opt_tensors, **rng_tensors()})
        checksums = {name: file_digest(tmp / name) for name in TENSOR_FILES}
        write_json(tmp / "state.json", {"format_version": FORMAT_VERSION, "step": step, "optimizer": opt_meta,
                                        "checksums": checksums, **state})
        final = self.root / name
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        write_json(self.latest_pointer, {"step": step, "dir": name})
        for old in sorted(self.root.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
        return final

    def load_latest(
        self, note: Any = print
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
        """``(model_state, optimizer_state, rng_tensors, state)`` of the newest complete checkpoint.

        The one ``latest.json`` points at, else (it is damaged) the newest folder that verifies;
        each damaged one passed over is named through ``note``. None complete: an error naming
        the damaged file of the newest.
        """
        try:
            first = [self.root / read_json(self.latest_pointer)["dir"]]
        except (InputError, KeyError, TypeError) as err:
            note(f"note: {self.latest_pointer} is damaged ({err}); looking for the newest complete checkpoint.")
            first = []
        candidates = first + [f for f in self.step_folders() if f not in first]
        problems = []
        for folder in candidates:
            try:
                loaded = self._load(folder)
            except InputError as err:
                problems.append(str(err))
                continue
            if problems:
                note(f"note: resuming from {folder.name}, the newest complete checkpoint; "
                     "passed over: " + "; ".join(problems))
            return loaded
        if not candidates:
            raise InputError(f"{self.root} holds no checkpoint to resume from. Start the run again without --resume.")
        raise InputError(f"no complete checkpoint in {self.root} to resume from: {problems[0]}. Start the run again "
                         "(--overwrite), or restore the file.")

    def _load(
        self, folder: Path
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
        """One checkpoint folder, verified against the checksums its ``state.json`` records."""
        state = read_json(folder / "state.json")
        if not isinstance(state, dict) or "step" not in state:
            raise InputError(f"{folder / 'state.json'} is damaged: it holds no checkpoint state")
        if state.get("format_version", 0) > FORMAT_VERSION:
            raise InputError(
                f"{folder} was written by a newer pertflow (checkpoint format {state['format_version']}); "
                "upgrade pertflow."
            )
        for name, digest in state.pop("checksums", {}).items():  # checkpoints written before checksums: not checked
            path = folder / name
            if not path.is_file():
                raise InputError(f"{path} is missing")
            if file_digest(path) != digest:
                raise InputError(f"{path} is damaged: its contents differ from what was written (checksum)")
        extra = load_tensors(folder / "optimizer.safetensors")
        optimizer_state = optimizer_from_flat(extra, state.pop("optimizer"))
        rng = {k: v for k, v in extra.items() if k.startswith("rng.")}
        return load_tensors(folder / "model.safetensors"), optimizer_state, rng, state

    def save_best(self, model_state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        save_tensors(self.best_weights, model_state, metadata={"info": json.dumps(info)})
