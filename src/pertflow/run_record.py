"""What a run folder records about how it was trained (``run.json``), and how a resumed run is
checked against it: the settings given again must agree with the saved ones, a finished run
resumes only to train longer, a gene panel stays the one it started with. Used by
:func:`pertflow.api.train`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pertflow.configs import load_sections
from pertflow.data.dataset import PerturbationData
from pertflow.data.spec import DataSpec
from pertflow.data.view import SplitView
from pertflow.errors import InputError
from pertflow.io import read_json
from pertflow.train.checkpoint import STAGES_DIR
from pertflow.train.config import RESUME_MAY_CHANGE, TrainConfig

DataArg = Any  # a path, a PerturbationData or a SplitView (see pertflow.api)
SplitArg = Any  # a path, a Split or None

def shipped_config(model: str | None, config: str | Path | None) -> str | Path | None:
    """A config name (``"cpu"``) as the file that ships with pertflow (``<model>-cpu.yaml``); a path as it is."""
    if model is None or config is None or Path(config).suffix in (".yaml", ".yml") or Path(config).exists():
        return config
    from pertflow.io import package_dir

    path = package_dir("configs") / f"{model}-{config}.yaml"
    if not path.is_file():
        names = sorted(p.name for p in package_dir("configs").glob(f"{model}-*.yaml"))
        raise InputError(f"no config file '{config}' and no shipped config '{path.name}' (shipped for {model}: {names}).")
    return path


RUN_FILE = "run.json"
RUN_FILE_VERSION = 1
# What `train` writes into a run folder: the folder holds a run when one of them is there.
RUN_FILES = (RUN_FILE, "model.json", "model.safetensors", "checkpoints", "history.csv", STAGES_DIR)


def run_settings(out: Path, resume: bool, saved: dict[str, Any] | None, model: str | None, data: DataArg | None,
                  split: SplitArg, config: str | Path | None, sets: list[str] | None, read_args: dict[str, Any]) -> tuple:
    """The model, data, split, config sections and read arguments of a run: as given, over what a
    resumed run saved in ``run.json`` (given ones must agree with it)."""
    given = load_sections(config, sets)
    if saved is None:
        missing = [flag for flag, value in (("--model", model), ("--data", data), ("--split", split)) if value is None]
        if isinstance(data, SplitView) and "--split" in missing:
            missing.remove("--split")
        if missing:
            how = ("; this run folder has no run.json (it was written by an older pertflow), so give them and the "
                   "original --config/--set again") if resume else " (or --resume to continue the run in --out)"
            raise InputError(f"give {', '.join(missing)}{how}.")
        return model, data, split, given, read_args
    if model is not None and model != saved["model"]:
        raise InputError(f"{out} is a run of '{saved['model']}', not '{model}'. Resume it without --model, or train "
                         f"'{model}' into a new --out.")
    for flag, value, key in (("--data", data, "data"), ("--split", split, "split")):
        if value is None and saved[key] is None and not (key == "split" and isinstance(data, SplitView)):
            raise InputError(f"{out}/{RUN_FILE} does not record the {key} file (it was given as an object): give {flag}.")
    data = saved["data"] if data is None else data
    split = saved["split"] if split is None and not isinstance(data, SplitView) else split
    sections = {name: {**saved["config"][name], **given[name]} for name in given}
    stored = dict(saved["read_args"])
    if stored.get("spec") is not None:
        stored["spec"] = DataSpec.from_dict(stored["spec"])
    return saved["model"], data, split, sections, {**stored, **read_args}


def check_same_settings(out: Path, saved: dict[str, dict[str, Any]], resolved: dict[str, dict[str, Any]]) -> None:
    """A resumed run keeps its settings, but for those the engine lets change (``train.max_steps``)."""
    now = json.loads(json.dumps(resolved))
    changed = [f"{section}.{key}" for section, values in now.items() for key, value in values.items()
               if saved.get(section, {}).get(key, value) != value and not (section == "train" and key in RESUME_MAY_CHANGE)]
    if changed:
        allowed = ", ".join(f"train.{k}" for k in RESUME_MAY_CHANGE)
        raise InputError(f"cannot resume {out} with other settings ({', '.join(changed)}): only {allowed} may change. "
                         "Resume with the run's own settings (leave out --config and --set), or train into a new --out.")


def check_extension(out: Path, model: str, train_config: TrainConfig) -> None:
    """A finished run resumes only to train longer: ``train.max_steps`` beyond its last step."""
    done = read_json(out / "model.json").get("fit_report", {}).get("steps")
    if done is None:
        raise InputError(f"{out} holds a finished '{model}' model, which has no training steps to continue. "
                         "Pass --overwrite to fit it again, or choose a new --out.")
    if train_config.max_steps <= done:
        raise InputError(f"{out} is a finished run of {done} steps. To train it longer, resume with "
                         f"--set train.max_steps=N with N > {done}; to start again, pass --overwrite instead.")


def data_path(data: DataArg | None) -> str | None:
    dataset = data.data if isinstance(data, SplitView) else data
    path = dataset.path if isinstance(dataset, PerturbationData) else dataset
    return str(Path(path).resolve()) if path is not None else None


def resumed_genes(out: Path, saved: list[str] | None, given: list[str] | None) -> list[str] | None:
    """The gene panel of a resumed run: the one it was started with (a panel given again must be it)."""
    if given is not None and (saved is None or set(given) != set(saved)):
        trained_on = "all the split's genes" if saved is None else f"a panel of {len(saved)} genes"
        raise InputError(f"{out} was trained on {trained_on}, not on the genes given: resume without --genes, "
                         "or train into a new --out.")
    return saved


def saved_read_args(data: DataArg | None, read_args: dict[str, Any]) -> dict[str, Any]:
    """The read arguments as ``run.json`` keeps them (JSON-ready: a spec as its dict)."""
    dataset = data.data if isinstance(data, SplitView) else data
    if isinstance(dataset, PerturbationData):
        return {"backed": dataset.source.on_disk, "spec": dataset.spec.to_dict()}
    out = dict(read_args)
    spec = out.get("spec")
    if spec is not None and not isinstance(spec, DataSpec):
        spec = DataSpec.load(spec)
    if spec is not None:
        out["spec"] = spec.to_dict()
    if "context_cols" in out:
        out["context_cols"] = list(out["context_cols"])
    return out


