"""Settings of prediction, kept apart from a model's architecture and training settings.

A run's configuration has three sections: ``model`` (the family's frozen dataclass: what the
weights are; a model anchored on a prior builds on :class:`AnchoredConfig`), ``train``
(:class:`pertflow.train.TrainConfig`: how they were learnt) and ``predict`` (:class:`PredictConfig`:
how cells are generated from them). Only the last can change after training:
``pertflow predict --set predict.ode_steps=4``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PredictConfig:
    """How a trained model generates cells (the ``predict`` section of a run config).

    Attributes
    ----------
    batch_size
        Cells generated per call of the network.
    gene_chunk
        None: a per-gene network reads all genes at once. A number: genes are split at random
        into chunks of about this size, each generated on its own, as in training (linear
        instead of quadratic cost in the number of genes; used on CPU).
    ode_method, ode_steps
        The flow models' ODE solver (``rk4``, ``euler``, ``midpoint``, ``dopri5``) and its fixed
        steps (RK4: 4 network calls a step). Ignored by models without a flow.
    mode
        How a model anchored on a baseline predicts (:data:`pertflow.models.prior.PREDICTION_MODES`):
        ``auto``, the way that scored best on the validation perturbations at the end of
        training (saved with the run); or ``flow``, ``prior-mean``, ``prior`` to force one (for
        example the flow's own cells where its prior scored better). The flow models and
        ``latent-shift`` (``flow``: its predictor's cells) read it; other models ignore it.
    interval
        None (default): no intervals. A level such as 0.9: every predicted (perturbation,
        context) gets per-gene intervals of its predicted mean shift vs the context's controls, a
        bootstrap over the generated cells of ``n_seeds`` generations (the written cells are the
        first generation's, unchanged; the others cost one more generation each).
    n_seeds
        Generations pooled for the intervals (each with its own control draw and noise).
    n_bootstrap
        Bootstrap replicates of the intervals.
    control_cells
        Which control cells each predicted group is generated from (one cell from each). Where the
        context has at most this many visible control cells, every one of them, each the same
        number of times (once, or as often as it takes to reach the group's real cells), as scGen
        and CPA predict a held-out cell type: the predicted mean shift is then the model's and
        carries no noise of a draw (the evaluator's reference is the mean of all those controls).
        Above it, as many as the group's real cells, drawn (``null``: always so, the protocol of
        the results before this setting). On gbm, where the responses are small, the draw of 88 of
        100 controls moved each baseline's top-20 DE Pearson delta by a standard deviation of
        0.05-0.11 (``benchmarks/results/draw-noise``).
    """

    batch_size: int = 128
    gene_chunk: int | None = None
    ode_method: Literal["rk4", "euler", "midpoint", "dopri5"] = "rk4"
    ode_steps: int = 20
    mode: Literal["auto", "flow", "prior-mean", "prior"] = "auto"
    interval: float | None = None
    n_seeds: int = 1
    n_bootstrap: int = 200
    control_cells: int | None = 1000

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.gene_chunk is not None and self.gene_chunk < 1:
            raise ValueError(f"gene_chunk must be at least 1 (or null for all genes), got {self.gene_chunk}")
        if self.ode_steps < 1:
            raise ValueError(f"ode_steps must be at least 1, got {self.ode_steps}")
        if self.interval is not None and not 0 < self.interval < 1:
            raise ValueError(f"interval must be a level between 0 and 1 (e.g. 0.9) or null, got {self.interval}")
        if self.n_seeds < 1 or self.n_bootstrap < 10:
            raise ValueError(f"n_seeds must be at least 1 and n_bootstrap at least 10, got {self.n_seeds}, "
                             f"{self.n_bootstrap}")
        if self.control_cells is not None and self.control_cells < 1:
            raise ValueError(f"control_cells must be at least 1 (or null to draw as many as the real cells), got "
                             f"{self.control_cells}")

    def reads_every_control(self, pool: int) -> bool:
        """Whether a group is generated from every one of ``pool`` controls (see ``control_cells``)."""
        return self.control_cells is not None and pool <= self.control_cells

    def cells_to_generate(self, group: int, pool: int) -> int:
        """How many cells a group of ``group`` real cells is predicted with, from ``pool`` controls
        (see ``control_cells``): a whole multiple of the pool where every control is read (the
        fewest that reach ``group``), else ``group``."""
        return pool * -(-group // pool) if self.reads_every_control(pool) else group


#: How a flow pairs a batch's sources with its targets, and where on the path it trains
#: (:data:`pertflow.flows.COUPLINGS`, :data:`pertflow.flows.TIME_SAMPLERS`; a test checks they agree).
CouplingName = Literal["independent", "ot"]
TimeSamplerName = Literal["uniform", "logit-normal"]


@dataclass(frozen=True)
class FlowPathConfig:
    """The fields of a flow's path, declared once for every flow model's ``model`` section (the
    gene-space flows and CFM-VC through :class:`~pertflow.models.flow.FlowConfig`, latent-shift's
    flow predictor through its own config).

    Attributes
    ----------
    source_noise
        Scale of the standard normal noise added to the control cell (or its latent) where the
        flow starts.
    coupling
        How the targets are paired with the sources (within a batch, or within a group):
        ``independent`` (as drawn) or ``ot`` (minibatch optimal transport, straighter paths).
    time_sampler
        Where on the path training samples are taken.
    """

    source_noise: float = 0.1
    coupling: CouplingName = "independent"
    time_sampler: TimeSamplerName = "uniform"


#: The baselines a model can be anchored on (``auto``: the one that scores best on validation).
PriorName = Literal["none", "mean", "additive", "additive-mean", "linear", "context-shift", "target-effect", "auto"]
#: What validation holds out (:mod:`pertflow.models.inner_split`).
ValidationKind = Literal["auto", "cells", "contexts", "perturbations"]


@dataclass(frozen=True)
class AnchoredConfig:
    """The ``model`` section fields of every model anchored on a prior
    (:class:`~pertflow.models.anchored.AnchoredModel`); a family's config subclasses it.

    Attributes
    ----------
    prior
        The baseline the model starts from (:mod:`pertflow.models.prior`); ``none``: the control
        cells themselves; ``auto``: the baseline that scores best on validation.
    validation
        What the validation that chooses the prior, the checkpoint and the prediction mode holds
        out of the training cells (:mod:`pertflow.models.inner_split`): ``contexts``, all
        perturbed cells of training contexts (as a context-transfer test does); ``perturbations``,
        training perturbations and the combinations that contain them (as an unseen-perturbation
        test does); ``cells``, the split's own validation cells (a share of the training groups'
        cells, which the model has fitted); ``auto``: the kind of the split's test.
    validation_held_out
        Contexts or perturbations held out (0: about a fifth of them, at least one).
    validation_contexts
        For a context transfer, which training contexts validation holds out: ``nearest`` (those
        whose controls are nearest the test context's), ``as-novel`` (those as far from the rest
        of training as the test context is), ``both`` (one of each; :mod:`pertflow.models.inner_split`).
    refit
        After the choices are made on the inner split, train the model again on every training
        cell (twice the training time); otherwise the model keeps what it learnt without the
        held-out cells (its prior is always refitted on every training cell).
    prior_strengths
        The prior's shift is scaled by the one of these that scores best on validation (first:
        the strongest; see :mod:`pertflow.models.prior`). ``[1.0, 0.75, 0.5, 0.25]`` lets validation
        shrink a prior whose response transfers only partly to the held-out contexts.
    strength_margin
        A weaker prior (a lower strength, or no change) is chosen only where it scores more than
        this above every stronger candidate on validation: among the candidates within it of the
        best score, the strongest is taken (:mod:`pertflow.models.prior`). 0: the best score.
        0.02 (the bar's tie on top-20): drawing the validation cells again moves the difference
        between two strengths' scores by an sd of 0.006-0.014 on gbm and 0.03-0.11 on zhao
        (benchmarks/results/strength-margin), so a smaller lead is not evidence that the response
        transfers only partly. At strength 1 alone it weighs no change against the baselines: it
        changes no choice of the cfm and CFM-VC configs on any fold (the replay there).
    validation_rotations
        How many inner splits the prior and the prediction mode are chosen on (their scores
        averaged): the first as above, each other one holding out as many other training contexts
        or perturbations, none held out before (:func:`pertflow.models.inner_split.rotations`).
        The model is trained once more per extra split; 1: one inner split.
    validation_rotations_on
        The kinds of inner split that take ``validation_rotations`` (the others use one):
        ``perturbations`` alone keeps a context transfer on its one inner split (the contexts
        ``validation_contexts`` picks; more splits hold out contexts farther from the test, weaker
        evidence where a model's quality differs by lineage) while an unseen-perturbation test,
        whose one held-out single is a small sample, is judged on several.
    mode_rule
        How the prediction mode is chosen over the inner splits: ``mean``, the mode with the best
        mean score; ``every-split``, the same among the prior's cells and the modes that score at
        least the prior's cells on every inner split (one split: the same as ``mean``). A lead on
        the mean that one held-out group carries is the choice that failed on the test: replayed on
        the committed runs with three splits it put 4 more folds within the bar and took none out
        (benchmarks/results/mode-rule).
    validation_reference
        What validation reads a predicted shift against for its top-20 DE Pearson delta:
        ``all-controls``, the mean of all the context's visible controls, as the evaluator reads
        the real shift (a prediction from a draw of 32 of them carries the draw's deviation from
        that mean); ``drawn``, the mean of the controls the prediction was generated from, as the
        evaluator now reads a test prediction generated from every control
        (``predict.control_cells``): no change then scores 0, as on the test.
    """

    prior: PriorName = "none"
    validation: ValidationKind = "auto"
    validation_held_out: int = 0
    validation_contexts: Literal["nearest", "as-novel", "both"] = "nearest"
    refit: bool = False
    prior_strengths: tuple[float, ...] = (1.0,)
    strength_margin: float = 0.02
    validation_rotations: int = 1
    validation_rotations_on: tuple[Literal["contexts", "perturbations"], ...] = ("contexts", "perturbations")
    mode_rule: Literal["mean", "every-split"] = "every-split"
    validation_reference: Literal["all-controls", "drawn"] = "all-controls"

    def __post_init__(self) -> None:
        if self.validation_rotations < 1:
            raise ValueError(f"validation_rotations must be 1 or more (1: one inner split); "
                             f"got {self.validation_rotations}")
        if self.validation_rotations > 1 and not self.validation_rotations_on:
            raise ValueError("validation_rotations_on is empty, so validation_rotations would never apply: name "
                             "the kinds of inner split that take it (contexts, perturbations) or set "
                             "validation_rotations=1")
        if not self.prior_strengths or any(not 0 < s <= 1 for s in self.prior_strengths):
            raise ValueError(f"prior_strengths must be one or more factors in (0, 1], e.g. [1.0, 0.75, 0.5, 0.25]; got "
                             f"{list(self.prior_strengths)}")
        if not 0 <= self.strength_margin < 1:
            raise ValueError(f"strength_margin must be in [0, 1) (a difference of validation scores, e.g. 0.02); got "
                             f"{self.strength_margin}")
