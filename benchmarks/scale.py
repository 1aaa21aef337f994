"""Out-of-core training at scale: peak memory and step rate, backed (streaming) vs in memory.

Writes a synthetic sparse counts dataset of ``--cells`` cells x ``--genes`` genes to disk in
chunks (hundreds of perturbations in two cell lines, about 90% zeros, cells in random order),
trains the ``cfm`` CPU configuration on it out of core (``backed``: every batch streams from
the file) for ``--steps`` steps, then the same on a subset of ``--in-memory-cells`` cells read
into memory, and writes

    {"cells", "genes", "file_gib",
     "backed": {"peak_rss_gib", "steps_per_s", ...},
     "in_memory": {"cells", "peak_rss_gib", "steps_per_s", ...}}

Each training runs in its own process, so that its peak resident memory (``ru_maxrss``) is its
own: everything the run holds, Python, torch and scanpy included. ``steps_per_s`` is the
training loop's rate (validation excluded); ``setup_s`` is the time before it (reading the file's
metadata, checking its values, the row index, the prior's pass over the training cells).

    python benchmarks/scale.py --cells 2000000 --genes 2000 --steps 300 \
        --workdir /tmp/pertflow-scale --out benchmarks/results/scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from pertflow.io import write_json

CONFIG = Path(__file__).resolve().parent / "configs" / "cfm-cpu.yaml"
SPEC = {"pert_col": "perturbation", "control": "control", "context_cols": ["cell_line"], "is_counts": True}
CONTEXTS = ("line_A", "line_B")


def write_dataset(path: Path, n_cells: int, n_genes: int, n_perturbations: int, seed: int = 0,
                  chunk: int = 4000) -> None:
    """A synthetic counts ``.h5ad`` (CSR on disk), written ``chunk`` cells at a time.

    Counts are Poisson around a per-gene mean (about 90% zeros), scaled per cell (library size),
    per cell line, and for a perturbed cell by its perturbation's effect on 20 genes. Every
    perturbation is a gene of the file; 10% of the cells are controls; cells are in random order.
    """
    rng = np.random.default_rng(seed)
    genes = [f"G{i:05d}" for i in range(n_genes)]
    perturbations = np.array(["control", *genes[:n_perturbations]], dtype=object)
    base = rng.lognormal(mean=np.log(0.06), sigma=1.0, size=n_genes)  # mean counts: ~90% zeros
    line_factor = rng.lognormal(0.0, 0.3, size=(len(CONTEXTS), n_genes))
    effect = np.ones((len(perturbations), n_genes))
    for p in range(1, len(perturbations)):
        targets = rng.choice(n_genes, size=20, replace=False)
        effect[p, targets] = rng.lognormal(0.0, 1.0, size=20)
        effect[p, p - 1] = 0.1  # the knocked-down gene itself
    label = np.where(rng.random(n_cells) < 0.1, 0, rng.integers(1, len(perturbations), size=n_cells))
    line = rng.integers(0, len(CONTEXTS), size=n_cells)
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(perturbations[label].astype(str)),
         "cell_line": pd.Categorical(np.array(CONTEXTS)[line])},
        index=pd.Index([f"c{i:08d}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(index=pd.Index(genes))
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", var)
        for name in ("uns", "obsm", "varm", "obsp", "varp", "layers"):
            ad.io.write_elem(f, name, {})
        X = f.create_group("X")
        X.attrs["encoding-type"], X.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        X.attrs["shape"] = (n_cells, n_genes)
        data = X.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 16,))
        indices = X.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 16,))
        indptr = X.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        stored = 0
        for start in range(0, n_cells, chunk):
            stop = min(n_cells, start + chunk)
            size = rng.lognormal(0.0, 0.3, size=(stop - start, 1))
            lam = size * base * line_factor[line[start:stop]] * effect[label[start:stop]]
            counts = rng.poisson(lam).astype(np.float32)
            rows, cols = np.nonzero(counts)
            n = len(rows)
            data.resize((stored + n,))
            indices.resize((stored + n,))
            data[stored:] = counts[rows, cols]
            indices[stored:] = cols.astype(np.int32)
            indptr[start + 1 : stop + 1] = stored + np.cumsum(np.bincount(rows, minlength=stop - start))
            stored += n


def make_split(data_path: Path, out: Path) -> None:
    """A random split (10% of each perturbation's cells held out, 10% of the rest for validation)."""
    from pertflow.data.dataset import PerturbationData
    from pertflow.data.splits import make_split as split_data

    with PerturbationData.read(data_path, backed=True, validate=False, **SPEC) as data:
        split_data(data, "random", test_fraction=0.1).save(out)


def train_worker(data_path: Path, split_path: Path, run_dir: Path, steps: int, backed: bool, config: Path) -> dict:
    """Train cfm for ``steps`` steps; its rate, setup time and this process's peak memory."""
    from pertflow import api

    started = time.perf_counter()
    sets = [f"train.max_steps={steps}", "train.progress=false", f"train.checkpoint_every={steps}",
            f"train.val_every={steps}", "train.val_batches=2"]
    model = api.train("cfm", str(data_path), str(split_path), run_dir, config=config, sets=sets, overwrite=True,
                      backed=backed, **SPEC)
    total = time.perf_counter() - started
    rate = model.fit_report["steps_per_s"]
    return {
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        "steps_per_s": rate,
        "steps": steps,
        "setup_s": total - steps / rate,
        "total_s": total,
    }


def run_worker(data_path: Path, split_path: Path, run_dir: Path, steps: int, backed: bool, config: Path) -> dict:
    """:func:`train_worker` in a fresh process (its peak memory is its own)."""
    cmd = [sys.executable, __file__, "--worker", "--data", str(data_path), "--split", str(split_path),
           "--run", str(run_dir), "--steps", str(steps), "--config", str(config), *(["--backed"] if backed else [])]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=2_000_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--perturbations", type=int, default=300)
    p.add_argument("--in-memory-cells", type=int, default=100_000, help="cells of the in-memory comparison (a subset that fits)")
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--workdir", type=Path, default=Path("pertflow-scale"), help="where the data and runs are written")
    p.add_argument("--keep", action="store_true", help="keep the data files (default: removed at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    # the worker: one training in this process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--split", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--backed", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(train_worker(args.data, args.split, args.run, args.steps, args.backed, args.config)))
        return 0
    if args.out is None:
        p.error("--out is required")
    work = args.workdir
    big, small = work / "scale.h5ad", work / "scale_in_memory.h5ad"
    t0 = time.perf_counter()
    write_dataset(big, args.cells, args.genes, args.perturbations, args.seed)
    write_seconds = time.perf_counter() - t0
    in_memory_cells = min(args.cells, args.in_memory_cells)
    write_dataset(small, in_memory_cells, args.genes, args.perturbations, args.seed)
    for path in (big, small):
        make_split(path, path.with_suffix(".split.json"))
    with h5py.File(big, "r") as f:
        nnz = int(f["X"]["indptr"][-1])
    result = {
        "cells": args.cells,
        "genes": args.genes,
        "perturbations": args.perturbations,
        "zeros": 1 - nnz / (args.cells * args.genes),
        "file_gib": big.stat().st_size / 2**30,
        "write_s": write_seconds,
        "config": str(args.config),
        "backed": run_worker(big, big.with_suffix(".split.json"), work / "run_backed", args.steps, True, args.config),
        "in_memory": {"cells": in_memory_cells,
                      **run_worker(small, small.with_suffix(".split.json"), work / "run_in_memory", args.steps, False, args.config)},
        "command": "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    result["backed_rate_vs_in_memory"] = result["backed"]["steps_per_s"] / result["in_memory"]["steps_per_s"]
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
