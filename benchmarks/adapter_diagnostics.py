"""Why the gbm adapter does not help: K562 vs a glioblastoma line's control cells, and the learnt shift.

Reads the dataset and a committed adapter (`benchmarks/results/adapter/adapters/<line>/shift.csv`)
and prints, on the adapter's genes: the correlation of the shift with (K562 mean - line mean), the
mean |shift| against the mean |difference of the means|, the per-gene means' distance to K562's
before and after shifting (clipped at 0, as the model reads them), the share of zeros and the
per-gene s.d. of each. Writes them as JSON.

    python benchmarks/adapter_diagnostics.py --data-dir ../shared/data --line A172 \
        --out benchmarks/results/adapter/diagnostics_A172.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from pertflow.data.tasks import resolve_data_dir
from pertflow.io import write_json

DATASET = "norman19_mcfaline23_devel.h5ad"
RESULTS = Path(__file__).parent / "results" / "adapter" / "adapters"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--line", default="A172")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    adata = ad.read_h5ad(resolve_data_dir(args.data_dir) / DATASET)
    shift = pd.read_csv(RESULTS / args.line / "shift.csv", index_col=0).iloc[:, 0]
    genes = pd.Index(adata.var_names).get_indexer(shift.index)
    control = (adata.obs["perturbation"].astype(str) == "control").to_numpy()
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    k562 = x[control & (adata.obs["cell_type"] == "k562").to_numpy()][:, genes]
    line = x[control & (adata.obs["cell_type"] == args.line).to_numpy()][:, genes]
    s = shift.to_numpy()
    shifted = np.clip(line + s, 0, None)
    diff = k562.mean(0) - line.mean(0)
    report = {
        "line": args.line,
        "corr_shift_vs_mean_difference": float(np.corrcoef(s, diff)[0, 1]),
        "mean_abs_shift": float(np.abs(s).mean()),
        "mean_abs_mean_difference": float(np.abs(diff).mean()),
        "mean_abs_distance_to_k562_means_before": float(np.abs(line.mean(0) - k562.mean(0)).mean()),
        "mean_abs_distance_to_k562_means_after": float(np.abs(shifted.mean(0) - k562.mean(0)).mean()),
        "zero_share": {"k562": float((k562 == 0).mean()), args.line: float((line == 0).mean()), "shifted": float((shifted == 0).mean())},
        "mean_per_gene_sd": {"k562": float(k562.std(0).mean()), args.line: float(line.std(0).mean())},
    }
    write_json(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
