"""The gene-space flow models on the AnnData side: a flow network over genes anchored on a prior.

:class:`GeneFlowModel` is an :class:`~pertflow.models.anchored.AnchoredNetwork` (the prior, the
validation that selects checkpoint and prediction mode, persistence) whose network is a
:class:`~pertflow.models.flow.GeneFlowNetwork`: it builds the network from the vocabulary and
the flow matching the config names, reads control cells as per-gene tokens (what the domain
adapter aligns) and, for a network that reads dose, conditions on it.

Dose: where the data spec has a dose column, a condition is (perturbation, dose), labelled
``drugA@1`` (:class:`~pertflow.data.spec.DataSpec`); the prior works per condition (a baseline's
shift of an unmeasured dose: :mod:`pertflow.models.baselines`), and a model whose network reads
dose (``reads_dose``: ``cfm``) conditions on it through the perturbation encoder's log-dose
embedding in its loss, its sampling and generation. A model that does not read dose refuses such
data (:class:`~pertflow.models.base.PerturbationModel`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pertflow.models.anchored import AnchoredNetwork
from pertflow.models.descriptor_choice import ChoosesDescriptor
from pertflow.models.flow import flow_matching
from pertflow.models.network import frozen


class GeneFlowModel(ChoosesDescriptor, AnchoredNetwork):
    """A flow network over genes anchored on a baseline (see the module docstring).

    Its network's ``control_embedding(control (n, G)) -> (n, G, d)`` gives the tokens it reads
    control cells as. A subclass whose network takes ``dose`` (a
    :class:`~pertflow.models.flow.GeneFlowNetwork` built with ``dose``, sampling with ``dose=``
    (n,)) sets ``reads_dose``.
    """

    @classmethod
    def trained_with_dose(cls, tensors: dict[str, torch.Tensor]) -> bool:
        """A flow trained on doses saved its log-dose embedding (``perturbation_encoder.dose``)."""
        return cls.reads_dose and any(key.startswith("perturbation_encoder.dose.") for key in tensors)

    def network_inputs(self) -> dict[str, Any]:
        """What a :class:`~pertflow.models.flow.GeneFlowNetwork` is built from besides its config:
        the flow matching and the vocabulary's genes, special tokens and descriptors (keywords;
        :meth:`~pertflow.models.descriptor_choice.ChoosesDescriptor.descriptor_matrix`)."""
        vocab = self.vocab
        descriptors = self.descriptor_matrix()
        return {
            "flow": flow_matching(self.config),
            "gene_tokens": torch.from_numpy(vocab.gene_ids(vocab.expression_genes)),
            "n_tokens": len(vocab),
            "first_other_token": vocab.first_other_id,
            "pad_id": vocab.pad_id,
            "unk_id": vocab.unk_id,
            "descriptors": None if descriptors is None else torch.from_numpy(descriptors),
            **({"dose": self.spec.dose_col is not None} if self.reads_dose else {}),
        }

    def cell_inputs(self, perturbation: str, context: str | None, n: int) -> dict[str, np.ndarray]:
        """A network that reads dose gets the condition's dose for every cell."""
        if self.reads_dose and self.spec.dose_col is not None:
            dose = self.spec.split_dose(perturbation)[1]
            return {"dose": np.full(n, dose or 0.0, dtype=np.float32)}
        return {}

    # ------------------------------------------------------------------ adaptation
    def control_embedding(self, controls: torch.Tensor) -> torch.Tensor:
        """(n, G) control cells -> (n, G, d) the tokens the network reads them as (the network's
        ``control_embedding``; see :meth:`PerturbationModel.control_embedding`).

        A network that centres its controls per gene (``center``) reads a shifted control batch
        exactly as the unshifted one: only a change of scale or dropout reaches it, which
        :func:`pertflow.adapt.adapter.learn_adapter` says for a ``shift`` adapter.
        """
        with frozen(self.module.to(controls.device)) as module:
            return module.control_embedding(controls)
