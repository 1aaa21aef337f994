"""Scoring predictions of the split's validation perturbations, for choices made while fitting.

The evaluator's two headline metrics (test cells are never read): the Pearson delta on the real
top-20 DE genes (against the context's control mean) and the E-distance in a PCA of the training
cells. A group is a (perturbation, context) with validation cells; its real side is all the
visible cells of that group (validation and training cells, up to ``max_cells``), because the
reference splits hold 6-10 validation cells per group, on which both metrics are mostly noise
(the E-distance of two such samples of one population varies more than the models it should rank).
So for a model that trained on the group, the score measures its fit to the measured
perturbations; for a prior predicted leave-one-out, which never read the group's cells, it
measures how it generalises. One number ranks candidates (a baseline for a flow's prior, a
training checkpoint, the flow against its own prior)::

    score = mean top-20 DE Pearson delta - mean E-distance / mean E-distance of no change

Both parts are better when higher; the E-distance is read relative to predicting no change, so
the score has no unit and no change scores -1 plus its Pearson delta. That Pearson delta is not 0:
the predicted mean is that of the drawn control cells, whose difference from the mean of all the
context's controls is sampling noise, correlated with the real shift by chance (the evaluator's no
change has the same noise on a test's larger groups). A choice between ``none`` and a weak prior
is decided partly by it. With ``reference="drawn"`` (a model's ``validation_reference``) the
predicted shift is read against the drawn controls' own mean instead: the prediction's shift
alone, as the evaluator reads a test prediction generated from every control of its context
(``predict.control_cells``), and no change scores 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pertflow.data.view import SplitView
from pertflow.eval import metrics as M

# (perturbation, context, control cells (n, G)) -> predicted cells (n, G)
Predictor = Callable[[str, str, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ValidationGroup:
    perturbation: str
    context: str
    real: np.ndarray  # (n, G) the group's visible cells (validation and training)
    controls: np.ndarray  # (m, G) visible control cells of the context, drawn once: one per cell to generate
    control_mean: np.ndarray  # (G,) mean of all visible controls of the context
    de_genes: np.ndarray  # top DE genes of real vs controls
    real_pcs: np.ndarray  # (n, k) the real cells in the PCA


@dataclass(frozen=True)
class ValidationScore:
    """Means over the validation groups, and the one number that ranks (see the module docstring)."""

    pearson_top20_de: float
    edistance: float
    score: float

    def as_dict(self, prefix: str = "val_") -> dict[str, float]:
        return {f"{prefix}pearson_top20_de": self.pearson_top20_de, f"{prefix}edistance": self.edistance,
                f"{prefix}score": self.score}


def mean_score(scores: list[ValidationScore]) -> ValidationScore:
    """The mean of several validation scores (of one candidate on several inner splits)."""
    return ValidationScore(*(float(np.mean([getattr(s, f) for s in scores]))
                             for f in ("pearson_top20_de", "edistance", "score")))


Kind = tuple[int, int]  # (components, how many of them are measured as singles in training)


def _kind(data, measured: dict[str, set[tuple[str, str]]], pert: str, group: tuple[str, str] | None) -> Kind:
    parts = data.components(pert)
    return len(parts), sum(bool(measured.get(c, set()) - {group}) for c in parts)


@dataclass(frozen=True)
class TaskKinds:
    """The kinds of the split's test perturbations, computed once per split view.

    A perturbation's kind is its number of components and how many of them are measured as
    singles in training (a group never counts as measuring itself: validation predicts it left
    out). Only the split's test perturbation *names* are read, never a test cell.
    """

    measured: dict[str, set[tuple[str, str]]]  # single perturbation -> the training groups that measure it
    kinds: frozenset[Kind]  # the test perturbations' kinds
    shares: dict[Kind, float] = field(default_factory=dict)  # each kind's share of the test perturbations

    @classmethod
    def of(cls, view: SplitView) -> TaskKinds:
        data = view.data
        train = view.rows.train[~data.is_control[view.rows.train]]
        measured: dict[str, set[tuple[str, str]]] = {}
        for pert, ctx in view.groups(train):
            if len(data.components(pert)) == 1:  # with a dose column: a single at any of its doses
                measured.setdefault(data.spec.split_dose(pert)[0], set()).add((pert, ctx))
        kinds = [_kind(data, measured, p, None) for p in view.split.test_perturbations]
        shares = {k: kinds.count(k) / len(kinds) for k in set(kinds)}
        return cls(measured, frozenset(kinds), shares)

    def kind(self, data, pert: str, group: tuple[str, str] | None = None) -> Kind:
        """The kind of ``pert``, predicted as the group ``group`` left out (None: not a training group)."""
        return _kind(data, measured=self.measured, pert=pert, group=group)

    @property
    def measured_combinations(self) -> bool:
        """Whether every test perturbation of the split is a combination of singles measured in training."""
        return bool(self.kinds) and all(n > 1 and seen == n for n, seen in self.kinds)


def like_test(view: SplitView, keys: list[tuple[str, str]],
              kinds: TaskKinds | None = None) -> tuple[list[tuple[str, str]], bool]:
    """The validation groups of the kind the split predicts, and whether they are of its kind.

    A combination task's test combinations have both singles measured, so only validation
    combinations whose singles are measured are scored; an unseen single is scored on validation
    singles (left out, none is measured); a single transferred to a new context on validation
    singles measured in other contexts. Where no validation group has the test's kind (see
    :class:`TaskKinds`), those with its number of components (and ``False``); where none has
    that either, all. ``kinds``: the view's, when already computed.
    """
    data = view.data
    kinds = kinds if kinds is not None else TaskKinds.of(view)
    same_kind = [k for k in keys if kinds.kind(data, k[0], k) in kinds.kinds]
    if same_kind or not kinds.kinds:
        return same_kind or keys, True
    arity = {n for n, _ in kinds.kinds}
    return [k for k in keys if len(data.components(k[0])) in arity] or keys, False


class ValidationSet:
    """The validation perturbations of a split view, ready to score predictions of them.

    Validation cells are cells of training perturbations; where some of them are of the kind the
    split asks to predict (:func:`like_test`: as many components as its test perturbations, as
    many of them measured as singles), only those are scored, so that a choice made on validation
    (a prior, a prediction mode) is made on the task's own kind of perturbation. The test
    perturbations' kinds are kept (``test_kinds``, :class:`TaskKinds`).

    Parameters
    ----------
    view
        The split view.
    max_cells
        Real cells per group (a seeded subsample above it).
    n_generated
        Cells a model generates per group (control cells drawn once, seeded): what a score costs.
    max_groups
        Groups scored at most (a seeded choice among them above it).
    n_pcs, max_pca_cells
        The PCA of the training cells for the E-distance.
    top_k
        DE genes of the Pearson delta.
    max_control_cells
        Control cells of a context read at most (a seeded subsample above it).
    seed
        Seeds the subsamples and the control cells drawn.
    """

    def __init__(self, view: SplitView, max_cells: int = 200, n_generated: int = 32, max_groups: int = 16,
                 n_pcs: int = 50, max_pca_cells: int = 5000, top_k: int = 20, min_cells: int = 3, seed: int = 0,
                 max_control_cells: int = 50_000, reference: str = "all-controls"):
        if reference not in ("all-controls", "drawn"):
            raise ValueError(f"reference must be 'all-controls' or 'drawn', got {reference!r}")
        self.reference = reference
        rng = np.random.default_rng(seed)
        data = view.data
        train = view.rows.train
        pca_rows = np.sort(rng.choice(train, size=min(len(train), max_pca_cells), replace=False))
        self.pca = M.fit_pca(view.expression.get(pca_rows), n_pcs, max_cells=max_pca_cells, seed=seed)
        val = view.rows.val[~data.is_control[view.rows.val]]
        visible = view.groups(view.visible[~data.is_control[view.visible]])
        self.groups: list[ValidationGroup] = []
        self.test_kinds = TaskKinds.of(view)
        keys, self.of_test_kind = like_test(view, sorted(view.groups(val)), self.test_kinds)
        if len(keys) > max_groups:
            keys = self._choose(view, keys, max_groups, rng)
        for pert, ctx in keys:
            rows = visible[(pert, ctx)]
            if len(rows) < min_cells:
                continue
            try:
                pool = view.control_rows(ctx)
            except Exception:
                continue
            if len(rows) > max_cells:
                rows = np.sort(rng.choice(rows, size=max_cells, replace=False))
            if len(pool) > max_control_cells:  # bounded memory on very large data
                pool = np.sort(rng.choice(pool, size=max_control_cells, replace=False))
            real = view.expression.get(rows)
            all_controls = view.expression.get(pool)
            n = min(n_generated, len(rows))
            chosen = rng.choice(len(pool), size=n, replace=len(pool) < n)
            self.groups.append(ValidationGroup(
                pert, ctx, real, all_controls[chosen], all_controls.mean(0),
                M.top_de_genes(real, all_controls, top_k), self.pca.transform(real),
            ))
        self.weights = self._kind_weights(view)
        self._no_change = self._edistance(lambda p, c, controls: controls) if self.groups else float("nan")

    def __len__(self) -> int:
        return len(self.groups)

    def _choose(self, view: SplitView, keys: list[tuple[str, str]], n: int,
                rng: np.random.Generator) -> list[tuple[str, str]]:
        """``n`` of the groups (seeded), each test kind's number in proportion to its share of the
        test perturbations (at least one each), so that no kind the test asks for is left out."""
        by_kind: dict[Kind, list[int]] = {}
        for i, key in enumerate(keys):
            by_kind.setdefault(self.test_kinds.kind(view.data, key[0], key), []).append(i)
        shares = self.test_kinds.shares
        if not self.of_test_kind or any(k not in shares for k in by_kind):
            return [keys[i] for i in np.sort(rng.choice(len(keys), size=n, replace=False))]
        total = sum(shares[k] for k in by_kind)
        quota = {k: min(len(rows), max(1, int(round(n * shares[k] / total)))) for k, rows in by_kind.items()}
        chosen = [i for k in sorted(by_kind) for i in rng.choice(by_kind[k], size=quota[k], replace=False)]
        return [keys[i] for i in sorted(chosen)]

    def _kind_weights(self, view: SplitView) -> np.ndarray:
        """Each group's weight in the means: a kind weighs as its share of the test perturbations
        (norman-unseen-single: 5 unseen singles, 4 combinations with one unseen component), split
        evenly among the validation groups of that kind; equal weights where the groups are not of
        the test's kinds."""
        if not self.groups:
            return np.zeros(0)
        kinds = [self.test_kinds.kind(view.data, g.perturbation, (g.perturbation, g.context)) for g in self.groups]
        shares = self.test_kinds.shares
        if not self.of_test_kind or not shares or any(k not in shares for k in kinds):
            return np.full(len(kinds), 1.0 / len(kinds))
        present = {k: kinds.count(k) for k in set(kinds)}
        total = sum(shares[k] for k in present)
        return np.array([shares[k] / total / present[k] for k in kinds])

    def _edistance(self, predict: Predictor) -> float:
        distances = [M.edistance(self.pca.transform(predict(g.perturbation, g.context, g.controls)), g.real_pcs)
                     for g in self.groups]
        return float(np.average(distances, weights=self.weights))

    def score(self, predict: Predictor) -> ValidationScore:
        """Score a predictor of validation cells (see the module docstring)."""
        pearsons, distances = [], []
        for g in self.groups:
            cells = np.clip(predict(g.perturbation, g.context, g.controls), 0, None)
            if self.reference == "drawn":  # the prediction's own shift, against the real one
                r = M.pearson_r((cells.mean(0) - g.controls.mean(0))[g.de_genes],
                                (g.real.mean(0) - g.control_mean)[g.de_genes])
            else:
                r = M.pearson_delta_vs_reference(cells.mean(0), g.real.mean(0), g.control_mean, g.de_genes)
            pearsons.append(0.0 if np.isnan(r) else r)
            distances.append(M.edistance(self.pca.transform(cells), g.real_pcs))
        pearson, distance = (float(np.average(pearsons, weights=self.weights)),
                             float(np.average(distances, weights=self.weights)))
        return ValidationScore(pearson, distance, pearson - distance / max(self._no_change, 1e-12))
