"""Quality and cost of a trained CCFM against its ODE steps per stage (issue 14, items 2 and 5).

CCFM samples in two stages (the latent, then the expression given it), each integrated with the
``predict`` section's solver: RK4 x 20 per stage, the SPEC's default, is 160 network calls. Given
a CCFM run folder of ``pertflow benchmark`` (``<out>/runs/<split>/ccfm``), this predicts the
split's test cells again with Euler, midpoint and RK4 at 1-20 steps per stage and scores them with
the evaluator (top-20 DE Pearson delta, E-distance, MMD; the flow's own cells,
``predict.mode=flow``, as ``nfe_curve.py``: both use ``pertflow.analysis.solver_scores``), and measures the cost:

* ``steps.csv`` / ``steps.png``: one row per (solver, steps per stage), with the seconds and
  predicted cells per second of each prediction (model loading included);
* ``cost.json``: the run's own record (training steps/s with validation excluded, seconds of the
  foundation's pretraining and of the feature cache, the cache's size; the benchmark's
  ``timing.csv`` when there is one), the latent's memory per cell and per batch, and two probes,
  each in its own process so that its peak resident memory (``ru_maxrss``: Python, torch and the data
  included) is its own: ``train`` trains ``--probe-steps`` steps with the run's settings in a
  temporary folder, the run's foundation given (so the features are computed again and timed),
  and ``predict`` predicts the test cells with the run's solver settings.

    python benchmarks/ccfm_steps.py --data-dir ../shared/data --out benchmarks/results/ccfm \\
        OUT/runs/norman-combo-seen2/ccfm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from pertflow.analysis import fold_view, solver_scores
from pertflow.api import predict, train
from pertflow.data.tasks import find_tasks, resolve_data_dir
from pertflow.eval.plots import plot_solver_curves
from pertflow.io import atomic_path, read_json, write_json
from pertflow.runtime import set_threads

METHODS = ("euler", "midpoint", "rk4")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def latent_memory(meta: dict, config: dict) -> dict:
    """What the latent costs: per cell on disk, and the float32 tensors of a training batch and
    of one sampling block (cells x gene chunk), from the run's settings (``meta``: model.json)."""
    cache = meta.get("fit_report", {}).get("feature_cache", {})
    genes, width = len(meta["genes"]), meta["config"]["latent_dim"]
    model, trainc, pred = meta["config"], config["train"], meta["predict_config"]
    step_genes = min(model["genes_per_step"], genes)
    chunk = min(pred["gene_chunk"] or genes, genes)
    mib = lambda n: round(n / 2**20, 2)  # noqa: E731
    return {
        "width": width,
        "genes": genes,
        "per_cell_on_disk_kib": round(genes * width * 2 / 1024, 1),
        "cache_mib": mib(cache["bytes"]) if "bytes" in cache else None,
        "cache_cells": cache.get("cells"),
        # LatentRows reads a batch's cells on every gene (B, G, D) float32; the module keeps the step's genes
        "training_batch_read_mib": mib(trainc["batch_size"] * genes * width * 4),
        "training_batch_step_genes_mib": mib(trainc["batch_size"] * step_genes * width * 4),
        # stage 1 holds (cells, chunk, D): the state, plus the solver's stages (midpoint 2, RK4 4 more)
        "sampling_block_state_mib": mib(pred["batch_size"] * chunk * width * 4),
    }


def probe_train(run: Path, view, steps: int) -> dict:
    """Train ``steps`` steps with the run's settings (its foundation given) in a temporary folder."""
    saved = read_json(run / "run.json")["config"]
    model = {**saved["model"], "foundation": str((run / "foundation").resolve()), "latent_dim": None}
    trainc = {**saved["train"], "max_steps": steps, "val_every": steps, "checkpoint_every": steps, "progress": False}
    with tempfile.TemporaryDirectory(prefix="ccfm-probe-") as tmp:
        config = Path(tmp) / "ccfm.yaml"
        config.write_text(yaml.safe_dump({"model": model, "train": trainc, "predict": saved["predict"]}))
        start = time.perf_counter()
        fitted = train("ccfm", view, None, Path(tmp) / "run", config=config)
        seconds = time.perf_counter() - start
    report = fitted.fit_report
    return {"steps": steps, "seconds": round(seconds, 1), "steps_per_s": report.get("steps_per_s"),
            "features_seconds": report.get("features_seconds"), "feature_cache": report.get("feature_cache"),
            "peak_rss_gib": round(peak_rss_gib(), 3)}


def probe_predict(run: Path, view) -> dict:
    """Predict the split's test cells with the run's solver settings (the flow's cells)."""
    start = time.perf_counter()
    pred = predict(run, view, None, sets=["predict.mode=flow"])
    seconds = time.perf_counter() - start
    spec = read_json(run / "model.json")["spec"]
    control, pert_col = spec["control"], spec["pert_col"]
    cells = int((pred.obs[pert_col].astype(str) != control).sum())
    return {"cells": cells, "seconds": round(seconds, 2), "cells_per_s": round(cells / seconds, 1),
            "peak_rss_gib": round(peak_rss_gib(), 3)}


def run_probe(kind: str, args: argparse.Namespace) -> dict:
    """A probe in its own process; its last line of output is its JSON."""
    cmd = [sys.executable, __file__, "--probe", kind, "--probe-steps", str(args.probe_steps), "--threads", str(args.threads),
           "--tasks-dir", args.tasks_dir, "--out", args.out, args.run]
    if args.data_dir:
        cmd[2:2] = ["--data-dir", args.data_dir]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a CCFM run folder <out>/runs/<task>[__<fold>]/ccfm")
    p.add_argument("--data-dir", help="the datasets (default: $PERTFLOW_DATA_DIR)")
    p.add_argument("--tasks-dir", default=str(Path(__file__).parent / "tasks"))
    p.add_argument("--out", required=True, help="folder for steps.csv, steps.png and cost.json")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--probe-steps", type=int, default=100, help="training steps of the training probe")
    p.add_argument("--probes", default="train,predict", help="which probes to run (comma-separated; empty: none)")
    p.add_argument("--steps", default="1,2,4,8,20", help="steps per stage of every solver (comma-separated)")
    p.add_argument("--probe", choices=("train", "predict"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    set_threads(args.threads)
    grid = {method: tuple(int(n) for n in args.steps.split(",")) for method in METHODS}
    run = Path(args.run)
    if not (run / "model.json").is_file():
        raise SystemExit(f"{run} holds no trained model (model.json): train it with pertflow benchmark first")
    data_dir = resolve_data_dir(args.data_dir)
    tasks = find_tasks(args.tasks_dir)
    if args.probe:
        with fold_view(run, tasks, data_dir) as view:
            result = probe_train(run, view, args.probe_steps) if args.probe == "train" else probe_predict(run, view)
        print(json.dumps(result), flush=True)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    meta = read_json(run / "model.json")
    config = read_json(run / "run.json")["config"]
    fit_report = meta.get("fit_report", {})
    timing = pd.read_csv(run / "timing.csv").iloc[0].to_dict() if (run / "timing.csv").is_file() else {}
    cost = {
        "run": str(run),
        "machine": {"cores": os.cpu_count(), "torch_threads": args.threads, "processor": platform.machine(),
                    "load_average_at_start": [round(x, 2) for x in load_before]},
        "config": {"predict": meta["predict_config"], "train": {k: config["train"][k] for k in ("max_steps", "batch_size")},
                   "model": {k: config["model"][k] for k in ("d_model", "n_layers", "backbone", "genes_per_step", "foundation_d_model",
                                                                "foundation_layers", "foundation_steps", "bottleneck_dim", "dh_depth")}},
        "run_record": {k: fit_report.get(k) for k in ("steps", "steps_per_s", "parameters", "best_step", "prior", "prediction_mode",
                                                        "foundation_seconds", "features_seconds", "feature_cache")},
        "benchmark_timing": timing,
        "latent_memory": latent_memory(meta, config),
    }
    probes = [kind for kind in args.probes.split(",") if kind]
    if set(probes) - {"train", "predict"}:
        raise SystemExit(f"--probes: train and/or predict, not {args.probes}")
    if probes:
        cost["probes"] = {kind: run_probe(kind, args) for kind in probes}
        print(cost["probes"], flush=True)
    with fold_view(run, tasks, data_dir) as view:
        table = pd.DataFrame(solver_scores(run, view, grid))
    table["cells_per_s"] = table["predicted_cells"] / table["predict_seconds"]
    cost["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    with atomic_path(out / "steps.csv") as tmp:
        table.to_csv(tmp, index=False)
    plot_solver_curves(table, out / "steps.png", xlabel="network evaluations per stage (two stages)")
    write_json(out / "cost.json", cost)
    print(json.dumps(cost, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
