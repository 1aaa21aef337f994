"""The adapter's mathematics: a per-gene transport of target expression that makes a frozen
embedding of the transported target controls match that of the source controls, by per-gene MMD
(tensors only; the transports are :mod:`pertflow.adapt.transports`).

Shapes: n cells, G genes, d embedding width.

The objective of a parametric transport ``f_theta`` (``shift``: ``x + b``; ``affine``: ``a x + b``,
both clipped at 0, what the model reads at prediction):

    L(theta) = mean over genes g of [ MMD^2( E(f_theta(T))[:, g], E(S)[:, g] ) + l2 * |theta_g - id|^2 ]

with ``E`` the model's control embedding ((n, G) expression -> (n, G, d) tokens), ``S`` the source
controls and MMD^2 the unbiased multi-bandwidth RBF estimate of :func:`pertflow.ops.kernels.mmd2_rbf`
(scales 0.5, 1, 2, 4 of a base bandwidth per gene). Each gene's base bandwidth is the mean squared
distance of its pooled tokens (source and untransported target), computed once and bounded below
by ``min_bandwidth``: unlike the median, it does not collapse on a gene whose cells are mostly
zeros (a kernel that narrow makes any move of the zeros look like a total mismatch, and gives no
gradient); a fixed kernel also makes the MMD of every step comparable.

Never worse: a part of each side's control cells (``holdout``) is set aside and never stepped on.
The identity and then the parameters every ``eval_every`` steps are scored on it (the mean over all
genes of the per-gene MMD^2); the best parameters are kept. Where the held-out MMD rises, the
parameters go back to the best and the learning rate is halved; after ``patience`` such rises in
a row the fit stops. The MMD after is that of the kept state, never above the MMD before (the
identity's): if no state beats the identity, the identity is kept and the fit says so.

Steps: each step draws ``batch_size`` fitting cells of each side (without replacement) and
``genes_per_step`` genes, all from one seeded generator (a seed repeats a run exactly), and updates
only the parameters of those genes (Adam with per-gene moments and step counts: a gene not drawn
does not move, which plain Adam's momentum would make it do). Inputs are always expression,
never embeddings: the embedding is computed here, from the expression, by the function given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from pertflow.adapt.config import AdapterConfig
from pertflow.adapt.transports import (
    TRANSPORTS,
    ParametricTransport,
    QuantileTransport,
    ShiftTransport,
    Transport,
)
from pertflow.ops.kernels import mmd2_rbf

Embedding = Callable[[Tensor], Tensor]


@dataclass
class TransportFit:
    """The result of :func:`fit_transport`.

    Attributes
    ----------
    transport
        The kept transport (the identity shift when no fitted state beat it).
    history
        (step, held-out MMD, learning rate) records: the mean over all genes of the per-gene MMD^2
        on the held-out cells, of the identity (step 0, learning rate 0) and then of the state
        every ``eval_every`` steps (a quantile map: step 1).
    kept_step
        The step whose state was kept; None when the identity was kept.
    mmd_before, mmd_after
        The held-out MMD of the identity and of the kept state (``mmd_after <= mmd_before``).
    """

    transport: Transport
    history: list[tuple[int, float, float]]
    kept_step: int | None
    mmd_before: float
    mmd_after: float

    @property
    def shift(self) -> Tensor:
        """(G,) the shift of a ``shift`` transport."""
        return torch.from_numpy(self.transport.shift)


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


def gene_bandwidths(x: Tensor, y: Tensor, min_bandwidth: float) -> Tensor:
    """(G,) base squared bandwidth of each gene's kernel: the mean squared distance between two
    distinct tokens of the pooled (n, G, d) and (m, G, d) embeddings, bounded below by
    ``min_bandwidth`` (detached; see the module docstring)."""
    with torch.no_grad():
        pooled = torch.cat([x, y])
        n = pooled.shape[0]
        spread = 2 * pooled.var(dim=0, unbiased=False).sum(-1) * n / max(n - 1, 1)
    return spread.clamp_min(min_bandwidth)


def evaluation_mmd(x: Tensor, y: Tensor, bandwidth: Tensor, gene_chunk: int = 64) -> float:
    """Mean over genes of :func:`per_gene_mmd` of (n, G, d) and (m, G, d) embeddings, without
    gradient, ``gene_chunk`` genes at a time (memory)."""
    with torch.no_grad():
        total = sum(float(per_gene_mmd(x[:, g:g + gene_chunk], y[:, g:g + gene_chunk],
                                       bandwidth[g:g + gene_chunk]).sum())
                    for g in range(0, x.shape[1], gene_chunk))
    return total / x.shape[1]


def _split(n: int, config: AdapterConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Rows (fitting, held out) of a side of ``n`` cells."""
    hold = min(config.eval_cells, max(2, round(config.holdout * n)))
    if n - hold < 2:
        raise ValueError(f"the adapter needs at least 4 control cells on each side (2 to fit, 2 held out); got {n}")
    order = torch.randperm(n, generator=generator)
    return order[hold:].sort().values, order[:hold].sort().values


def fit_transport(embed: Embedding, source: Tensor, target: Tensor, config: AdapterConfig,
                  progress: Callable[[int, float], None] | None = None) -> TransportFit:
    """Fit ``config.transport`` from ``target`` to ``source`` (see the module docstring).

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
        The transport and its settings.
    progress
        Called with (step, loss) after every step.

    Returns
    -------
    TransportFit
        The kept transport, the held-out MMD history, the kept step, the MMD before and after.
    """
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"source and target must be (n, G) on the same genes; got {tuple(source.shape)} and "
                         f"{tuple(target.shape)}")
    device = source.device
    generator = torch.Generator().manual_seed(config.seed)
    (fit_s, hold_s), (fit_t, hold_t) = (_split(source.shape[0], config, generator),
                                        _split(target.shape[0], config, generator))
    source_fit, target_fit = source[fit_s.to(device)], target[fit_t.to(device)]
    hold_target = target[hold_t.to(device)]
    with torch.no_grad():
        reference = embed(source[hold_s.to(device)])
        bandwidth = gene_bandwidths(embed(source_fit[:config.eval_cells]), embed(target_fit[:config.eval_cells]),
                                    config.min_bandwidth)

    def score(mapped: Tensor) -> float:
        with torch.no_grad():
            return evaluation_mmd(embed(mapped), reference, bandwidth)

    before = score(hold_target)
    history = [(0, before, 0.0)]
    if config.transport == "quantile":
        quantile = QuantileTransport.fit(source_fit.cpu().numpy(), target_fit.cpu().numpy(), config.n_quantiles,
                                         config.seed)
        mapped = torch.from_numpy(quantile.apply(hold_target.cpu().numpy())).to(device)
        history.append((1, score(mapped), 0.0))
        if progress is not None:
            progress(1, history[-1][1])
        better = history[-1][1] < before
        return TransportFit(quantile if better else ShiftTransport.identity(source.shape[1]), history,
                            1 if better else None, before, min(before, history[-1][1]))
    kind = TRANSPORTS[config.transport]
    assert issubclass(kind, ParametricTransport)
    return _descend(kind, embed, source_fit, target_fit, hold_target, score, bandwidth, history, config, generator,
                    progress)


def _descend(kind: type[ParametricTransport], embed: Embedding, source: Tensor, target: Tensor, hold_target: Tensor,
             score: Callable[[Tensor], float], bandwidth: Tensor, history: list[tuple[int, float, float]],
             config: AdapterConfig, generator: torch.Generator,
             progress: Callable[[int, float], None] | None) -> TransportFit:
    """The MMD descent of a parametric transport, keeping the best held-out state."""
    device = source.device
    n_s, n_genes = source.shape
    n_t = target.shape[0]
    identity = {k: v.detach() for k, v in kind.initial(source, target, "zero").items()}
    params = {k: v.detach().clone().requires_grad_(True) for k, v in kind.initial(source, target, config.init).items()}
    moments = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in params.items()}
    counts = torch.zeros(n_genes, device=device)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    best_mmd, best_step, best = history[0][1], None, None
    start = score(kind.transform(hold_target, params))
    history.append((0, start, config.lr))
    if start < best_mmd:
        best_mmd, best_step, best = start, 0, {k: v.detach().clone() for k, v in params.items()}
    lr, rises = config.lr, 0
    per_step = n_genes if config.genes_per_step is None else min(config.genes_per_step, n_genes)

    def draw(n: int, k: int) -> Tensor:
        return torch.randperm(n, generator=generator)[: min(n, k)].to(device)

    for step in range(1, config.steps + 1):
        rows_s, rows_t = draw(n_s, config.batch_size), draw(n_t, config.batch_size)
        genes = draw(n_genes, per_step)
        with torch.no_grad():
            reference = embed(source[rows_s])[:, genes]
        tokens = embed(kind.transform(target[rows_t], params))[:, genes]
        penalty = sum((params[k][genes] - identity[k][genes]) ** 2 for k in params)
        loss = (per_gene_mmd(tokens, reference, bandwidth[genes]) + config.l2 * penalty).mean()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        counts[genes] += 1
        step_lr = lr * (1 - 0.9 * min(step, config.steps) / config.steps)
        with torch.no_grad():  # Adam on the genes drawn only
            correction1, correction2 = 1 - beta1 ** counts[genes], 1 - beta2 ** counts[genes]
            for (name, value), grad in zip(params.items(), grads):
                if grad is None:
                    continue
                m, v = moments[name]
                m[genes] = beta1 * m[genes] + (1 - beta1) * grad[genes]
                v[genes] = beta2 * v[genes] + (1 - beta2) * grad[genes] ** 2
                value[genes] -= step_lr * (m[genes] / correction1) / ((v[genes] / correction2).sqrt() + eps)
        if progress is not None:
            progress(step, float(loss.detach()))
        if step % config.eval_every and step != config.steps:
            continue
        mmd = score(kind.transform(hold_target, params))
        history.append((step, mmd, lr))
        if mmd < best_mmd:
            best_mmd, best_step, best, rises = mmd, step, {k: v.detach().clone() for k, v in params.items()}, 0
            continue
        rises += 1
        if rises >= config.patience:
            break
        lr /= 2  # back to the best state (the identity when none beat it), with a smaller step
        with torch.no_grad():
            for name, value in params.items():
                value.copy_(identity[name] if best is None else best[name])
                moments[name][0].zero_()
                moments[name][1].zero_()
        counts.zero_()
    kept = kind.from_params(identity if best is None else best)
    return TransportFit(kept, history, best_step, history[0][1], best_mmd)


def fit_shift(embed: Embedding, source: Tensor, target: Tensor, config: AdapterConfig,
              progress: Callable[[int, float], None] | None = None) -> TransportFit:
    """:func:`fit_transport` with the ``shift`` transport (``.shift`` is the learnt shift)."""
    from dataclasses import replace

    return fit_transport(embed, source, target, replace(config, transport="shift"), progress)
