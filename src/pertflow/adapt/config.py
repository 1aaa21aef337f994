"""The adapter's settings (no tensors: the command line reads them without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from pertflow.configs import require_at_least_one

#: the transports (:data:`pertflow.adapt.transports.TRANSPORTS` gives each its class)
TransportName = Literal["shift", "affine", "quantile"]
#: where a learnt transport starts (:data:`pertflow.adapt.transports.INITS`)
InitName = Literal["moments", "zero"]


@dataclass(frozen=True)
class AdapterConfig:
    """Settings of the adapter (``pertflow adapt``).

    Attributes
    ----------
    transport
        ``shift`` (a per-gene offset), ``affine`` (a per-gene scale and offset), both learnt by
        MMD, or ``quantile`` (a per-gene quantile map, fitted directly).
    steps
        Adam steps at most (``shift`` and ``affine``).
    lr
        Adam's learning rate (log1p units per step, roughly); it decays linearly to 10% of
        itself over the run, and halves where the held-out MMD rises.
    init
        ``moments``: start from the transport that matches each gene's mean (``affine``: and
        standard deviation) to the source's; ``zero``: from the identity.
    batch_size
        Fitting cells of each dataset per step (drawn without replacement).
    genes_per_step
        Genes whose MMD is taken each step (drawn at random); None: all genes every step.
    l2
        Weight of the penalty on each gene's distance from the identity beside its MMD.
    min_bandwidth
        Lower bound of the RBF kernel's squared bandwidth.
    max_cells
        Control cells read per dataset at most (a seeded subsample beyond that).
    holdout
        Fraction of each dataset's control cells set aside to score the transport (never stepped
        on); at least 2 cells and at most ``eval_cells``.
    eval_cells
        Held-out cells per dataset at most.
    eval_every
        Steps between two scores on the held-out cells.
    patience
        Rises of the held-out MMD in a row after which the fit stops.
    n_quantiles
        Points of each gene's quantile grid (``quantile``).
    per_context
        Fit one transport per context (cell type, cell line) that both datasets name, on that
        context's control cells alone, beside the pooled one that cells of any other context get.
        For contexts whose expression differs (a depth change moves a monocyte's genes otherwise
        than a T cell's) and data whose mix of contexts differs between the two files.
    min_context_cells
        Control cells a context needs on each side for a transport of its own (``per_context``);
        a context with fewer gets the pooled transport.
    seed
        Seeds the subsample, the held-out cells, the batches, the genes of each step and the
        positions the quantile map gives to zeros.
    """

    transport: TransportName = "shift"
    steps: int = 300
    lr: float = 0.05
    init: InitName = "moments"
    batch_size: int = 128
    genes_per_step: int | None = 64
    l2: float = 1e-3
    min_bandwidth: float = 1e-3
    max_cells: int = 5000
    holdout: float = 0.25
    eval_cells: int = 256
    eval_every: int = 10
    patience: int = 5
    n_quantiles: int = 101
    per_context: bool = False
    min_context_cells: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name, kind in (("transport", TransportName), ("init", InitName)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"{name} must be one of {', '.join(get_args(kind))}, got {getattr(self, name)!r}")
        require_at_least_one(self, "steps", "batch_size", "max_cells", "eval_cells", "eval_every", "patience")
        if self.min_context_cells > self.max_cells:
            raise ValueError(f"min_context_cells ({self.min_context_cells}) is above max_cells ({self.max_cells}), the "
                             "control cells read a side: no context could get a transport of its own")
        if self.min_context_cells < 4:
            raise ValueError(f"min_context_cells must be at least 4 (2 cells a side to fit, 2 to score), got "
                             f"{self.min_context_cells}")
        if self.batch_size < 2 or self.eval_cells < 2 or self.n_quantiles < 2:
            raise ValueError("batch_size, eval_cells and n_quantiles must be at least 2 (the unbiased MMD needs two "
                             "cells a side)")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be a fraction between 0 and 1, got {self.holdout}")
        if self.genes_per_step is not None and self.genes_per_step < 1:
            raise ValueError(f"genes_per_step must be at least 1 (or null for all genes), got {self.genes_per_step}")
        if self.lr <= 0 or self.l2 < 0 or self.min_bandwidth <= 0:
            raise ValueError("lr and min_bandwidth must be positive and l2 non-negative")
