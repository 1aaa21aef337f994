"""What a model can do beyond the train / predict contract, as protocols (checked with
``isinstance`` / ``issubclass``) instead of attribute probes: a latent space it embeds cells in,
generation without control cells; and one small mixin, for models adapted through each gene's
expression."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch


@runtime_checkable
class EmbedsCells(Protocol):
    """A model with a latent space (latent-shift): ``embed`` (n, G) expression -> (n, k) latents;
    ``pertflow evaluate --run`` adds KNN purity in it."""

    def embed(self, expression: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class GeneratesWithoutControls(Protocol):
    """A model with a latent control distribution (cfmvc): cells of a perturbation in a cell type
    without control cells (:func:`pertflow.api.generate_expression`)."""

    def generate_expression(self, perturbation: str, batch: str | None = None, cell_type: str | None = None,
                            spatial: Any = None, n_steps: int | None = None, use_mean: bool | None = None,
                            n_cells: int = 100, seed: int = 0) -> np.ndarray: ...


class ReadsControlExpression:
    """A model that reads a control cell through a learnt function of its whole expression vector
    (latent-shift's PCA, CFM-VC's count encoder) has no per-gene tokens: its control embedding is
    each gene's expression itself, so that what an adapter (:mod:`pertflow.adapt`) aligns across
    datasets is each gene's values, the very input the model reads. Listed before the model's
    base class, it replaces the base's refusal."""

    def control_embedding(self, controls: torch.Tensor) -> torch.Tensor:
        """(n, G) control cells -> (n, G, 1): each gene's expression (the model's weights are not
        involved, so none needs freezing)."""
        return controls.unsqueeze(-1)
