"""The MMD domain adapter on real data: a flow model trained on K562 carried to each glioblastoma line.

The model is trained once on the K562 cells of ``norman19_mcfaline23_devel.h5ad`` (a random
split of K562 only, all 500 genes; every knock-down of the glioblastoma lines is also measured
in K562) and reused for every fold of ``gbm-cellline-transfer`` (A172, T98G, U87MG). For each
fold an adapter is learnt from the K562 control cells to the held-out line's control cells
(``pertflow adapt``), and the line's test cells (the task's reference split file) are predicted
and scored (``pertflow.api.evaluate_split``) by

* ``no-change``: the line's own control cells (the reference every model has to beat);
* ``cfm``: the CPU benchmark config (``benchmarks/configs/cfm-cpu.yaml``, which centres the
  controls per gene: shift-equivariant, so it cannot be adapted; a reference);
* ``cfm-uncentred``: the same config with ``model.center=false``, without the adapter;
* ``cfm-uncentred+<transport>``: the same model reading the line's controls mapped by an adapter
  of each transport (``--transports``: ``shift``, ``affine``, ``quantile``);
* ``cfm-uncentred+<transport>-back``: the same, carried back onto the line's scale
  (``--shift-back``: the model predicts on K562's scale; each predicted cell becomes its control
  cell as measured plus the change the model predicted from the mapped one);
* ``cfm+<transport>``, ``cfm+<transport>-back``: the centred model with the transports that
  change scale (``affine``, ``quantile``; a shift cannot reach a centred model).

Writes to ``--out``: ``results.csv`` (one row per fold, variant and perturbation; all metrics),
``summary.csv`` / ``summary.md`` (top-20 DE Pearson delta, E-distance, MMD per fold and over the
folds), ``adapters.csv`` (each adapter's MMD before and after and its support shares) and ``runs/`` (models, adapters, predictions;
not committed). An interrupted run continues: finished steps are read back from disk.

    python benchmarks/adapter_gbm.py --data-dir ../shared/data --out benchmarks/results/adapter --threads 2

A quick check of the script: ``--folds A172 --set train.max_steps=20 --adapt-set steps=20``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import pandas as pd

from pertflow import api
from pertflow.data import make_split
from pertflow.data.split_file import Split
from pertflow.data.tasks import resolve_data_dir
from pertflow.io import atomic_path, write_json, write_text
from pertflow.train.checkpoint import CheckpointDir

DATASET = "norman19_mcfaline23_devel.h5ad"
TASK = "gbm-cellline-transfer"
FOLDS = ("A172", "T98G", "U87MG")
SOURCE_CONTEXT = "k562"
CONFIG = Path(__file__).parent / "configs" / "cfm-cpu.yaml"
TRANSPORTS = ("shift", "affine", "quantile")
#: the runs (trained once, on K562) predicted without an adapter
PLAIN = ("no-change", "cfm", "cfm-uncentred")


def variants(transports: list[str]) -> dict[str, tuple[str, str | None, bool]]:
    """variant -> (run, transport of its adapter or None, shift back)."""
    found: dict[str, tuple[str, str | None, bool]] = {name: (name, None, False) for name in PLAIN}
    for run in ("cfm-uncentred", "cfm"):
        for transport in transports:
            if run == "cfm" and transport == "shift":
                continue  # a per-gene shift leaves a centred model's input unchanged (refused by adapt)
            found[f"{run}+{transport}"] = (run, transport, False)
            found[f"{run}+{transport}-back"] = (run, transport, True)
    return found
METRICS = {"pearson_delta_top20_de": "top-20 DE Pearson Δ ↑", "edistance_pca": "E-distance ↓", "mmd_rbf_pca": "MMD ↓",
           "pearson_delta": "Pearson Δ ↑"}
ADAPTER_DEFAULTS = {"steps": 500, "genes_per_step": 128}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_sets(items: list[str] | None) -> dict[str, object]:
    """``["steps=300", "lr=0.02"]`` -> adapter settings (values read as YAML scalars)."""
    import yaml

    settings: dict[str, object] = dict(ADAPTER_DEFAULTS)
    for item in items or []:
        key, _, value = item.partition("=")
        settings[key.strip()] = yaml.safe_load(value)
    return settings


def train_on_k562(data, runs: Path, sets: list[str]) -> dict[str, Path]:
    """The three K562 runs (trained once; an existing run is reused, an interrupted one resumed)."""
    split_path = runs / "k562_split.json"
    if not split_path.is_file():
        make_split(data, "random", keep={"cell_type": [SOURCE_CONTEXT]}, test_fraction=0.1, seed=0).save(split_path)
    view = api.split_view(data, Split.load(split_path))
    plans = {
        "no-change": ("no-change", None, []),
        "cfm": ("cfm", CONFIG, sets),
        "cfm-uncentred": ("cfm", CONFIG, [*sets, "model.center=false"]),
    }
    found = {}
    for name, (model, config, overrides) in plans.items():
        run = runs / "k562" / name
        if not (run / "model.json").is_file():
            log(f"training {name} on K562 ({view})")
            start = time.perf_counter()
            resume = CheckpointDir(run).exists()
            network = model != "no-change"
            # a folder without a model and without a checkpoint holds a run stopped before its first step
            api.train(model, view, None, run, config=config, resume=resume, overwrite=run.exists() and not resume,
                      sets=[*overrides, "train.progress=false"] if network else None)
            write_json(run / "timing.json", {"train_seconds": time.perf_counter() - start})
        found[name] = run
    return found


def run_fold(data, fold: str, split_file: Path, runs: dict[str, Path], out: Path, adapter_settings: dict,
             threads: int, transports: list[str]) -> tuple[pd.DataFrame, list[dict]]:
    """Adapt each run to one line with each transport, predict its test cells with every variant, score them."""
    folder = out / "runs" / fold
    view = api.split_view(data, Split.load(split_file))
    inputs = api.evaluation_inputs(view)
    adapters: dict[tuple[str, str], api.Adapter] = {}
    tables = []
    for variant, (run, transport, back) in variants(transports).items():
        if transport is not None and (run, transport) not in adapters:
            adapter_dir = folder / f"adapter-{run}-{transport}"
            if not (adapter_dir / "adapter.json").is_file():
                log(f"[{fold}] adapting {run} from {SOURCE_CONTEXT} controls to {fold} controls ({transport})")
                api.adapt(runs[run], data, data, adapter_dir, source_contexts=[SOURCE_CONTEXT], contexts=[fold],
                          settings={**adapter_settings, "transport": transport}, overwrite=True)  # no adapter.json: unfinished
            adapters[run, transport] = api.Adapter.load(adapter_dir)
        pred_path = folder / variant / "pred.h5ad"
        if not pred_path.is_file():
            log(f"[{fold}] predicting {variant}")
            api.predict(runs[run], view, None, pred_path, adapter=adapters[run, transport] if transport else None,
                        shift_back=back, overwrite=True)  # no pred.h5ad: unfinished
        results_path = folder / variant / "eval" / "results.csv"
        if not results_path.is_file():
            log(f"[{fold}] evaluating {variant}")
            api.evaluate_split(None, None, ad.read_h5ad(pred_path), out=folder / variant / "eval", overwrite=True,
                               de_cache=out / "cache" / "de" / fold, config=api.EvalConfig(num_threads=threads), inputs=inputs)
        table = pd.read_csv(results_path)
        table.insert(0, "variant", variant)
        table.insert(0, "fold", fold)
        tables.append(table)
    info = [{"fold": fold, "run": run, "transport": transport, "adapter_mmd_before": a.mmd_before,
             "adapter_mmd_after": a.mmd_after, "kept_step": a.kept_step,
             "outside_before": a.info.get("support", {}).get("outside_before"),
             "outside_after": a.info.get("support", {}).get("outside_after"),
             "target_cells": a.info.get("target_cells"), "source_cells": a.info.get("source_cells")}
            for (run, transport), a in adapters.items()]
    return pd.concat(tables, ignore_index=True), info


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean over the perturbations of each (fold, variant), plus the mean over folds (fold ``all``)."""
    metrics = [m for m in METRICS if m in results.columns]
    per_fold = results.groupby(["fold", "variant"], sort=False)[metrics].mean()
    overall = per_fold.groupby(level="variant", sort=False).mean()
    overall.index = pd.MultiIndex.from_product([["all"], overall.index], names=["fold", "variant"])
    return pd.concat([per_fold, overall])


def markdown(summary: pd.DataFrame, adapters: pd.DataFrame, command: str) -> str:
    lines = ["# The MMD domain adapter on gbm-cellline-transfer (K562 model, all three folds)", "",
             f"`{command}`", "",
             "Mean over the held-out knock-downs of each fold (and over the folds); see the script's docstring "
             "for the variants.", ""]
    for fold, block in summary.groupby(level="fold", sort=False):
        block = block.droplevel("fold")
        cols = list(block.columns)
        lines += [f"## {'mean over folds' if fold == 'all' else fold}", "",
                  "| variant | " + " | ".join(METRICS[c] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {v} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |" for v, row in block.iterrows()]
        lines.append("")
    lines += ["## The adapters (K562 controls -> the line's controls)", "",
              "MMD: held-out control embeddings of the model; outside: the share of the line's controls outside "
              "K562's (`pertflow.adapt.support`), before and after.", "",
              "| fold | model | transport | MMD before | MMD after | step kept | outside before | outside after | "
              "target cells | source cells |", "|---" * 10 + "|"]
    lines += [f"| {r.fold} | {r.run} | {r.transport} | {r.adapter_mmd_before:.4f} | {r.adapter_mmd_after:.4f} | "
              f"{r.kept_step} | {r.outside_before:.2f} | {r.outside_after:.2f} | {r.target_cells} | {r.source_cells} |"
              for r in adapters.itertuples()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="folder of the datasets and splits/ (default: $PERTFLOW_DATA_DIR)")
    parser.add_argument("--out", required=True, help="output folder (an interrupted run continues there)")
    parser.add_argument("--folds", default=",".join(FOLDS), help="comma-separated folds (default: all three)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key of cfm-cpu.yaml for both K562 flow models, e.g. train.max_steps=20")
    parser.add_argument("--adapt-set", action="append", metavar="KEY=VALUE",
                        help=f"adapter setting, e.g. steps=300 (defaults here: {ADAPTER_DEFAULTS})")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="comma-separated transports (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="threads for cell-eval's DE tests")
    args = parser.parse_args()
    data_dir = resolve_data_dir(args.data_dir)
    out = Path(args.out)
    data = api.open_data(data_dir / DATASET)
    try:
        runs = train_on_k562(data, out / "runs", args.set)
        tables, adapters = [], []
        for fold in [f for f in args.folds.split(",") if f]:
            table, info = run_fold(data, fold, data_dir / "splits" / f"{TASK}__{fold}.json", runs, out,
                                   parse_sets(args.adapt_set), args.threads, [t for t in args.transports.split(",") if t])
            tables.append(table)
            adapters += info
    finally:
        data.close()
    results = pd.concat(tables, ignore_index=True)
    adapters = pd.DataFrame(adapters)
    summary = summarize(results)
    with atomic_path(out / "results.csv") as tmp:
        results.to_csv(tmp, index=False)
    with atomic_path(out / "summary.csv") as tmp:
        summary.to_csv(tmp, float_format="%.4f")
    with atomic_path(out / "adapters.csv") as tmp:
        adapters.to_csv(tmp, index=False, float_format="%.4f")
    command = "python benchmarks/adapter_gbm.py " + " ".join(
        [f"--folds {args.folds}", f"--transports {args.transports}"] + [f"--set {s}" for s in args.set] + [f"--adapt-set {s}" for s in args.adapt_set or []])
    write_text(out / "summary.md", markdown(summary, adapters, command))
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
