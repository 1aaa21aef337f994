"""Where a prediction's distance to the real cells comes from: spread and mean shift.

For each prediction file, averaged over the held-out perturbations of the split:

* ``variance_ratio``: summed per-gene variance of the predicted cells over that of the real
  test cells (1 = as spread as the real cells; < 1 collapsed, > 1 too noisy);
* in the evaluator's PCA of the split's training cells, the shift of each perturbation's mean
  from the mean of the test context's visible control cells, split into the part
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

import anndata as ad
import numpy as np
import scipy.sparse as sp

from pertflow.api import EvalConfig, evaluation_inputs
from pertflow.eval.evaluator import context_labels
from pertflow.eval.metrics import edistance, fit_pca


def dense(a: ad.AnnData) -> np.ndarray:
    return a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the dataset the split was made on")
    parser.add_argument("--split", required=True, help="the split JSON (its test cells are the real ones)")
    parser.add_argument("predictions", nargs="+", help="prediction .h5ad files (pertflow predict)")
    args = parser.parse_args()
    inputs = evaluation_inputs(args.data, args.split)  # the real side exactly as the evaluator reads it
    pert_col, control = inputs.pert_col, inputs.control
    real = inputs.real
    if len(set(context_labels(real, inputs.context_col))) > 1:
        raise SystemExit(f"{args.split} tests several contexts; this script reads one at a time")
    cfg = EvalConfig()
    pca = fit_pca(inputs.train.X, cfg.n_pcs, max_cells=cfg.max_pca_cells, seed=cfg.seed)
    control_mean = pca.transform(dense(real[real.obs[pert_col] == control])).mean(0)
    print("prediction\tvariance_ratio\tcommon_error\tspecific_error\tedistance\tedistance_recentred")
    for path in args.predictions:
        pred = ad.read_h5ad(path)[:, real.var_names]  # the genes in the PCA's order
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
