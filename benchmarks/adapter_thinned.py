"""The adapter on a technical shift with a known answer: kang thinned to a lower depth and normalised another way.

Issue 29's test case, made from public data: the kang counts (``counts_reconstructed``) are
thinned binomially to ``--keep`` of their depth and normalised to 10,000 per cell (the file's
expression is normalised to 1,832.5), so the "new lab's" cells differ from the training cells in
depth, dropout and scale, with the same biology. A model trained on the original file predicts
the thinned file's held-out cell type (a kang context-transfer fold):

* ``no adapter``: the model reads the thinned controls as they are;
* ``<transport>``: an adapter learnt on the two files' control cells only (``pertflow adapt
  --transport``) maps the thinned controls onto the original scale, and the predicted change is
  carried back onto the thinned cells (``--shift-back``); a transport the model refuses (a shift,
  for a model that centres its controls) is left out; ``quantile per context`` fits one map per
  cell type (``--per-context``) on that cell type's controls of both files;
* ``trained on the shifted data``: the same model trained on the thinned file itself (the
  reference an adapter should approach).

Every prediction is scored against the thinned file's real test cells (top-20 DE Pearson delta,
E-distance in the evaluator's PCA). ``gap recovered`` = (adapted - no adapter) / (reference - no
adapter), per metric, where the reference is better than no adapter; where it is not (the
unadapted prediction already scores as well as a model trained on the shifted data) there is no
gap to recover, and the table says whether the adapted prediction stays at least as good as the
reference (``no gap, kept``) or falls below it (``no gap, lost``). Writes ``results.csv`` and
``summary.md`` to ``--out``; the thinned file and the runs go to ``--work`` (never committed).

    python benchmarks/adapter_thinned.py --data-dir ../shared/data --fold CD4T \\
        --out benchmarks/results/adapter/thinned --work /tmp/thinned
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertflow import api
from pertflow.benchmark import write_manifest
from pertflow.errors import InputError
from pertflow.eval import metric_direction
from pertflow.io import write_text
from pertflow.runtime import available_cores, set_threads

KANG = "kang18_pbmc_ifnb.h5ad"
COUNTS = "counts_reconstructed"
TRANSPORTS = ("shift", "affine", "quantile")
#: transports also fitted once per cell type (``pertflow adapt --per-context``)
PER_CONTEXT = ("quantile",)
METRICS = {"pearson_delta_top20_de": "top-20 DE Pearson delta", "edistance_pca": "E-distance"}


def thinned_copy(source: Path, out: Path, keep: float, target_sum: float, seed: int) -> Path:
    """The file with its counts thinned binomially to ``keep`` and log1p-normalised to ``target_sum``."""
    adata = ad.read_h5ad(source)
    counts = sp.csr_matrix(adata.layers[COUNTS]).astype(np.float64)
    counts.data = np.rint(counts.data)
    rng = np.random.default_rng(seed)
    thinned = counts.copy()
    thinned.data = rng.binomial(thinned.data.astype(np.int64), keep).astype(np.float64)
    thinned.eliminate_zeros()
    depth = np.asarray(thinned.sum(1)).ravel()
    if (depth == 0).any():
        raise SystemExit(f"{int((depth == 0).sum())} cells lose every count at keep={keep}: choose a larger --keep")
    normalised = sp.diags(target_sum / depth) @ thinned
    normalised.data = np.log1p(normalised.data)
    shifted = ad.AnnData(normalised.astype(np.float32).tocsr(), obs=adata.obs.copy(), var=adata.var.copy())
    shifted.layers[COUNTS] = thinned.astype(np.float32).tocsr()
    shifted.uns["log1p"] = {"base": None}
    shifted.uns["thinning"] = {"keep": keep, "target_sum": target_sum, "seed": seed, "source": source.name}
    out.parent.mkdir(parents=True, exist_ok=True)
    shifted.write_h5ad(out)
    return out


def scores(data: Path, split: Path, pred: ad.AnnData) -> dict[str, float]:
    result = api.evaluate_split(data, split, pred, baselines=False, config=api.EvalConfig(cell_eval_profile="anndata"))
    return {m: float(result.aggregate.loc["mean", m]) for m in METRICS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--fold", default="CD4T", help="the kang cell type held out (a reference split of kang-celltype-transfer)")
    p.add_argument("--model", default="latent-shift", help="a model with a CPU config")
    p.add_argument("--keep", type=float, default=0.3, help="share of the counts kept by the thinning")
    p.add_argument("--target-sum", type=float, default=1e4, help="the thinned file's normalisation total")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="change a setting of the model's CPU config for both trainings, e.g. model.center=false")
    p.add_argument("--predict-set", action="append", default=[], metavar="predict.KEY=VALUE",
                   help="a prediction setting for every prediction, e.g. predict.mode=flow (the model's own cells, "
                        "which an adapter changes, where validation chose its prior's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    args = p.parse_args()
    set_threads(args.threads)
    start = time.perf_counter()
    data_dir, out, work = Path(args.data_dir), Path(args.out), Path(args.work)
    original = data_dir / KANG
    split = data_dir / "splits" / f"kang-celltype-transfer__{args.fold}.json"
    shifted = work / f"kang_thinned_{args.keep:g}.h5ad"  # shared by the models
    if not shifted.is_file():
        thinned_copy(original, shifted, args.keep, args.target_sum, args.seed)
    runs = {}
    for name, data in (("original", original), ("shifted", shifted)):
        run = work / f"{args.model}{'_'.join([''] + [x.replace('=', '-') for x in args.set])}_{name}"
        if not (run / "model.json").is_file():
            api.train(args.model, data, split, run, config="cpu", sets=args.set, overwrite=True)
        runs[name] = run
    sets = args.predict_set or None
    rows = [{"prediction": "no adapter", **scores(shifted, split, api.predict(runs["original"], shifted, split, seed=0, sets=sets))}]
    for transport, per_context in [(t, False) for t in TRANSPORTS] + [(t, True) for t in PER_CONTEXT]:
        name = transport + (" per context" if per_context else "")
        folder = work / f"adapter_{args.model}_{name.replace(' ', '_')}"
        try:
            adapter = api.adapt(runs["original"], original, shifted, folder, transport=transport, overwrite=True,
                                settings={"per_context": per_context})
        except InputError as err:  # a shift cannot reach a model that centres its controls
            print(f"adapter {name}: {err}", flush=True)
            continue
        pred = api.predict(runs["original"], shifted, split, seed=0, adapter=adapter, shift_back=True, sets=sets)
        rows.append({"prediction": f"adapter: {name}", "mmd_before": adapter.mmd_before, "mmd_after": adapter.mmd_after,
                     **scores(shifted, split, pred)})
    rows.append({"prediction": "trained on the shifted data",
                 **scores(shifted, split, api.predict(runs["shifted"], shifted, split, seed=0, sets=sets))})
    table = pd.DataFrame(rows)
    none, ref = table.iloc[0], table.iloc[-1]
    for metric in METRICS:
        better = 1.0 if metric_direction(metric) == "higher" else -1.0
        gap = better * (ref[metric] - none[metric])
        table[f"gap_recovered_{metric}"] = better * (table[metric] - none[metric]) / gap if gap > 1e-9 else np.nan
        table[f"no_gap_kept_{metric}"] = (better * (table[metric] - ref[metric]) >= 0) if gap <= 1e-9 else np.nan
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False, float_format="%.4f")
    command = ("python benchmarks/adapter_thinned.py --data-dir ../shared/data "
               f"--fold {args.fold} --model {args.model} {''.join(f'--set {x} ' for x in args.set)}"
               f"{''.join(f'--predict-set {x} ' for x in args.predict_set)}--keep {args.keep:g} "
               f"--target-sum {args.target_sum:g} --seed {args.seed} --out {args.out} --work WORK")
    lines = [f"# The adapter on kang thinned to {args.keep:g} of its depth, normalised to {args.target_sum:g}",
             "", f"Model `{args.model}` (CPU config{', ' + ', '.join(args.set) if args.set else ''}), kang fold {args.fold} "
             "(held-out cell type). Made with", "",
             f"```bash\n{command}\n```", "",
             "| prediction | top-20 DE Pearson Δ ↑ | E-distance ↓ | gap recovered (top-20 / E) | held-out MMD before → after |",
             "|---|---|---|---|---|"]
    for _, row in table.iterrows():
        mmd = f"{row['mmd_before']:.4f} → {row['mmd_after']:.4f}" if pd.notna(row.get("mmd_before")) else ""
        gap = (" / ".join(recovered_text(row, metric) for metric in METRICS)
               if row["prediction"] not in ("no adapter", "trained on the shifted data") else "")
        lines.append(f"| {row['prediction']} | {row['pearson_delta_top20_de']:.3f} | {row['edistance_pca']:.3f} | {gap} | {mmd} |")
    lines += ["", f"{time.perf_counter() - start:.0f} s on this machine."]
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    write_manifest(out, [args.model], None, "cpu", time.perf_counter() - start, args.threads or available_cores(),
                   command)
    print("\n".join(lines))


def recovered_text(row: pd.Series, metric: str) -> str:
    """The gap recovered on ``metric`` as the summary prints it (see the module docstring)."""
    if pd.notna(row[f"gap_recovered_{metric}"]):
        return f"{row[f'gap_recovered_{metric}']:.0%}"
    return "no gap, kept" if row[f"no_gap_kept_{metric}"] else "no gap, lost"


if __name__ == "__main__":
    main()
