"""Gradient checkpointing of a network's layers: activations recomputed in the backward pass."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_layer(layer: nn.Module, *args: Any, checkpointed: bool = False) -> Any:
    """``layer(*args)``; with ``checkpointed`` (and gradients on), its activations are not kept
    but recomputed in the backward pass: less memory for about a third more compute. The
    recomputation replays the RNG state, so dropout draws the same mask."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)
