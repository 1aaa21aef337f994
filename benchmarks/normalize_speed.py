"""Seconds per block of pertflow's ``normalize_log1p`` against the route it replaced (an AnnData
of the block, scanpy's ``normalize_total`` + ``log1p``), on a sparse counts block the size of an
out-of-core training batch's read (64 cells x 2000 genes, 10% non-zero).

    python benchmarks/normalize_speed.py
"""

from __future__ import annotations

import time

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

from pertflow.data.loading import normalize_log1p


def through_scanpy(block: sp.csr_matrix, target_sum: float) -> sp.csr_matrix:
    tmp = ad.AnnData(X=block.astype(np.float32))
    sc.pp.normalize_total(tmp, target_sum=target_sum)
    sc.pp.log1p(tmp)
    return tmp.X


def ms_per_call(fn, block, repeats: int = 200) -> float:
    fn(block, 1e4)  # first call: imports and caches
    start = time.perf_counter()
    for _ in range(repeats):
        fn(block, 1e4)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    rng = np.random.default_rng(0)
    block = sp.random(64, 2000, density=0.1, format="csr", random_state=0,
                      data_rvs=lambda n: rng.poisson(3, n) + 1).astype(np.float32)
    diff = abs(normalize_log1p(block, 1e4).toarray() - through_scanpy(block, 1e4).toarray()).max()
    print(f"scanpy route: {ms_per_call(through_scanpy, block):.2f} ms, normalize_log1p: "
          f"{ms_per_call(normalize_log1p, block):.2f} ms per 64 x 2000 block; max difference {diff:.1e}")


if __name__ == "__main__":
    main()
