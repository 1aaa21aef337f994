"""A validation that imitates the test: an inner split of the visible cells of the test's kind.

A split's own validation cells are a share of the training groups' cells: a model that fitted
those groups' responses scores well on them whether or not it carries to what the test asks. On
kang (context transfer) the flow's margin over its prior on such cells ranked *opposite* to its
gain on the test (Spearman -0.71 over the 7 folds). So the choices a model anchored on a prior
makes (the prior, the checkpoint, the prediction mode; :mod:`pertflow.models.anchored`) are made
on cells held out the way the test holds out its own:

* ``contexts`` (the test's contexts have no perturbed training cells: a context transfer): all
  perturbed cells of one or more training contexts leave training and become the validation;
  their control cells stay visible, as the test contexts' do. Which contexts (``contexts``):
  ``nearest``, those whose control cells are nearest the test contexts' (a monocyte for a
  monocyte); ``as-novel``, those as far from the rest of training as the test context is from
  training (its nearest training context's distance: a cell type with a close sibling in
  training is an easier validation than a test without one); ``both``, one of each.
* ``perturbations`` (a test perturbation has a component no training perturbation has: unseen
  perturbations): training singles leave training, with every training combination that
  contains one of them, and become the validation (singles left unseen, and combinations with
  one unseen component, as the test's are).
* ``cells`` (anything else, e.g. combinations of measured singles): the split's own validation
  cells, as before (:class:`~pertflow.models.validation.ValidationSet` then scores the kind of
  perturbation the test predicts where it can, and the prior says where it cannot).

One held-out context or perturbation is a small sample: :func:`rotations` gives more inner
splits of the same kind, each holding out others (``validation_rotations``: the prior and the
prediction mode are then chosen on the mean over them).

The model is then fitted on the inner split's training cells. Its prior is refitted on every
training cell once the choices are made (cheap); the network is trained again on every
training cell only with ``refit`` (twice the training time): otherwise it never read the
held-out cells, which the fit report says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pertflow.data.view import SplitView

#: the most control cells of a context read for its mean (a seeded subsample above it)
MEAN_CELLS = 2000
#: what an inner split can hold out (``auto``, in a config, picks one by the test's kind)
KINDS = ("cells", "contexts", "perturbations")
#: which training contexts a context-transfer validation holds out (see the module docstring)
CONTEXT_CHOICES = ("nearest", "as-novel", "both")


@dataclass(frozen=True)
class InnerSplit:
    """What a model is fitted and validated on (see the module docstring).

    Attributes
    ----------
    view
        The view to fit on: the outer one for ``cells``, else one whose training cells lack the
        held-out ones and whose validation cells are them (and the visible controls).
    kind
        ``cells``, ``contexts`` or ``perturbations``.
    held_out
        The contexts or perturbations held out (empty for ``cells``).
    reason
        Why this kind, in a sentence.
    """

    view: SplitView
    kind: str
    held_out: list[str] = field(default_factory=list)
    reason: str = ""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "held_out": list(self.held_out), "reason": self.reason}


def kind_of_test(view: SplitView) -> tuple[str, str]:
    """The kind of validation the split's test asks for, and why (see the module docstring)."""
    data = view.data
    train = view.rows.train
    perturbed = train[~data.is_control[train]]
    trained_contexts = set(map(str, data.contexts[perturbed]))
    new_contexts = sorted({c for _, c in view.test_groups()} - trained_contexts)
    if new_contexts and len(trained_contexts) >= 2:
        return "contexts", f"the test contexts {new_contexts[:3]} have no perturbed training cells (a context transfer)"
    trained = {c for p in set(data.perturbations[perturbed]) for c in data.components(p)}
    unseen = sorted({c for p in view.split.test_perturbations for c in data.components(p)} - trained)
    if unseen:
        return "perturbations", f"test components such as {unseen[:3]} have no training cells (unseen perturbations)"
    return "cells", "every test context and component has training cells"


def inner_split(view: SplitView, kind: str = "auto", n_held_out: int = 0, seed: int = 0,
                contexts: str = "nearest") -> InnerSplit:
    """The inner split a model anchored on a prior is fitted and validated on.

    Parameters
    ----------
    view
        The split view (test cells are never read; only the test groups' labels).
    kind
        ``auto`` (the kind of the split's test, :func:`kind_of_test`), ``cells``, ``contexts`` or
        ``perturbations``.
    n_held_out
        Contexts or perturbations held out; 0: about a fifth of them, at least one (always
        leaving at least one in training).
    seed
        Seeds the choice of perturbations held out and the control cells read for context means.
    contexts
        Which training contexts ``contexts`` holds out (:data:`CONTEXT_CHOICES`; ``both`` holds
        out at least two).
    """
    reason = f"validation: {kind} (the config)"
    if kind == "auto":
        kind, why = kind_of_test(view)
        reason = why
    if kind == "cells":
        return InnerSplit(view, "cells", [], reason)
    rng = np.random.default_rng(seed)
    data = view.data
    train = view.rows.train
    perturbed = train[~data.is_control[train]]
    if kind == "contexts":
        candidates = sorted(set(map(str, data.contexts[perturbed])))
        held = _held_out_contexts(view, candidates, n_held_out, contexts, rng)
    elif kind == "perturbations":
        held = _held_out_perturbations(view, perturbed, n_held_out, rng)
    else:
        raise ValueError(f"unknown validation kind '{kind}'")
    if not held:
        return InnerSplit(view, "cells", [],
                          f"{reason}; but nothing could be held out, so the split's validation cells")
    return hold_out(view, kind, held, reason)


def hold_out(view: SplitView, kind: str, held: list[str], reason: str = "") -> InnerSplit:
    """The inner split whose validation cells are the visible perturbed cells of the ``held``
    contexts (``kind`` ``contexts``) or perturbations (``perturbations``), with the visible
    controls; its training cells are the rest of the split's."""
    data = view.data
    labels = data.contexts if kind == "contexts" else data.perturbations
    visible_perturbed = view.visible[~data.is_control[view.visible]]
    out = np.isin(labels[visible_perturbed].astype(str), held)
    held_rows = visible_perturbed[out]
    inner_train = np.setdiff1d(view.rows.train, held_rows, assume_unique=True)
    val_controls = view.rows.val[data.is_control[view.rows.val]]
    inner = view.with_rows(inner_train, np.sort(np.concatenate([held_rows, val_controls])))
    return InnerSplit(inner, kind, list(held), reason)


def rotations(view: SplitView, first: InnerSplit, n: int, contexts: str = "nearest", seed: int = 0) -> list[InnerSplit]:
    """``first`` (the inner split a model is fitted on) and up to ``n - 1`` more of its kind, each
    holding out as many training contexts or perturbations as ``first`` (the last one fewer where
    too few are left), none held out by an earlier one: contexts in the order ``contexts`` ranks
    them, perturbations drawn with seeds ``seed + 1``, ..., so that a choice is judged on more
    held-out groups than one split has. One context always stays in training; ``cells`` has none."""
    out = [first]
    if first.kind == "cells" or n <= 1:
        return out
    data = view.data
    train = view.rows.train
    perturbed = train[~data.is_control[train]]
    held: set[str] = set(first.held_out)
    if first.kind == "contexts":
        candidates = sorted(set(map(str, data.contexts[perturbed])))
        ranking = _ranked_contexts(view, candidates, contexts, np.random.default_rng(seed))
        ranked = [c for c in ranking if c not in held]
        size = len(first.held_out)  # fewer than the candidates, so one always stays in training
        while len(out) < n and ranked:
            chosen, ranked = ranked[:size], ranked[size:]
            out.append(hold_out(view, "contexts", chosen, f"{first.reason}; rotation {len(out)}"))
        return out
    size = len({c for p in first.held_out for c in data.components(p) if len(data.components(p)) == 1}) or 1
    for r in range(1, n):
        singles = {data.components(p)[0] for p in held if len(data.components(p)) == 1}  # drugA@1 -> drugA
        chosen = _held_out_perturbations(view, perturbed, size, np.random.default_rng(seed + r), exclude=singles)
        if not chosen:
            break
        held |= set(chosen)
        out.append(hold_out(view, "perturbations", chosen, f"{first.reason}; rotation {len(out)}"))
    return out


def _count(n_held_out: int, n_candidates: int) -> int:
    n = n_held_out or max(1, int(round(n_candidates / 5)))
    return max(0, min(n, n_candidates - 1))


def _control_mean(view: SplitView, context: str, rng: np.random.Generator) -> np.ndarray:
    rows = view.control_rows(context)
    if len(rows) > MEAN_CELLS:
        rows = np.sort(rng.choice(rows, size=MEAN_CELLS, replace=False))
    return view.expression.get(rows).mean(0)


def _held_out_contexts(view: SplitView, candidates: list[str], n_held_out: int, choice: str,
                       rng: np.random.Generator) -> list[str]:
    """The training contexts to hold out (see the module docstring), by their control means."""
    n = _count(n_held_out, len(candidates))
    if choice == "both":
        n = min(max(n, 2), len(candidates) - 1)
    return _ranked_contexts(view, candidates, choice, rng)[:n] if n > 0 else []


def _ranked_contexts(view: SplitView, candidates: list[str], choice: str, rng: np.random.Generator) -> list[str]:
    """Every candidate context in the order validation holds them out (``choice``)."""
    if choice not in CONTEXT_CHOICES:
        raise ValueError(f"unknown choice of validation contexts '{choice}'; choose one of {CONTEXT_CHOICES}")
    tests = sorted({c for _, c in view.test_groups()})
    means = {c: _control_mean(view, c, rng) for c in candidates + tests}  # each context's controls read once
    gap = {(a, b): float(np.linalg.norm(means[a] - means[b])) for a in means for b in means}
    to_test = {c: min(gap[c, t] for t in tests) for c in candidates}
    nearest = sorted(candidates, key=lambda c: (to_test[c], c))
    # how new the test is to training, and each candidate to the rest of training
    test_novelty = float(np.mean([min(gap[t, c] for c in candidates) for t in tests]))
    novelty = {c: min(gap[c, o] for o in candidates if o != c) if len(candidates) > 1 else 0.0 for c in candidates}
    as_novel = sorted(candidates, key=lambda c: (abs(novelty[c] - test_novelty), c))
    if choice == "nearest":
        return nearest
    if choice == "as-novel":
        return as_novel
    ranked: list[str] = []
    for pick in (p for pair in zip(nearest, as_novel) for p in pair):  # alternate: nearest, as novel, ...
        if pick not in ranked:
            ranked.append(pick)
    return ranked


def _held_out_perturbations(view: SplitView, perturbed: np.ndarray, n_held_out: int,
                            rng: np.random.Generator, exclude: set[str] = frozenset()) -> list[str]:
    """Training singles (seeded) and every training perturbation that contains one of them. Where the
    test holds combinations with an unseen component, the singles are drawn among those that are
    components of training combinations, so that validation has that kind too; where every unseen
    component of the test is a measured gene (a CRISPR target the data measures), among the
    training singles that are measured genes (at least two), so that validation judges what the
    data says about a target (:mod:`pertflow.models.target_effect`) where the test does. Singles
    in ``exclude`` are not drawn (an earlier rotation held them out)."""
    data = view.data
    names = sorted(set(map(str, data.perturbations[perturbed])))
    singles = sorted({data.components(p)[0] for p in names if len(data.components(p)) == 1})
    in_combos = sorted({c for p in names if len(data.components(p)) > 1 for c in data.components(p)} & set(singles))
    test_has_combos = any(len(data.components(p)) > 1 for p in view.split.test_perturbations)
    if test_has_combos and in_combos:
        singles = in_combos
    measured = set(view.vocab.expression_genes)
    trained = {c for p in names for c in data.components(p)}
    unseen = {c for p in view.split.test_perturbations for c in data.components(p)} - trained
    measured_singles = [c for c in singles if c in measured]
    if unseen and unseen <= measured and len(measured_singles) >= 2:
        singles = measured_singles
    n = _count(n_held_out, len(singles))
    singles = [c for c in singles if c not in exclude]
    n = min(n, len(singles))
    if n == 0:
        return []
    chosen = set(rng.choice(singles, size=n, replace=False).tolist())
    held = [p for p in names if chosen & set(data.components(p))]
    return held if len(held) < len(names) else []
