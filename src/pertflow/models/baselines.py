"""The field's baselines, as models with the same API as every other model.

Each predicts **cells**: the test context's control cells plus a predicted shift ``delta``
(clipped at 0), so their predictions have a real cell-to-cell spread and cell-eval's DE metrics
stay meaningful. Shifts are learnt on the split's training cells only. A training *response*
is ``mean(perturbed cells of p in context c) - mean(control cells of c)``, always taken
against the controls of the same context.

* ``no-change``: delta = 0 (the controls themselves).
* ``mean``: the average response of the training perturbations (in the test context when it
  has any, else over all contexts): the same shift for every perturbation.
* ``additive``: a combination is the sum of its singles' responses; a single is its own
  response (0 when never seen).
* ``additive-mean`` (a prior of pertflow's own, not one of the field's baselines): ``additive``
  with a single never seen as the average response of the measured singles.
* ``linear``: ridge regression of the response on perturbation features (Ahlmann-Eltze et al.
  2025): ``delta = b + G W p`` with ``b`` the mean training response, ``G`` the genes' top
  principal components of the (centred) training responses (genes as observations, scores),
  ``p`` the perturbation's features (its target gene's row of ``G`` when that gene is measured,
  a one-hot of non-gene perturbation tokens; summed over a combination's components) and
  ``W = (G'G + lambda I)^-1 G' Y P (P'P + lambda I)^-1``.
* ``context-shift``: a held-out context's controls plus the perturbation's response averaged
  over the contexts where it was measured (its own response when it was measured in the test
  context; 0 when never seen).

With a dose column (``spec.dose_col``) a training response is one condition's, ``drugA@1``
(perturbation at a dose), so every baseline works per (perturbation, dose). A condition whose
dose was not measured (a ``dose`` split's held-out dose) gets, where a baseline looks up a
measured response (``additive``, ``context-shift``), its perturbation's responses at the measured
doses interpolated linearly in log10(dose) between the nearest measured doses below and above,
or the nearest measured dose outside their range (:meth:`DeltaModel.dose_response`); a
combination's components are read at the combination's dose. ``linear``'s features name the
perturbation, not its dose: it predicts a perturbation's fit over its training doses. ``mean``
averages every training condition. Leave-one-out (:meth:`DeltaModel.without`) drops one
condition, so a held-out dose is rebuilt from the other doses only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pertflow.data.dose import dose_label
from pertflow.data.view import SplitView
from pertflow.models.base import PerturbationModel
from pertflow.models.config import PredictConfig
from pertflow.train.config import TrainConfig


@dataclass(frozen=True)
class NoOptions:
    """This model has no options."""


@dataclass(frozen=True)
class LinearConfig:
    """Options of the linear baseline.

    Attributes
    ----------
    n_components
        K, principal components of the training responses used as gene embeddings.
    ridge
        lambda of the ridge penalty.
    """

    n_components: int = 10
    ridge: float = 0.1


class DeltaModel(PerturbationModel):
    """Control cells plus a learnt shift: the common part of the baselines."""

    config_class = NoOptions
    reads_dose = True  # every baseline works per condition (see the module docstring)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.keys: list[tuple[str, str]] = []  # (perturbation, context) of each training response
        self.responses = np.zeros((0, len(self.genes)), dtype=np.float32)

    def fit(self, view: SplitView, train_config: TrainConfig | None = None, run_dir: Path | None = None,
            resume: bool = False) -> None:
        means = view.expression.group_means(view.groups(view.rows.train))  # one pass over backed data
        control_mean = {ctx: mean for (pert, ctx), mean in means.items() if pert == self.spec.control}
        keys, responses = [], []
        for (pert, ctx), mean in sorted(means.items()):
            if pert == self.spec.control:
                continue
            if ctx not in control_mean:
                continue  # the sampler-level check names this; a baseline just cannot use the group
            keys.append((pert, ctx))
            responses.append(mean - control_mean[ctx])
        self.fit_responses(keys, np.array(responses, dtype=np.float32).reshape(len(keys), len(self.genes)))

    def fit_responses(self, keys: list[tuple[str, str]], responses: np.ndarray) -> None:
        """Fit on training responses: ``keys`` (perturbation, context) and their (n, G) mean shifts."""
        self.keys = list(keys)
        self.responses = np.asarray(responses, dtype=np.float32)
        self.fit_report = {"training_responses": len(self.keys)}

    def without(self, key: tuple[str, str]) -> DeltaModel:
        """The same baseline fitted without one training response (a leave-one-out copy)."""
        keep = [i for i, k in enumerate(self.keys) if k != tuple(key)]
        other = self.unfitted_copy()
        other.fit_responses([self.keys[i] for i in keep], self.responses[keep])
        return other

    def unfitted_copy(self) -> DeltaModel:
        """The same baseline before :meth:`fit_responses` (a model that fits more than responses
        carries that state over)."""
        return type(self)(self.config, self.genes, self.vocab, self.spec, self.predict_config)

    @functools.cached_property
    def _gene_pos(self) -> dict[str, int]:
        """Position of each measured gene's symbol among the model's genes."""
        return {g: i for i, g in enumerate(self.vocab.expression_genes)}

    # ------------------------------------------------------------------ lookups
    def response(self, perturbation: str, context: str) -> np.ndarray | None:
        """The training response of a perturbation in a context, else averaged over its contexts;
        for a condition at an unmeasured dose, :meth:`dose_response`."""
        exact = [i for i, k in enumerate(self.keys) if k == (perturbation, context)]
        if exact:
            return self.responses[exact[0]]
        anywhere = [i for i, k in enumerate(self.keys) if k[0] == perturbation]
        return self.responses[anywhere].mean(0) if anywhere else self.dose_response(perturbation, context)

    def dose_response(self, condition: str, context: str) -> np.ndarray | None:
        """The response of a perturbation at a dose it was not measured at (``drugA@1``): its
        measured responses (in ``context`` when measured there, else averaged over contexts per
        dose) interpolated linearly in log10(dose) between the nearest measured doses below and
        above; outside their range the nearest one's. None without a dose or a measured dose."""
        base, dose = self.spec.split_dose(condition)
        if dose is None or dose <= 0:
            return None
        measured = [(i, d) for i, (p, _) in enumerate(self.keys) for b, d in [self.spec.split_dose(p)]
                    if b == base and d is not None and d > 0]
        here = [(i, d) for i, d in measured if self.keys[i][1] == context]
        chosen = here or measured
        if not chosen:
            return None
        doses = sorted({d for _, d in chosen})
        curve = np.stack([self.responses[[i for i, d in chosen if d == dd]].mean(0) for dd in doses])
        x, at = np.log10(doses), np.log10(dose)
        j = int(np.searchsorted(x, at))
        if j == 0 or j == len(x):
            return curve[min(j, len(x) - 1)]
        w = (at - x[j - 1]) / (x[j] - x[j - 1])
        return ((1 - w) * curve[j - 1] + w * curve[j]).astype(np.float32)

    def predicted_delta(self, perturbation: str, context: str) -> np.ndarray:
        raise NotImplementedError

    def generate(
        self,
        controls: np.ndarray,
        perturbation: str,
        context: str,
        rng: np.random.Generator,
        settings: PredictConfig | None = None,
    ) -> np.ndarray:
        return np.clip(controls + self.predicted_delta(perturbation, context)[None, :], 0, None)

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"responses": torch.from_numpy(self.responses)}

    def extra_state(self) -> dict[str, Any]:
        return {"keys": [list(k) for k in self.keys]}

    def load_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.responses = tensors["responses"].numpy()
        self.keys = [tuple(k) for k in extra["keys"]]


class NoChange(DeltaModel):
    name = "no-change"

    def predicted_delta(self, perturbation: str, context: str) -> np.ndarray:
        return np.zeros(len(self.genes), dtype=np.float32)


class TrainingMean(DeltaModel):
    name = "mean"

    def predicted_delta(self, perturbation: str, context: str) -> np.ndarray:
        same = [i for i, k in enumerate(self.keys) if k[1] == context]
        chosen = same or list(range(len(self.keys)))
        return self.responses[chosen].mean(0) if chosen else np.zeros(len(self.genes), dtype=np.float32)


class Additive(DeltaModel):
    name = "additive"
    predicts_unknown_labels = False  # no change, for a label it never measured

    def unmeasured_single(self, context: str) -> np.ndarray:
        """The shift of a single never measured: none (the field's additive baseline)."""
        return np.zeros(len(self.genes), dtype=np.float32)

    def predicted_delta(self, perturbation: str, context: str) -> np.ndarray:
        comps = self.components(perturbation)
        if len(comps) == 1:
            found = self.response(perturbation, context)
            return found if found is not None else self.unmeasured_single(context)
        dose = self.spec.split_dose(perturbation)[1]
        total = np.zeros(len(self.genes), dtype=np.float32)
        for comp in comps:
            found = self.response(comp if dose is None else dose_label(comp, dose), context)
            if found is not None:
                total += found
        return total


class AdditiveSingleMean(Additive):
    """``additive``, except that a single never measured is the average response of the measured
    singles (in the context where it has any, else over all contexts) instead of no change.

    An unseen single still does what every perturbation of the screen does (the part the
    measured singles share); in a combination that part already comes with its measured
    component, so an unmeasured component adds nothing there, as in ``additive`` (each measured
    single's response counts once). Unlike ``mean`` it averages singles only: a screen's
    combinations move more genes further than its singles. On norman-unseen-single's test (5
    unseen singles, 4 combinations with one unseen gene) it scores top-20 DE Pearson delta 0.542
    and E-distance 0.260, against additive's 0.387 / 0.272 and linear's 0.460 / 0.308. A prior of
    pertflow's own (``prior: additive-mean``), not one of the field's baselines.
    """

    name = "additive-mean"
    predicts_unknown_labels = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._single_means: dict[str, np.ndarray] = {}  # context -> its measured singles' mean response
        self._single_mean = np.zeros(len(self.genes), dtype=np.float32)  # over every context

    def fit_responses(self, keys: list[tuple[str, str]], responses: np.ndarray) -> None:
        super().fit_responses(keys, responses)
        singles = [i for i, (p, _) in enumerate(self.keys) if len(self.components(p)) == 1]
        self._single_means = {c: self.responses[[i for i in singles if self.keys[i][1] == c]].mean(0)
                              for c in {self.keys[i][1] for i in singles}}
        self._single_mean = (self.responses[singles].mean(0) if singles
                             else np.zeros(len(self.genes), dtype=np.float32))

    def unmeasured_single(self, context: str) -> np.ndarray:
        return self._single_means.get(context, self._single_mean).astype(np.float32)

    def load_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        super().load_state(tensors, extra)
        self.fit_responses(self.keys, self.responses)


class ContextShift(DeltaModel):
    name = "context-shift"
    predicts_unknown_labels = False  # no change, for a label it never measured

    def predicted_delta(self, perturbation: str, context: str) -> np.ndarray:
        found = self.response(perturbation, context)
        return found if found is not None else np.zeros(len(self.genes), dtype=np.float32)


class Linear(DeltaModel):
    name = "linear"
    config_class = LinearConfig

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gene_embedding = np.zeros((len(self.genes), 0), dtype=np.float32)  # G: (genes, K)
        self.weights = np.zeros((0, 0), dtype=np.float32)  # W: (K, features)
        self.offset = np.zeros(len(self.genes), dtype=np.float32)  # b
        self.feature_tokens: list[str] = []  # non-gene tokens with a one-hot feature

    def fit_responses(self, keys: list[tuple[str, str]], responses: np.ndarray) -> None:
        super().fit_responses(keys, responses)
        Y = self.responses.T.astype(np.float64)  # (genes, training groups)
        self.offset = Y.mean(1).astype(np.float32) if Y.size else np.zeros(len(self.genes), dtype=np.float32)
        centred = Y - self.offset[:, None] if Y.size else np.zeros((len(self.genes), 0))
        # G: gene embeddings, the top principal components of the training pseudobulk (genes as
        # observations), as scores (singular values kept), as in Ahlmann-Eltze et al.
        k = max(0, min(self.config.n_components, centred.shape[1] - 1, centred.shape[0]))
        u, s, _ = (np.linalg.svd(centred, full_matrices=False) if k
                   else (np.zeros((len(self.genes), 0)), np.zeros(0), None))
        G = u[:, :k] * s[:k]
        self.gene_embedding = G.astype(np.float32)
        self.feature_tokens = sorted({c for p, _ in self.keys for c in self.components(p) if c not in self._gene_pos})
        if not self.keys:
            self.weights = np.zeros((k, k + len(self.feature_tokens)), dtype=np.float32)
            return
        P = np.stack([self.features(p) for p, _ in self.keys])  # (groups, features)
        lam = self.config.ridge
        left = np.linalg.solve(G.T @ G + lam * np.eye(k), G.T @ centred)
        self.weights = (left @ P @ np.linalg.inv(P.T @ P + lam * np.eye(P.shape[1]))).astype(np.float32)
        self.fit_report.update({"n_components": k, "features": int(P.shape[1])})

    def features(self, perturbation: str) -> np.ndarray:
        """p: summed over components, [loadings of a measured target gene, one-hot of other tokens]."""
        k = self.gene_embedding.shape[1]
        out = np.zeros(k + len(self.feature_tokens), dtype=np.float64)
        pos = self._gene_pos
        for comp in self.components(perturbation):
            if comp in pos:
                out[:k] += self.gene_embedding[pos[comp]]
            elif comp in self.feature_tokens:
                out[k + self.feature_tokens.index(comp)] += 1.0
        return out

    def predicted_delta(self, perturbation: str, context: str) -> np.ndarray:
        return (self.offset + self.gene_embedding @ (self.weights @ self.features(perturbation))).astype(np.float32)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            **super().state_tensors(),
            "gene_embedding": torch.from_numpy(self.gene_embedding),
            "weights": torch.from_numpy(np.ascontiguousarray(self.weights)),
            "offset": torch.from_numpy(self.offset),
        }

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "feature_tokens": self.feature_tokens}

    def load_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        super().load_state(tensors, extra)
        self.gene_embedding = tensors["gene_embedding"].numpy()
        self.weights = tensors["weights"].numpy()
        self.offset = tensors["offset"].numpy()
        self.feature_tokens = list(extra["feature_tokens"])
