"""Token and value embeddings shared by the per-gene models (scGPT family, gene-space flows).

Parameter names follow scGPT (``embedding``, ``enc_norm``, ``linear1``, ``linear2``, ``norm``) so that
public scGPT checkpoints load into these layers by name, with no renaming.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GeneEncoder(nn.Module):
    """Gene-vocabulary embedding followed by LayerNorm.

    Parameters
    ----------
    num_embeddings
        Vocabulary size.
    embedding_dim
        Width ``d``.
    padding_idx
        Token id of ``<pad>``; its row is kept at zero and receives no gradient.

    Notes
    -----
    scGPT parameter names: ``embedding.weight`` (V, d), ``enc_norm.weight`` (d,), ``enc_norm.bias`` (d,).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(embedding_dim)

    def forward(self, ids: Tensor) -> Tensor:
        """Embed token ids.

        Parameters
        ----------
        ids
            Long tensor of token ids, any shape ``(...)``; e.g. ``(B, L)`` genes or ``(B, 2)``
            perturbation targets.

        Returns
        -------
        Tensor
            ``(..., d)``.
        """
        return self.enc_norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    """Scalar expression value -> vector: Linear(1, d) -> ReLU -> Linear(d, d) -> LayerNorm -> dropout.

    Parameters
    ----------
    d_model
        Width ``d``.
    dropout
        Dropout on the output.
    max_value
        Values are clamped from above at this value (scGPT uses 512) so that a stray huge count
        cannot saturate the first layer; there is no lower clamp because scGPT's mask and pad
        values are negative (-1, -2) and must stay distinguishable.

    Notes
    -----
    scGPT parameter names: ``linear1.weight`` (d, 1), ``linear1.bias``, ``linear2.weight`` (d, d),
    ``linear2.bias``, ``norm.weight``, ``norm.bias``.
    """

    def __init__(self, d_model: int, dropout: float = 0.1, max_value: float = 512.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.max_value = float(max_value)

    def forward(self, values: Tensor) -> Tensor:
        """Encode values.

        Parameters
        ----------
        values
            Float tensor ``(B, L)``.

        Returns
        -------
        Tensor
            ``(B, L, d)``.
        """
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))


class CategoryValueEncoder(nn.Module):
    """Binned expression value (an integer bin) -> vector: Embedding + LayerNorm.

    Parameters
    ----------
    num_embeddings
        Number of bins including the special pad and mask bins (scGPT: ``n_bins + 2``).
    embedding_dim
        Width ``d``.
    padding_idx
        Bin index used for padding (scGPT passes its ``pad_value``, which for the category style is
        ``n_bins``).

    Notes
    -----
    scGPT parameter names: ``embedding.weight`` (n_bins, d), ``enc_norm.weight``, ``enc_norm.bias``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(embedding_dim)

    def forward(self, values: Tensor) -> Tensor:
        """Embed bins.

        Parameters
        ----------
        values
            ``(B, L)`` bin indices, float or long (floats are truncated to long, as in scGPT).

        Returns
        -------
        Tensor
            ``(B, L, d)``.
        """
        return self.enc_norm(self.embedding(values.long()))


class BatchLabelEncoder(nn.Module):
    """Batch (or modality) label -> vector: Embedding + LayerNorm.

    Parameters
    ----------
    num_embeddings
        Number of labels.
    embedding_dim
        Width ``d``.
    padding_idx
        Optional padding label.

    Notes
    -----
    scGPT parameter names: ``embedding.weight`` (n_labels, d), ``enc_norm.weight``, ``enc_norm.bias``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(embedding_dim)

    def forward(self, labels: Tensor) -> Tensor:
        """Embed labels.

        Parameters
        ----------
        labels
            Long tensor ``(B,)`` (one label per cell) or ``(B, L)`` (one per token).

        Returns
        -------
        Tensor
            ``(B, d)`` or ``(B, L, d)``.
        """
        return self.enc_norm(self.embedding(labels))
