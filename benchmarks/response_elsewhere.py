"""What another part of a dataset says about a perturbation a task never measured (issue 28).

norman-unseen-single holds out MAP2K6 in K562, and MAP2K6 is not among the 500 measured genes,
so no descriptor built from the task's cells can know it. The same file also holds MAP2K6
knock-downs in three glioblastoma lines (another assay and cell type, outside the task). This
asks whether those say that MAP2K6 acts like its paralog MAP2K3: per context, each
perturbation's mean response (its cells' mean minus the context's controls' mean), averaged over
the contexts; the responses centred across perturbations (so that what all of them share drops
out); then the Pearson correlation of the target's centred response with each other one's::

    python benchmarks/response_elsewhere.py norman19_mcfaline23_devel.h5ad MAP2K6 \\
        --contexts A172,T98G,U87MG --out benchmarks/results/descriptors/map2k6_in_gbm.csv

(the file is read from ``../shared/data`` beside the repository, or ``$PERTFLOW_DATA``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from pertflow.io import write_text


def mean_responses(adata: ad.AnnData, pert_col: str, control: str, context_col: str,
                   contexts: list[str]) -> pd.DataFrame:
    """(perturbation x gene) mean response over ``contexts``, each context's against its own controls;
    a perturbation enters only where every context measured it."""
    per_context = []
    for context in contexts:
        cells = adata[adata.obs[context_col] == context]
        x = cells.X.toarray() if hasattr(cells.X, "toarray") else np.asarray(cells.X)
        labels = cells.obs[pert_col].astype(str).to_numpy()
        if not (labels == control).any():
            raise SystemExit(f"context {context!r} has no '{control}' cells to measure responses against")
        means = pd.DataFrame(x, columns=cells.var_names).groupby(labels).mean()
        per_context.append(means.drop(index=control) - means.loc[control])
    common = sorted(set.intersection(*(set(m.index) for m in per_context)))
    return sum(m.loc[common] for m in per_context) / len(per_context)


def centred_correlations(responses: pd.DataFrame, target: str) -> pd.Series:
    """Pearson correlation of ``target``'s response with each other perturbation's, after centring
    every gene across perturbations."""
    if target not in responses.index:
        raise SystemExit(f"{target!r} is not measured in every context named; measured: {list(responses.index)}")
    centred = responses - responses.mean(axis=0)
    others = centred.drop(index=target)
    return others.apply(lambda row: float(np.corrcoef(row, centred.loc[target])[0, 1]), axis=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="an .h5ad file of the shared data folder")
    p.add_argument("target")
    p.add_argument("--contexts", required=True, help="comma-separated values of the context column")
    p.add_argument("--pert-col", default="condition")
    p.add_argument("--control", default="control")
    p.add_argument("--context-col", default="cell_type")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    data_dir = Path(os.environ.get("PERTFLOW_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    adata = ad.read_h5ad(data_dir / args.dataset)
    responses = mean_responses(adata, args.pert_col, args.control, args.context_col, args.contexts.split(","))
    table = centred_correlations(responses, args.target).rename("centred_correlation").round(4)
    table.index.name = "perturbation"
    write_text(Path(args.out), table.sort_values(ascending=False).to_csv())
    print(table.sort_values(ascending=False).to_string())


if __name__ == "__main__":
    main()
