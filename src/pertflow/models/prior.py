"""A flow's prior: the baseline whose predicted shift the flow starts from.

A flow anchored on a baseline starts from the context's control cells shifted by the baseline's
predicted response and learns only the residual transport and the change in spread; with zero
velocity it predicts the baseline exactly. The prior is fitted on training cells only and saved
with the run.

In training, the shift of a training perturbation (in its context) is the baseline's prediction
*without* that perturbation's own response (leave one out): otherwise the baseline would see
the answer, and the flow would learn to trust a prior that at test time, for a perturbation it
never measured, is only an estimate. The one exception is a single under the ``additive`` (or
``additive-mean``) prior: these build a combination from its *measured* singles, so a measured single is
that prior's input, not something it predicts; its shift is its own response, the same as when
it is a component of a test combination. (Only in training: validation scores every prior and
every prediction mode leave-one-out, :meth:`Prior.held_out_delta`.) The flow then learns a
near-zero residual for singles and, since a combination's condition is the sum of its singles' (see
:class:`~pertflow.nn.perturbation.PerturbationEncoder`), only the interaction for combinations.
(Left out, a single's residual would carry its whole effect, and a combination's would count its
components twice: once in the prior, once in the summed condition.) The other priors keep a
single's shift left out, so the model's residual for a measured single is its response minus
that estimate; a combination with a measured single then takes as its shift the sum of its
components' shifts (:meth:`Prior.composed`: a measured single's training shift, the baseline's
estimate for any other component), never the baseline's own estimate of the combination, which
already holds the single's response (linear) or an average of it (mean): with the residuals
the model adds for its components, each measured single's response counts once (on
norman-unseen-single, latent-shift under the linear prior predicted MAP2K3+MAP2K6 at -0.433
top-20 DE Pearson delta, the linear baseline 0.252). A condition at a dose
(``drugA@1``, with a dose column) is always left out: at an unmeasured dose the prior is an
interpolation of the other doses (:meth:`~pertflow.models.baselines.DeltaModel.dose_response`),
and in training it is the same, so the flow learns how far a dose is from that estimate. ``auto``
picks the baseline that scores best on the split's validation perturbations, each also predicted
leave-one-out (:mod:`pertflow.models.validation`); test cells are never read. One case validation
cannot judge: a split that predicts combinations of measured singles whose validation has no such
combination (norman-combo-seen2: every combination with both singles measured is a test one);
there ``auto`` takes ``additive``, the baseline built from the measured singles, says so, and the
flow model predicts with it (validation cannot judge the flow on that case either).

A prior also has a strength: its shift scaled by a factor chosen on validation among the
config's ``prior_strengths`` (default ``[1.0]``: the baseline as it is; :data:`PRIOR_STRENGTHS`
is the set 1, 0.75, 0.5, 0.25 the CPU configs give). Where a response transfers only partly to a
new context, the baseline's full shift moves the cells too far: on the kang CD4T test, half the
linear baseline's shift kept its direction (top-20 DE Pearson 0.843 vs 0.845) and brought its
E-distance from 1.635 to 0.536 (no change: 1.330). The strength stops at a quarter, so that the
prior still says which way the genes move (below it the drawn control cells' noise is most of the
predicted change). With ``strength_margin`` (a model's config) a weaker prior, no change the
weakest, must score more than that margin above every stronger one: validation drawn again moves
two strengths' score difference by about as much, and a lead inside it chose a quarter of the mean
where the test wanted all of it (zhao PW030) or no change where it wanted a quarter (gbm T98G).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from pertflow.data.view import SplitView
from pertflow.models.baselines import DeltaModel
from pertflow.models.registry import model_class
from pertflow.models.validation import ValidationScore, ValidationSet, mean_score
from pertflow.train.launch import is_main_process

#: Prior names and the baseline each one is (``none``: the controls themselves, no change).
PRIOR_BASELINES = {"none": "no-change", "mean": "mean", "additive": "additive", "additive-mean": "additive-mean",
                   "linear": "linear", "context-shift": "context-shift", "target-effect": "target-effect"}
#: The priors that build a combination from its measured singles (a measured single is their input)
ADDITIVE = ("additive", "additive-mean")
#: The prior strengths to give ``prior_strengths`` to let validation shrink the prior (strongest first).
PRIOR_STRENGTHS = (1.0, 0.75, 0.5, 0.25)
#: why ``auto`` took additive without validation's judgement (see the module docstring)
UNJUDGED_COMBINATIONS = ("the split predicts combinations of measured singles, and no validation combination has its "
                         "singles measured: validation cannot judge that case, "
                         "and additive is the baseline built from them")


class Prior:
    """A fitted baseline as a flow's starting shift.

    Attributes
    ----------
    name
        The baseline chosen (a key of :data:`PRIOR_BASELINES`).
    baseline
        The baseline, fitted on all training responses (what prediction uses).
    strength
        The baseline's shift is scaled by it (see the module docstring; 1 unless ``auto`` chose).
    scores
        With ``auto``: each candidate's validation score (see :class:`ValidationSet`), by
        :attr:`label`.
    """

    def __init__(self, name: str, baseline: DeltaModel, scores: dict[str, dict[str, float]] | None = None,
                 strength: float = 1.0):
        self.name = name
        self.baseline = baseline
        self.strength = float(strength)
        self.scores = scores or {}
        self.reason = "chosen by the config" if scores is None else "the best validation score"
        self._left_out: dict[tuple[str, str], np.ndarray] = {}

    @property
    def label(self) -> str:
        """The prior as reports name it: ``mean``, or ``mean x 0.5`` at a strength below 1."""
        return self.name if self.strength == 1.0 else f"{self.name} x {self.strength:g}"

    @property
    def shift_scale(self) -> float:
        """How much of a baseline's shift the prior moves cells by: its strength, 0 for no change."""
        return 0.0 if self.name == "none" else self.strength

    def at_strength(self, strength: float) -> Prior:
        """The same fitted baseline at another strength (sharing its leave-one-out shifts)."""
        prior = Prior(self.name, self.baseline, None, strength)
        prior._left_out = self._left_out
        return prior

    @classmethod
    def fit(cls, choice: str, view: SplitView, validation: ValidationSet | None = None,
            strengths: tuple[float, ...] = (1.0,),
            more: Sequence[tuple[SplitView, ValidationSet]] = (), margin: float = 0.0) -> Prior:
        """Fit the prior named ``choice`` on the training cells of ``view`` (``auto``: choose on
        ``validation``; without validation groups, ``mean``), at the one of ``strengths`` that
        scores best on ``validation`` (the first without it). ``more``: further inner splits
        (view, validation), each candidate's scores averaged over them and ``validation``
        (:func:`~pertflow.models.inner_split.rotations`). ``margin``: the strongest candidate
        within it of the best score is chosen (:func:`strongest_within`)."""
        judged = validation is not None and len(validation) > 0
        if choice != "auto" and (len(strengths) == 1 or not judged):
            return cls(choice, cls._baseline(choice, view), None, strengths[0])
        if not judged:
            prior = cls("mean", cls._baseline("mean", view), None, strengths[0])
            prior.reason = "no validation groups to choose on: the mean"
            return prior
        candidates = cls._candidates(choice, view, strengths)
        every = [{label: prior.score(validation) for label, prior in candidates.items()}]
        for other_view, other_validation in more:
            if len(other_validation):
                others = cls._candidates(choice, other_view, strengths)
                every.append({label: prior.score(other_validation) for label, prior in others.items()})
        scores = {label: mean_score([s[label] for s in every]) for label in candidates}
        ranked = {label: s.score for label, s in scores.items()}
        scales = {label: prior.shift_scale for label, prior in candidates.items()}
        best = strongest_within(ranked, scales, margin)
        reason = ("the best validation score" if best == strongest_within(ranked, scales, 0.0) else
                  f"the strongest prior within {margin:g} of the best validation score")
        reason += f" (the mean over {len(every)} inner splits)" if len(every) > 1 else ""
        if choice == "auto" and not validation.of_test_kind and validation.test_kinds.measured_combinations:
            best = next(label for label, prior in candidates.items() if prior.name == "additive")  # the strongest
            reason = UNJUDGED_COMBINATIONS
            print(f"note: prior 'auto' chose additive: {reason}.", flush=True)
        chosen = candidates[best]
        chosen.scores = {label: s.as_dict("") for label, s in scores.items()}
        chosen.reason = reason
        return chosen

    @classmethod
    def _candidates(cls, choice: str, view: SplitView, strengths: tuple[float, ...]) -> dict[str, Prior]:
        """Every prior ``choice`` may take (``auto``: each baseline) at each strength, fitted on ``view``."""
        candidates: dict[str, Prior] = {}
        for name in PRIOR_BASELINES if choice == "auto" else (choice,):
            full = cls(name, cls._baseline(name, view))
            for strength in strengths if name != "none" else (1.0,):
                prior = full.at_strength(strength)
                candidates[prior.label] = prior
        return candidates

    def refitted(self, view: SplitView) -> Prior:
        """The same baseline fitted on ``view``'s training cells (after it was chosen on an inner
        split), keeping its validation scores and the reason it was chosen."""
        prior = Prior(self.name, self._baseline(self.name, view), self.scores, self.strength)
        prior.reason = self.reason
        return prior

    @staticmethod
    def _baseline(name: str, view: SplitView) -> DeltaModel:
        baseline = model_class(PRIOR_BASELINES[name]).from_view(view)
        baseline.fit(view)
        return baseline

    # ------------------------------------------------------------------ shifts
    def delta(self, perturbation: str, context: str) -> np.ndarray:
        """(G,) the baseline's predicted shift at the prior's strength, from all training responses
        (for prediction); a combination with a measured single is :meth:`composed`."""
        composed = self.composed(perturbation, context)
        shift = composed if composed is not None else self.baseline.predicted_delta(perturbation, context)
        return (self.strength * shift).astype(np.float32)

    def composed(self, perturbation: str, context: str) -> np.ndarray | None:
        """(G,) at strength 1, a combination's shift as the sum of its components' (see the module
        docstring): a component measured as a single in ``context`` enters as the shift its own
        training batches start from (:meth:`training_delta`), so that with the residual the model
        learnt on that single its response counts once; any other component as the baseline's
        estimate of it (fitted without the combination's own response, where that was measured).
        None where the baseline's own combination stands: a single, a dose, no measured
        component, or the ``none``, ``additive`` and ``additive-mean`` priors (they compose so already)."""
        comps = self.baseline.components(perturbation)
        if (self.name in ("none", *ADDITIVE) or len(comps) < 2
                or self.baseline.spec.split_dose(perturbation)[1] is not None):
            return None
        measured = [(c, context) in self.baseline.keys for c in comps]
        if not any(measured):
            return None
        key = (perturbation, context)
        estimate = self.baseline.without(key) if key in self.baseline.keys else self.baseline
        return np.sum([self._left_out_shift(c, context) if m else estimate.predicted_delta(c, context)
                       for c, m in zip(comps, measured)], axis=0).astype(np.float32)

    def held_out_delta(self, perturbation: str, context: str) -> np.ndarray:
        """(G,) the shift of a perturbation predicted without its own response (leave one out):
        what validation scores, so that no prior is scored on a group it has read."""
        return self.strength * self._left_out_shift(perturbation, context)

    def _left_out_shift(self, perturbation: str, context: str) -> np.ndarray:
        """:meth:`held_out_delta` at strength 1 (computed once, shared by every strength)."""
        key = (perturbation, context)
        if key not in self._left_out:
            if perturbation == self.baseline.spec.control:
                shift = np.zeros(len(self.baseline.genes), dtype=np.float32)
            elif (composed := self.composed(perturbation, context)) is not None:
                shift = composed
            elif key in self.baseline.keys:
                shift = self.baseline.without(key).predicted_delta(perturbation, context)
            else:
                shift = self.baseline.predicted_delta(perturbation, context)
            self._left_out[key] = np.asarray(shift, dtype=np.float32)
        return self._left_out[key]

    def training_delta(self, perturbation: str, context: str) -> np.ndarray:
        """(G,) the shift a training batch of this perturbation starts from: :meth:`held_out_delta`,
        except for a measured single under an additive prior (:data:`ADDITIVE`): its own response
        (the additive prior's input; see the module docstring). Never used for scoring."""
        if self.name in ADDITIVE and (perturbation, context) in self.baseline.keys \
                and len(self.baseline.components(perturbation)) == 1 \
                and self.baseline.spec.split_dose(perturbation)[1] is None:
            return self.delta(perturbation, context)
        return self.held_out_delta(perturbation, context)

    def score(self, validation: ValidationSet):
        """The validation score of the prior's own cells (controls + leave-one-out shift)."""
        return validation.score(lambda p, c, controls: controls + self.held_out_delta(p, c))

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"prior.{k}": v for k, v in self.baseline.state_tensors().items()}

    def extra_state(self) -> dict[str, Any]:
        return {"name": self.name, "baseline": self.baseline.extra_state(), "scores": self.scores,
                "reason": self.reason, "strength": self.strength}

    @classmethod
    def from_state(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor], model: Any) -> Prior:
        """The prior saved with a run (``model``: the flow model, for genes, vocabulary and spec)."""
        baseline = model_class(PRIOR_BASELINES[state["name"]])(
            model_class(PRIOR_BASELINES[state["name"]]).config_class(), model.genes, model.vocab, model.spec
        )
        baseline.load_state({k.removeprefix("prior."): v for k, v in tensors.items() if k.startswith("prior.")},
                            state["baseline"])
        # strength 1: saved before strengths
        prior = cls(state["name"], baseline, state.get("scores"), state.get("strength", 1.0))
        prior.reason = state.get("reason", prior.reason)
        return prior


# ---------------------------------------------------------------------------- prediction modes
#: How a model anchored on a prior predicts: ``flow``, its own cells; ``prior-mean``, its cells
#: moved onto the prior's mean (the prior's shift, the model's spread), then clipped at zero, which
#: raises the mean of a gene whose moved cells went below zero (so the mean is the prior's only
#: where none did); ``prior``, the prior's own cells (the model added nothing on validation).
#: ``predict.mode`` forces one.
PREDICTION_MODES = ("flow", "prior-mean", "prior")


def strongest_within(scores: Mapping[str, float], scales: Mapping[str, float], margin: float) -> str:
    """The candidate to choose: among those scoring within ``margin`` of the best, the one with the
    largest ``scales`` (the share of a baseline's shift it moves cells by), then the best score,
    then the first (ties of one perturbation: mean = additive = linear = context-shift go to the
    first, the simplest). With ``margin`` 0: the best score."""
    order = list(scores)
    top = max(round(score, 9) for score in scores.values())
    near = [label for label in order if round(scores[label], 9) >= top - margin]
    return max(near, key=lambda label: (round(scores[label], 9) if margin == 0 else scales[label],
                                        round(scores[label], 9), -order.index(label)))


def mode_cells(mode: str, controls: np.ndarray, shift: np.ndarray, model_cells: Callable[[], np.ndarray]) -> np.ndarray:
    """Cells of a perturbation in one of :data:`PREDICTION_MODES`, from control cells (n, G), the
    prior's (G,) shift and ``model_cells()``, the model's own (n, G) cells (not called for ``prior``)."""
    anchor = np.clip(controls + shift[None, :], 0, None)
    if mode == "prior":
        return anchor
    cells = model_cells()
    if mode == "prior-mean":
        cells = np.clip(cells - cells.mean(0) + anchor.mean(0), 0, None)
    return cells


def best_mode(scores: Mapping[str, float], allowed: Callable[[str], bool] | None = None) -> str:
    """The mode of :data:`PREDICTION_MODES` with the best score (``scores``: mode -> score) among
    ``prior`` and the modes ``allowed`` (default: every one); ties go to the first."""
    candidates = [m for m in PREDICTION_MODES if m == "prior" or allowed is None or allowed(m)]
    return max(candidates, key=lambda m: (scores[m], -PREDICTION_MODES.index(m)))


def led_on_every_split(splits: Sequence[Mapping[str, float]]) -> Callable[[str], bool]:
    """``mode_rule: every-split``: whether a mode scores at least the prior's cells on every inner
    split (``splits``: each split's mode -> score)."""
    return lambda mode: all(split[mode] >= split["prior"] for split in splits)


def choose_prediction_mode(score: Callable[[str], ValidationScore], prior: Prior, what: str = "the flow",
                           allowed: Callable[[str], bool] | None = None) -> tuple[str, dict[str, Any]]:
    """The prediction mode that scores best on validation (``score(mode)``; ties go to the first of
    :data:`PREDICTION_MODES`) among ``prior`` and the modes ``allowed`` (default: every one), and
    the scores for the fit report (``{"validation": {mode: ...}}``).

    So a model is never worse on validation than its own prior. Where validation cannot judge the
    test's kind of combination (:data:`UNJUDGED_COMBINATIONS`), ``prior`` (the additive prior).
    ``what`` names the model in the note printed when it does not predict as itself.
    """
    scores = {mode: score(mode) for mode in PREDICTION_MODES}
    mode = best_mode({m: s.score for m, s in scores.items()}, allowed)
    report: dict[str, Any] = {"validation": {m: s.as_dict("") for m, s in scores.items()}}
    if allowed is not None and (dropped := [m for m in PREDICTION_MODES if m != "prior" and not allowed(m)]):
        report["modes_not_allowed"] = dropped
    if prior.reason == UNJUDGED_COMBINATIONS:  # validation has none of the test's kind
        mode = "prior"
        if is_main_process():
            print(f"note: no validation combination has its singles measured, so {what} cannot be judged on the "
                  "test's kind of combination: predicting as its additive prior.", flush=True)
    elif mode != "flow" and is_main_process():
        print(f"note: on the validation perturbations {what} scored {scores['flow'].score:.3f} and its prior "
              f"({prior.label}) {scores['prior'].score:.3f}; predicting as '{mode}'.", flush=True)
    return mode, report
