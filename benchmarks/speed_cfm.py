"""Speed and memory of the gene-space flow model's network.

``--scdfm-size`` measures the work of scDFM's reference setting, the same on both sides: d_model
512, 4 layers, 8 heads, dropout 0.1, batch 32, 500 genes per step out of a 5029-gene vocabulary,
velocity MSE + 0.5 MMD, Adam; and one vector-field evaluation over 128 cells x 500 genes without
gradients. It writes ``{"train_s_per_step", "eval_s_128_cells", "peak_rss_gib", "params"}``
(medians of ``--repeats`` steps after 2 warm-ups; the peak resident memory of the process).

Without it, the model section of ``benchmarks/configs/cfm-cpu.yaml`` is measured on 500 and
2000 genes (training steps/s, and generated cells/s with the config's solver and gene chunks).

``--backbone dense|latent`` overrides the backbone (default: the config's); ``--profile FILE``
writes torch-profiler tables of one training step and one evaluation. Inputs are random
log1p-like tensors: speed does not depend on the values.

    python benchmarks/speed_cfm.py --scdfm-size --out benchmarks/results/speed/cfm_scdfm_size.json
    python benchmarks/speed_cfm.py --scdfm-size --backbone dense --repeats 3 --out ...
    python benchmarks/speed_cfm.py --out benchmarks/results/speed/cfm_cpu_config.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from pertflow.configs import build
from pertflow.models.cfm.config import CFMConfig
from pertflow.models.cfm.module import CFMModule
from pertflow.models.config import PredictConfig
from pertflow.models.flow import flow_matching

REPO = Path(__file__).resolve().parents[1]
SCDFM = {"d_model": 512, "n_layers": 4, "n_heads": 8, "dropout": 0.1, "genes_per_step": 500, "gamma": 0.5}
SCDFM_BATCH, SCDFM_VOCAB, SCDFM_EVAL_CELLS = 32, 5029, 128


def make_module(config: CFMConfig, n_genes: int, device: torch.device) -> CFMModule:
    torch.manual_seed(0)
    return CFMModule(config, flow_matching(config), torch.arange(2, n_genes + 2), n_tokens=n_genes + 2,
                     first_other_token=n_genes + 2, pad_id=0, unk_id=1).to(device)


def batch(b: int, n_genes: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    expr = lambda: torch.log1p(torch.poisson(torch.rand(b, n_genes, generator=g) * 3, generator=g))  # noqa: E731
    return {"target": expr().to(device), "control": expr().to(device), "pert_ids": torch.randint(2, n_genes + 2, (b, 2), generator=g).to(device)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def training_step(module: CFMModule, data: dict, device: torch.device, bf16: bool):
    opt = torch.optim.Adam(module.parameters(), lr=1e-4)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with amp:
            loss = module.loss(data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)

    return step


def one_evaluation(module: CFMModule, cells: int, n_genes: int, device: torch.device, bf16: bool):
    """One vector-field call over ``cells`` x ``n_genes`` without gradients (the field's context
    included: it is what one ODE step costs when nothing is cached)."""
    data = batch(cells, n_genes, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    idx = torch.arange(n_genes, device=device)
    t = torch.full((cells,), 0.5, device=device)

    def call() -> None:
        with torch.no_grad(), amp:
            module.velocity(t, data["target"], module.context(data["control"], data["pert_ids"], idx))
        sync(device)

    return call


def timed(fn, repeats: int, warmups: int = 2) -> list[float]:
    for _ in range(warmups):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def profile_table(fn, title: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        fn()
    return f"## {title}\n\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25) + "\n"


def scdfm_size(args: argparse.Namespace, device: torch.device) -> dict:
    overrides = {**SCDFM, **({"backbone": args.backbone} if args.backbone else {})}
    config = build(CFMConfig, overrides)
    module = make_module(config, SCDFM_VOCAB, device).train()
    data = batch(SCDFM_BATCH, SCDFM_VOCAB, device)
    step = training_step(module, data, device, args.bf16)
    train = timed(step, args.repeats)
    module.eval()
    call = one_evaluation(module, SCDFM_EVAL_CELLS, config.genes_per_step, device, args.bf16)
    evals = timed(call, args.repeats)
    if args.profile:
        module.train()
        text = profile_table(step, f"one training step ({config.backbone} backbone)")
        module.eval()
        text += profile_table(call, f"one evaluation, {SCDFM_EVAL_CELLS} cells x {config.genes_per_step} genes")
        Path(args.profile).parent.mkdir(parents=True, exist_ok=True)
        Path(args.profile).write_text(text)
    return {
        "train_s_per_step": statistics.median(train),
        "eval_s_128_cells": statistics.median(evals),
        "peak_rss_gib": peak_rss_gib(),
        "params": sum(p.numel() for p in module.parameters()),
        "backbone": config.backbone,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k in (*SCDFM, "backbone", "n_latents", "d_token")},
        "token_width": config.token_width,
        "batch_size": SCDFM_BATCH,
        "vocabulary": SCDFM_VOCAB,
        "train_steps_s": train,
        "eval_calls_s": evals,
    }


def cpu_config(args: argparse.Namespace, device: torch.device) -> dict:
    cpu = yaml.safe_load((REPO / "benchmarks/configs/cfm-cpu.yaml").read_text())
    model = {**cpu["model"], **({"backbone": args.backbone} if args.backbone else {})}
    config, settings = build(CFMConfig, model), build(PredictConfig, cpu["predict"])
    cases = {}
    for n_genes in (500, 2000):
        module = make_module(config, n_genes, device).train()
        step = training_step(module, batch(cpu["train"]["batch_size"], n_genes, device), device, args.bf16)
        train = timed(step, args.repeats)
        module.eval()
        data = batch(args.cells, n_genes, device)

        def sample(module=module, data=data) -> None:
            module.sample(data["control"], data["pert_ids"], settings, torch.Generator().manual_seed(0))
            sync(device)

        sampled = timed(sample, max(1, args.repeats // 2), warmups=1)
        cases[f"{n_genes}-genes"] = {
            "steps_per_s": 1 / statistics.median(train),
            "cells_per_s": args.cells / statistics.median(sampled),
            "params": sum(p.numel() for p in module.parameters()),
        }
    return {"config": dataclasses.asdict(config), "predict": dataclasses.asdict(settings),
            "batch_size": cpu["train"]["batch_size"], "cases": cases, "peak_rss_gib": peak_rss_gib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--scdfm-size", action="store_true", help="the work of scDFM's reference setting (see above)")
    p.add_argument("--backbone", choices=("dense", "latent"), help="override the backbone")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions after 2 warm-ups (median reported)")
    p.add_argument("--cells", type=int, default=128, help="cells sampled per timing at the CPU config")
    p.add_argument("--profile", help="write torch-profiler tables of a training step and an evaluation here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    result = scdfm_size(args, device) if args.scdfm_size else cpu_config(args, device)
    result["machine"] = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "bf16": args.bf16,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_s")}, indent=1))


if __name__ == "__main__":
    main()
