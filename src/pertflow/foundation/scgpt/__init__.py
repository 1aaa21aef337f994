"""scGPT-compatible model family: networks, objectives, public checkpoints, frozen feature extraction.

Entry points: :func:`load_pretrained` / :func:`export_pretrained` for the public model folders
(``args.json``, ``vocab.json``, ``best_model.pt``), :class:`TransformerModel` and friends for
training, :class:`FrozenScGPTExtractor` and :class:`FeatureCache` for frozen use.
"""

from pertflow.models.scgpt.checkpoint import (
    LoadReport,
    PretrainedScGPT,
    export_pretrained,
    load_pretrained,
)
from pertflow.models.scgpt.config import ScGPTConfig
from pertflow.models.scgpt.extractor import FrozenScGPTExtractor
from pertflow.models.scgpt.feature_cache import FeatureCache, GeneFeatures
from pertflow.models.scgpt.losses import ScGPTLossWeights, random_mask_value, scgpt_loss
from pertflow.models.scgpt.generation_model import TransformerGenerator
from pertflow.models.scgpt.transformer import MultiOmicTransformerModel, ScGPTOutput, TransformerModel

__all__ = [
    "FeatureCache",
    "FrozenScGPTExtractor",
    "GeneFeatures",
    "LoadReport",
    "MultiOmicTransformerModel",
    "PretrainedScGPT",
    "ScGPTConfig",
    "ScGPTLossWeights",
    "ScGPTOutput",
    "TransformerGenerator",
    "TransformerModel",
    "export_pretrained",
    "load_pretrained",
    "random_mask_value",
    "scgpt_loss",
]
