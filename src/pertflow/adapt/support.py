"""Where the target's control cells lie against the source's, before and after the transport.

A control-only alignment carries a model to a technical change of the same cells (depth,
capture, normalisation, a gene panel): after it, the target's controls sit among the source's.
Where they do not (another cell type or tissue, a perturbed population labelled as controls), no
per-gene transport of the controls says how the cells respond, and the adapted prediction
cannot be trusted. So the adapter measures, in a PCA of both sides' control cells, the share
of target cells *outside the source's support*: farther from their nearest source cell than
99% of held-out source cells are from theirs. It warns when, after the transport, more than
half of the target's cells are outside (a technical change of the same cells leaves about 1%),
and ``controls.png`` shows both, before and after.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from pertflow.io import atomic_path

#: principal components of the source's controls the distances are taken in
N_PCS = 20
#: a cell is outside the source's support beyond this quantile of the source's own distances
SUPPORT_QUANTILE = 0.99
#: the share of target cells outside the source's support, after the transport, that warns
WARN_SHARE = 0.5
#: cells of each side read at most (a seeded subsample above it)
MAX_CELLS = 2000


@dataclass
class Support:
    """The target's controls against the source's support (see the module docstring).

    Attributes
    ----------
    outside_before, outside_after
        The share of target control cells outside the source's support, untransported and
        transported.
    coords
        Two principal components of both sides' controls: ``source``, ``target`` and
        ``adapted`` cells (for the picture; not saved).
    """

    outside_before: float
    outside_after: float
    coords: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def trusted(self) -> bool:
        return self.outside_after <= WARN_SHARE

    def warning(self) -> str:
        return (f"{self.outside_after:.0%} of the target's control cells lie outside the source's controls after the "
                f"transport ({self.outside_before:.0%} before; a technical change of the same cells leaves about 1%): "
                "the two datasets differ by more than a change of depth, capture or normalisation (another cell type "
                "or tissue?), and a control-only alignment cannot say how these cells respond. See controls.png; "
                "predict on such data without trusting the adapter, or train on data of these cells.")

    def as_dict(self) -> dict[str, float]:
        return {"outside_before": self.outside_before, "outside_after": self.outside_after}


def _subsample(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= MAX_CELLS else x[np.sort(rng.choice(len(x), MAX_CELLS, replace=False))]


def _principal_components(cells: np.ndarray):
    """The projection onto the top :data:`N_PCS` principal components of (n, G) cells (centred)."""
    center = cells.mean(0)
    _, _, vt = np.linalg.svd(cells - center, full_matrices=False)
    axes = vt[: min(N_PCS, len(vt))].T
    return lambda x: (np.asarray(x, np.float32) - center) @ axes


def measure_support(source: np.ndarray, target: np.ndarray, adapted: np.ndarray, seed: int = 0) -> Support:
    """(n, G) source controls, (m, G) target controls and the same cells transported -> :class:`Support`."""
    rng = np.random.default_rng(seed)
    source = _subsample(np.asarray(source, np.float32), rng)
    keep = rng.permutation(len(target))[:MAX_CELLS]
    target, adapted = np.asarray(target, np.float32)[keep], np.asarray(adapted, np.float32)[keep]
    # in a PCA of both sides: the source's own would hide the directions the target differs in
    project = _principal_components(np.concatenate([source, target]))
    pcs = {"source": project(source), "target": project(target), "adapted": project(adapted)}
    order = rng.permutation(len(source))
    tree = cKDTree(pcs["source"][order[: len(order) // 2]])
    radius = np.quantile(tree.query(pcs["source"][order[len(order) // 2:]])[0], SUPPORT_QUANTILE)

    def outside(points: np.ndarray) -> float:
        return float((tree.query(points)[0] > radius).mean())

    return Support(outside(pcs["target"]), outside(pcs["adapted"]), {name: x[:, :2] for name, x in pcs.items()})


def warn_if_untrusted(support: Support) -> None:
    if not support.trusted:
        warnings.warn(support.warning(), UserWarning, stacklevel=3)


def plot_support(support: Support, path: Path) -> None:
    """``controls.png``: the source's and the target's controls in the first two principal
    components of both, before and after the transport."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), sharex=True, sharey=True)
    for ax, side, share in ((axes[0], "target", support.outside_before), (axes[1], "adapted", support.outside_after)):
        ax.scatter(*support.coords["source"].T, s=3, c="0.6", alpha=0.5, label="source controls", rasterized=True)
        ax.scatter(*support.coords[side].T, s=3, c="tab:orange" if side == "target" else "tab:blue", alpha=0.5,
                   label=f"target controls, {'as measured' if side == 'target' else 'transported'}", rasterized=True)
        ax.set_title(f"{'before' if side == 'target' else 'after'}: {share:.0%} outside the source's support",
                     fontsize=9)
        ax.set_xlabel("PC1 of the source and target controls")
        ax.legend(fontsize=7, markerscale=3, loc="best")
    axes[0].set_ylabel("PC2")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
