"""Training and sampling speed of the gene-space flow model (issue: CFM backbone, "Measure").

Measures training steps/s (loss + backward + Adam step) and predicted cells/s (ODE sampling from
noise) at two sizes:

* ``spec-default``: SPEC 2.1's defaults, B 48, 1000 of 5000 genes per step, d 128, 4 layers,
  8 heads, RK4 with 20 steps over all 5000 genes at inference (on a CPU a full RK4 x 20 sample
  takes many minutes per cell: ``--default-ode-steps 1`` times one RK4 step, and the JSON then
  reports that measurement and the rate it implies for 20 steps);
* ``cpu-benchmark``: the model section of ``benchmarks/configs/cfm-cpu.yaml`` on 500 genes
  (the Norman and glioblastoma tasks) and on 2000 genes (the Kang task).

Inputs are random log1p-like tensors: speed does not depend on the values. Writes a JSON file.

    python benchmarks/speed_cfm.py --out benchmarks/results/cfm_speed_cpu.json
    python benchmarks/speed_cfm.py --device cuda --bf16 --out benchmarks/results/cfm_speed_gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from pertflow.configs import build
from pertflow.models.cfm.config import CFMConfig
from pertflow.models.cfm.module import CFMModule
from pertflow.models.config import PredictConfig
from pertflow.models.flow import flow_parts

REPO = Path(__file__).resolve().parents[1]


def make_module(config: CFMConfig, n_genes: int, device: torch.device) -> CFMModule:
    torch.manual_seed(0)
    return CFMModule(config, flow_parts(config), torch.arange(2, n_genes + 2), n_tokens=n_genes + 2, first_other_token=n_genes + 2,
                     pad_id=0, unk_id=1).to(device)


def batch(b: int, n_genes: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    expr = lambda: torch.log1p(torch.poisson(torch.rand(b, n_genes, generator=g) * 3, generator=g))  # noqa: E731
    return {"target": expr().to(device), "control": expr().to(device), "pert_ids": torch.randint(2, n_genes + 2, (b, 2), generator=g).to(device)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training(module: CFMModule, b: int, n_genes: int, device: torch.device, bf16: bool, budget_s: float) -> dict:
    opt = torch.optim.Adam(module.parameters(), lr=1e-4)
    data = batch(b, n_genes, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with amp:
            loss = module.loss(data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)

    for _ in range(2):  # warm-up: kernels, allocators
        step()
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < budget_s:
        step()
        steps += 1
    elapsed = time.perf_counter() - start
    return {"steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed}


def time_sampling(module: CFMModule, settings: PredictConfig, cells: int, n_genes: int, device: torch.device, bf16: bool,
                  ode_steps: int | None = None) -> dict:
    data = batch(cells, n_genes, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    module.eval()
    measured = settings if ode_steps is None else PredictConfig(**{**settings.__dict__, "ode_steps": ode_steps})
    with amp:
        module.sample(data["control"][:2], data["pert_ids"][:2], measured, torch.Generator().manual_seed(0))  # warm-up
        sync(device)
        start = time.perf_counter()
        module.sample(data["control"], data["pert_ids"], measured, torch.Generator().manual_seed(0))
        sync(device)
    elapsed = time.perf_counter() - start
    out = {"cells": cells, "seconds": elapsed, "ode_steps_measured": measured.ode_steps, "cells_per_s": cells / elapsed}
    if measured.ode_steps != settings.ode_steps:
        out["cells_per_s_at_configured_steps"] = cells / elapsed * measured.ode_steps / settings.ode_steps
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--train-seconds", type=float, default=60.0, help="time budget of each training measurement")
    p.add_argument("--sample-cells-default", type=int, default=4, help="cells sampled at the SPEC default size")
    p.add_argument("--sample-cells-cpu", type=int, default=64, help="cells sampled at the CPU benchmark size")
    p.add_argument("--default-ode-steps", type=int, default=None, help="RK4 steps timed at the SPEC default size (default: all 20)")
    args = p.parse_args()
    device = torch.device(args.device)
    cpu = yaml.safe_load((REPO / "benchmarks/configs/cfm-cpu.yaml").read_text())
    cpu_model, cpu_predict = build(CFMConfig, cpu["model"]), build(PredictConfig, cpu["predict"])
    cpu_batch = cpu["train"]["batch_size"]
    cases = [
        ("spec-default", CFMConfig(), PredictConfig(), 48, 5000, args.sample_cells_default, args.default_ode_steps),
        ("cpu-benchmark-500-genes", cpu_model, cpu_predict, cpu_batch, 500, args.sample_cells_cpu, None),
        ("cpu-benchmark-2000-genes", cpu_model, cpu_predict, cpu_batch, 2000, args.sample_cells_cpu, None),
    ]
    results = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "bf16": args.bf16,
        "cases": {},
    }
    for name, config, settings, b, n_genes, cells, ode_steps in cases:
        module = make_module(config, n_genes, device)
        entry = {
            "batch_size": b,
            "genes": n_genes,
            "genes_per_step": min(config.genes_per_step, n_genes),
            "d_model": config.d_model,
            "n_layers": config.n_layers,
            "ode": f"{settings.ode_method} x {settings.ode_steps}",
            "inference_gene_chunk": settings.gene_chunk,
            "parameters": sum(p.numel() for p in module.parameters()),
        }
        print(f"{name}: training ...", flush=True)
        entry["training"] = time_training(module, b, n_genes, device, args.bf16, args.train_seconds)
        print(f"{name}: sampling {cells} cells ...", flush=True)
        entry["sampling"] = time_sampling(module, settings, cells, n_genes, device, args.bf16, ode_steps)
        results["cases"][name] = entry
        print(json.dumps(entry, indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
