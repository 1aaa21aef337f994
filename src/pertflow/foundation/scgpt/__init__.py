"""The scGPT-compatible foundation library: networks, objectives, public checkpoints, frozen feature
extraction, pretraining (:mod:`pertflow.foundation.scgpt.pretrain`). The perturbation model built on
it is :mod:`pertflow.models.scgpt_generator`.

Entry points: :func:`load_pretrained` / :func:`export_pretrained` for the public model folders
(``args.json``, ``vocab.json``, ``best_model.pt``), :class:`TransformerModel` and friends for
training, :class:`FrozenScGPTExtractor` and :class:`FeatureCache` for frozen use.
"""

from pertflow.foundation.scgpt.checkpoint import (
    LoadReport,
    PretrainedScGPT,
    export_pretrained,
    load_pretrained,
)
from pertflow.foundation.scgpt.config import ScGPTConfig
from pertflow.foundation.scgpt.extractor import FrozenScGPTExtractor
from pertflow.foundation.scgpt.feature_cache import FeatureCache, GeneFeatures
from pertflow.foundation.scgpt.losses import ScGPTLossWeights, random_mask_value, scgpt_loss
from pertflow.foundation.scgpt.generation_model import TransformerGenerator
from pertflow.foundation.scgpt.transformer import MultiOmicTransformerModel, ScGPTOutput, TransformerModel

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
