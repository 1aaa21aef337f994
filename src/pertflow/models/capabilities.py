"""What a model can do beyond the train / predict contract, as protocols (checked with
``isinstance`` / ``issubclass``) instead of attribute probes: a latent space it embeds cells in,
generation without control cells."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


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
