"""Analyses of a finished ``pertflow benchmark``: its runs predicted again and scored.

The scripts of ``benchmarks/`` that read a benchmark's run folders (``selection.py``,
``own_cells.py``, ``validation_by_context.py``, ``nfe_curve.py``, ``ccfm_steps.py``) share what is
here: the split view of a run folder (:func:`fold_view`), a run's test cells predicted again with
overrides and scored (:func:`rescore`, :func:`solver_scores`), a pass over every run of some models
that continues where it stopped (:func:`score_runs`), and their common command-line arguments
(:func:`analysis_parser`, :func:`analysis_inputs`). None of it chooses anything: the benchmark's
choices stay validation's.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from pertflow.api import EvalConfig, evaluate_split, evaluation_inputs, predict, split_view
from pertflow.benchmark import fold_split
from pertflow.data.tasks import Task, find_tasks, resolve_data_dir
from pertflow.data.view import SplitView
from pertflow.errors import InputError
from pertflow.flows import EVALUATIONS_PER_STEP
from pertflow.io import atomic_path
from pertflow.runtime import set_threads


@contextmanager
def fold_view(run: Path, tasks: dict[str, Task], data_dir: Path) -> Iterator[SplitView]:
    """The split view of a benchmark run folder ``<out>/runs/<task>[__<fold>]/<model>`` (the
    analyses of ``benchmarks/`` re-predict a finished run with it)."""
    task_name, _, fold = Path(run).parent.name.partition("__")
    if task_name not in tasks:
        raise InputError(f"{run}: '{task_name}' is not a task of the tasks folder (a run folder is "
                         "<out>/runs/<task>[__<fold>]/<model>)")
    task = tasks[task_name]
    with task.open_data(data_dir) as data:
        yield split_view(data, fold_split(task, data, fold or None, data_dir / "splits"))


def rescore(run: Path, view: SplitView, sets: list[str], metrics: tuple[str, ...]) -> dict[str, float]:
    """A finished run's test cells predicted again with ``--set`` overrides (e.g.
    ``predict.mode=flow``) and scored by pertflow's metrics (cell-eval's DE-based ones skipped):
    the mean of ``metrics`` over the test perturbations, with the seconds the prediction took."""
    inputs = evaluation_inputs(view)
    start = time.perf_counter()
    pred = predict(run, view, None, sets=sets)
    seconds = time.perf_counter() - start
    result = evaluate_split(None, None, pred, inputs=inputs, config=EvalConfig(cell_eval_profile="anndata"))
    agg = result.aggregate.loc["mean"]
    cells = int((pred.obs[inputs.pert_col].astype(str) != inputs.control).sum())
    return {**{m: float(agg[m]) for m in metrics}, "predict_seconds": seconds, "predicted_cells": cells}


#: what the analyses of finished runs score by default (cell-eval's DE-based metrics do not depend
#: on the solver more than these)
RESCORE_METRICS = ("pearson_delta_top20_de", "edistance_pca", "mmd_rbf_pca")


def solver_scores(run: Path, view: SplitView, grid: dict[str, tuple[int, ...]], sets: tuple[str, ...] = (),
                  metrics: tuple[str, ...] = RESCORE_METRICS) -> list[dict]:
    """One row per (ODE solver, steps) of ``grid``: a finished run's own flow cells of the split's
    test perturbations (``predict.mode=flow``) scored by :func:`rescore`, with the network
    evaluations per sample (``nfe``)."""
    rows = []
    for method, steps_list in grid.items():
        for steps in steps_list:
            sets_here = [f"predict.ode_method={method}", f"predict.ode_steps={steps}", "predict.mode=flow", *sets]
            rows.append({"split": run.parent.name, "model": run.name, "method": method, "steps": steps,
                         "nfe": steps * EVALUATIONS_PER_STEP[method], **rescore(run, view, sets_here, metrics)})
            print(rows[-1], flush=True)
    return rows


def score_runs(bench: Path, models: list[str], tasks: dict[str, Task], data_dir: Path, out: Path,
               score: Callable[[Path, SplitView], dict[str, Any]], splits: list[str] | None = None) -> None:
    """An analysis of a finished benchmark: ``score(run, view)`` -> a row, for every trained run
    of ``models`` in ``bench/runs`` (``splits``: only these), written to the CSV ``out`` after each
    run. Rows already in ``out`` (by split and model) are kept and not redone, so an interrupted
    pass continues; a row gets ``split`` and ``model`` unless ``score`` gives them."""
    done = pd.read_csv(out) if out.is_file() else pd.DataFrame(columns=["split", "model"])
    rows = done.to_dict("records")
    for split in sorted(p.name for p in (bench / "runs").iterdir() if p.is_dir()):
        if splits and split not in splits:
            continue
        runs = [bench / "runs" / split / m for m in models]
        todo = [r for r in runs if (r / "model.json").is_file()
                and not ((done["split"] == split) & (done["model"] == r.name)).any()]
        if not todo:
            continue
        with fold_view(todo[0], tasks, data_dir) as view:
            for run in todo:
                rows.append({"split": split, "model": run.name, **score(run, view)})
                print(rows[-1], flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(out) as tmp:
                    pd.DataFrame(rows).to_csv(tmp, index=False)


def analysis_parser(description: str, models_help: str) -> argparse.ArgumentParser:
    """The arguments every analysis of a finished benchmark takes: the benchmark folder, the
    models to score, the datasets, the tasks, the CSV to write and the threads (a script adds its
    own after these)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", help="a pertflow benchmark output folder (its runs/<split>/<model>)")
    p.add_argument("--models", required=True, help=f"{models_help} (comma-separated benchmark names)")
    p.add_argument("--data-dir", help="the datasets (default: $PERTFLOW_DATA_DIR)")
    p.add_argument("--tasks-dir", help="the task files (default: the ones pertflow ships)")
    p.add_argument("--out", required=True, help="the CSV to write (rows already there are kept, not redone)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p


@dataclass(frozen=True)
class AnalysisInputs:
    """What :func:`analysis_parser`'s arguments name, read and checked."""

    bench: Path
    models: list[str]
    tasks: dict[str, Task]
    data_dir: Path
    out: Path


def analysis_inputs(args: argparse.Namespace) -> AnalysisInputs:
    """The benchmark folder, models, tasks, datasets and output of parsed analysis arguments;
    sets the torch threads. A folder that is not a benchmark's output is refused by name."""
    set_threads(args.threads)
    bench = Path(args.bench)
    if not (bench / "runs").is_dir():
        raise InputError(f"{bench} holds no runs/ folder: give the --out folder of a finished `pertflow benchmark`.")
    models = [m for m in args.models.split(",") if m]
    if not models:
        raise InputError("--models names no model: give the benchmark names of the runs to score, e.g. cfm,ccfm.")
    tasks = find_tasks(args.tasks_dir) if args.tasks_dir else find_tasks()
    return AnalysisInputs(bench, models, tasks, resolve_data_dir(args.data_dir), Path(args.out))
