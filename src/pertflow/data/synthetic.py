"""Synthetic perturbation data with a known answer: the tests' fixture and the demo's default data.

The generative model, in log-mean space (natural log of the expected count before library
size)::

    log_mu[c, g] = base[g] + context_shift[ctx(c), g] + programs[c] @ loadings[:, g] + lfc[p(c), ctx(c), g]
    counts[c, g] ~ NegativeBinomial(mean = size_factor[c] * exp(log_mu[c, g]), dispersion = theta)

* ``base`` and ``context_shift``: each context (cell line) has its own baseline.
* ``programs``: per-cell activity of a few gene programs (co-varying gene modules), so that
  cells are heterogeneous in a structured way, not just Poisson noise.
* ``lfc``: each single perturbation moves ``n_effect_genes`` genes; a share ``shared`` of the
  response is common to all contexts and the rest is context-specific. A genetic perturbation
  also moves its own target gene (knock-down: ``target_lfc`` < 0).
* combinations: the sum of their singles' responses plus an interaction on a few genes.

``adata.uns["synthetic"]`` keeps the ground truth: the per-(perturbation, context) log fold
changes, the baselines and the generation parameters.
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

CONTROL = "control"


def make_synthetic(
    n_genes: int = 200,
    n_contexts: int = 3,
    n_singles: int = 10,
    n_combos: int = 5,
    cells_per_group: int = 50,
    controls_per_context: int = 100,
    n_effect_genes: int = 30,
    n_programs: int = 6,
    shared: float = 0.7,
    interaction_scale: float = 0.5,
    target_lfc: float = -2.0,
    effect_scale: float = 0.8,
    theta: float = 5.0,
    genetic: bool = True,
    doses: tuple[float, ...] | None = None,
    ec50: float = 1.0,
    hill: float = 1.5,
    seed: int = 0,
) -> ad.AnnData:
    """Negative-binomial counts of control and perturbed cells in several contexts.

    Parameters
    ----------
    n_genes
        Genes (``G0000``, ``G0001``, ...).
    n_contexts
        Cell lines ``line_A``, ``line_B``, ... in ``obs['cell_type']``.
    n_singles, n_combos
        Single perturbations, and two-component combinations of them.
    cells_per_group, controls_per_context
        Cells per (perturbation, context), and control cells per context.
    n_effect_genes
        Genes moved by each single perturbation ("a few dozen").
    shared
        Share of a perturbation's response common to all contexts (the rest is specific).
    interaction_scale
        Scale of a combination's non-additive part.
    target_lfc
        Log fold change of a genetic perturbation's own target gene.
    genetic
        Genetic perturbations named after (and moving) a gene; otherwise drugs ``drug_00``...
    doses, ec50, hill
        A dose-response: every perturbation is given at each of ``doses`` (``cells_per_group``
        cells each, ``obs['dose']``; 0 for controls), its log fold changes scaled by the Hill
        curve ``dose^hill / (dose^hill + ec50^hill)`` (ground truth: ``uns['synthetic']['doses']``,
        ``['dose_scale']``).
    seed
        Seed; the same seed gives the same file.

    Returns
    -------
    anndata.AnnData
        Counts in ``X`` (CSR float32); ``obs['perturbation']`` (control label ``control``),
        ``obs['cell_type']``, ``obs['batch']``; ground truth in ``uns['synthetic']``.
    """
    if n_singles < 2 and n_combos:
        raise ValueError("combinations need at least two single perturbations")
    if n_effect_genes >= n_genes:
        raise ValueError("n_effect_genes must be smaller than n_genes")
    rng = np.random.default_rng(seed)
    genes = [f"G{i:04d}" for i in range(n_genes)]
    contexts = [f"line_{chr(ord('A') + i)}" for i in range(n_contexts)]

    base = rng.normal(np.log(0.3), 1.3, n_genes)
    context_shift = rng.normal(0, 0.4, (n_contexts, n_genes)) * (rng.random((n_contexts, n_genes)) < 0.3)
    loadings = rng.normal(0, 0.5, (n_programs, n_genes)) * (rng.random((n_programs, n_genes)) < 0.15)

    # Singles: targets are distinct genes; each moves n_effect_genes genes.
    targets = rng.choice(n_genes, n_singles, replace=False)
    singles = [genes[t] for t in targets] if genetic else [f"drug_{i:02d}" for i in range(n_singles)]
    lfc_single = np.zeros((n_singles, n_contexts, n_genes))
    for i in range(n_singles):
        hit = rng.choice(n_genes, n_effect_genes, replace=False)
        common = rng.normal(0, effect_scale, n_effect_genes)
        for k in range(n_contexts):
            specific = rng.normal(0, effect_scale, n_effect_genes)
            lfc_single[i, k, hit] = shared * common + (1 - shared) * specific
        if genetic:
            lfc_single[i, :, targets[i]] = target_lfc

    pairs: list[tuple[int, int]] = []
    all_pairs = [(a, b) for a in range(n_singles) for b in range(a + 1, n_singles)]
    for j in rng.permutation(len(all_pairs))[:n_combos]:
        pairs.append(all_pairs[j])
    combos = [f"{singles[a]}+{singles[b]}" for a, b in pairs]
    lfc_combo = np.zeros((len(pairs), n_contexts, n_genes))
    for j, (a, b) in enumerate(pairs):
        inter = np.zeros(n_genes)
        hit = rng.choice(n_genes, max(1, n_effect_genes // 3), replace=False)
        inter[hit] = rng.normal(0, interaction_scale, len(hit))
        lfc_combo[j] = lfc_single[a] + lfc_single[b] + inter[None, :]

    names = [CONTROL, *singles, *combos]
    lfc = np.concatenate([np.zeros((1, n_contexts, n_genes)), lfc_single, lfc_combo])

    dose_levels = np.asarray(doses if doses else [0.0], dtype=float)
    if doses and np.any(dose_levels <= 0):
        raise ValueError("doses must be positive")
    dose_scale = dose_levels**hill / (dose_levels**hill + ec50**hill) if doses else np.ones(1)
    pert_idx, ctx_idx, dose_idx = [], [], []
    for k in range(n_contexts):
        for p in range(len(names)):
            for j in range(1 if p == 0 else len(dose_levels)):
                n = controls_per_context if p == 0 else cells_per_group
                pert_idx += [p] * n
                ctx_idx += [k] * n
                dose_idx += [-1 if p == 0 else j] * n
    pert_idx_arr = np.array(pert_idx)
    ctx_idx_arr = np.array(ctx_idx)
    dose_idx_arr = np.array(dose_idx)
    n_cells = len(pert_idx_arr)
    scale = np.where(dose_idx_arr < 0, 0.0, dose_scale[np.maximum(dose_idx_arr, 0)])

    programs = rng.normal(0, 1, (n_cells, n_programs))
    log_mu = (base[None, :] + context_shift[ctx_idx_arr] + programs @ loadings
              + scale[:, None] * lfc[pert_idx_arr, ctx_idx_arr])
    size_factor = rng.lognormal(np.log(4.0), 0.35, n_cells)
    mean = size_factor[:, None] * np.exp(log_mu)
    # Negative binomial as a gamma-Poisson mixture: Var = mean + mean^2 / theta.
    counts = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)

    order = rng.permutation(n_cells)  # files are rarely sorted by condition
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical([names[p] for p in pert_idx_arr[order]], categories=names),
            "cell_type": pd.Categorical([contexts[k] for k in ctx_idx_arr[order]], categories=contexts),
            "batch": pd.Categorical(rng.choice(["b1", "b2"], n_cells)),
        },
        index=[f"cell{i:05d}" for i in range(n_cells)],
    )
    if doses:
        obs["dose"] = np.where(dose_idx_arr < 0, 0.0, dose_levels[np.maximum(dose_idx_arr, 0)])[order]
    adata = ad.AnnData(X=sp.csr_matrix(counts[order]), obs=obs, var=pd.DataFrame(index=genes))
    truth: dict[str, Any] = {
        "perturbations": np.array(names),
        "contexts": np.array(contexts),
        "lfc": lfc.astype(np.float32),
        "base_log_mean": (base[None, :] + context_shift).astype(np.float32),
        "combo_interaction": (lfc_combo - np.stack([lfc_single[a] + lfc_single[b] for a, b in pairs]) if pairs
                              else np.zeros((0, n_contexts, n_genes))).astype(np.float32),
        "params": {
            "seed": seed,
            "shared": shared,
            "theta": theta,
            "target_lfc": target_lfc if genetic else 0.0,
            "n_effect_genes": n_effect_genes,
            "genetic": genetic,
        },
    }
    if doses:
        truth["doses"] = dose_levels.astype(np.float32)
        truth["dose_scale"] = dose_scale.astype(np.float32)
    adata.uns["synthetic"] = truth
    return adata
