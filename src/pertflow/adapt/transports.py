"""The transports of the adapter: per-gene maps of a target dataset's log1p control expression onto
the source's, each a small class that is fitted, applied, saved to and loaded from plain files.

* :class:`ShiftTransport` (``shift``): ``y = clip(x + b, 0)``, an offset per gene;
* :class:`AffineTransport` (``affine``): ``y = clip(a x + b, 0)``, a scale and an offset per gene
  (a depth or scale change);
* :class:`QuantileTransport` (``quantile``): per gene, the target's empirical CDF followed by the
  source's quantile function (non-parametric, monotone, exact on the marginals, the zero mass
  included: a depth and dropout change).

``shift`` and ``affine`` are parametric: :mod:`pertflow.adapt.shift` learns their parameters by
MMD through the model's control embedding (:meth:`initial`, :meth:`transform` on tensors,
:meth:`from_params`). ``quantile`` is fitted directly on the control cells (:meth:`QuantileTransport.fit`).
Every transport clips its output at 0 (log1p expression is >= 0). Each also maps back
(:meth:`Transport.invert`: source -> target scale), which carries a prediction made on the
source's scale onto the target's (``predict --shift-back``): the shift's offset subtracted, the
affine map undone, the quantile map run the other way (the source's CDF, then the target's
quantile function). No pickles: CSV tables, written atomically, one row per model gene in the
model's order.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pertflow.errors import InputError
from pertflow.io import atomic_path

#: Initialisations of the parametric transports (AdapterConfig.init, :data:`~pertflow.adapt.config.InitName`).
INITS = ("moments", "zero")


def _read_table(path: Path, columns: list[str], genes: list[str]) -> pd.DataFrame:
    """A transport table: its first columns must be ``columns`` and its genes ``genes``, in order."""
    if not path.is_file():
        raise InputError(f"{path} is missing from the adapter folder. Run `pertflow adapt` again.")
    table = pd.read_csv(path)
    if list(table.columns[:len(columns)]) != columns or list(table["gene"].astype(str)) != genes:
        raise InputError(f"{path} does not hold the columns {','.join(columns)} for the genes of adapter.json. "
                         "Run `pertflow adapt` again.")
    return table


def _positive_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """(G,) mean and standard deviation of each gene's positive values (0 and 0 for a gene without
    any): a dropout change of the zero mass leaves them as they are."""
    positive = (x > 0).float()
    n = positive.sum(0).clamp_min(1.0)
    mean = (x * positive).sum(0) / n
    var = (((x - mean) ** 2) * positive).sum(0) / n
    return mean, var.sqrt()


class Transport:
    """A per-gene map of log1p control expression (target -> source scale); see the module docstring."""

    name: ClassVar[str]
    #: The file(s) of the adapter folder that hold its state.
    files: ClassVar[tuple[str, ...]]

    def apply(self, controls: np.ndarray) -> np.ndarray:
        """(n, G) log1p expression on the adapter's genes -> (n, G) float32, clipped at 0."""
        raise NotImplementedError

    def invert(self, cells: np.ndarray) -> np.ndarray:
        """(n, G) log1p expression on the source's scale -> the target's (the map back), float32.
        Deterministic. The shift and the affine map are undone before their clipping at 0 (not
        clipped here), so that a change carried back through them (``own + invert(predicted) -
        invert(mapped)``) is exactly the change on their scale; the caller clips."""
        raise NotImplementedError

    def save(self, folder: Path, genes: list[str]) -> None:
        """Write the state to ``folder`` (atomically), one row per gene of ``genes``."""
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path, genes: list[str]) -> Transport:
        """Read the state written by :meth:`save` (checked against ``genes``)."""
        raise NotImplementedError

    @classmethod
    def identity(cls, n_genes: int) -> Transport:
        """The transport that changes nothing (kept when no fitted one lowers the held-out MMD)."""
        raise NotImplementedError


class ParametricTransport(Transport):
    """A transport with per-gene parameters learnt by MMD (tensors of shape (G,))."""

    #: Parameter names, in the order of :meth:`transform`'s dictionary.
    params: ClassVar[tuple[str, ...]]

    @staticmethod
    def transform(x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """(n, G) tensor -> mapped (n, G), clipped at 0 (differentiable w.r.t. the parameters)."""
        raise NotImplementedError

    @classmethod
    def initial(cls, source: Tensor, target: Tensor, init: str) -> dict[str, Tensor]:
        """Starting parameters: ``zero`` the identity, ``moments`` the per-gene map that matches the
        mean of the target to the source's (``affine``: the mean and standard deviation of the
        positive values, which extra dropout leaves as they are)."""
        raise NotImplementedError

    @classmethod
    def from_params(cls, params: dict[str, Tensor]) -> ParametricTransport:
        raise NotImplementedError


class ShiftTransport(ParametricTransport):
    """``y = clip(x + shift, 0)``.

    Attributes
    ----------
    shift
        (G,) float32 added to the target's log1p expression.
    """

    name = "shift"
    files = ("shift.csv",)
    params = ("shift",)

    def __init__(self, shift: np.ndarray) -> None:
        self.shift = np.asarray(shift, dtype=np.float32)

    @staticmethod
    def transform(x: Tensor, params: dict[str, Tensor]) -> Tensor:
        return (x + params["shift"]).clamp_min(0.0)

    @classmethod
    def initial(cls, source: Tensor, target: Tensor, init: str) -> dict[str, Tensor]:
        if init == "zero":
            return {"shift": torch.zeros(source.shape[1], device=source.device)}
        return {"shift": source.mean(0) - target.mean(0)}

    @classmethod
    def from_params(cls, params: dict[str, Tensor]) -> ShiftTransport:
        return cls(params["shift"].detach().cpu().numpy())

    @classmethod
    def identity(cls, n_genes: int) -> ShiftTransport:
        return cls(np.zeros(n_genes, np.float32))

    def apply(self, controls: np.ndarray) -> np.ndarray:
        return np.clip(controls + self.shift[None, :], 0, None).astype(np.float32)

    def invert(self, cells: np.ndarray) -> np.ndarray:
        return (cells - self.shift[None, :]).astype(np.float32)

    def save(self, folder: Path, genes: list[str]) -> None:
        with atomic_path(folder / "shift.csv") as tmp:
            pd.DataFrame({"gene": genes, "shift": self.shift}).to_csv(tmp, index=False, float_format="%.6g")

    @classmethod
    def load(cls, folder: Path, genes: list[str]) -> ShiftTransport:
        return cls(_read_table(folder / "shift.csv", ["gene", "shift"], genes)["shift"].to_numpy(np.float32))


class AffineTransport(ParametricTransport):
    """``y = clip(scale * x + shift, 0)``; the scale is learnt as its logarithm (always positive,
    so the map stays monotone).

    Attributes
    ----------
    scale, shift
        (G,) float32.
    """

    name = "affine"
    files = ("affine.csv",)
    params = ("log_scale", "shift")

    def __init__(self, scale: np.ndarray, shift: np.ndarray) -> None:
        self.scale = np.asarray(scale, dtype=np.float32)
        self.shift = np.asarray(shift, dtype=np.float32)

    @staticmethod
    def transform(x: Tensor, params: dict[str, Tensor]) -> Tensor:
        return (x * params["log_scale"].exp() + params["shift"]).clamp_min(0.0)

    @classmethod
    def initial(cls, source: Tensor, target: Tensor, init: str) -> dict[str, Tensor]:
        n_genes, device = source.shape[1], source.device
        if init == "zero":
            return {"log_scale": torch.zeros(n_genes, device=device), "shift": torch.zeros(n_genes, device=device)}
        (mean_s, sd_s), (mean_t, sd_t) = _positive_moments(source), _positive_moments(target)
        scale = torch.where((sd_s > 1e-6) & (sd_t > 1e-6), sd_s / sd_t.clamp_min(1e-6), torch.ones_like(sd_s))
        scale = scale.clamp(0.1, 10.0)
        return {"log_scale": scale.log(), "shift": mean_s - scale * mean_t}

    @classmethod
    def from_params(cls, params: dict[str, Tensor]) -> AffineTransport:
        return cls(params["log_scale"].detach().exp().cpu().numpy(), params["shift"].detach().cpu().numpy())

    @classmethod
    def identity(cls, n_genes: int) -> AffineTransport:
        return cls(np.ones(n_genes, np.float32), np.zeros(n_genes, np.float32))

    def apply(self, controls: np.ndarray) -> np.ndarray:
        return np.clip(controls * self.scale[None, :] + self.shift[None, :], 0, None).astype(np.float32)

    def invert(self, cells: np.ndarray) -> np.ndarray:
        return ((cells - self.shift[None, :]) / self.scale[None, :]).astype(np.float32)

    def save(self, folder: Path, genes: list[str]) -> None:
        with atomic_path(folder / "affine.csv") as tmp:
            table = pd.DataFrame({"gene": genes, "scale": self.scale, "shift": self.shift})
            table.to_csv(tmp, index=False, float_format="%.6g")

    @classmethod
    def load(cls, folder: Path, genes: list[str]) -> AffineTransport:
        table = _read_table(folder / "affine.csv", ["gene", "scale", "shift"], genes)
        return cls(table["scale"].to_numpy(np.float32), table["shift"].to_numpy(np.float32))


class QuantileTransport(Transport):
    """Per gene, ``y = Q_S(F_T(x))``: the target's empirical CDF, then the source's quantile function.

    ``F_T`` is the target's zero fraction ``z`` for the zero mass and ``z + (1 - z) F_+(x)`` above
    it, ``F_+`` interpolated on the quantiles of the target's positive values (tied quantiles
    collapsed to their mid-rank); a zero is given a position drawn uniformly in ``[0, z]`` (seeded:
    the same input gives the same output), so that zeros spread over the source's low quantiles and
    the dropout rates match whichever side has more zeros. ``Q_S`` is interpolated on the source's
    quantiles. The map is monotone in ``x`` and exact on each gene's marginal up to the grid.
    Above the top quantile a value keeps its excess over it, both ways: a perturbation raises some
    genes beyond every control cell (interferon-stimulated genes in monocytes), and a map that
    stopped at the top quantile would flatten that response when a prediction is carried back
    (kang thinned, CD14+Mono). Slope 1 because in log1p space a change of depth or normalisation
    is an offset at high expression, so a fold change over the top control cell stays that fold
    change (a slope fitted on the top quantiles, tried first, ran away on genes with few positive
    cells). Read backwards, a gene the target's controls never express has no target quantiles: a
    value above the source's top is carried with the offset between the two files' top quantiles
    (:attr:`top_offset`, the median over the genes both express), as the tail of an expressed gene
    is; one below the top is the target's 0. (A value just above the top jumps by the whole offset:
    ramping it in over the first ``|offset|`` of excess, so that a flow's noise over the top stays
    small, cost the thinned-kang monocytes 0.904 / 2.534 against 0.926 / 2.300, their induced
    genes coming back too low.) A gene the source's controls never vary is carried as it is.

    Attributes
    ----------
    source_quantiles
        (G, K) the source's quantiles at ``grid`` (K points from 0 to 1).
    target_zero
        (G,) the target's fraction of zeros.
    target_positive
        (G, K) the quantiles of the target's positive values (NaN for a gene without any).
    seed
        Seeds the positions given to zeros.
    """

    name = "quantile"
    files = ("quantile.csv",)

    def __init__(self, source_quantiles: np.ndarray, target_zero: np.ndarray, target_positive: np.ndarray,
                 seed: int = 0):
        self.source_quantiles = np.asarray(source_quantiles, dtype=np.float64)
        self.target_zero = np.asarray(target_zero, dtype=np.float64)
        self.target_positive = np.asarray(target_positive, dtype=np.float64)
        self.seed = int(seed)
        self.grid = np.linspace(0.0, 1.0, self.source_quantiles.shape[1])

    @classmethod
    def fit(cls, source: np.ndarray, target: np.ndarray, n_quantiles: int = 101, seed: int = 0) -> QuantileTransport:
        """Fit on (n_S, G) source and (n_T, G) target log1p control expression (same genes)."""
        grid = np.linspace(0.0, 1.0, n_quantiles)
        source_q = np.quantile(source, grid, axis=0).T
        positive = np.full((target.shape[1], n_quantiles), np.nan)
        for g in range(target.shape[1]):
            values = target[:, g][target[:, g] > 0]
            if len(values):
                positive[g] = np.quantile(values, grid)
        return cls(source_q, (target <= 0).mean(0), positive, seed)

    @property
    def top_offset(self) -> float:
        """The target's top quantile minus the source's, median over the genes both express: the
        two files' difference of scale at high expression (0 when no gene is expressed on both)."""
        both = ~np.isnan(self.target_positive).any(axis=1) & (self.source_quantiles[:, -1] > 0)
        if not both.any():
            return 0.0
        return float(np.median(self.target_positive[both, -1] - self.source_quantiles[both, -1]))

    @classmethod
    def identity(cls, n_genes: int) -> QuantileTransport:
        """The identity cannot be written as a quantile map of unknown data: use the shift's."""
        raise NotImplementedError("the quantile transport's identity is ShiftTransport.identity")

    def _tied_knots(self, quantiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(K,) quantiles at :attr:`grid` -> their distinct values and each one's position on the
        grid, tied quantiles collapsed to their mid-rank (the CDF as :func:`np.interp` reads it)."""
        knots, first = np.unique(quantiles, return_index=True)
        last = len(self.grid) - 1 - np.unique(quantiles[::-1], return_index=True)[1]
        return knots, (self.grid[first] + self.grid[last]) / 2

    def _positions(self, values: np.ndarray, g: int, rng: np.random.Generator) -> np.ndarray:
        z = self.target_zero[g]
        u = rng.uniform(0.0, z, size=len(values))  # drawn for every cell: the same draws whatever the values
        positive = values > 0
        if positive.any() and not np.isnan(self.target_positive[g]).any():
            knots, mid = self._tied_knots(self.target_positive[g])
            mid = mid if len(knots) > 1 else np.full(1, 0.5)
            u[positive] = z + (1 - z) * np.interp(values[positive], knots, mid, left=0.0, right=1.0)
        return u

    def apply(self, controls: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        out = np.empty(controls.shape, np.float32)
        for g in range(controls.shape[1]):
            values = np.asarray(controls[:, g], np.float64)
            out[:, g] = np.interp(self._positions(values, g, rng), self.grid, self.source_quantiles[g])
            if not np.isnan(self.target_positive[g]).any():
                top = self.target_positive[g, -1]
                beyond = values > top
                out[beyond, g] = self.source_quantiles[g, -1] + values[beyond] - top
        return np.clip(out, 0, None)

    def invert(self, cells: np.ndarray) -> np.ndarray:
        """Per gene ``x = Q_T(F_S(y))``: a value's position among the source's quantiles (tied knots at
        their mid-rank, so a 0 sits in the middle of the source's zero mass), then the target's
        value there (0 in its zero mass, its positive quantiles above it); a 0 stays 0. A gene the
        target's controls never express: above the source's top, the value plus :attr:`top_offset`
        (an induced gene keeps its response), else 0; a gene constant in the source's: as it is."""
        out = np.zeros(cells.shape, np.float32)
        offset = self.top_offset
        for g in range(cells.shape[1]):
            knots, mid = self._tied_knots(self.source_quantiles[g])
            values = np.asarray(cells[:, g], np.float64)
            if len(knots) < 2:  # no scale to read it on
                out[:, g] = values
                continue
            expressed = not np.isnan(self.target_positive[g]).any()
            if expressed:  # else below the source's top is the target's 0
                u = np.interp(values, knots, mid)
                z = self.target_zero[g]
                above = (u > z) & (values > 0)  # nothing expressed on the source's scale is nothing on the target's
                out[above, g] = np.interp((u[above] - z) / max(1 - z, 1e-12), self.grid, self.target_positive[g])
            target_top = self.target_positive[g, -1] if expressed else knots[-1] + offset
            beyond = values > knots[-1]
            out[beyond, g] = np.maximum(target_top + values[beyond] - knots[-1], 0)
        return out

    def save(self, folder: Path, genes: list[str]) -> None:
        k = self.source_quantiles.shape[1]
        names = [f"q{i:03d}" for i in range(k)]
        source = pd.DataFrame(self.source_quantiles, columns=names)
        target = pd.DataFrame(self.target_positive, columns=names)
        source.insert(0, "zero_fraction", (self.source_quantiles <= 0).mean(1))  # informative only
        target.insert(0, "zero_fraction", self.target_zero)
        for table, side in ((source, "source"), (target, "target_positive")):
            table.insert(0, "side", side)
            table.insert(0, "gene", genes)
        table = pd.concat([source, target], ignore_index=True)
        table.insert(len(table.columns), "seed", self.seed)
        with atomic_path(folder / "quantile.csv") as tmp:
            table.to_csv(tmp, index=False, float_format="%.17g")  # exact: a rounded knot moves tied values

    @classmethod
    def load(cls, folder: Path, genes: list[str]) -> QuantileTransport:
        path = folder / "quantile.csv"
        if not path.is_file():
            raise InputError(f"{path} is missing from the adapter folder. Run `pertflow adapt` again.")
        table = pd.read_csv(path, float_precision="round_trip")  # the knots exactly as saved
        names = [c for c in table.columns if c.startswith("q")]
        parts = {side: table[table["side"] == side] for side in ("source", "target_positive")}
        if any(list(p["gene"].astype(str)) != genes for p in parts.values()) or not names:
            raise InputError(f"{path} does not hold the source and target_positive quantiles of the genes of "
                             "adapter.json. Run `pertflow adapt` again.")
        return cls(parts["source"][names].to_numpy(), parts["target_positive"]["zero_fraction"].to_numpy(),
                   parts["target_positive"][names].to_numpy(), int(table["seed"].iloc[0]))


#: The transports by name (``pertflow adapt --transport``).
TRANSPORTS: dict[str, type[Transport]] = {t.name: t for t in (ShiftTransport, AffineTransport, QuantileTransport)}


def transport_class(name: str) -> type[Transport]:
    """The transport called ``name``; an unknown one is an InputError naming the choices."""
    if name not in TRANSPORTS:
        raise InputError(f"unknown transport {name!r}: choose one of {', '.join(TRANSPORTS)} "
                         "(shift: an offset per gene; affine: a scale and an offset; "
                         "quantile: a depth and dropout change).")
    return TRANSPORTS[name]
