"""Configuration of the gene-space flow model."""

from __future__ import annotations

from dataclasses import dataclass

from pertflow.models.flow import GeneFlowConfig


@dataclass(frozen=True)
class CFMConfig(GeneFlowConfig):
    """The ``model`` section of a ``cfm`` run: the fields of every gene-space flow model
    (:class:`~pertflow.models.flow.GeneFlowConfig`), with the SPEC's defaults (SPEC 2.1)."""
