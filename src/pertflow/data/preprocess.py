"""Gene selection with scanpy, on training cells only."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import scanpy as sc

from pertflow.data.dataset import PerturbationData
from pertflow.errors import InputError


def perturbed_gene_indices(data: PerturbationData) -> np.ndarray:
    """Columns of the genes that are perturbation targets in ``data`` (any split)."""
    symbols = {s: i for i, s in enumerate(data.gene_symbols)}
    names = {s: i for i, s in enumerate(map(str, data.gene_names))}
    found = set()
    for pert in data.perturbation_names:
        for comp in data.components(pert):
            i = symbols.get(comp, names.get(comp))
            if i is not None:
                found.add(i)
    return np.array(sorted(found), dtype=np.int64)


def select_genes(
    data: PerturbationData,
    train_rows: np.ndarray,
    n_top_genes: int,
    flavor: str = "seurat",
    force_perturbed: bool = True,
    max_cells: int = 200_000,
    seed: int = 0,
) -> list[str]:
    """Highly variable genes of the training cells, with perturbed genes forced in.

    Parameters
    ----------
    data
        The dataset.
    train_rows
        Rows of the training cells: no validation or test cell may influence the gene set.
    n_top_genes
        How many genes scanpy's ``highly_variable_genes`` picks.
    flavor
        scanpy flavour; ``"seurat"`` and ``"cell_ranger"`` expect log data (what pertflow
        gives), ``"seurat_v3"`` expects counts and is refused here.
    force_perturbed
        Add every measured gene that is a perturbation target, even if not variable.
    max_cells, seed
        With more training cells than ``max_cells``, the genes are chosen on a seeded sample of
        that many (read in chunks, as CSR): memory is bounded by the sample, not the data.

    Returns
    -------
    list[str]
        ``var_names`` of the chosen genes in file order.
    """
    if flavor == "seurat_v3":
        raise InputError("flavor 'seurat_v3' needs raw counts; pertflow selects genes on log1p values: use 'seurat'.")
    n_genes = data.adata.n_vars
    if n_top_genes >= n_genes:
        return list(map(str, data.gene_names))
    train_rows = np.asarray(train_rows, dtype=np.int64)
    if len(train_rows) > max_cells:
        train_rows = np.random.default_rng(seed).choice(train_rows, size=max_cells, replace=False)
    X = data.log_expression_csr(np.sort(train_rows))
    tmp = ad.AnnData(X=X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hvg = sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor=flavor, inplace=False)
    chosen = np.flatnonzero(hvg["highly_variable"].to_numpy())
    if force_perturbed:
        chosen = np.union1d(chosen, perturbed_gene_indices(data))
    return [str(data.gene_names[i]) for i in np.sort(chosen)]
