"""Benchmark tasks: a dataset, a split kind and its options, and the folds, kept as YAML files.

A task file (``<name>.yaml``; the benchmark's ship with the package, :data:`TASKS_DIR`) looks like::

    name: kang-celltype-transfer
    question: carry the interferon response to a new cell type
    dataset: kang18_pbmc_ifnb.h5ad          # a file name inside the data folder
    kind: context                           # a split kind of pertflow.data.splits
    folds: [B, CD14+Mono, ...]              # optional; for `context` a fold is the test context,
                                            # for other kinds a mapping: fold name -> its options
    spec: {}                                # optional data spec keys (pert_col, control, ...)
    options: {context_col: cell_type, n_top_genes: 2000}

The data folder comes from a flag or the environment variable ``PERTFLOW_DATA_DIR``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pertflow.data.dataset import PerturbationData
from pertflow.data.kinds import SPLIT_KINDS
from pertflow.data.split_file import Split
from pertflow.data.splits import make_split
from pertflow.errors import InputError
from pertflow.io import package_dir, read_yaml

DATA_DIR_ENV = "PERTFLOW_DATA_DIR"
TASK_KEYS = ("name", "question", "dataset", "kind", "folds", "spec", "options")

#: The benchmark's task files, shipped with the package (also reachable as benchmarks/tasks in the repository).
TASKS_DIR = package_dir("tasks")


@dataclass(frozen=True)
class Task:
    """A benchmark task read from a YAML file (see the module docstring)."""

    name: str
    dataset: str
    kind: str
    question: str = ""
    folds: tuple[str, ...] = ()
    spec: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    fold_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Task:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such task file. pertflow's own task files are in {TASKS_DIR}.")
        data = read_yaml(path, "task file") or {}
        if not isinstance(data, dict):
            raise InputError(f"{path} must hold a mapping with the keys {list(TASK_KEYS)}.")
        unknown = sorted(set(data) - set(TASK_KEYS))
        if unknown:
            raise InputError(f"{path}: unknown task keys {unknown}; valid keys are {list(TASK_KEYS)}.")
        missing = [k for k in ("name", "dataset", "kind") if k not in data]
        if missing:
            raise InputError(f"{path}: the task needs the keys {missing}.")
        if data["kind"] not in SPLIT_KINDS:
            raise InputError(f"{path}: unknown kind '{data['kind']}'; choose one of {list(SPLIT_KINDS)}.")
        folds = data.get("folds") or ()
        fold_options: dict[str, dict[str, Any]] = {}
        if isinstance(folds, dict):  # fold name -> the builder's options of that fold
            if not all(isinstance(v, dict) for v in folds.values()):
                raise InputError(f"{path}: folds given as a mapping need options per fold (name: {{option: value}}).")
            fold_options = {str(k): dict(v) for k, v in folds.items()}
        elif folds and data["kind"] != "context":
            raise InputError(f"{path}: a list of folds names test contexts, which a task of kind '{data['kind']}' has "
                             "not; give the folds as a mapping of fold name to options (e.g. test_perturbations).")
        return cls(
            name=data["name"],
            dataset=data["dataset"],
            kind=data["kind"],
            question=data.get("question", ""),
            folds=tuple(str(f) for f in folds),
            fold_options=fold_options,
            spec=dict(data.get("spec") or {}),
            options=dict(data.get("options") or {}),
        )

    @property
    def fold_names(self) -> tuple[str | None, ...]:
        return self.folds or (None,)

    def split_name(self, fold: str | None) -> str:
        return self.name if fold is None else f"{self.name}__{fold}"

    def open_data(self, data_dir: str | Path | None = None, backed: bool = False) -> PerturbationData:
        """The task's dataset, found in ``data_dir`` (or ``$PERTFLOW_DATA_DIR``)."""
        return PerturbationData.read(resolve_data_dir(data_dir) / self.dataset, backed=backed, **self.spec)

    def build(self, data: PerturbationData, fold: str | None = None) -> Split:
        """The split of one fold."""
        if self.folds and fold not in self.folds:
            raise InputError(f"task {self.name} has folds {list(self.folds)}; choose one with --fold.")
        if not self.folds and fold is not None:
            raise InputError(f"task {self.name} has no folds; leave out --fold.")
        options = dict(self.options)
        if fold is not None:
            if fold in self.fold_options:
                options.update(self.fold_options[fold])
            else:
                options["test_context"] = fold
        split = make_split(data, self.kind, **options)
        split.name, split.task, split.fold = self.split_name(fold), self.name, fold
        return split


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The data folder: the argument, else ``$PERTFLOW_DATA_DIR``; it must exist."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise InputError(f"no data folder: pass --data-dir or set {DATA_DIR_ENV}.")
    path = Path(chosen)
    if not path.is_dir():
        raise InputError(f"data folder {path} does not exist. Pass --data-dir or set {DATA_DIR_ENV}.")
    return path


def find_tasks(tasks_dir: str | Path = TASKS_DIR) -> dict[str, Task]:
    """Every task file of a folder, by task name."""
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise InputError(f"task folder {tasks_dir} does not exist; pertflow's own tasks are in {TASKS_DIR} (the "
                         "default).")
    tasks = [Task.load(p) for p in sorted(tasks_dir.glob("*.yaml"))]
    return {t.name: t for t in tasks}


def resolve_task(task: str | Path, tasks_dir: str | Path | None = None) -> Task:
    """A task given as a YAML file, or by name in ``tasks_dir``."""
    if Path(task).suffix in (".yaml", ".yml") or Path(task).is_file():
        return Task.load(task)
    tasks_dir = tasks_dir or TASKS_DIR
    tasks = find_tasks(tasks_dir)
    if task not in tasks:
        raise InputError(f"no task '{task}' in {tasks_dir}; tasks: {sorted(tasks)}.")
    return tasks[task]
