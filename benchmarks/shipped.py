"""The leaderboard of the shipped CPU configs: each model as a user gets it today.

``leaderboard.md`` puts every variant ever benchmarked side by side, under the label its run
used. This script answers the narrower question "how does ``pertflow benchmark --models X`` do
on every fold, with the config that ships": ``shipped.yaml`` lists, for each shipped model, the
benchmark runs made with its config (older first; a later run overrides an earlier one on the
folds it holds) and the config each run used, a file or ``<commit>:<path>`` of this repository;
``tasks`` keeps only those of a run's tasks (a run that stands for the config on some of them).
The config is checked against the run's manifest (its sha256, where the manifest kept one), and
each setting that differs from today's shipped config is printed beside the spec's ``why``:
what the difference changes on that run's folds (often nothing, e.g. a descriptor on a
context-transfer task, where every model keeps the one-hot). A fold no listed run holds is
reported missing, not filled in.

Writes a markdown table per task (mean over folds, folds won and within the bar of the strongest
baseline per fold), the list of folds below that bar (with the baselines, if any, that meet it
themselves), and the provenance of every row::

    python benchmarks/shipped.py benchmarks/results/shipped.yaml \\
        --out benchmarks/results/shipped.md --csv benchmarks/results/shipped.csv
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from leaderboard import fold_means, leaderboard  # noqa: E402  (a sibling script)

from pertflow.io import write_text  # noqa: E402
from pertflow.models.registry import BASELINES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "src" / "pertflow" / "resources" / "configs"
SECTIONS = ("model", "predict", "train")


def config_text(ref: str, folder: Path) -> str:
    """The text of a run's config: a file in the run's folder, or ``<commit>:<path>`` in git."""
    if (folder / ref).is_file():
        return (folder / ref).read_text()
    commit, sep, path = ref.partition(":")
    if not sep:
        raise SystemExit(f"config {ref!r} is neither a file in {folder} nor <commit>:<path>")
    return subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout


def settings(text: str) -> dict[str, object]:
    """The model, predict and train settings of a config, as ``section.key`` -> value."""
    loaded = yaml.safe_load(text) or {}
    return {f"{s}.{k}": v for s in SECTIONS for k, v in (loaded.get(s) or {}).items()}


def differences(run: dict[str, object], shipped: dict[str, object]) -> list[str]:
    return [f"{k}: {run.get(k, '(unset)')} -> {shipped.get(k, '(unset)')}"
            for k in sorted(set(run) | set(shipped)) if run.get(k) != shipped.get(k)]


def recorded_sha(folder: Path, label: str) -> str | None:
    """The sha256 prefix the run's manifest recorded for ``label``'s config, if any."""
    manifest = folder / "manifest.json"
    configs = json.loads(manifest.read_text()).get("configs") if manifest.is_file() else None
    entry = configs.get(label) if isinstance(configs, dict) else None
    return entry.get("sha256") if isinstance(entry, dict) else None


def model_rows(name: str, runs: list[dict], results: Path) -> tuple[pd.DataFrame, list[dict]]:
    """(task, fold) means of every run of one shipped model, later runs first, and their provenance."""
    shipped = settings((SHIPPED / f"{name}-cpu.yaml").read_text())
    tables, provenance = [], []
    for rank, run in enumerate(runs):
        folder = results / run["folder"]
        text = config_text(run["config"], folder)
        sha = recorded_sha(folder, run["label"])
        matches = sha is not None and hashlib.sha256(text.encode()).hexdigest()[:len(sha)] == sha
        if sha and not matches and not run.get("unchecked"):
            raise SystemExit(f"{run['folder']}: config {run['config']} is not the one its manifest recorded for "
                             f"{run['label']} (sha256 {sha}); name the config that run used, "
                             "or say why under 'unchecked'")
        every = fold_means([folder])
        if run["label"] not in every.index.get_level_values("model"):
            raise SystemExit(f"{run['folder']}/results.csv holds no run labelled {run['label']!r}")
        means = every.xs(run["label"], level="model").reset_index()
        if "tasks" in run:
            tasks = run["tasks"]
            if not isinstance(tasks, list) or not tasks or not set(tasks) <= set(means["task"]):
                raise SystemExit(f"{run['folder']}: 'tasks' must be a list of tasks its run of {run['label']!r} "
                                 f"holds ({sorted(set(means['task']))}); got {tasks!r}")
            means = means[means["task"].isin(tasks)]
        means["model"], means["rank"], means["source"] = name, rank, run["folder"]
        tables.append(means)
        folds = {t: sorted(b["fold"]) for t, b in means.groupby("task")}
        provenance.append({"model": name, "folder": run["folder"], "label": run["label"], "config": run["config"],
                           "checked": "checked" if matches else run.get("unchecked", "no sha256 recorded"),
                           "differs": differences(settings(text), shipped), "why": run.get("why", ""), "folds": folds})
    every = pd.concat(tables).sort_values("rank")
    return every.drop_duplicates(["task", "fold"], keep="last"), provenance


def baseline_rows(folders: list[str], results: Path) -> pd.DataFrame:
    """The baselines' and the noise ceiling's (task, fold) means, a later folder's first."""
    if not folders:
        return pd.DataFrame(columns=["task", "fold", "model"])
    every = fold_means([results / folder for folder in folders]).reset_index()
    return every[every["model"].isin([*BASELINES, "ceiling"])]


def baselines_within(board: pd.DataFrame) -> dict[tuple[str, str], list[str]]:
    """Per (task, fold), the baselines within that fold's bar themselves. The bar takes the best
    top-20 and the best E-distance separately, so where they come from two baselines none may
    meet it (zhao PW040: no change's top-20, the mean's E-distance)."""
    base = board[board["model"].isin(BASELINES) & board["within"]]
    return {key: sorted(block["model"]) for key, block in base.groupby(["task", "fold"])}


def markdown(board: pd.DataFrame, models: list[str], provenance: list[dict], tasks: dict[str, list[str]],
             meeting: dict[tuple[str, str], list[str]]) -> str:
    lines = ["# The shipped CPU configs on every fold", "",
             "Made by `benchmarks/shipped.py` from `shipped.yaml` (the runs of each shipped config and why "
             "their settings may differ). Strongest baseline: per fold and metric, the best of "
             f"{', '.join(BASELINES)}; *within* = top-20 no more than 0.02 below it and E-distance no more "
             "than 10% above it.", ""]
    for task, folds in tasks.items():  # every fold a baseline holds: one no shipped run holds shows as missing
        block = board[board["task"] == task]
        lines += [f"## {task} ({len(folds)} fold{'s' if len(folds) > 1 else ''})", "",
                  "| model | top-20 DE Pearson Δ ↑ | E-distance ↓ | folds won | folds within | missing folds |",
                  "|---|---|---|---|---|---|"]
        best = block.groupby("fold")[["best_top20", "best_edist"]].first().mean()
        for model in models:
            rows = block[block["model"] == model]
            missing = sorted(set(folds) - set(rows["fold"]))
            if rows.empty:
                lines.append(f"| {model} | | | | | all |")
                continue
            lines.append(f"| {model} | {rows.top20.mean():.3f} | {rows.edist.mean():.3f} | {int(rows.wins.sum())}/"
                         f"{len(rows)} | {int(rows.within.sum())}/{len(rows)} | {', '.join(missing) or '-'} |")
        lines += [f"| *strongest baseline per fold* | {best.best_top20:.3f} | {best.best_edist:.3f} | | | |", ""]
    below = board[board["model"].isin(models) & ~board["within"]]
    lines += ["## Folds below the bar", "",
              "| task | fold | model | top-20 | E-distance | strongest baseline (top-20 / E) | baselines within it |",
              "|---|---|---|---|---|---|---|"]
    for r in below.sort_values(["task", "fold", "model"]).itertuples():
        lines.append(f"| {r.task} | {r.fold or '-'} | {r.model} | {r.top20:.3f} | {r.edist:.3f} | "
                     f"{r.best_top20:.3f} / {r.best_edist:.3f} | {', '.join(meeting.get((r.task, r.fold), [])) or 'none'} |")
    lines += ["", "## Where each row comes from", "",
              "Later runs override earlier ones on the folds they hold. *Differs*: the run's setting -> "
              "today's; *checked*: the config matches the sha256 the run's manifest recorded (else why not).", ""]
    for p in provenance:
        folds = "; ".join(f"{t}: {', '.join(f or '-' for f in fs)}" for t, fs in p["folds"].items())
        lines += [f"- **{p['model']}** from `{p['folder']}` (run as `{p['label']}`, config `{p['config']}`"
                  f"; {p['checked']}): {folds}.",
                  f"  Differs: {'; '.join(p['differs']) or 'nothing'}." + (f" {p['why']}" if p["why"] else "")]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="shipped.yaml: baselines (folders) and, per model, its runs")
    p.add_argument("--out", required=True, help="the markdown file to write")
    p.add_argument("--csv", help="also the per-fold table as CSV")
    args = p.parse_args()
    spec_path = Path(args.spec)
    spec = yaml.safe_load(spec_path.read_text())
    results = spec_path.resolve().parent
    frames, provenance = [baseline_rows(spec["baselines"], results)], []
    for name, runs in spec["models"].items():
        rows, prov = model_rows(name, runs, results)
        frames.append(rows)
        provenance += prov
    folds = pd.concat([f for f in frames if len(f)]).set_index(["task", "fold", "model"])
    every_fold = folds.index.droplevel("model").unique()
    with_baseline = folds[folds.index.get_level_values("model").isin(BASELINES)].index.droplevel("model").unique()
    if len(lacking := every_fold.difference(with_baseline)):
        raise SystemExit(f"no baseline run for the folds {list(lacking)}: add a folder that holds them to 'baselines'")
    board = leaderboard(folds)
    meeting = baselines_within(board)
    board = board[board["model"].isin(list(spec["models"]))]
    tasks = {task: sorted(f for t, f in with_baseline if t == task) for task in sorted({t for t, _ in with_baseline})}
    write_text(args.out, markdown(board, list(spec["models"]), provenance, tasks, meeting))
    if args.csv:
        write_text(args.csv, board.to_csv(index=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
