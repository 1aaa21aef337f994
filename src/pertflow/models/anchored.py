"""The contract of a model anchored on a prior: one home for the prior, the validation that
selects, the prediction mode and their persistence.

A model anchored on a prior (the gene-space flows, CFM-VC, latent-shift) starts from a
baseline's predicted shift (:mod:`pertflow.models.prior`) and learns what the baseline misses.
:meth:`AnchoredModel.fit` is the one sequence they share::

    inner = inner_split(view, config.validation)    # cells held out as the test holds out its own
    validation = ValidationSet(inner.view)          # the perturbations that judge (test cells never read)
    self.prior = Prior.fit(config.prior, inner.view, validation)
    self.fit_anchored(inner.view, ..., validation)   # the family's own training (checkpoints
                                                     # may be chosen with self.validation_score)
    self.prediction_mode = choose on validation      # flow / prior-mean / prior
    self.prior = the chosen prior refitted on view   # (and the model trained again with refit)

With ``validation_rotations`` > 1 the prior and the mode are chosen on the mean over that many
inner splits (:func:`~pertflow.models.inner_split.rotations`): the model is first trained on each
extra one (``stages/rotation-<r>``) and its modes scored there, then on the first as above;
only on the kinds of inner split ``validation_rotations_on`` names (the fit report says so).
With ``mode_rule: every-split`` (the default) a mode other than the prior's cells is a candidate
only where it scores at least the prior's cells on every inner split, not only on their mean.

A family implements :meth:`fit_anchored` and :meth:`own_cells` (its own cells of a perturbation
from control cells and the prior's shift); prediction (:meth:`generate`), validation scoring and
the choice of mode are the contract's, so a new kind of validation is one change here.
After fitting the model predicts the way that scored best on validation (``prediction_mode``):

* ``flow``: the model's own cells;
* ``prior-mean``: its cells moved onto the prior's mean (the prior's shift, the model's spread;
  clipped at zero after, see :data:`~pertflow.models.prior.PREDICTION_MODES`);
* ``prior``: the prior's own cells (the model added nothing on validation).

So a run is never worse on validation than its baseline, and says which way it predicts.
``predict.mode`` forces one.

:class:`AnchoredNetwork` is the base of an anchored model that is one network trained by the
engine (:class:`~pertflow.models.network.NetworkModel`): its batches carry the prior's
leave-one-out shift and its checkpoints are kept by the validation score. The gene-space flows
(:class:`~pertflow.models.flow_model.GeneFlowModel`) and CFM-VC's latent flow build on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pertflow.data.keys import BATCH_KEYS
from pertflow.data.view import SplitView
from pertflow.models.base import PerturbationModel
from pertflow.models.config import AnchoredConfig, PredictConfig
from pertflow.models.inner_split import InnerSplit, inner_split, rotations
from pertflow.models.network import NetworkModel, inference_device
from pertflow.models.prior import PREDICTION_MODES, Prior, choose_prediction_mode, led_on_every_split, mode_cells
from pertflow.models.validation import ValidationScore, ValidationSet, mean_score
from pertflow.train.checkpoint import STAGES_DIR
from pertflow.train.config import TrainConfig

VALIDATION_SEED = 0
PRIOR_PREFIX = "prior."
REFIT_DIR = "refit"  # where the model trained again on every training cell keeps its checkpoints


def validation_splits(view: SplitView, config: AnchoredConfig) -> tuple[InnerSplit, ValidationSet,
                                                                         list[tuple[InnerSplit, ValidationSet]]]:
    """The inner split an anchored model with ``config`` is fitted on, its validation set, and the
    further inner splits it chooses on (``validation_rotations``), each with validation groups to score."""
    inner = inner_split(view, config.validation, config.validation_held_out, VALIDATION_SEED,
                        config.validation_contexts)
    reference = config.validation_reference
    validation = ValidationSet(inner.view, seed=VALIDATION_SEED, reference=reference)
    if not len(validation):
        return inner, validation, []
    n_splits = config.validation_rotations if inner.kind in config.validation_rotations_on else 1
    splits = rotations(view, inner, n_splits, config.validation_contexts, VALIDATION_SEED)[1:]
    return inner, validation, [(split, val) for r, split in enumerate(splits, start=1)
                               if len(val := ValidationSet(split.view, seed=VALIDATION_SEED + r, reference=reference))]


class AnchoredModel(PerturbationModel):
    """A model anchored on a prior (see the module docstring).

    Subclasses implement :meth:`fit_anchored` and :meth:`own_cells`; their ``config`` has a
    ``prior`` field (:data:`~pertflow.models.flow.PriorName`).
    """

    #: how the notes name the model's own cells ("the flow", "the mlp predictor")
    what: ClassVar[str] = "the flow"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.prior: Prior | None = None
        self.prediction_mode = "flow"

    # ------------------------------------------------------------------ to implement
    def fit_anchored(self, view: SplitView, train_config: TrainConfig, run_dir: Path, resume: bool,
                     validation: ValidationSet | None) -> None:
        """Train the model's own part on ``view``'s training cells, :attr:`prior` fitted; write what
        it reports into :attr:`fit_report`. ``validation`` may choose checkpoints
        (:meth:`validation_score`); None when the model is trained again on every training cell
        after the choices were made (``refit``)."""
        raise NotImplementedError

    def own_cells(self, controls: np.ndarray, perturbation: str, context: str, shift: np.ndarray,
                  rng: np.random.Generator, settings: PredictConfig, **how: Any) -> np.ndarray:
        """(n, G) the model's own cells of a perturbation from (n, G) control cells of ``context``
        and the prior's (G,) shift. ``how``: what a family passes from its own scoring (e.g. the
        network being trained)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the one fit sequence
    def fit(self, view: SplitView, train_config: TrainConfig, run_dir: Path, resume: bool = False) -> None:
        """Validation, prior, the model's own training, then the prediction mode (see the module
        docstring); the fit report says what was chosen, on what, and why."""
        run_dir = Path(run_dir)
        self.fit_report = {}
        self.prediction_mode = "flow"
        inner, validation, others = validation_splits(view, self.config)
        rotates = inner.kind in self.config.validation_rotations_on
        self.prior = Prior.fit(self.config.prior, inner.view, validation, self.config.prior_strengths,
                               more=[(split.view, val) for split, val in others], margin=self.config.strength_margin)
        rotation_scores = [self.fit_rotation(r, split, val, train_config, run_dir, resume)
                           for r, (split, val) in enumerate(others, start=1)]
        if others:  # the rotations trained the model on other splits: the first one's now
            self.fit_report = {}
            self.prior = self.prior.refitted(inner.view)
        self.fit_anchored(inner.view, train_config, run_dir, resume, validation)
        chosen: dict[str, Any] = {"validation_split": {**inner.describe(), "groups": len(validation)}}
        if self.config.validation_rotations > 1 and not rotates:
            chosen["validation_split"]["rotations"] = (f"one split: validation_rotations_on "
                                                      f"{list(self.config.validation_rotations_on)} leaves out "
                                                      f"'{inner.kind}'")
        if len(validation):
            first = {mode: self.validation_score(validation, mode) for mode in PREDICTION_MODES}
            every = [first, *rotation_scores]  # each inner split's scores of every mode
            self.prediction_mode, choice = choose_prediction_mode(
                lambda mode: mean_score([split[mode] for split in every]), self.prior, self.what,
                None if self.config.mode_rule == "mean" else
                led_on_every_split([{m: s.score for m, s in split.items()} for split in every]))
            chosen.update(choice)  # with rotations, "validation" is the mean over the inner splits
            if others:
                chosen["validation_first_split"] = {m: s.as_dict("") for m, s in first.items()}
        if others:
            chosen["validation_rotations"] = [{**split.describe(), "groups": len(val),
                                               "validation": {m: s.as_dict("") for m, s in scores.items()}}
                                              for (split, val), scores in zip(others, rotation_scores)]
        if inner.held_out:
            self.prior = self.prior.refitted(view)  # the chosen baseline, on every training cell
            if self.config.refit:
                inner_report, self.fit_report = self.fit_report, {}
                self.fit_anchored(view, train_config, run_dir / REFIT_DIR, resume, None)
                self.fit_report["inner_fit"] = inner_report
            chosen["validation_split"]["model_trained_on"] = "all training cells" if self.config.refit else (
                "the training cells without the held-out ones (refit: false)")
        self.fit_report.update({"prior": self.prior.label, "prior_reason": self.prior.reason,
                                "prior_scores": self.prior.scores, **chosen, "prediction_mode": self.prediction_mode})

    def fit_rotation(self, r: int, split: InnerSplit, validation: ValidationSet, train_config: TrainConfig,
                     run_dir: Path, resume: bool) -> dict[str, ValidationScore]:
        """Train the model on one more inner split (``validation_rotations``; its checkpoints in
        ``stages/rotation-<r>``) with the chosen prior refitted on it, and score each prediction
        mode on its held-out groups."""
        self.prior = self.prior.refitted(split.view)
        self.fit_anchored(split.view, train_config, run_dir / STAGES_DIR / f"rotation-{r}", resume, validation)
        return {mode: self.validation_score(validation, mode) for mode in PREDICTION_MODES}

    def validation_score(self, validation: ValidationSet, mode: str = "flow", **how: Any) -> ValidationScore:
        """The validation score of the cells of one prediction mode; every shift is the prior's
        leave-one-out one (:meth:`Prior.held_out_delta`), as in training."""
        rng = np.random.default_rng(VALIDATION_SEED)

        def predict(p: str, c: str, controls: np.ndarray) -> np.ndarray:
            shift = self.prior.held_out_delta(p, c)
            return mode_cells(mode, controls, shift,
                              lambda: self.own_cells(controls, p, c, shift, rng, self.predict_config, **how))

        with torch.no_grad():
            return validation.score(predict)

    # ------------------------------------------------------------------ prediction
    def generate(
        self,
        controls: np.ndarray,
        perturbation: str,
        context: str,
        rng: np.random.Generator,
        settings: PredictConfig | None = None,
    ) -> np.ndarray:
        settings = settings or self.predict_config
        shift = (self.prior.delta(perturbation, context) if self.prior is not None
                 else np.zeros(len(self.genes), np.float32))
        mode = self.prediction_mode if settings.mode == "auto" else settings.mode
        return mode_cells(mode, controls, shift,
                          lambda: self.own_cells(controls, perturbation, context, shift, rng, settings))

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().state_tensors(), **self.prior.state_tensors()}

    def extra_state(self) -> dict[str, Any]:
        state = {**super().extra_state(), "prediction_mode": self.prediction_mode}
        if self.prior is not None:
            state["prior"] = self.prior.extra_state()
        return state

    def load_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        super().load_state({k: v for k, v in tensors.items() if not k.startswith(PRIOR_PREFIX)}, extra)
        self.prediction_mode = extra.get("prediction_mode", "flow")  # runs saved before the modes predict as the model
        self.prior = Prior.from_state(extra["prior"], tensors, self)


class AnchoredNetwork(AnchoredModel, NetworkModel):
    """An anchored model that is one network trained by the engine (see the module docstring).

    The network's ``loss`` reads ``batch[BATCH_KEYS.PRIOR_DELTA]`` and its ``sample`` takes
    ``shift=`` (n, G), the prior's shift of each control cell, and the arrays of :meth:`cell_inputs`.
    """

    def batch_arrays(self, view: SplitView) -> dict[str, Any]:
        return {"group_arrays": {BATCH_KEYS.PRIOR_DELTA: self.prior.training_delta}}

    def fit_anchored(self, view: SplitView, train_config: TrainConfig, run_dir: Path, resume: bool,
                     validation: ValidationSet | None) -> None:
        selector = None
        if validation is not None and len(validation):
            selector = lambda module: self.validation_score(validation, module=module).as_dict()  # noqa: E731
        NetworkModel.fit(self, view, train_config, run_dir, resume, selector=selector)

    def own_cells(self, controls: np.ndarray, perturbation: str, context: str, shift: np.ndarray,
                  rng: np.random.Generator, settings: PredictConfig,
                  module: torch.nn.Module | None = None) -> np.ndarray:
        """The network's cells (``module``: a network being trained, else the model's own)."""
        module = module if module is not None else self.module.to(inference_device())
        shifts = np.broadcast_to(shift[None, :], controls.shape).astype(np.float32)
        return self.sample_cells(module, controls, perturbation, rng, settings, shift=shifts,
                                 **self.cell_inputs(perturbation, context, len(controls)))

    def cell_inputs(self, perturbation: str, context: str | None, n: int) -> dict[str, np.ndarray]:
        """More inputs of the network's ``sample``, one row per control cell (n rows) of
        ``context``: none here; a network conditioned on covariates or dose gets them this way."""
        return {}
