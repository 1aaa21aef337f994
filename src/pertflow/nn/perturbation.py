"""Perturbation tokens -> vectors, shared by the token-reading models."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pertflow.nn.embeddings import GeneEncoder

MAX_ARITY = 8  # components of a combination the arity embedding tells apart (more share the last)


def unknown_perturbation_dropout(pert_ids: Tensor, pad_id: int, unk_id: int, p: float) -> Tensor:
    """With probability ``p``, the whole batch's perturbation becomes ``<unk>``.

    Trained this way, the ``<unk>`` token learns the typical response, which is what a
    perturbation never seen in training (and without a descriptor) is given at inference, instead
    of an untrained embedding. One draw per batch: a batch holds one perturbation.

    Parameters
    ----------
    pert_ids
        (B, K) perturbation token ids, padded with ``pad_id``.
    """
    if p <= 0 or torch.rand(()) >= p:
        return pert_ids
    return torch.where(pert_ids != pad_id, torch.full_like(pert_ids, unk_id), pert_ids)


class PerturbationEncoder(nn.Module):
    """Perturbation token ids (B, K) -> (B, d), the sum over a combination's components.

    A combination is the composition of its singles: ``emb(A+B) = emb(A) + emb(B)``, not their
    mean (a new point between them, which a network cannot tell from a third single), plus a
    learnt vector for its number of components (zero at first), so that a network can tell a
    combination, whose prior already holds its singles' effects, from a single.

    Gene tokens are embedded by the model's :class:`GeneEncoder` (passed at call time, so its
    weights are shared, not copied); non-gene tokens (drugs, cytokines) by a table of their own,
    zero-initialised so that a token never seen in training adds nothing. Optional descriptor
    vectors (V, D) are projected and added, which is what lets an unseen perturbation carry
    information.

    With ``dose=True``, a perturbation given at a dose (B,) gets a log-dose embedding added to its
    own: a small network of ``log10(dose)``, smooth in it (so a dose between two seen ones lands
    between them), its last layer zero-initialised (it adds nothing until trained); a dose <= 0
    (none given, or a control) adds nothing.
    """

    def __init__(self, n_tokens: int, first_other_token: int, pad_id: int, d_model: int,
                 descriptors: Tensor | None = None, dose: bool = False):
        super().__init__()
        self.first_other_token = first_other_token
        self.pad_id = pad_id
        n_other = n_tokens - first_other_token
        self.other = nn.Embedding(max(n_other, 1), d_model)
        nn.init.zeros_(self.other.weight)
        self.arity = nn.Embedding(MAX_ARITY + 1, d_model)
        nn.init.zeros_(self.arity.weight)
        if descriptors is not None:
            self.register_buffer("descriptors", descriptors.float())
            self.descriptor_proj = nn.Linear(descriptors.shape[1], d_model)
        else:
            self.descriptors = None
        self.dose = None
        if dose:
            self.dose = nn.Sequential(nn.Linear(1, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
            nn.init.zeros_(self.dose[-1].weight)
            nn.init.zeros_(self.dose[-1].bias)

    def dose_embedding(self, dose: Tensor) -> Tensor:
        """(B,) doses -> (B, d): the log-dose embedding (zero where the dose is <= 0)."""
        if self.dose is None:
            raise ValueError("this encoder was built without dose (dose=True)")
        dose = dose.float().reshape(-1, 1)
        given = (dose > 0).to(dose.dtype)
        return self.dose(torch.log10(dose.clamp(min=1e-12)) * given) * given

    def forward(self, ids: Tensor, gene_encoder: GeneEncoder, dose: Tensor | None = None) -> Tensor:
        is_other = ids >= self.first_other_token
        gene_part = gene_encoder(torch.where(is_other, torch.full_like(ids, self.pad_id), ids))
        other_part = self.other((ids - self.first_other_token).clamp(min=0))
        emb = torch.where(is_other.unsqueeze(-1), other_part, gene_part)
        if self.descriptors is not None:
            emb = emb + self.descriptor_proj(self.descriptors[ids])
        mask = (ids != self.pad_id).unsqueeze(-1).to(emb.dtype)
        arity = mask.sum(1).squeeze(-1).long().clamp(max=MAX_ARITY)
        out = (emb * mask).sum(1) + self.arity(arity)
        if dose is not None:
            out = out + self.dose_embedding(dose)
        return out
