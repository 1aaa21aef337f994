"""Spread of predicted cells against the real ones: for each prediction file, the summed
per-gene variance of the predicted cells over that of the real test cells, per held-out
perturbation, averaged (1 = as spread as the real cells; < 1 collapsed, > 1 too noisy).

    python benchmarks/variance_ratio.py --data ../shared/data/norman19_mcfaline23_devel.h5ad \\
        --split ../shared/data/splits/gbm-cellline-transfer__A172.json PRED.h5ad [PRED.h5ad ...]
"""

from __future__ import annotations

import argparse
import json

import anndata as ad
import numpy as np
import scipy.sparse as sp


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
    test = data[data.obs_names.isin(split["test"])]
    pert_col, control = split["pert_col"], split["control"]
    for path in args.predictions:
        pred = ad.read_h5ad(path)
        real = test[:, pred.var_names]
        perturbations = sorted(set(pred.obs[pert_col]) - {control})
        ratios = [
            dense(pred[pred.obs[pert_col] == p]).var(0).sum() / dense(real[real.obs[pert_col] == p]).var(0).sum()
            for p in perturbations
        ]
        print(f"{path}\t{np.mean(ratios):.2f}")


if __name__ == "__main__":
    main()
