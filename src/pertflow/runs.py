"""Run folders of ``pertflow train``: what a run was started with (``run.json``), the checks
that a resumed run is the same run, and :func:`start_run`, which makes those checks and writes
``run.json`` before any training process starts (the API's ``train`` uses it; one process or
several).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pertflow.configs import build, load_sections, to_dict
from pertflow.data.dataset import PerturbationData
from pertflow.data.spec import DataSpec
from pertflow.data.split_file import Split
from pertflow.data.view import SplitView
from pertflow.errors import InputError
from pertflow.io import check_output, read_json, remove_outputs, write_json
from pertflow.models.anchored import REFIT_DIR
from pertflow.models.config import PredictConfig
from pertflow.models.registry import model_class
from pertflow.train.checkpoint import STAGES_DIR, holds_checkpoint
from pertflow.train.config import RESUME_MAY_CHANGE, TrainConfig

DataArg = str | Path | PerturbationData | SplitView
SplitArg = str | Path | Split | None


@dataclass
class TrainRun:
    """A run checked and recorded, ready to train (in this process or in several)."""

    model: str
    data: DataArg
    split: Split
    out: Path
    model_config: Any
    train_config: TrainConfig
    predict_config: PredictConfig
    genes: list[str] | None
    read_args: dict[str, Any]
    resume: bool


def start_run(model: str | None, data: DataArg | None, split: SplitArg, out: Path, config: str | Path | None,
              sets: list[str] | None, resume: bool, genes: list[str] | None, overwrite: bool, read_args: dict[str, Any],
              write: bool = True) -> TrainRun:
    """Check a run's settings against its folder and (with ``write``) record them in ``run.json``.

    ``write=False``: the other processes of a distributed run, which compute the same run
    without touching the folder (process 0 checks and writes it).
    """
    if resume and overwrite:
        raise InputError("give --resume (continue the run in --out) or --overwrite (start it again), not both.")
    existing = []
    if write:
        existing = check_output(out, "run folder", overwrite=overwrite or resume, holds=RUN_FILES,
                                other_choice="--resume to continue it "
                                             "(or --resume --set train.max_steps=N to train it longer)")
    saved = None
    if resume:
        if write and not existing:
            raise InputError(f"nothing to resume in {out}: no run was started there. Train without --resume.")
        saved = read_json(out / RUN_FILE) if (out / RUN_FILE).is_file() else None
    model, data, split, sections, read_args = run_settings(out, resume, saved, model, data, split, config, sets,
                                                           read_args)
    split_obj = split_of(data, split)
    if saved is not None and split_obj.digest() != saved["split_digest"]:
        raise InputError(f"the split given is not the one {out} was trained on (other cells or genes). Resume without "
                         "--split, or train into a new --out.")
    cls = model_class(model, sections["model"])
    model_config = build(cls.config_class, sections["model"], "model")
    train_config = build(TrainConfig, sections["train"], "train")
    predict_config = build(PredictConfig, {**to_dict(cls.default_predict_config), **sections["predict"]}, "predict")
    resolved = {"model": to_dict(model_config), "train": to_dict(train_config), "predict": to_dict(predict_config)}
    if saved is not None:
        check_same_settings(out, saved["config"], resolved)
        genes = resumed_genes(out, saved.get("genes"), genes)
    if resume and (out / "model.json").is_file():
        check_extension(out, model, train_config)
    if write:
        if overwrite:
            remove_outputs(existing)
        write_json(out / RUN_FILE, {
            "format_version": RUN_FILE_VERSION,
            "model": model,
            "config": resolved,
            "data": data_path(data),
            "split": str(Path(split).resolve()) if isinstance(split, (str, Path)) else None,
            "split_digest": split_obj.digest(),
            "genes": None if genes is None else [str(g) for g in genes],
            "read_args": saved_read_args(data, read_args),
        })
    return TrainRun(model, data, split_obj, out, model_config, train_config, predict_config, genes, read_args,
                    resume and holds_checkpoint(out))


def split_of(data: DataArg | None, split: SplitArg) -> Split:
    """The split object: the view's, the one given, or the file read."""
    if isinstance(data, SplitView):
        return data.split
    if split is None:
        raise InputError("a split is needed: give the split file (--split) the model was trained or is evaluated on.")
    return split if isinstance(split, Split) else Split.load(split)


RUN_FILE = "run.json"
RUN_FILE_VERSION = 1
# What `train` writes into a run folder: the folder holds a run when one of them is there.
RUN_FILES = (RUN_FILE, "model.json", "model.safetensors", "checkpoints", "history.csv", STAGES_DIR, REFIT_DIR)


def run_settings(out: Path, resume: bool, saved: dict[str, Any] | None, model: str | None, data: DataArg | None,
                  split: SplitArg, config: str | Path | None, sets: list[str] | None,
                  read_args: dict[str, Any]) -> tuple:
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
            raise InputError(f"{out}/{RUN_FILE} does not record the {key} file (it was given as an object): give "
                             f"{flag}.")
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
               if saved.get(section, {}).get(key, value) != value
               and not (section == "train" and key in RESUME_MAY_CHANGE)]
    if changed:
        allowed = ", ".join(f"train.{k}" for k in RESUME_MAY_CHANGE)
        raise InputError(f"cannot resume {out} with other settings ({', '.join(changed)}): only {allowed} may change. "
                         "Resume with the run's own settings (leave out --config and --set), or train into a new "
                         "--out.")


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


def shipped_config(model: str | None, config: str | Path | None) -> str | Path | None:
    """A config name (``"cpu"``) as the file that ships with pertflow (``<model>-cpu.yaml``); a path as it is."""
    if model is None or config is None or Path(config).suffix in (".yaml", ".yml") or Path(config).exists():
        return config
    from pertflow.io import package_dir

    path = package_dir("configs") / f"{model}-{config}.yaml"
    if not path.is_file():
        names = sorted(p.name for p in package_dir("configs").glob(f"{model}-*.yaml"))
        raise InputError(f"no config file '{config}' and no shipped config '{path.name}' (shipped for {model}: "
                         f"{names}).")
    return path


# ---------------------------------------------------------------------------- what a run chose, in words
MODE_WORDS = {"flow": "its own cells", "prior-mean": "its own cells moved onto its prior's mean",
              "prior": "its prior's cells"}


def fit_summary(model: Any) -> list[str]:
    """A few rounded lines saying what training did and chose and why (the raw record stays in
    ``model.json``'s ``fit_report``)."""
    report = model.fit_report
    lines = []
    steps = report.get("steps")
    what = f"trained {model.name}" + (f": {steps} steps" if steps else "")
    if (report.get("processes") or 1) > 1:
        what += f" (processes {report['processes']})"
    if report.get("best_step") not in (None, steps):
        what += f", the weights of step {report['best_step']} kept"
    lines.append(what)
    split = report.get("validation_split")
    if split:
        held = ", ".join(split.get("held_out", [])[:5])
        kinds = {"contexts": f"the perturbed cells of the training context(s) {held}",
                 "perturbations": f"the training perturbation(s) {held}"}
        kind = kinds.get(split.get("kind"), "the split's validation cells")
        lines.append(f"validation: {kind} ({split.get('reason', '')}); {split.get('groups', 0)} groups scored")
        if split.get("model_trained_on"):
            lines.append(f"  the model was then trained on {split['model_trained_on']}; "
                         "its prior refitted on every training cell")
    if report.get("prior"):
        lines.append(f"prior: {report['prior']} ({report.get('prior_reason', '')})")
    scores = report.get("validation")
    if isinstance(scores, dict) and scores:
        shown = ", ".join(f"{MODE_WORDS.get(m, m)} {s['pearson_top20_de']:.3f} / {s['edistance']:.3g}"
                          for m, s in scores.items() if isinstance(s, dict) and "pearson_top20_de" in s)
        lines.append("on validation (top-20 DE Pearson delta, higher is better / E-distance, lower is better): "
                     f"{shown}")
    if report.get("prediction_mode"):
        lines.append(f"predicts with {MODE_WORDS.get(report['prediction_mode'], report['prediction_mode'])}")
    return lines
