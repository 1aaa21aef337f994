"""Configuration of the gene-space flow model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class CFMConfig:
    """The ``model`` section of a ``cfm`` run (SPEC 2.1; defaults are the SPEC's).

    Attributes
    ----------
    d_model, n_heads, n_layers, mlp_ratio, dropout
        Width, attention heads, backbone layers (DiffPerceiverBlocks), MLP width ratio, dropout
        of the value encoders.
    differential_attention
        scDFM's differential attention (True) or plain attention (False, an ablation).
    genes_per_step
        G: random genes per training step (all genes when the data has fewer).
    gamma
        Weight of the MMD term on the one-step estimate ``x_t + (1 - t) v``.
    max_components
        Most components of a combination.
    unknown_perturbation_p
        Share of training batches whose perturbation is replaced by ``<unk>``, so that a
        perturbation never seen in training (and without a descriptor) gets the typical
        response instead of an untrained embedding.
    source
        Where the flow starts (t = 0): ``noise``, a standard normal (the SPEC), or ``control``, the
        control cell plus ``source_noise`` times a standard normal: the flow then transports the
        control distribution onto the perturbed one, a much shorter path that a small budget
        learns well.
    source_noise
        Scale of the noise added to a control source.
    reference_cell
        With a control source, which control cell the network is conditioned on: ``own``, the
        cell the flow starts from (what the committed CPU results used), or ``other``, another
        control cell of the batch. With ``own`` the network can read the start point off the
        condition and learn ``v = (x_t - x_0) / t``, which carries each cell toward the mean of
        its possible targets; ``source_noise`` is then what keeps the cells spread (on gbm A172
        without noise: a third of the real variance left). ``other`` leaves only the context to
        the condition, so the flow must transport the whole distribution.
    center
        Work in coordinates centred on the control cells' mean per gene: the flow's inputs and
        outputs have the batch's control mean subtracted, and it is added back to the generated
        cells. The network then sees how far a cell is from its own context's controls rather than
        absolute expression, which differs from context to context (a held-out cell line or
        patient starts from a baseline the network never saw); the model is exactly equivariant
        to a per-gene shift of all its inputs.
    coupling
        How the B targets of a batch are paired with the B sources: ``independent`` (as drawn) or
        ``ot`` (minibatch optimal transport on squared distances, which straightens the paths).
    ode_method, ode_steps
        Inference solver (``rk4``, ``euler``, ``midpoint``, ``dopri5``) and its fixed steps.
    inference_gene_chunk
        None: inference attends over all genes at once (the SPEC). A number: genes are split
        at random into chunks of about this size, each integrated on its own, as in training
        (linear instead of quadratic cost in the number of genes; used on CPU).
    predict_batch_size
        Cells generated per call.
    """

    d_model: int = 128
    n_heads: int = 8
    n_layers: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    differential_attention: bool = True
    genes_per_step: int = 1000
    gamma: float = 0.5
    max_components: int = 2
    unknown_perturbation_p: float = 0.1
    source: Literal["noise", "control"] = "noise"
    source_noise: float = 0.1
    reference_cell: Literal["own", "other"] = "own"
    center: bool = False
    coupling: Literal["independent", "ot"] = "independent"
    ode_method: Literal["rk4", "euler", "midpoint", "dopri5"] = "rk4"
    ode_steps: int = 20
    inference_gene_chunk: int | None = None
    predict_batch_size: int = 128

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.genes_per_step < 2:
            raise ValueError("genes_per_step must be at least 2")
