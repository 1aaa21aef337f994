"""``pertflow benchmark``: models x tasks x folds -> results table, markdown summary and plots.

For every fold of every task the runner trains each model on the training cells (reusing a run
folder that already holds a trained model), predicts the test cells, and scores the prediction
with :func:`pertflow.eval.evaluator.evaluate`, sharing the real data's DE table across models.
Everything lands under ``out/``:

* ``runs/<split>/<model>/``: the run folder, ``pred.h5ad``, ``eval/results.csv``;

A model may be named with a variant, ``family@variant`` (``latent-shift@flow``): the family's
model trained with the config ``family@variant<suffix>``, so that two settings of one model are
benchmarked side by side under their own names.
* ``results.csv``: one row per (task, fold, model, context, perturbation), one column per metric;
* ``summary.csv`` / ``summary.md``: per task and model, the mean over perturbations within a
  fold, then over folds; the best value of each column is marked; the row ``ceiling`` is the
  fold's noise ceiling (:mod:`pertflow.eval.ceiling`: half of the real cells scored against the
  other half, in ``runs/<split>/ceiling/eval/``), never marked best;
* ``plots/<task>_metrics.png``: key metrics per model; ``plots/<task>_deltas.png``: predicted vs
  real mean shift (vs control) of every held-out perturbation, one panel per model;
  ``plots/<task>_embedding.png``: per held-out perturbation, its context's real cells (controls and
  perturbed) in their own 2-D PCA and each model's predicted cells projected into it (the
  coordinates in ``runs/<split>/embedding.npz`` and ``runs/<split>/<model>/embedding.npz``); both
  grids a page of perturbations per file (``_2.png`` ...);
* ``plots/<split>_<model>_training.png``: a trained run's losses (CCFM: both streams, and its
  foundation's pretraining).

An interrupted benchmark continues where it stopped: finished steps are read back from disk, an
interrupted training run is resumed from its checkpoint. So ``out`` is the one output that is not
refused when it exists (see :func:`pertflow.io.check_output`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from pertflow.api import (RUN_FILES, EvalConfig, EvaluationInputs, evaluate_split, evaluation_inputs, predict,
                          split_view, train)
from pertflow.data.split_file import Split
from pertflow.data.tasks import TASKS_DIR, Task, find_tasks, resolve_data_dir
from pertflow.eval.evaluator import context_labels
from pertflow.eval.metrics import group_means
from pertflow.eval.plots import (EMBED_CELLS, plot_deltas, plot_embeddings, plot_metrics, plot_training, project,
                                 shared_pca)
from pertflow.errors import InputError
from pertflow.io import atomic_path, check_writable, package_dir, read_json, write_text
from pertflow.models.capabilities import EmbedsCells
from pertflow.models.registry import model_class

CEILING_NOTE = ("*ceiling*: half of the real cells scored against the other half. Its Pearson deltas (corrected to "
                "full depth) are what the data's sampling noise allows; its other metrics are measured at half depth, "
                "so its E-distance is a noisier reference, not a bound (a model may score below it).\n\n")
KEY_METRICS = (
    "pearson_delta",
    "pearson_delta_top20_de",
    "mse_top20_de_rel_nochange",
    "r2_delta",
    "systema_pearson_delta",
    "centroid_accuracy",
    "edistance_pca",
    "mmd_rbf_pca",
    "knn_purity_pca",
    "knn_purity_latent",
    "discrimination_score_l1",
    "overlap_at_N",
    "de_direction_match",
)


def fold_split(task: Task, data: Any, fold: str | None, splits_dir: Path | None) -> Split:
    """The fold's split: the reference file when one exists, else built from the task."""
    name = task.split_name(fold)
    reference = splits_dir / f"{name}.json" if splits_dir else None
    split = Split.load(reference) if reference and reference.is_file() else task.build(data, fold)
    split.name = split.name or name
    return split


def benchmark(models: list[str], tasks: str | list[str], out: str | Path, *, folds: list[str] | None = None,
              tasks_dir: str | Path | None = None, data_dir: str | Path | None = None,
              splits_dir: str | Path | None = None, configs_dir: str | Path | None = None,
              config_suffix: str = "-cpu.yaml", threads: int = 1) -> Path:
    """Run models x tasks x folds (``tasks="all"`` for every task); returns the path of ``summary.md``
    (the Python form of ``pertflow benchmark``).

    ``tasks_dir`` and ``configs_dir`` default to the task files and model configs that ship with
    pertflow (``pertflow/resources/tasks``, ``pertflow/resources/configs``), so it runs from any folder.

    An existing ``out`` is not refused: a benchmark continues where it stopped (finished runs,
    predictions and evaluations under ``out/runs`` are read back, not recomputed).
    """
    check_writable(out)

    tasks_dir = tasks_dir or TASKS_DIR
    configs_dir = configs_dir or package_dir("configs")
    data_dir = resolve_data_dir(data_dir)
    found = find_tasks(tasks_dir)
    names = sorted(found) if tasks == "all" else list(tasks)
    unknown = [t for t in names if t not in found]
    if unknown:
        raise InputError(f"unknown tasks {unknown}; tasks in {tasks_dir}: {sorted(found)}.")
    if splits_dir is None and (data_dir / "splits").is_dir():
        splits_dir = data_dir / "splits"
    out = Path(out)
    run_benchmark(models, [found[t] for t in names], data_dir, out, splits_dir=Path(splits_dir) if splits_dir else None,
                  folds=folds, configs_dir=Path(configs_dir) if configs_dir else None, config_suffix=config_suffix,
                  threads=threads)
    return out / "summary.md"


def config_file(configs_dir: Path | None, model: str, suffix: str) -> Path | None:
    """The config file of a benchmark model name, ``<configs_dir>/<model><suffix>``, where it exists."""
    path = configs_dir / f"{model}{suffix}" if configs_dir else None
    return path if path is not None and path.is_file() else None


def _has_latent_space(model: str, run_dir: Path) -> bool:
    """Whether the trained run's model class (its config's variant) embeds cells (``embed``)."""
    return issubclass(model_class(model_family(model), read_json(run_dir / "model.json")["config"]), EmbedsCells)


def model_family(name: str) -> str:
    """The registered model of a benchmark model name (``latent-shift@flow`` -> ``latent-shift``)."""
    return name.split("@", 1)[0]


def run_benchmark(
    models: list[str],
    tasks: list[Task],
    data_dir: Path,
    out: Path,
    splits_dir: Path | None = None,
    configs_dir: Path | None = None,
    config_suffix: str = "-cpu.yaml",
    threads: int = 1,
    folds: list[str] | None = None,
    log: Any = print,
) -> pd.DataFrame:
    """Run (or continue) a benchmark; returns the per-perturbation results table.

    Parameters
    ----------
    models
        Registered model names, or ``family@variant`` (see the module docstring).
    tasks
        Tasks to run, all their folds.
    data_dir
        Folder of the tasks' datasets.
    out
        Output folder (see the module docstring).
    splits_dir
        Folder of reference split files ``<task>__<fold>.json``; used when present.
    configs_dir
        Folder of model configs ``<model><config_suffix>`` (e.g. ``cfm-cpu.yaml``).
    threads
        Threads for cell-eval's DE tests.
    folds
        Run only these folds of tasks that have folds (all when None).
    """
    for name in models:
        model_class(model_family(name))  # unknown names fail before any work
        if "@" in name and config_file(configs_dir, name, config_suffix) is None:
            raise InputError(f"model variant '{name}' has no config {name}{config_suffix} in {configs_dir}; "
                             "write one there (a variant is its family's model trained with its own config).")
    eval_config = EvalConfig(num_threads=threads)
    started = time.perf_counter()
    tables = []
    for task in tasks:
        data = task.open_data(data_dir)
        try:
            for fold in task.fold_names:
                if folds is not None and fold is not None and fold not in folds:
                    continue
                view = split_view(data, fold_split(task, data, fold, splits_dir))
                inputs = evaluation_inputs(view)
                split_name = view.split.name
                de_cache = out / "cache" / "de" / split_name
                if not (out / "runs" / split_name / "embedding.npz").is_file():
                    _write_real_embedding(out / "runs" / split_name, inputs)
                for model in models:
                    run_dir = out / "runs" / split_name / model
                    config = config_file(configs_dir, model, config_suffix)
                    timing = _read_timing(run_dir)
                    if not (run_dir / "model.json").is_file():
                        log(f"[{split_name}] training {model}")
                        start = time.perf_counter()
                        resume = any((run_dir / name).exists() for name in RUN_FILES)  # a run started before
                        train(model_family(model), view, None, run_dir, config=config,
                              resume=resume)
                        # a resumed run adds this call's seconds to those recorded before it
                        timing["train_seconds"] = timing.get("train_seconds", 0.0) + time.perf_counter() - start
                        _write_timing(run_dir, timing)  # kept if the prediction is interrupted
                    pred_path = run_dir / "pred.h5ad"
                    if not pred_path.is_file():
                        log(f"[{split_name}] predicting {model}")
                        start = time.perf_counter()
                        predict(run_dir, view, None, pred_path, progress=True)
                        timing["predict_seconds"] = time.perf_counter() - start
                    _write_timing(run_dir, timing)
                    training_plot = out / "plots" / f"{split_name}_{model}_training.png"
                    if not training_plot.is_file():
                        plot_training(run_dir, training_plot, f"{split_name}: {model}, training")
                    pred = None
                    if not (run_dir / "embedding.npz").is_file():
                        pred = ad.read_h5ad(pred_path)
                        _write_pred_embedding(run_dir, inputs, pred)
                    results_path = run_dir / "eval" / "results.csv"
                    if not results_path.is_file():
                        log(f"[{split_name}] evaluating {model}")
                        pred = pred if pred is not None else ad.read_h5ad(pred_path)
                        # overwrite: an evaluation interrupted before results.csv
                        evaluate_split(None, None, pred, out=run_dir / "eval", de_cache=de_cache, config=eval_config,
                                       inputs=inputs, overwrite=True, progress=True,
                                       run=run_dir if _has_latent_space(model, run_dir) else None)  # knn_purity_latent
                        _write_deltas(run_dir, inputs, pred)
                    table = pd.read_csv(results_path)
                    table.insert(0, "model", model)
                    table.insert(0, "fold", fold if fold is not None else "")
                    table.insert(0, "task", task.name)
                    for key, value in timing.items():
                        table[key] = value
                    tables.append(table)
                tables.append(_ceiling_table(task.name, fold, split_name, inputs, out, de_cache, eval_config, log))
        finally:
            data.close()
    if not tables:
        raise InputError("nothing was benchmarked: give at least one model and one task.")
    results = pd.concat(tables, ignore_index=True)
    write_report(results, out, models)
    write_manifest(out, models, configs_dir, config_suffix, time.perf_counter() - started, threads)
    return results


def _ceiling_table(task: str, fold: str | None, split_name: str, inputs: EvaluationInputs, out: Path,
                   de_cache: Path, eval_config: Any, log: Any) -> pd.DataFrame:
    """The fold's noise ceiling (real cells, half against half) as the rows of the model ``ceiling``."""
    from pertflow.eval.ceiling import CEILING, noise_ceiling

    eval_dir = out / "runs" / split_name / CEILING / "eval"
    if not (eval_dir / "results.csv").is_file():
        log(f"[{split_name}] scoring the noise ceiling (half of the real cells against the other half)")
        noise_ceiling(inputs.real, pert_col=inputs.pert_col, control=inputs.control, context_col=inputs.context_col,
                      train=inputs.train, outdir=eval_dir, de_cache=de_cache, config=eval_config, progress=True)
    table = pd.read_csv(eval_dir / "results.csv")
    table.insert(0, "model", CEILING)
    table.insert(0, "fold", fold if fold is not None else "")
    table.insert(0, "task", task)
    return table


def _read_timing(run_dir: Path) -> dict[str, float]:
    path = run_dir / "timing.csv"
    return pd.read_csv(path).iloc[0].to_dict() if path.is_file() else {}


def _write_timing(run_dir: Path, timing: dict[str, float]) -> None:
    write_text(run_dir / "timing.csv", pd.DataFrame([timing]).to_csv(index=False))


def _mean_shifts(adata: ad.AnnData, context_col: str | None, pert_col: str,
                 control: str) -> dict[tuple[str, str], np.ndarray]:
    """Mean shift vs the context's controls of every (context, perturbation) of a file."""
    perts = adata.obs[pert_col].astype(str).to_numpy()
    ctxs = context_labels(adata, context_col)
    out = {}
    for ctx in pd.unique(ctxs):
        in_ctx = np.flatnonzero(ctxs == ctx)
        means = group_means(adata.X[in_ctx], perts[in_ctx])
        out.update({(str(ctx), p): m - means[control] for p, m in means.items() if p != control})
    return out


def _write_deltas(run_dir: Path, inputs: EvaluationInputs, pred: ad.AnnData) -> None:
    """Mean shift vs control of every held-out perturbation, real and predicted (for the plots), and
    the predicted shift's per-gene interval (``lower``, ``upper``) where the prediction has one."""
    real = _mean_shifts(inputs.real, inputs.context_col, inputs.pert_col, inputs.control)
    predicted = _mean_shifts(pred, inputs.context_col, inputs.pert_col, inputs.control)
    keys = [k for k in real if k in predicted]
    bounds = {}
    found = pred.uns.get("pertflow_interval")  # predict.interval: per-gene intervals of the predicted shifts
    if found is not None:
        rows = {(str(c), str(p)): i for i, (c, p) in enumerate(zip(found["context"], found["perturbation"]))}
        by_pert = {str(p): i for i, p in enumerate(found["perturbation"])}
        hits = [rows.get(k, by_pert.get(k[1]) if len(set(found["context"])) == 1 else None) for k in keys]
        if keys and all(h is not None for h in hits):
            bounds = {"lower": np.asarray(found["lower"])[hits], "upper": np.asarray(found["upper"])[hits]}
    with atomic_path(run_dir / "deltas.npz") as tmp:
        np.savez(
            tmp,
            context=np.array([k[0] for k in keys]),
            perturbation=np.array([k[1] for k in keys]),
            real=np.array([real[k] for k in keys]),
            pred=np.array([predicted[k] for k in keys]),
            **bounds,
        )


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def _sample(rows: np.ndarray, seed: int) -> np.ndarray:
    """At most :data:`EMBED_CELLS` of ``rows``, drawn with a fixed seed, in their order."""
    if rows.size <= EMBED_CELLS:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, EMBED_CELLS, replace=False))


def _write_real_embedding(split_dir: Path, inputs: EvaluationInputs) -> None:
    """Per held-out (context, perturbation): the 2-D PCA of its real cells, the context's controls
    and the perturbation's cells, on its most shifted genes (:func:`pertflow.eval.plots.shared_pca`), with their
    coordinates (``kind`` 0: control, 1: perturbed) into ``embedding.npz``; a model's cells go into the same PCA."""
    real = inputs.real
    perts = real.obs[inputs.pert_col].astype(str).to_numpy()
    ctxs = context_labels(real, inputs.context_col)
    cases: dict[str, list] = {k: [] for k in ("context", "perturbation", "mean", "components", "xy", "case", "kind")}
    for ctx in pd.unique(ctxs):
        controls = _sample(np.flatnonzero((ctxs == ctx) & (perts == inputs.control)), seed=0)
        for pert in sorted(set(perts[ctxs == ctx]) - {inputs.control}):
            perturbed = _sample(np.flatnonzero((ctxs == ctx) & (perts == pert)), seed=len(cases["context"]) + 1)
            x = _dense(real.X[np.concatenate([controls, perturbed])])
            if x.shape[0] < 3 or not len(perturbed):
                continue  # too few cells for a 2-D PCA: the panel stays empty
            projection = shared_pca(x[:len(controls)], x[len(controls):])
            cases["kind"].append(np.r_[np.zeros(len(controls), np.int8), np.ones(len(perturbed), np.int8)])
            cases["case"].append(np.full(len(x), len(cases["context"])))
            cases["xy"].append(project(x, projection).astype(np.float32))
            cases["context"].append(str(ctx))
            cases["perturbation"].append(pert)
            cases["mean"].append(projection.mean.astype(np.float32))
            cases["components"].append(projection.components.astype(np.float32))
    if not cases["context"]:
        return
    with atomic_path(split_dir / "embedding.npz") as tmp:
        np.savez(tmp, **{k: np.array(v) if k in ("context", "perturbation")
                         else np.stack(v) if k in ("mean", "components")
                         else np.concatenate(v) for k, v in cases.items()})


def _write_pred_embedding(run_dir: Path, inputs: EvaluationInputs, pred: ad.AnnData) -> None:
    """A model's predicted cells of each held-out perturbation projected into that perturbation's
    PCA of the real cells (``../embedding.npz``; not refitted), into ``embedding.npz``."""
    from pertflow.eval.plots import Projection
    found = run_dir.parent / "embedding.npz"
    if not found.is_file():
        return
    with np.load(found) as real:
        contexts, names, means, components = real["context"], real["perturbation"], real["mean"], real["components"]
    if list(pred.var_names) != list(inputs.real.var_names):
        pred = pred[:, inputs.real.var_names]
    perts = pred.obs[inputs.pert_col].astype(str).to_numpy()
    ctxs = context_labels(pred, inputs.context_col)
    xy, case = [], []
    for i, (ctx, pert) in enumerate(zip(contexts, names)):
        rows = _sample(np.flatnonzero((ctxs == ctx) & (perts == pert)), seed=i + 1)
        if rows.size:
            xy.append(project(_dense(pred.X[rows]), Projection(means[i], components[i])).astype(np.float32))
            case.append(np.full(rows.size, i))
    with atomic_path(run_dir / "embedding.npz") as tmp:
        np.savez(tmp, context=contexts, perturbation=names,
                 xy=np.concatenate(xy) if xy else np.zeros((0, 2), np.float32),
                 case=np.concatenate(case) if case else np.zeros(0, int))


# ---------------------------------------------------------------------------- report
def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per (task, model): mean over perturbations within each fold, then mean over folds."""
    metrics = [c for c in results.columns if c not in ("task", "fold", "model", "context", "perturbation")]
    numeric = results[["task", "fold", "model", *metrics]].copy()
    numeric[metrics] = numeric[metrics].apply(pd.to_numeric, errors="coerce")
    per_fold = numeric.groupby(["task", "fold", "model"], sort=False).mean()
    return per_fold.groupby(level=["task", "model"], sort=False).mean()


def markdown_table(summary: pd.DataFrame, metrics: tuple[str, ...] = KEY_METRICS) -> str:
    """One table per task, each column's direction (↑ higher, ↓ lower is better) in its header and
    its best model in bold.

    Values are compared as shown (3 decimals): models a reader sees tie are bold together, and
    float noise below the shown precision decides nothing."""
    from pertflow.eval.ceiling import CEILING
    from pertflow.eval.evaluator import metric_direction

    lines = []
    for task, block in summary.groupby(level="task", sort=False):
        block = block.droplevel("task")
        cols = [m for m in metrics if m in block.columns and block[m].notna().any()]
        arrows = {"higher": " ↑", "lower": " ↓"}
        header = [m + arrows.get(metric_direction(m), "") for m in cols]
        lines += [f"### {task}", "", "| model | " + " | ".join(header) + " |", "|---" * (len(cols) + 1) + "|"]
        best: dict[str, set[str]] = {}
        for m in cols:
            direction = metric_direction(m)
            values = block[m].drop(CEILING, errors="ignore").dropna().round(3)
            if direction == "none" or values.nunique() < 2:
                continue  # nothing to mark when every model ties
            top = values.max() if direction == "higher" else values.min()
            best[m] = set(values.index[values == top])
        for model, row in block.iterrows():
            cells = []
            for m in cols:
                v = row[m]
                text = "–" if pd.isna(v) else f"{v:.3f}"
                cells.append(f"**{text}**" if model in best.get(m, ()) else f"*{text}*" if model == CEILING else text)
            lines.append(f"| {'*ceiling*' if model == CEILING else model} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


#: The metric a one-line verdict reads (the field's headline: Pearson of the shift on the top DE genes).
VERDICT_METRIC = "pearson_delta_top20_de"


def verdict_lines(summary: pd.DataFrame, baselines: tuple[str, ...], metric: str = VERDICT_METRIC,
                  tie: float = 0.01) -> list[str]:
    """One line per task and non-baseline model: the model against the strongest baseline of the
    task on ``metric`` (differences within ``tie`` are a tie), with the noise ceiling beside it."""
    from pertflow.eval.ceiling import CEILING
    from pertflow.eval.evaluator import strongest

    lines = []
    for task, block in summary.groupby(level="task", sort=False):
        block = block.droplevel("task")
        if metric not in block.columns:
            continue
        values = block[metric]
        base = values[[m for m in block.index if m in baselines]].dropna()
        ceiling = values.get(CEILING, np.nan)
        reach = "" if pd.isna(ceiling) else f"; ceiling {ceiling:.3f}"
        for model in block.index:
            if model in baselines or model == CEILING or pd.isna(values[model]):
                continue
            if base.empty:
                lines.append(f"{task}: {model} {metric} {values[model]:.3f} (no baseline to compare with{reach})")
                continue
            best, reference, sign = strongest(base, metric)
            gain = (values[model] - reference) * sign
            word = "ties with" if abs(gain) <= tie else "beats" if gain > 0 else "falls short of"
            lines.append(f"{task}: {model} {word} the strongest baseline, {best}: {metric} "
                         f"{values[model]:.3f} vs {reference:.3f}{reach}")
    return lines


def write_manifest(out: Path, models: list[str], configs_dir: Path | None, config_suffix: str, seconds: float,
                   threads: int, command: str | None = None) -> None:
    """``out/manifest.json``: what made the results folder: the commit, the command, each model's
    config file and its SHA-256, the machine and the seconds of the call that wrote it."""
    import hashlib
    import platform
    import subprocess
    import sys

    import torch

    from pertflow.runtime import available_cores

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    configs = {}
    for model in models:
        path = config_file(configs_dir, model, config_suffix)
        if path is not None:
            configs[model] = {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}
    manifest = {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": command or " ".join(["pertflow", *sys.argv[1:]]),
        "models": models,
        "configs": configs,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cores": available_cores(), "threads": threads},
        "seconds": round(seconds, 1),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def write_report(results: pd.DataFrame, out: Path, models: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.csv") as tmp:
        results.to_csv(tmp, index=False)
    summary = summarize(results)
    with atomic_path(out / "summary.csv") as tmp:
        summary.to_csv(tmp)
    write_text(out / "summary.md",
               "Mean over perturbations within a fold, then over folds; best model per column in bold; "
               + CEILING_NOTE + markdown_table(summary))
    from pertflow.models.registry import BASELINES

    plot_metrics(summary, out / "plots", baselines=tuple(BASELINES))
    plot_deltas(results, out, models)
    plot_embeddings(results, out, models)
