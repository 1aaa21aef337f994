"""Where a prediction's distance to the real cells comes from: spread and mean shift.

For each prediction file, averaged over the held-out perturbations of the split:

* ``variance_ratio``: summed per-gene variance of the predicted cells over that of the real
  test cells (1 = as spread as the real cells; < 1 collapsed, > 1 too noisy);
* in a 50-component PCA of the split's training cells (as the evaluator's E-distance), the
  shift of each perturbation's mean from the test context's control mean, split into the part
  common to all held-out perturbations and the rest: ``common_error`` is the distance between
  the predicted and real common shifts, ``specific_error`` the mean distance between the
  predicted and real perturbation-specific parts (no change scores the size of the real shifts);
* ``edistance`` in that PCA (all cells, so it can differ slightly from the evaluator's, which
  subsamples large sets), and ``edistance_recentred``: the same after moving each predicted set
  onto the real set's mean, i.e. what is left of the E-distance when the mean shift is right.

    python benchmarks/diagnose_predictions.py --data ../shared/data/norman19_mcfaline23_devel.h5ad \\
        --split ../shared/data/splits/gbm-cellline-transfer__A172.json PRED.h5ad [PRED.h5ad ...]

Prints one tab-separated row per file.
"""

from __future__ import annotations

import argparse
import json

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

from pertflow.eval.metrics import edistance, fit_pca


def dense(a: ad.AnnData) -> np.ndarray:
    return a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the dataset the split was made on")
    parser.add_argument("--split", required=True, help="the split JSON (its test cells are the real ones)")
    parser.add_argument("predictions", nargs="+", help="prediction .h5ad files (pertflow predict)")
    args = parser.parse_args()
    split = json.load(open(args.split))
    data = ad.read_h5ad(args.data)
    transform = split.get("x_transform") or "as_is_log1p"
    if transform == "normalize_total_1e4_log1p":  # counts in X: as the evaluator reads them
        sc.pp.normalize_total(data, target_sum=1e4)
        sc.pp.log1p(data)
    elif transform != "as_is_log1p":
        raise SystemExit(f"unknown x_transform {transform!r} in {args.split}")
    pert_col, control = split["pert_col"], split["control"]
    test = data[data.obs_names.isin(split["test"])]
    controls = test[test.obs[pert_col] == control]
    if split.get("context_col") and split.get("test_context"):
        in_context = data.obs[split["context_col"]] == split["test_context"]
        controls = data[in_context & (data.obs[pert_col] == control)]
    pca = fit_pca(dense(data[data.obs_names.isin(split["train"])]), 50)
    control_mean = pca.transform(dense(controls)).mean(0)
    print("prediction\tvariance_ratio\tcommon_error\tspecific_error\tedistance\tedistance_recentred")
    for path in args.predictions:
        pred = ad.read_h5ad(path)[:, data.var_names]  # the genes in the PCA's order
        real = test
        perturbations = sorted(set(pred.obs[pert_col]) - {control})
        real_sets = [dense(real[real.obs[pert_col] == p]) for p in perturbations]
        pred_sets = [dense(pred[pred.obs[pert_col] == p]) for p in perturbations]
        ratio = np.mean([p.var(0).sum() / r.var(0).sum() for p, r in zip(pred_sets, real_sets)])
        real_pcs = [pca.transform(r) for r in real_sets]
        pred_pcs = [pca.transform(p) for p in pred_sets]
        real_shift = np.array([r.mean(0) - control_mean for r in real_pcs])
        pred_shift = np.array([p.mean(0) - control_mean for p in pred_pcs])
        e = np.mean([edistance(p, r) for p, r in zip(pred_pcs, real_pcs)])
        e_recentred = np.mean([edistance(p - p.mean(0) + r.mean(0), r) for p, r in zip(pred_pcs, real_pcs)])
        common_error = np.linalg.norm(pred_shift.mean(0) - real_shift.mean(0))
        specific = (pred_shift - pred_shift.mean(0)) - (real_shift - real_shift.mean(0))
        specific_error = np.linalg.norm(specific, axis=1).mean()
        print(f"{path}\t{ratio:.2f}\t{common_error:.3f}\t{specific_error:.3f}\t{e:.3f}\t{e_recentred:.3f}")


if __name__ == "__main__":
    main()
