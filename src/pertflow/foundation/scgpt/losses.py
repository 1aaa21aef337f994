"""scGPT's training objectives and the MLM masking helper, as pure functions of tensors.

Objectives (scGPT names in brackets):
    MLM   masked MSE on the masked positions                  [masked_mse_loss]
    zero  Bernoulli NLL of "value > 0" (explicit_zero_prob)  [criterion_neg_log_bernoulli]
    CLS   cross-entropy of cell-type logits
    MVC   masked MSE of the prediction from the cell embedding (GEPC)
    CCE   InfoNCE between two dropout views of each cell      [Similarity(temp=0.5) + CE]
    ECS   elastic cell similarity on the cell embeddings
    DAB   cross-entropy of batch logits (the discriminator sits behind gradient reversal)
    pert  masked MSE of the generator's perturbed-expression prediction

A note on ``zero_probs``: scGPT's decoders output ``sigmoid(zero_logit)`` and call it the zero
probability, but its loss treats it as ``P(value > 0)`` (``Bernoulli(probs).log_prob(target > 0)``)
and its sampler keeps a prediction with that probability. The functions here follow those semantics
so that checkpoints trained with ``explicit_zero_prob`` keep their meaning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from pertflow.nn.loss import LossOutput

if TYPE_CHECKING:  # module.py imports this file, so the output type is imported for annotations only
    from pertflow.foundation.scgpt.transformer import ScGPTOutput


def _zero_with_grad(reference: Tensor) -> Tensor:
    # A zero that stays in the graph, so that ``loss.backward()`` works on an empty mask.
    return reference.sum() * 0.0


def masked_mse_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the positions where ``mask`` is true.

    Parameters
    ----------
    pred, target
        ``(B, L)``.
    mask
        ``(B, L)`` bool (or 0/1), the positions to score.

    Returns
    -------
    Tensor
        Scalar; 0 (with a gradient path) when the mask is empty instead of scGPT's NaN.
    """
    mask = mask.bool()
    total = mask.sum()
    if total == 0:
        return _zero_with_grad(pred)
    # where() rather than multiplying by the mask, so that anything at unscored positions (even NaN)
    # cannot leak into the loss.
    return torch.where(mask, (pred - target) ** 2, torch.zeros_like(pred)).sum() / total


def zero_prob_nll(nonzero_probs: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Bernoulli negative log-likelihood of ``target > 0`` under ``nonzero_probs``, on masked positions.

    Parameters
    ----------
    nonzero_probs
        ``(B, L)`` in [0, 1]: the model's ``mlm_zero_probs`` / ``mvc_zero_probs`` (see module notes).
    target
        ``(B, L)`` true values.
    mask
        ``(B, L)`` positions to score.

    Returns
    -------
    Tensor
        Scalar. ``binary_cross_entropy`` clamps ``log`` at -100, so probabilities of exactly 0 or 1
        give a finite loss where scGPT's ``Bernoulli.log_prob`` could give ``inf``.
    """
    mask = mask.bool()
    total = mask.sum()
    if total == 0:
        return _zero_with_grad(nonzero_probs)
    probs = torch.where(mask, nonzero_probs, torch.full_like(nonzero_probs, 0.5))
    per_position = F.binary_cross_entropy(probs, (target > 0).to(probs.dtype), reduction="none")
    return torch.where(mask, per_position, torch.zeros_like(per_position)).sum() / total


def cls_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of cell-type logits ``(B, n_cls)`` against labels ``(B,)``."""
    return F.cross_entropy(logits, labels.long())


def mvc_loss(mvc_output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MVC (GEPC): :func:`masked_mse_loss` of the cell-embedding prediction ``(B, L)``."""
    return masked_mse_loss(mvc_output, target, mask)


def contrastive_cell_loss(cell_emb_a: Tensor, cell_emb_b: Tensor, temperature: float = 0.5) -> Tensor:
    """InfoNCE between two views of the same cells (scGPT's CCE, SimCSE-style).

    Cell ``i`` of view a must pick cell ``i`` of view b among all cells of the batch, by cosine
    similarity divided by ``temperature``. scGPT builds the two views by encoding the same input
    twice under different dropout draws.

    Parameters
    ----------
    cell_emb_a, cell_emb_b
        ``(B, d)``.
    temperature
        scGPT uses 0.5.

    Returns
    -------
    Tensor
        Scalar.
    """
    sim = F.cosine_similarity(cell_emb_a.unsqueeze(1), cell_emb_b.unsqueeze(0), dim=-1) / temperature
    labels = torch.arange(sim.shape[0], device=sim.device)
    return F.cross_entropy(sim, labels)


def elastic_cell_similarity_loss(cell_emb: Tensor, threshold: float = 0.3) -> Tensor:
    """scGPT's ECS: ``mean(1 - (relu(cos_ij) - threshold)^2)`` over all cell pairs, diagonal zeroed.

    Minimising it pushes positive cosine similarities away from ``threshold`` (similar cells closer
    together, dissimilar ones apart); negative similarities are left alone by the ReLU.

    Parameters
    ----------
    cell_emb
        ``(B, d)``.
    threshold
        scGPT's ``ecs_threshold`` (default 0.3).

    Returns
    -------
    Tensor
        Scalar.
    """
    normed = F.normalize(cell_emb, p=2, dim=1)
    cos = normed @ normed.t()
    # Explicit normalisation + matmul rather than F.cosine_similarity, which can exceed 1 (torch #78064).
    eye = torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device)
    cos = F.relu(cos.masked_fill(eye, 0.0))
    return torch.mean(1.0 - (cos - threshold) ** 2)


def dab_loss(dab_output: Tensor, batch_labels: Tensor) -> Tensor:
    """Cross-entropy of the adversarial batch logits ``(B, n_batches)`` against ``(B,)`` labels.

    The discriminator sits behind gradient reversal, so minimising this trains the discriminator
    and, through the reversed gradient, strips batch information from the cell embedding.
    """
    return F.cross_entropy(dab_output, batch_labels.long())


def perturbation_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """The generator's loss: MSE of predicted vs observed perturbed expression on non-padding positions.

    Parameters
    ----------
    pred, target
        ``(B, L)``.
    mask
        ``(B, L)`` positions to score (default: all), e.g. ``~src_key_padding_mask``.

    Returns
    -------
    Tensor
        Scalar.
    """
    if mask is None:
        mask = torch.ones_like(pred, dtype=torch.bool)
    return masked_mse_loss(pred, target, mask)


def masked_relative_error(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean ``|pred - target| / (target + 1e-6)`` over masked positions (scGPT's logged metric)."""
    mask = mask.bool()
    if not bool(mask.any()):
        return _zero_with_grad(pred)
    return (torch.abs(pred[mask] - target[mask]) / (target[mask] + 1e-6)).mean()


# ============================================================================ masking


@dataclass
class MaskedValues:
    """Result of :func:`random_mask_value`.

    Attributes
    ----------
    values
        ``(B, L)`` input values with the chosen positions set to ``mask_value``.
    mask
        ``(B, L)`` bool, True at the masked positions (the positions MLM scores).
    """

    values: Tensor
    mask: Tensor


def random_mask_value(
    values: Tensor,
    mask_ratio: float = 0.15,
    mask_value: float = -1.0,
    pad_value: float = 0.0,
    keep_first_n: int = 0,
    generator: torch.Generator | None = None,
) -> MaskedValues:
    """Mask a random ``int(n * mask_ratio)`` of each cell's ``n`` non-padding positions (scGPT's MLM input).

    Parameters
    ----------
    values
        ``(B, L)`` values; positions equal to ``pad_value`` are never masked.
    mask_ratio
        Fraction in [0, 1).
    mask_value
        Value written at masked positions (scGPT: -1).
    pad_value
        Padding value (scGPT pretraining: -2; its tutorials' default 0).
    keep_first_n
        Leading positions never masked (e.g. 1 for the ``<cls>`` position when its value is not the
        pad value).
    generator
        Optional seeded generator, for repeatable masks.

    Returns
    -------
    MaskedValues
        A new tensor (the input is not modified) and the mask.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    eligible = values.ne(pad_value)
    if keep_first_n:
        eligible[:, :keep_first_n] = False
    n_mask = (eligible.sum(dim=1).to(torch.float64) * mask_ratio).floor().long()  # (B,)
    # Random scores; ineligible positions sort last, then the n_mask smallest per row are masked.
    scores = torch.rand(values.shape, generator=generator, device="cpu").to(values.device)
    scores = scores.masked_fill(~eligible, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    mask = (ranks < n_mask.unsqueeze(1)) & eligible
    return MaskedValues(values=values.masked_fill(mask, mask_value), mask=mask)


# ============================================================================ combined objective


@dataclass(frozen=True)
class ScGPTLossWeights:
    """Weights of the terms in :func:`scgpt_loss`; 0 turns a term off (and skips its computation).

    Defaults follow scGPT's pretraining script (MLM + MVC, CLS when labels exist; no CCE, no ECS).
    Its fine-tuning tutorials use CCE 10, ECS 10 and DAB 1.
    """

    mlm: float = 1.0
    zero: float = 1.0
    cls: float = 1.0
    mvc: float = 1.0
    cce: float = 0.0
    ecs: float = 0.0
    dab: float = 1.0


def scgpt_loss(
    output: ScGPTOutput,
    target_values: Tensor,
    masked_positions: Tensor,
    cls_labels: Tensor | None = None,
    batch_labels: Tensor | None = None,
    weights: ScGPTLossWeights | None = None,
) -> LossOutput:
    """Combine the objectives present in a model output, as scGPT's training loops do.

    Parameters
    ----------
    output
        A :class:`~pertflow.foundation.scgpt.transformer.ScGPTOutput`.
    target_values
        ``(B, L)`` true values.
    masked_positions
        ``(B, L)`` bool, positions scored by MLM/MVC (masked inputs; for the generator, all
        non-padding positions).
    cls_labels
        ``(B,)`` cell-type labels, needed when ``output.cls_output`` is present.
    batch_labels
        ``(B,)`` batch labels, needed when ``output.dab_output`` is present.
    weights
        Term weights; default :class:`ScGPTLossWeights`.

    Returns
    -------
    LossOutput
        ``loss`` and, in ``metrics``, each unweighted term (``mlm``, ``mlm_zero``, ``cls``, ``mvc``,
        ``mvc_zero``, ``cce``, ``ecs``, ``dab``) that was computed.
    """
    w = weights or ScGPTLossWeights()
    terms: dict[str, Tensor] = {"mlm": masked_mse_loss(output.mlm_output, target_values, masked_positions)}
    total = w.mlm * terms["mlm"]
    if output.mlm_zero_probs is not None and w.zero:
        terms["mlm_zero"] = zero_prob_nll(output.mlm_zero_probs, target_values, masked_positions)
        total = total + w.zero * terms["mlm_zero"]
    if output.cls_output is not None and w.cls:
        if cls_labels is None:
            raise ValueError("cls_labels are needed for the CLS objective")
        terms["cls"] = cls_loss(output.cls_output, cls_labels)
        total = total + w.cls * terms["cls"]
    if output.mvc_output is not None and w.mvc:
        terms["mvc"] = mvc_loss(output.mvc_output, target_values, masked_positions)
        total = total + w.mvc * terms["mvc"]
        if output.mvc_zero_probs is not None and w.zero:
            terms["mvc_zero"] = zero_prob_nll(output.mvc_zero_probs, target_values, masked_positions)
            total = total + w.zero * terms["mvc_zero"]
    if output.loss_cce is not None and w.cce:
        terms["cce"] = output.loss_cce
        total = total + w.cce * terms["cce"]
    if output.loss_ecs is not None and w.ecs:
        terms["ecs"] = output.loss_ecs
        total = total + w.ecs * terms["ecs"]
    if output.dab_output is not None and w.dab:
        if batch_labels is None:
            raise ValueError("batch_labels are needed for the DAB objective")
        terms["dab"] = dab_loss(output.dab_output, batch_labels)
        total = total + w.dab * terms["dab"]
    return LossOutput(loss=total, metrics={name: float(term.detach()) for name, term in terms.items()})
