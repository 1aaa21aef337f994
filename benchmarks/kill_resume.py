"""kill -9 at random moments of `pertflow train` on a real dataset, then `--resume`: the weights
must be those of the uninterrupted run (issue 30).

Trains the shipped `cfm` CPU config, shortened, on one kang fold three ways: uninterrupted; and
killed with SIGKILL at a random training step, inside a random checkpoint write, or inside a
validation (``PERTFLOW_CRASH_AT``, :mod:`pertflow.faults`), each resumed with ``--resume`` (resumed
again if killed again: the kills are drawn before each attempt). Writes which points were hit
and whether every tensor of the resumed run equals the uninterrupted one's, bit for bit.

    python benchmarks/kill_resume.py --data-dir ../shared/data --out benchmarks/results/faults/kill_resume.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from pertflow.io import write_text
from pertflow.models.base import PerturbationModel

STEPS = 40
SETS = [f"train.max_steps={STEPS}", "train.checkpoint_every=10", "train.val_every=10", "train.progress=false"]


def pertflow(args: list[str], crash: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "PERTFLOW_CRASH_AT"}
    if crash:
        env["PERTFLOW_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "pertflow.cli", *args], env=env, capture_output=True, text=True).returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--fold", default="NK")
    p.add_argument("--seed", type=int, default=0, help="draws the kill points")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    data = Path(args.data_dir) / "kang18_pbmc_ifnb.h5ad"
    work = Path(tempfile.mkdtemp(prefix="pertflow-kill-"))
    split = work / "split.json"
    assert pertflow(["split", "--task", "kang-celltype-transfer", "--fold", args.fold, "--data-dir", args.data_dir,
                     "--out", str(split)]) == 0
    train = ["train", "--model", "cfm", "--config", "cpu", "--data", str(data), "--split", str(split), "--threads", "1",
             *[a for s in SETS for a in ("--set", s)]]
    assert pertflow([*train, "--out", str(work / "unbroken")]) == 0
    reference = PerturbationModel.load(work / "unbroken").state_tensors()
    rows = []
    for point in ("train-step", "checkpoint-write", "validation"):
        run = work / point
        limit = {"train-step": STEPS, "checkpoint-write": STEPS // 10, "validation": STEPS // 10}[point]
        kills, code = [], None
        first = True
        while code != 0:
            n = int(rng.integers(1, limit + 1))
            crash = f"{point}:{n}" if len(kills) < 2 else None  # at most two kills a run, then let it finish
            code = pertflow([*train, "--out", str(run)] if first else ["train", "--resume", "--out", str(run), "--threads", "1"],
                            crash)
            first = False
            if code == -signal.SIGKILL:
                kills.append(crash)
            elif code != 0:
                raise SystemExit(f"{point}: pertflow exited {code}")
        resumed = PerturbationModel.load(run).state_tensors()
        equal = all(torch.equal(resumed[k], v) for k, v in reference.items()) and resumed.keys() == reference.keys()
        rows.append({"point": point, "kills": kills, "weights_equal_uninterrupted": equal})
        print(rows[-1], flush=True)
    write_text(args.out, json.dumps({"dataset": data.name, "fold": args.fold, "steps": STEPS, "config": "cfm-cpu.yaml",
                                     "sets": SETS, "threads": 1, "runs": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
