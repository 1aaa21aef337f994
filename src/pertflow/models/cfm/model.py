"""``CFM``: the gene-space flow model as a pertflow model (AnnData-facing)."""

from __future__ import annotations

import torch

from pertflow.models.cfm.config import CFMConfig
from pertflow.models.cfm.module import CFMModule
from pertflow.models.flow import flow_parts
from pertflow.models.flow_model import GeneFlowModel


class CFM(GeneFlowModel):
    """Gene-space conditional flow matching (scDFM backbone); see :mod:`pertflow.models.cfm.module`."""

    name = "cfm"
    config_class = CFMConfig

    def build_module(self) -> CFMModule:
        vocab = self.vocab
        descriptors = vocab.descriptor_matrix()
        return CFMModule(
            self.config,
            flow_parts(self.config),
            torch.from_numpy(vocab.gene_ids(vocab.expression_genes)),
            n_tokens=len(vocab),
            first_other_token=vocab.first_other_id,
            pad_id=vocab.pad_id,
            unk_id=vocab.unk_id,
            descriptors=None if descriptors is None else torch.from_numpy(descriptors),
        )
