"""The prior a model chooses with and without ``strength_margin``, and how far validation drawn again
moves the scores that choice reads. No model is trained.

For each fold: the inner splits an anchored model with CONFIG is fitted on (the ones
``AnchoredModel.fit`` builds, :func:`~pertflow.models.anchored.validation_splits`), the prior
``Prior.fit`` chooses on them with margin 0 and with ``--margin``, and the noise of the choice:
each inner split's validation set drawn again with ``--redraws`` other seeds (other control cells
to generate from, another subsample of real cells), and per baseline the standard deviation over
the draws of the score difference between neighbouring strengths (1 and 0.75, 0.75 and 0.5, 0.5
and 0.25; and a quarter against no change). One JSON line per fold::

    python benchmarks/strength_margin.py src/pertflow/resources/configs/ccfm-cpu.yaml \\
        gbm-cellline-transfer A172,T98G,U87MG --margin 0.02 > gbm.jsonl

(a task of one fold: ``-``)
(the data is read from ``../shared/data`` beside the repository, or ``$PERTFLOW_DATA``).
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np

from pertflow.api import split_view
from pertflow.benchmark import fold_split
from pertflow.configs import build, load_sections
from pertflow.data.tasks import find_tasks
from pertflow.models.anchored import validation_splits
from pertflow.models.config import AnchoredConfig
from pertflow.models.prior import Prior
from pertflow.models.validation import ValidationSet
from pertflow.runtime import set_threads

BASELINES = ("mean", "linear")  # the baselines whose strengths the noise is read on


def anchored_config(path: str) -> AnchoredConfig:
    """The anchored-contract fields of a model config file (the family's own fields left out)."""
    model = load_sections(path)["model"]
    fields = AnchoredConfig.__dataclass_fields__
    return build(AnchoredConfig, {k: v for k, v in model.items() if k in fields}, "model")


def neighbour_noise(view, strengths: tuple[float, ...], redraws: int, seed0: int) -> dict[str, float]:
    """Per pair of neighbouring strengths (and a quarter against no change): the sd over ``redraws``
    validation sets drawn with other seeds of their score difference, the median over ``BASELINES``."""
    candidates = Prior._candidates("auto", view, strengths)
    draws = []
    for k in range(redraws):
        validation = ValidationSet(view, seed=seed0 + 1000 * (k + 1))
        if len(validation):
            draws.append({label: prior.score(validation).score for label, prior in candidates.items()})
    if len(draws) < 2:
        return {}
    pairs: dict[str, list[float]] = {}
    for base in BASELINES:  # each baseline's strengths, strongest first, then no change
        ladder = sorted((label for label, prior in candidates.items() if prior.name in (base, "none")),
                        key=lambda label: -candidates[label].shift_scale)
        for a, b in zip(ladder, ladder[1:]):
            name = " vs ".join("none" if candidates[x].name == "none" else f"{candidates[x].strength:g}"
                               for x in (a, b))
            pairs.setdefault(name, []).append(float(np.std([d[a] - d[b] for d in draws], ddof=1)))
    return {name: round(float(np.median(v)), 4) for name, v in pairs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("task")
    parser.add_argument("folds")
    parser.add_argument("--margin", type=float, default=0.02)
    parser.add_argument("--redraws", type=int, default=4)
    args = parser.parse_args()
    set_threads(2)
    data_dir = Path(os.environ.get("PERTFLOW_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    config = anchored_config(args.config)
    task = find_tasks()[args.task]
    for fold in args.folds.split(","):
        with task.open_data(data_dir) as data:
            view = split_view(data, fold_split(task, data, None if fold in ("", "-") else fold, data_dir / "splits"))
            inner, validation, others = validation_splits(view, config)
            more = [(split.view, val) for split, val in others]
            plain = Prior.fit(config.prior, inner.view, validation, config.prior_strengths, more=more)
            kept = Prior.fit(config.prior, inner.view, validation, config.prior_strengths, more=more, margin=args.margin)
            noise = [neighbour_noise(split.view, config.prior_strengths, args.redraws, r)
                     for r, split in enumerate([inner, *(s for s, _ in others)])]
            row = {"task": args.task, "fold": fold, "splits": [list(inner.held_out), *(list(s.held_out) for s, _ in others)],
                   "chosen": plain.label, "chosen_with_margin": kept.label, "margin": args.margin,
                   "scores": {label: round(s["score"], 4) for label, s in plain.scores.items()},
                   "noise_sd": noise}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
