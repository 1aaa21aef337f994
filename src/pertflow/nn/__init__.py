"""Layers with weights used by two or more model families (tensors in, tensors out)."""

from pertflow.nn.decoders import ExprDecoder, ExprPrediction
from pertflow.nn.embeddings import (
    BatchLabelEncoder,
    CategoryValueEncoder,
    ContinuousValueEncoder,
    GeneEncoder,
)

__all__ = [
    "BatchLabelEncoder",
    "CategoryValueEncoder",
    "ContinuousValueEncoder",
    "ExprDecoder",
    "ExprPrediction",
    "GeneEncoder",
]
