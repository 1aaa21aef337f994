"""``target-effect``: what the data knows about a perturbation's target gene (issue 28).

A CRISPR perturbation (knock-down, knock-out, activation) acts first on its target gene. When the
target is a measured gene, the data says how it is expressed in the control cells and which genes
co-vary with it there, even when the screen never perturbed it. The field's baselines do not use
that: ``mean`` predicts every perturbation alike and ``linear`` reads the target's row of the
*response* PCA, which says how the target responds to other perturbations, not what perturbing it
does. This model predicts, for a perturbation with measured targets ``t``::

    delta = common + sum over t of  s_t * (e_t + lambda * beta_t)

* ``s_t = log1p(f * expm1(c_t)) - c_t``: the target's own change, its control level ``c_t`` in the
  context (log1p) scaled by ``f``, the training targets' average fold (geometric mean of their
  expression, ``expm1`` of log1p, over their control level: e.g. 0.3 for a knock-down to 30%);
* ``beta_t``: the regression coefficients of every gene on the target over the training control
  cells (co-expression; ``e_t`` the target's own coordinate), carried with weight ``lambda``;
* ``common``: the training responses' average once each one's own target part is taken out
  (what every perturbation of the screen does: the mean baseline, without the targets).

``f`` and ``lambda`` (from :data:`SPREAD_WEIGHTS`) are fitted on the training singles with a
measured target, ``lambda`` by leave-one-out: the one whose predictions of each such single from
the others are closest. A perturbation without a measured target gets ``common`` (the mean
baseline when no training target is measured). Training cells only; a model of pertflow's own,
not one of the field's baselines, usable alone and as a prior (``prior: target-effect``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pertflow.data.view import SplitView
from pertflow.models.baselines import DeltaModel
from pertflow.train.config import TrainConfig

SPREAD_WEIGHTS = (0.0, 0.25, 0.5, 1.0)
MAX_CONTROLS = 5000  # control cells read for the co-expression (a seeded sample beyond this)
MIN_LEVEL = 0.05  # a target below this control level (log1p) says nothing about its fold
MIN_FOLD = 1e-3  # a fold of a target measured at zero after its perturbation counts as this


class TargetEffect(DeltaModel):
    """The target gene's own change and its co-expressed genes' (see the module docstring)."""

    name = "target-effect"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.context_levels: dict[str, np.ndarray] = {}  # context -> (G,) mean control expression
        self.targets: list[str] = []  # measured genes that are perturbation components in the data
        self.beta = np.zeros((len(self.genes), 0), dtype=np.float32)  # (G, targets) co-expression
        self.log_fold = 0.0
        self.spread = 0.0
        self.common: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ fitting
    def fit(self, view: SplitView, train_config: TrainConfig | None = None, run_dir: Any = None,
            resume: bool = False) -> None:
        data = view.data
        position = self._gene_pos
        self.targets = sorted({c for p in data.perturbation_names for c in data.components(p) if c in position})
        controls = view.rows.train[data.is_control[view.rows.train]]
        self.context_levels = {ctx: view.expression.get(view.control_rows(ctx)).mean(0).astype(np.float32)
                               for ctx in sorted(set(data.contexts[controls]))}
        self.beta = self.coexpression(view, controls, [position[t] for t in self.targets])
        super().fit(view)

    def coexpression(self, view: SplitView, controls: np.ndarray, columns: list[int]) -> np.ndarray:
        """(G, len(columns)): each gene's regression coefficient on each target column over the
        control cells, centred per context (0 on the target itself)."""
        if not columns or not len(controls):
            return np.zeros((len(self.genes), len(columns)), dtype=np.float32)
        if len(controls) > MAX_CONTROLS:
            controls = np.sort(np.random.default_rng(0).choice(controls, size=MAX_CONTROLS, replace=False))
        x = view.expression.get(controls).astype(np.float64)
        contexts = view.data.contexts[controls]
        for ctx in set(contexts):
            x[contexts == ctx] -= x[contexts == ctx].mean(0)
        t = x[:, columns]
        var = (t**2).sum(0)
        beta = np.where(var > 0, (x.T @ t) / np.maximum(var, 1e-12), 0.0)
        beta[columns, np.arange(len(columns))] = 0.0
        return beta.astype(np.float32)

    def fit_responses(self, keys: list[tuple[str, str]], responses: np.ndarray) -> None:
        super().fit_responses(keys, responses)
        singles = [i for i, (p, _) in enumerate(self.keys) if len(self._measured(p)) == 1
                   and len(self.components(p)) == 1]
        folds = {i: self._log_fold(i) for i in singles}
        folds = {i: f for i, f in folds.items() if f is not None}
        self.log_fold = float(np.mean(list(folds.values()))) if folds else 0.0
        self.spread = self._loo_spread(folds)
        self.common = self._common()
        self.fit_report.update({"target_fold": round(float(np.exp(self.log_fold)), 4), "spread": self.spread,
                                "measured_target_singles": len(folds)})

    def _measured(self, perturbation: str) -> list[str]:
        return [c for c in self.components(perturbation) if c in self.targets]

    def _level(self, target: str, context: str) -> float:
        j = self._gene_pos[target]
        levels = self.context_levels.get(context)
        if levels is None:
            return float(np.mean([v[j] for v in self.context_levels.values()])) if self.context_levels else 0.0
        return float(levels[j])

    def _log_fold(self, i: int) -> float | None:
        """The log of a measured-target single's fold on its target (None at a near-zero level)."""
        (_, ctx), (t,) = self.keys[i], self._measured(self.keys[i][0])
        level = self._level(t, ctx)
        if level < MIN_LEVEL:
            return None
        after = np.expm1(max(level + float(self.responses[i, self._gene_pos[t]]), 0.0))
        return float(np.log(max(after / np.expm1(level), MIN_FOLD)))

    def _own_part(self, perturbation: str, context: str, log_fold: float, spread: float) -> np.ndarray:
        out = np.zeros(len(self.genes), dtype=np.float64)
        for t in self._measured(perturbation):
            k, j, level = self.targets.index(t), self._gene_pos[t], self._level(t, context)
            direction = spread * self.beta[:, k].astype(np.float64)
            direction[j] = 1.0
            out += (np.log1p(np.exp(log_fold) * np.expm1(level)) - level) * direction
        return out

    def _loo_spread(self, folds: dict[int, float]) -> float:
        """The weight of the co-expressed genes whose leave-one-out predictions of the measured-target
        singles' responses are closest (each predicted as the other responses' mean plus its own
        target part from the others' relative change; the mean is the same for every weight)."""
        if len(folds) < 2:
            return 0.0
        errors = []
        for spread in SPREAD_WEIGHTS:
            error = 0.0
            for i in folds:
                others = np.mean([f for j, f in folds.items() if j != i])
                p, ctx = self.keys[i]
                rest = np.mean(np.delete(self.responses, i, axis=0), axis=0)
                predicted = rest + self._own_part(p, ctx, others, spread)
                error += float(np.mean((predicted - self.responses[i]) ** 2))
            errors.append(error)
        return float(SPREAD_WEIGHTS[int(np.argmin(errors))])

    def _common(self) -> dict[str, np.ndarray]:
        """Per context (and ``""``: every context) the mean response without its own target part."""
        if not self.keys:
            return {}
        # float32 as the mean baseline's: without a measured target the two are the same numbers, so
        # that `prior: auto` sees a tie (which goes to the simpler mean), not float noise
        rest = np.stack([self.responses[i] - self._own_part(p, ctx, self._fold_or_mean(i), self.spread)
                         for i, (p, ctx) in enumerate(self.keys)]).astype(np.float32)
        out = {"": rest.mean(0)}
        for ctx in {c for _, c in self.keys}:
            out[ctx] = rest[[i for i, k in enumerate(self.keys) if k[1] == ctx]].mean(0)
        return out

    def _fold_or_mean(self, i: int) -> float:
        """A training response's own log fold (its measured one, for removing exactly its own
        target part), else the average one."""
        measured = self._measured(self.keys[i][0])
        if len(measured) == 1 and len(self.components(self.keys[i][0])) == 1:
            own = self._log_fold(i)
            if own is not None:
                return own
        return self.log_fold

    # ------------------------------------------------------------------ prediction
    def predicted_delta(self, perturbation: str, context: str) -> np.ndarray:
        common = self.common.get(context, self.common.get(""))
        if common is None:
            return np.zeros(len(self.genes), dtype=np.float32)
        own = self._own_part(perturbation, context, self.log_fold, self.spread)
        return common.copy() if not own.any() else (common + own).astype(np.float32)

    def unfitted_copy(self) -> TargetEffect:
        other = super().unfitted_copy()
        other.context_levels, other.targets, other.beta = self.context_levels, self.targets, self.beta
        return other

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        contexts = sorted(self.context_levels)
        levels = np.stack([self.context_levels[c] for c in contexts]) if contexts else np.zeros((0, len(self.genes)))
        return {**super().state_tensors(), "context_levels": torch.from_numpy(levels.astype(np.float32)),
                "beta": torch.from_numpy(np.ascontiguousarray(self.beta))}

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "contexts": sorted(self.context_levels), "targets": self.targets}

    def load_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        super().load_state(tensors, extra)
        self.context_levels = dict(zip(extra["contexts"], tensors["context_levels"].numpy()))
        self.targets = list(extra["targets"])
        self.beta = tensors["beta"].numpy()
        self.fit_responses(self.keys, self.responses)
