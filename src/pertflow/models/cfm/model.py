"""``CFM``: the gene-space flow model as a pertflow model (AnnData-facing)."""

from __future__ import annotations

from pertflow.models.cfm.config import CFMConfig
from pertflow.models.cfm.module import CFMModule
from pertflow.models.flow_model import GeneFlowModel


class CFM(GeneFlowModel):
    """Gene-space conditional flow matching (scDFM backbone); see :mod:`pertflow.models.cfm.module`."""

    name = "cfm"
    config_class = CFMConfig
    reads_dose = True

    def build_module(self) -> CFMModule:
        return CFMModule(self.config, **self.network_inputs())
