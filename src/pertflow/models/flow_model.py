"""What the flow models share on the AnnData side: the prior they start from, and model selection
on validation metrics.

A :class:`GeneFlowModel` fits its prior (:mod:`pertflow.models.prior`) before training and feeds
each batch the prior's leave-one-out shift; every validation it generates the split's validation
perturbations and scores them (:mod:`pertflow.models.validation`), keeping the best checkpoint by
that score. After training it compares the flow with its own prior on validation and predicts
the way that scored best (``prediction_mode``; :func:`~pertflow.models.prior.choose_prediction_mode`,
shared with the other models anchored on a prior):

* ``flow``: the flow's cells;
* ``prior-mean``: the flow's cells moved onto the prior's mean (the prior's shift, the flow's
  spread);
* ``prior``: the prior's own cells (the flow added nothing on validation).

So a run is never worse on validation than its baseline, and says which way it predicts.

Dose: where the data spec has a dose column, a condition is (perturbation, dose), labelled
``drugA@1`` (:class:`~pertflow.data.spec.DataSpec`); the prior works per condition (a baseline's
shift of an unmeasured dose: :mod:`pertflow.models.baselines`), and a model whose network reads
dose (``reads_dose``: ``cfm``) conditions on it through the perturbation encoder's log-dose
embedding in its loss, its sampling and :meth:`GeneFlowModel.generate`. A model that does not
read dose refuses such data (:class:`~pertflow.models.base.PerturbationModel`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pertflow.data.keys import BATCH_KEYS
from pertflow.data.view import SplitView
from pertflow.models.config import PredictConfig
from pertflow.models.flow import flow_parts
from pertflow.errors import InputError
from pertflow.models.network import NetworkModel, frozen, inference_device
from pertflow.models.prior import Prior, choose_prediction_mode, mode_cells
from pertflow.models.validation import ValidationScore, ValidationSet
from pertflow.train.config import TrainConfig

VALIDATION_SEED = 0


class GeneFlowModel(NetworkModel):
    """A flow network anchored on a baseline (see the module docstring).

    The network's ``loss`` reads ``batch[BATCH_KEYS.PRIOR_DELTA]``, its ``sample`` takes
    ``shift=`` (n, G), the prior's shift of each control cell, and its
    ``control_embedding(control (n, G)) -> (n, G, d)`` gives the tokens it reads control cells as.
    A subclass whose network takes ``dose`` (a :class:`~pertflow.models.flow.GeneFlowNetwork` built
    with ``dose``, sampling with ``dose=`` (n,)) sets ``reads_dose``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.prior: Prior | None = None
        self.prediction_mode = "flow"

    @classmethod
    def trained_with_dose(cls, tensors: dict[str, torch.Tensor]) -> bool:
        """A flow trained on doses saved its log-dose embedding (``perturbation_encoder.dose``)."""
        return cls.reads_dose and any(key.startswith("perturbation_encoder.dose.") for key in tensors)

    def network_inputs(self) -> dict[str, Any]:
        """What a :class:`~pertflow.models.flow.GeneFlowNetwork` is built from besides its config:
        the flow parts and the vocabulary's genes, special tokens and descriptors (keywords)."""
        vocab = self.vocab
        descriptors = vocab.descriptor_matrix()
        return {
            "parts": flow_parts(self.config),
            "gene_tokens": torch.from_numpy(vocab.gene_ids(vocab.expression_genes)),
            "n_tokens": len(vocab),
            "first_other_token": vocab.first_other_id,
            "pad_id": vocab.pad_id,
            "unk_id": vocab.unk_id,
            "descriptors": None if descriptors is None else torch.from_numpy(descriptors),
            **({"dose": self.spec.dose_col is not None} if self.reads_dose else {}),
        }

    def batch_arrays(self, view: SplitView) -> dict[str, Any]:
        return {"group_arrays": {BATCH_KEYS.PRIOR_DELTA: self.prior.training_delta}}

    # ------------------------------------------------------------------ training
    def fit(self, view: SplitView, train_config: TrainConfig, run_dir: Path, resume: bool = False, selector: Any = None) -> None:
        validation = ValidationSet(view, seed=VALIDATION_SEED)
        self.prior = Prior.fit(self.config.prior, view, validation)
        self.prediction_mode = "flow"
        if len(validation):
            selector = lambda module: self.validation_score(module, validation).as_dict()  # noqa: E731
        super().fit(view, train_config, run_dir, resume, selector=selector)
        report = {"prior": self.prior.name, "prior_reason": self.prior.reason, "prior_scores": self.prior.scores}
        if len(validation):
            self.prediction_mode, choice = choose_prediction_mode(
                lambda mode: self.validation_score(self.module, validation, mode), self.prior, "the flow")
            report.update(choice)
        report["prediction_mode"] = self.prediction_mode
        self.fit_report.update(report)

    def validation_score(self, module: torch.nn.Module, validation: ValidationSet, mode: str = "flow") -> ValidationScore:
        """Score ``module``'s cells of the validation perturbations (leave-one-out prior shifts:
        :meth:`Prior.held_out_delta`)."""
        rng = np.random.default_rng(VALIDATION_SEED)
        with torch.no_grad():
            return validation.score(
                lambda p, c, controls: self.cells(module, controls, p, self.prior.held_out_delta(p, c), rng, self.predict_config, mode,
                                                  context=c)
            )

    # ------------------------------------------------------------------ prediction
    def generate(
        self,
        controls: np.ndarray,
        perturbation: str,
        context: str,
        rng: np.random.Generator,
        settings: PredictConfig | None = None,
    ) -> np.ndarray:
        module = self.module.to(inference_device())
        settings = settings or self.predict_config
        shift = self.prior.delta(perturbation, context) if self.prior is not None else np.zeros(len(self.genes), np.float32)
        mode = self.prediction_mode if settings.mode == "auto" else settings.mode
        return self.cells(module, controls, perturbation, shift, rng, settings, mode, context=context)

    def cells(self, module: torch.nn.Module, controls: np.ndarray, perturbation: str, shift: np.ndarray,
              rng: np.random.Generator, settings: PredictConfig, mode: str, context: str | None = None) -> np.ndarray:
        """Cells of a perturbation (a condition ``drugA@1`` with a dose column) from control cells
        (of ``context``) and the prior's (G,) shift, in one of
        :data:`~pertflow.models.prior.PREDICTION_MODES` (:func:`~pertflow.models.prior.mode_cells`)."""
        shifts = np.broadcast_to(shift[None, :], controls.shape).astype(np.float32)
        inputs = self.cell_inputs(context, len(controls))
        if self.reads_dose and self.spec.dose_col is not None:
            dose = self.spec.split_dose(perturbation)[1]
            inputs["dose"] = np.full(len(controls), dose or 0.0, dtype=np.float32)
        return mode_cells(mode, controls, shift,
                          lambda: self.sample_cells(module, controls, perturbation, rng, settings, shift=shifts, **inputs))

    def cell_inputs(self, context: str | None, n: int) -> dict[str, np.ndarray]:
        """More inputs of the network's ``sample``, one row per control cell (n rows) of
        ``context``: none here; a network conditioned on covariates gets them this way."""
        return {}

    # ------------------------------------------------------------------ adaptation
    def control_embedding(self, controls: torch.Tensor) -> torch.Tensor:
        """(n, G) control cells -> (n, G, d) the tokens the network reads them as (the network's
        ``control_embedding``; see :meth:`PerturbationModel.control_embedding`).

        A network that centres its controls per gene (``center``) reads a shifted control batch
        exactly as the unshifted one, and moves its cells by the shift itself: there is nothing
        for a per-gene adapter to align, so that is refused.
        """
        if self.config.center:
            raise InputError(
                f"model '{self.name}' centres its control cells per gene (model.center: true): a per-gene shift of "
                "its input leaves its control tokens unchanged and moves its cells by the same shift, so there is "
                "nothing for an adapter to align. Adapt a model trained with --set model.center=false, or predict "
                "without an adapter."
            )
        with frozen(self.module.to(controls.device)) as module:
            return module.control_embedding(controls)

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().state_tensors(), **self.prior.state_tensors()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._prior_tensors = {k: v for k, v in tensors.items() if k.startswith("prior.")}
        super().load_state_tensors({k: v for k, v in tensors.items() if not k.startswith("prior.")})

    def extra_state(self) -> dict[str, Any]:
        state = {**super().extra_state(), "prediction_mode": self.prediction_mode}
        if self.prior is not None:
            state["prior"] = self.prior.extra_state()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.prediction_mode = state["prediction_mode"]
        self.prior = Prior.from_state(state["prior"], self._prior_tensors, self)
