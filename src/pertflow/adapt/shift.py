"""The adapter's mathematics: a per-gene shift of target expression that makes a frozen embedding
of the shifted target controls match that of the source controls, by per-gene MMD (tensors only).

Shapes: n cells, G genes, d embedding width.

The objective, for a shift ``s`` (G,):

    L(s) = mean over genes g of [ MMD^2( E(T + s)[:, g], E(S)[:, g] ) + l2 * s_g^2 ]

with ``E`` the model's control embedding ((n, G) expression -> (n, G, d) tokens), ``T + s`` the
target controls shifted and clipped at 0 (what the model reads at prediction), ``S`` the source
controls and MMD^2 the unbiased multi-bandwidth RBF estimate of :func:`pertflow.ops.kernels.mmd2_rbf`
(scales 0.5, 1, 2, 4 of a base bandwidth per gene). Each gene's base bandwidth is the median
heuristic of its pooled tokens (source and unshifted target) on the fixed evaluation sample,
computed once and bounded below by ``min_bandwidth``, so it cannot collapse on a gene whose cells
are mostly zeros; a fixed kernel also makes the MMD of every step comparable. Each step draws
``batch_size`` cells of each side (without replacement) and ``genes_per_step`` genes, all from one
seeded generator: a seed repeats a run exactly. Inputs are always expression, never embeddings:
the embedding is computed here, from the expression, by the function given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from pertflow.ops.kernels import median_sq_dist, mmd2_rbf

Embedding = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AdapterConfig:
    """Settings of the adapter (``pertflow adapt``).

    Attributes
    ----------
    steps
        Adam steps.
    lr
        Adam's learning rate (log1p units per step, roughly); it decays linearly to 10% of
        itself over the run, so that the shift settles.
    batch_size
        Cells of each dataset per step (drawn without replacement).
    genes_per_step
        Genes whose MMD is taken each step (drawn at random); None: all genes every step.
    l2
        Weight of the penalty ``s_g^2`` beside each gene's MMD (keeps genes without a shift at 0).
    min_bandwidth
        Lower bound of the median-heuristic squared bandwidth of the RBF kernel.
    max_cells
        Control cells read per dataset at most (a seeded subsample beyond that).
    eval_cells
        Cells per dataset of the fixed sample on which the reported MMD (over all genes) is taken.
    eval_every
        Steps between two records of that MMD.
    seed
        Seeds the subsample, the batches, the genes of each step and the evaluation sample.
    """

    steps: int = 300
    lr: float = 0.05
    batch_size: int = 128
    genes_per_step: int | None = 64
    l2: float = 1e-3
    min_bandwidth: float = 1e-3
    max_cells: int = 5000
    eval_cells: int = 256
    eval_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_cells", "eval_cells", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2 or self.eval_cells < 2:
            raise ValueError("batch_size and eval_cells must be at least 2 (the unbiased MMD needs two cells a side)")
        if self.genes_per_step is not None and self.genes_per_step < 1:
            raise ValueError(f"genes_per_step must be at least 1 (or null for all genes), got {self.genes_per_step}")
        if self.lr <= 0 or self.l2 < 0 or self.min_bandwidth <= 0:
            raise ValueError("lr and min_bandwidth must be positive and l2 non-negative")


@dataclass
class ShiftFit:
    """The result of :func:`fit_shift`.

    Attributes
    ----------
    shift
        (G,) the learnt shift, to be added to the target's log1p expression (then clipped at 0).
    history
        (step, MMD) records: the mean over all genes of the per-gene MMD^2 on the fixed
        evaluation sample, at step 0 (no shift) and every ``eval_every`` steps.
    """

    shift: Tensor
    history: list[tuple[int, float]]

    @property
    def mmd_before(self) -> float:
        return self.history[0][1]

    @property
    def mmd_after(self) -> float:
        return self.history[-1][1]


def shifted(target: Tensor, shift: Tensor) -> Tensor:
    """(n, G) target expression plus the (G,) shift, clipped at 0 (log1p expression is >= 0)."""
    return (target + shift).clamp_min(0.0)


def per_gene_mmd(x: Tensor, y: Tensor, bandwidth: Tensor) -> Tensor:
    """Per-gene MMD^2 of two samples of per-gene embeddings.

    Parameters
    ----------
    x, y
        (n, G, d) and (m, G, d) embeddings of the same G genes.
    bandwidth
        (G,) base squared bandwidth of each gene's kernel.

    Returns
    -------
    Tensor
        (G,) unbiased MMD^2 of each gene's n vs m d-vectors (differentiable).
    """
    return mmd2_rbf(x.transpose(0, 1), y.transpose(0, 1), bandwidth=bandwidth)  # a batch of G pairs


def gene_bandwidths(x: Tensor, y: Tensor, min_bandwidth: float, gene_chunk: int = 64) -> Tensor:
    """(G,) median-heuristic squared bandwidth of each gene's pooled (n, G, d) and (m, G, d)
    embeddings, bounded below by ``min_bandwidth`` (detached)."""
    return torch.cat([median_sq_dist(x[:, g:g + gene_chunk].transpose(0, 1), y[:, g:g + gene_chunk].transpose(0, 1),
                                      min_bandwidth=min_bandwidth) for g in range(0, x.shape[1], gene_chunk)])


def evaluation_mmd(x: Tensor, y: Tensor, bandwidth: Tensor, gene_chunk: int = 64) -> float:
    """Mean over genes of :func:`per_gene_mmd` of (n, G, d) and (m, G, d) embeddings, without
    gradient, ``gene_chunk`` genes at a time (memory)."""
    with torch.no_grad():
        total = sum(float(per_gene_mmd(x[:, g:g + gene_chunk], y[:, g:g + gene_chunk], bandwidth[g:g + gene_chunk]).sum())
                    for g in range(0, x.shape[1], gene_chunk))
    return total / x.shape[1]


def fit_shift(embed: Embedding, source: Tensor, target: Tensor, config: AdapterConfig,
              progress: Callable[[int, float], None] | None = None) -> ShiftFit:
    """Learn the per-gene shift of ``target`` (see the module docstring).

    Parameters
    ----------
    embed
        The frozen embedding, (n, G) expression -> (n, G, d), differentiable w.r.t. its input.
    source
        (n_S, G) log1p expression of the source's control cells.
    target
        (n_T, G) log1p expression of the target's control cells, on the same genes in the same
        order, on the same device as ``source``.
    config
        Steps, learning rate, batch, genes per step, penalty, bandwidth bound, seed.
    progress
        Called with (step, loss) after every step.

    Returns
    -------
    ShiftFit
        The shift (on the CPU) and the MMD history.
    """
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"source and target must be (n, G) on the same genes; got {tuple(source.shape)} and {tuple(target.shape)}")
    n_s, n_genes = source.shape
    n_t = target.shape[0]
    if min(n_s, n_t) < 2:
        raise ValueError(f"the MMD needs at least 2 control cells on each side; got {n_s} source and {n_t} target cells")
    device = source.device
    generator = torch.Generator().manual_seed(config.seed)

    def draw(n: int, k: int) -> Tensor:
        return torch.randperm(n, generator=generator)[: min(n, k)].to(device)

    eval_target = target[draw(n_t, config.eval_cells)]
    with torch.no_grad():
        eval_reference = embed(source[draw(n_s, config.eval_cells)])
        bandwidth = gene_bandwidths(eval_reference, embed(eval_target), config.min_bandwidth)

    def evaluate() -> float:
        with torch.no_grad():
            return evaluation_mmd(embed(shifted(eval_target, shift)), eval_reference, bandwidth)

    shift = torch.zeros(n_genes, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([shift], lr=config.lr)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=config.steps)
    history = [(0, evaluate())]
    per_step = n_genes if config.genes_per_step is None else min(config.genes_per_step, n_genes)
    for step in range(1, config.steps + 1):
        rows_s, rows_t = draw(n_s, config.batch_size), draw(n_t, config.batch_size)
        genes = draw(n_genes, per_step)
        with torch.no_grad():
            reference = embed(source[rows_s])[:, genes]
        tokens = embed(shifted(target[rows_t], shift))[:, genes]
        loss = (per_gene_mmd(tokens, reference, bandwidth[genes]) + config.l2 * shift[genes] ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        loss = loss.detach()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, loss.item())
        if step % config.eval_every == 0 or step == config.steps:
            history.append((step, evaluate()))
    return ShiftFit(shift.detach().cpu(), history)
