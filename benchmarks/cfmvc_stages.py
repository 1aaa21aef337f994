"""CFM-VC stage by stage on the tests' synthetic data: where the predicted means of the test groups
go wrong (issue 15's end-to-end test). Tiny widths; one thread; about a minute.

For every test (perturbation, context) of a random split, the squared error of the mean (log1p
scale, averaged over genes, then over groups) of:

* ``no change``: the context's visible control cells;
* ``vae: mean`` / ``vae: sample, own library`` / ``vae: sample, drawn library``: the VAE's
  reconstruction of the real test cells, decode(encode(x)), as the NB mean ``log1p(rho * target_sum)``,
  a count sample with each cell's own library, and a count sample with a library drawn as
  generation draws it (the context's log-normal);
* ``decode true z_int``: the test cells' own ``z_int`` decoded with the control cells' ``z_tech``
  (what a perfect flow would give), sampled as generation samples;
* ``flow z``: the flow's end points against the test cells' latents, relative to the distance
  of the control latents (1: no better than not moving);
* ``model (<mode>)``: the full prediction (:func:`pertflow.models.predict.predict_split`) in each
  prediction mode; the mode validation chose is marked.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/cfmvc_stages.py [--vae-steps 150] [--flow-steps 150] [--set model.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pertflow.configs import build, parse_sets
from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.synthetic import make_synthetic
from pertflow.data.view import SplitView
from pertflow.models.cfmvc.config import CFMVCConfig
from pertflow.models.cfmvc.model import CFMVC
from pertflow.models.config import PredictConfig
from pertflow.models.predict import predict_split
from pertflow.models.prior import PREDICTION_MODES
from pertflow.train import TrainConfig

# the end-to-end test's settings (tests/models/test_cfmvc.py)
MODEL = {"n_latent": 8, "hidden": 64, "n_layers": 1, "flow_hidden": 64, "d_context": 16, "vae_lr": 3e-3, "dropout": 0.0,
         "prior": "none"}
TRAIN = {"lr": 3e-3, "batch_size": 32, "val_every": 75, "checkpoint_every": 150, "progress": False}
PREDICT = {"ode_steps": 2, "ode_method": "midpoint"}


def group_error(means: dict, truth: dict) -> float:
    return float(np.mean([np.mean((means[k] - truth[k]) ** 2) for k in truth]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae-steps", type=int, default=150)
    parser.add_argument("--flow-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--effect-scale", type=float, default=0.8, help="make_synthetic's effect_scale (the tests' data: 0.8)")
    parser.add_argument("--effect-genes", type=int, default=12, help="make_synthetic's n_effect_genes (the tests' data: 12)")
    parser.add_argument("--batch-is-context", action="store_true",
                        help="give every cell its cell type as batch (the decoder then reads the cell type)")
    parser.add_argument("--cells", type=int, default=200, help="cells generated per group (the test's predict_split: as many as test cells)")
    parser.add_argument("--truth", choices=["test", "group"], default="group",
                        help="the real mean: the test cells only (5 a group, as the test) or all the group's cells (20)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="SECTION.KEY=VALUE (model, train, predict)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sets = parse_sets(args.sets)
    config = build(CFMVCConfig, {**MODEL, "vae_steps": args.vae_steps, **sets["model"]}, "model")
    train = build(TrainConfig, {**TRAIN, "max_steps": args.flow_steps, "seed": args.seed, **sets["train"]}, "train")
    settings = build(PredictConfig, {**PREDICT, **sets["predict"]}, "predict")

    adata = make_synthetic(n_genes=60, n_singles=6, n_combos=3, cells_per_group=20, controls_per_context=40,
                           n_effect_genes=args.effect_genes, effect_scale=args.effect_scale, seed=1)
    if args.batch_is_context:
        adata.obs["batch"] = adata.obs["cell_type"].astype(str)
    data = PerturbationData.from_anndata(adata, **({"batch_col": "batch"} if args.batch_is_context else {}))
    view = SplitView(data, make_split(data, "random", test_fraction=0.25))
    start = time.perf_counter()
    model = CFMVC.from_view(view, config, settings)
    with tempfile.TemporaryDirectory() as run:
        model.fit(view, train, Path(run))
    seconds = time.perf_counter() - start

    groups = view.test_groups()
    if args.truth == "group":
        everything = view.groups(np.flatnonzero(~data.is_control))
        truth = {k: data.log_expression(everything[k], view.gene_idx).mean(0) for k in groups}
    else:
        truth = {k: data.log_expression(rows, view.gene_idx).mean(0) for k, rows in groups.items()}
    rows = {}
    rows["no change"] = {k: view.expression.get(view.control_rows(k[1])).mean(0) for k in groups}

    module = model.module.eval()
    cov_table = model.covariate_table(view)
    source = data.counts_source(config.counts_layer)
    gen = torch.Generator().manual_seed(0)
    names = ["vae: mean", "vae: sample, own library", "vae: sample, drawn library", "decode true z_int"]
    for name in names:
        rows[name] = {}
    latent_error, latent_base, rest = [], [], []
    with torch.no_grad():
        for key, test_rows in groups.items():
            test_rows = np.random.default_rng(0).choice(test_rows, size=args.cells)  # each real cell decoded several times
            x = torch.from_numpy(data.log_expression(test_rows, view.gene_idx).astype(np.float32))
            cov = torch.from_numpy(cov_table[test_rows])
            post = module.vae.encode(x, cov[:, 0], cov[:, 1])
            rho = module.vae.decode(post.int_mu, post.tech_mu, cov[:, 0])
            rest.append(float(rho[:, -1].mean()))
            raw = source.read_rows(test_rows)
            raw = np.asarray(raw.toarray() if hasattr(raw, "toarray") else raw, dtype=np.float32)
            own_library = torch.from_numpy(raw.sum(1, keepdims=True))  # the synthetic data: all genes are modelled
            ctx = cov[:, 1]
            drawn = (module.library_loc[ctx, None] + module.library_scale[ctx, None] * torch.randn(len(x), 1, generator=gen)).exp()
            rows["vae: mean"][key] = module.vae.to_expression(rho, module.target_sum).numpy().mean(0)
            rows["vae: sample, own library"][key] = module.vae.to_expression(rho, module.target_sum, own_library, gen).numpy().mean(0)
            rows["vae: sample, drawn library"][key] = module.vae.to_expression(rho, module.target_sum, drawn, gen).numpy().mean(0)
            control_rows = np.random.default_rng(1).choice(view.control_rows(key[1]), size=args.cells)
            controls = torch.from_numpy(view.expression.get(control_rows))
            ccov = torch.from_numpy(cov_table[control_rows])
            cpost = module.vae.encode(controls, ccov[:, 0], ccov[:, 1])
            n = len(controls)
            z_true = post.int_mu[torch.randint(len(x), (n,), generator=gen)]
            rho_true = module.vae.decode(z_true, cpost.tech_mu, ccov[:, 0])
            lib = (module.library_loc[ccov[:, 1], None] + module.library_scale[ccov[:, 1], None] * torch.randn(n, 1, generator=gen)).exp()
            rows["decode true z_int"][key] = module.vae.to_expression(rho_true, module.target_sum, lib, gen).numpy().mean(0)
            # the flow's end points in z_int
            ids = model.perturbation_ids(key[0], n)
            context = module.context_encoder(module.multi_hot(ids), ccov[:, 0], ccov[:, 1], module.standardise(None, n, controls.device))
            z_flow = module.integrate(module.flow.start(cpost.int_mu, gen), context, settings)
            latent_error.append(float(((z_flow.mean(0) - post.int_mu.mean(0)) ** 2).sum()))
            latent_base.append(float(((cpost.int_mu.mean(0) - post.int_mu.mean(0)) ** 2).sum()))
    for mode in PREDICTION_MODES:
        chosen = " <- chosen" if mode == model.prediction_mode else ""
        mode_settings = dataclasses.replace(settings, mode=mode)
        rng = np.random.default_rng(2)
        rows[f"model ({mode}){chosen}"] = {
            k: model.generate(view.expression.get(rng.choice(view.control_rows(k[1]), size=args.cells)), k[0], k[1], rng,
                              mode_settings).mean(0) for k in groups}
        pred = predict_split(model, view, settings=mode_settings)
        X = np.asarray(pred.X.toarray() if hasattr(pred.X, "toarray") else pred.X)
        rows[f"predict_split ({mode}){chosen}"] = {
            k: X[((pred.obs["perturbation"] == k[0]) & (pred.obs["cell_type"] == k[1])).to_numpy()].mean(0) for k in groups}

    print(f"vae_steps={config.vae_steps} flow_steps={train.max_steps} fit {seconds:.1f} s; truth: {args.truth} cells; "
          f"{args.cells} cells generated a group (predict_split: as many as test cells); "
          f"validation: {model.fit_report.get('validation', {})}")
    for name, means in rows.items():
        print(f"  {name:34s} MSE of means {group_error(means, truth):.3f}")
    theta = module.vae.theta
    print(f"  decoder: share of the library outside the genes {np.mean(rest):.3f}; theta of the genes median "
          f"{float(theta[:-1].median()):.2f}, of the rest {float(theta[-1]):.3g}")
    print(f"  {'flow z (latent mean error / control)':34s} {np.mean(latent_error) / np.mean(latent_base):.3f}"
          f"  (control latent distance {np.mean(latent_base):.3f})")


if __name__ == "__main__":
    main()
