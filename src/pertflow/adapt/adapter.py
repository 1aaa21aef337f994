"""The MMD domain adapter on the AnnData side: read the control cells of a model's source data and
of new target data, fit the target's transport (:mod:`pertflow.adapt.shift`,
:mod:`pertflow.adapt.transports`), and save or load it as an adapter folder.

An adapter folder holds (no pickles; every file written atomically):

* the transport's table, one row per model gene in the model's order: ``shift.csv`` (``gene,shift``:
  added to the target's log1p expression, then clipped at 0), ``affine.csv`` (``gene,scale,shift``)
  or ``quantile.csv`` (per gene, the source's quantiles and the target's zero fraction and
  quantiles of its positive values);
* ``adapter.json``: the format version, the transport, the settings (seed included), the run, the
  data files (the source's as a list) and contexts read, the number of control cells of each side,
  the genes, the held-out MMD before and after, the step kept (null: the identity);
* ``mmd.csv`` (``step,mmd,lr``) and ``mmd.png``: the held-out MMD over the steps;
* ``controls.png``: the source's and the target's controls before and after the transport, and in
  ``adapter.json`` the share of target cells outside the source's support
  (:mod:`pertflow.adapt.support`; ``pertflow adapt`` warns where most of them are);
* with ``per_context``: a folder ``context_<i>`` per context fitted on its own, holding that
  context's transport table; ``adapter.json`` names each folder's context and its held-out MMD
  before and after (``contexts``).

Format 1 (a ``shift.csv`` and no transport named) is read as the ``shift`` transport; format 2 has
no per-context transports.
"""

from __future__ import annotations

import shutil
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from pertflow.adapt.config import AdapterConfig
from pertflow.adapt.shift import fit_transport
from pertflow.adapt.support import Support, measure_support, plot_support, warn_if_untrusted
from pertflow.adapt.transports import (
    TRANSPORTS,
    ShiftTransport,
    Transport,
    transport_class,
)
from pertflow.configs import build, to_dict
from pertflow.data.dataset import GENE_PANEL_FIX, PerturbationData
from pertflow.errors import InputError
from pertflow.io import atomic_path, read_json, write_json
from pertflow.models.base import PerturbationModel
from pertflow.models.network import inference_device

ADAPTER_FORMAT_VERSION = 3
#: Adapter formats this pertflow reads (1: a shift only; 2: no per-context transports).
READABLE_FORMATS = (1, 2, 3)
#: What an adapter folder holds (a folder holding one of them already holds an adapter).
ADAPTER_FILES = ("shift.csv", "affine.csv", "quantile.csv", "adapter.json", "mmd.csv", "mmd.png", "controls.png")
MMD_CONVENTION = (
    "mean over genes of the unbiased multi-bandwidth RBF MMD^2 (pertflow.ops.kernels.mmd2_rbf) between each "
    "gene's control embeddings of the source and of the transported target, on the held-out control cells "
    "(never stepped on; at most eval_cells a side)"
)
_META_KEYS = ("format_version", "settings", "steps", "mmd_before", "mmd_after", "mmd", "genes", "transport",
              "kept_step", "kept", "contexts")
#: The folder of the i-th per-context transport.
CONTEXT_FOLDER = "context_{}"


@dataclass
class Adapter:
    """A fitted per-gene transport of a target dataset's expression, for one model.

    Attributes
    ----------
    genes
        The model's genes, in its order.
    transport
        The kept transport (:mod:`pertflow.adapt.transports`).
    config
        The settings it was learnt with.
    history
        (step, held-out MMD, learning rate) records (see :data:`MMD_CONVENTION`).
    info
        What it was learnt from: run, data files, contexts, cells read.
    kept_step
        The step whose state was kept; None: the identity (no state lowered the held-out MMD).
    mmd_before, mmd_after
        The held-out MMD of the identity and of the kept transport (the first and the lowest
        record of ``history`` when not given).
    support
        Where the target's controls lie against the source's, before and after
        (:mod:`pertflow.adapt.support`; its shares are also in ``info``); None after loading.
    by_context
        Per-context transports (``per_context``): a target context's cells are mapped with its
        own, every other cell with :attr:`transport`.
    context_mmd
        Each per-context transport's held-out MMD before and after, on that context's cells.
    """

    genes: list[str]
    transport: Transport
    config: AdapterConfig
    history: list[tuple[int, float, float]]
    info: dict[str, Any] = field(default_factory=dict)
    kept_step: int | None = None
    mmd_before: float = float("nan")
    mmd_after: float = float("nan")
    support: Support | None = None
    by_context: dict[str, Transport] = field(default_factory=dict)
    context_mmd: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if np.isnan(self.mmd_before):
            self.mmd_before = float(self.history[0][1])
        if np.isnan(self.mmd_after):
            self.mmd_after = float(min(record[1] for record in self.history))

    @property
    def kept(self) -> str:
        """What was kept, in words."""
        if self.kept_step is None:
            return "the identity (no fitted state lowered the held-out MMD)"
        return f"the {self.transport.name} transport of step {self.kept_step}"

    @property
    def shift(self) -> np.ndarray:
        """(G,) the shift of a ``shift`` adapter (its one parameter; any adapter maps cells with :meth:`apply`)."""
        if not isinstance(self.transport, ShiftTransport):
            raise InputError(f"this adapter is a {self.transport.name} transport, not a per-gene shift: map cells with "
                             "Adapter.apply.")
        return self.transport.shift

    def transport_for(self, context: str | None) -> Transport:
        """The transport of a target context's cells: its own where it has one, else the pooled one."""
        return self.by_context.get(context, self.transport)

    def apply(self, controls: np.ndarray, context: str | None = None) -> np.ndarray:
        """(n, G) log1p expression on :attr:`genes` of cells of ``context`` (a target context
        label; None: the pooled transport) -> transported, clipped at 0 (float32)."""
        controls = np.asarray(controls, dtype=np.float32)
        if controls.ndim != 2 or controls.shape[1] != len(self.genes):
            raise InputError(f"the adapter maps (cells, {len(self.genes)} genes) expression; got shape "
                             f"{controls.shape}.")
        return self.transport_for(context).apply(controls)

    def invert(self, cells: np.ndarray, context: str | None = None) -> np.ndarray:
        """(n, G) cells of ``context`` on the source's (training data's) scale -> the target's: the
        transport run backwards (:meth:`~pertflow.adapt.transports.Transport.invert`; not clipped)."""
        return self.transport_for(context).invert(np.asarray(cells, dtype=np.float32))

    def check_genes(self, model: PerturbationModel) -> None:
        """The adapter must have been learnt for the model's genes, in its order."""
        if list(model.genes) != self.genes:
            raise InputError(
                f"the adapter's {len(self.genes)} genes are not the model's {len(model.genes)} genes in the model's "
                "order. Learn the adapter for this model (`pertflow adapt --run RUN ...`)."
            )

    # ------------------------------------------------------------------ persistence
    def save(self, out: str | Path) -> None:
        """Write the adapter folder (see the module docstring)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name in {f for t in TRANSPORTS.values() for f in t.files} - set(self.transport.files):
            (out / name).unlink(missing_ok=True)  # another transport's table of an overwritten folder
        for old in context_folders(out):
            shutil.rmtree(old)  # the per-context tables of the adapter this one replaces
        self.transport.save(out, self.genes)
        contexts = []
        for i, (context, transport) in enumerate(sorted(self.by_context.items())):
            (out / CONTEXT_FOLDER.format(i)).mkdir()
            transport.save(out / CONTEXT_FOLDER.format(i), self.genes)
            before, after = self.context_mmd.get(context, (None, None))
            contexts.append({"context": context, "folder": CONTEXT_FOLDER.format(i), "transport": transport.name,
                             "mmd_before": before, "mmd_after": after})
        history = pd.DataFrame(self.history, columns=["step", "mmd", "lr"])
        with atomic_path(out / "mmd.csv") as tmp:
            history.to_csv(tmp, index=False, float_format="%.6g")
        plot_history(history, out / "mmd.png")
        if self.support is not None:
            plot_support(self.support, out / "controls.png")
        write_json(out / "adapter.json", {
            "format_version": ADAPTER_FORMAT_VERSION,
            "transport": self.transport.name,
            **self.info,
            "settings": to_dict(self.config),
            "steps": self.config.steps,
            "mmd_before": self.mmd_before,
            "mmd_after": self.mmd_after,
            "kept_step": self.kept_step,
            "kept": self.kept,
            "contexts": contexts,
            "mmd": MMD_CONVENTION,
            "genes": self.genes,
        })

    @classmethod
    def load(cls, folder: str | Path) -> Adapter:
        """Read an adapter folder written by :meth:`save` (or by a pertflow of format 1)."""
        folder = Path(folder)
        if not (folder / "adapter.json").is_file():
            raise InputError(f"{folder} is not an adapter folder (adapter.json is missing). "
                             "Make one with `pertflow adapt`.")
        meta = read_json(folder / "adapter.json")
        version = meta.get("format_version", 0)
        if version not in READABLE_FORMATS:
            raise InputError(f"{folder} was written by another pertflow (adapter format {version}; this one reads "
                             f"{', '.join(map(str, READABLE_FORMATS))}); run `pertflow adapt` again.")
        genes = list(meta["genes"])
        transport = transport_class(meta.get("transport", "shift")).load(folder, genes)
        settings = {k: v for k, v in meta["settings"].items() if k in AdapterConfig.__dataclass_fields__}
        history = [(0, float(meta["mmd_before"]), 0.0)]
        if (folder / "mmd.csv").is_file():
            table = pd.read_csv(folder / "mmd.csv")
            lr = table["lr"] if "lr" in table else np.zeros(len(table))
            history = [(int(s), float(m), float(r)) for s, m, r in zip(table["step"], table["mmd"], lr)]
        kept_step = meta.get("kept_step", history[-1][0]) if version >= 2 else history[-1][0]
        after = meta["mmd_after"]
        contexts = meta.get("contexts", [])
        by_context = {c["context"]: transport_class(c["transport"]).load(folder / c["folder"], genes) for c in contexts}
        context_mmd = {c["context"]: (c["mmd_before"], c["mmd_after"]) for c in contexts}
        return cls(genes=genes, transport=transport, config=build(AdapterConfig, settings, "adapter"), history=history,
                   info={k: v for k, v in meta.items() if k not in _META_KEYS}, kept_step=kept_step,
                   mmd_before=float(meta["mmd_before"]), mmd_after=float(after), by_context=by_context,
                   context_mmd=context_mmd)


def control_rows(data: PerturbationData, contexts: Sequence[str] | None) -> np.ndarray:
    """Sorted rows of the control cells of ``contexts`` (all contexts when None); a file without
    any is an error naming it."""
    mask = data.is_control.copy()
    if contexts:
        unknown = sorted(set(contexts) - set(data.contexts))
        if unknown:
            raise InputError(f"contexts {unknown} are not in {data.path or 'the data'}; its contexts: "
                             f"{sorted(set(data.contexts))[:20]}.")
        mask &= np.isin(data.contexts, list(contexts))
    rows = np.flatnonzero(mask)
    if len(rows) == 0:
        where = f" of contexts {list(contexts)}" if contexts else ""
        raise InputError(
            f"{data.path or 'the data'} has no control cells{where} (label '{data.spec.control}' in "
            f"obs['{data.spec.pert_col}']). Check --control / --pert-col or the contexts, or leave the file out."
        )
    return rows


def read_controls(datasets: Sequence[PerturbationData], genes: list[str], contexts: Sequence[str] | None,
                  max_cells: int, rng: np.random.Generator) -> np.ndarray:
    """(n, G) log1p expression of the control cells of one side (one or more files), on ``genes``.

    Genes are matched by name in each file: its other genes are dropped and missing ones are an
    error naming them. Beyond ``max_cells`` control cells in all, a random subsample (drawn with
    ``rng`` over the files' controls together) is read. Rows are read in bounded chunks
    (:meth:`PerturbationData.log_expression`): a sparse matrix is never made dense beyond the
    control rows read, on the genes asked for.
    """
    columns = [data.gene_indices(genes, fix=GENE_PANEL_FIX) for data in datasets]  # every file, before reading
    rows = [control_rows(data, contexts) for data in datasets]
    bounds = np.cumsum([0] + [len(r) for r in rows])
    if bounds[-1] < 4:
        raise InputError(f"{bounds[-1]} control cells in {[str(d.path or 'the data') for d in datasets]}; the adapter "
                         "needs at least 4 a side (2 to fit, 2 held out to score it). Give more control cells (other "
                         "files or contexts).")
    chosen = (np.sort(rng.choice(bounds[-1], size=max_cells, replace=False)) if bounds[-1] > max_cells
              else np.arange(bounds[-1]))
    parts = []
    for data, own, cols, lo, hi in zip(datasets, rows, columns, bounds[:-1], bounds[1:]):
        picked = own[chosen[(chosen >= lo) & (chosen < hi)] - lo]
        if len(picked):
            parts.append(data.log_expression(picked, cols))
    return np.concatenate(parts)


def learn_adapter(
    model: PerturbationModel,
    source: PerturbationData | Sequence[PerturbationData],
    target: PerturbationData,
    config: AdapterConfig,
    source_contexts: Sequence[str] | None = None,
    target_contexts: Sequence[str] | None = None,
    progress: bool = False,
) -> Adapter:
    """Learn the adapter of ``model`` from its source data to ``target`` (control cells only).

    Parameters
    ----------
    model
        A trained model with a control embedding (:meth:`PerturbationModel.control_embedding`).
    source, target
        The data the model was trained on (S: one dataset, or an explicit list of them, whose
        control cells are pooled) and the new data (T).
    config
        The adapter's settings.
    source_contexts, target_contexts
        Read only the control cells of these contexts (all when None).
    progress
        Show a progress bar.
    """
    model.control_embedding(torch.zeros(2, len(model.genes)))  # a model without one stops here, before any reading
    if config.transport == "shift" and getattr(model.config, "center", False):
        raise InputError(
            f"model '{model.name}' centres its control cells per gene (model.center: true): a per-gene shift of its "
            "input leaves its control tokens unchanged and moves its cells by the same shift, so a shift adapter has "
            "nothing to align. Learn an affine or quantile adapter (--transport affine: a change of scale still "
            "reaches it), adapt a model trained with --set model.center=false, or predict without an adapter."
        )
    sources = [source] if isinstance(source, PerturbationData) else list(source)
    if not sources:
        raise InputError("no source data given: name the file(s) the model was trained on (--source-data).")
    if config.per_context:  # which contexts get their own transport: said before any fitting
        own_contexts, pooled_contexts = contexts_of_their_own(sources, target, config, source_contexts,
                                                              target_contexts)
    rng = np.random.default_rng(config.seed)
    device = inference_device()
    source_x = torch.from_numpy(read_controls(sources, model.genes, source_contexts, config.max_cells, rng)).to(device)
    target_x = torch.from_numpy(read_controls([target], model.genes, target_contexts, config.max_cells, rng)).to(device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc="adapting", unit="step")
    fit = fit_transport(model.control_embedding, source_x, target_x, config,
                        progress=None if bar is None
                        else (lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4f}"))))
    if bar is not None:
        bar.close()
    info = {
        "source_data": [str(d.path) if d.path else None for d in sources],
        "target_data": str(target.path) if target.path else None,
        "source_contexts": list(source_contexts) if source_contexts else None,
        "target_contexts": list(target_contexts) if target_contexts else None,
        "source_cells": int(source_x.shape[0]),
        "target_cells": int(target_x.shape[0]),
        "model": model.name,
    }
    target_np = target_x.cpu().numpy()
    support = measure_support(source_x.cpu().numpy(), target_np, fit.transport.apply(target_np), config.seed)
    info["support"] = {**support.as_dict(), "trusted": support.trusted}
    warn_if_untrusted(support)
    by_context, context_mmd = {}, {}
    if config.per_context:
        by_context, context_mmd = fit_per_context(model, target, config, own_contexts)
        info["pooled_contexts"] = pooled_contexts
    return Adapter(list(model.genes), fit.transport, config, fit.history, info, fit.kept_step, fit.mmd_before,
                   fit.mmd_after, support, by_context, context_mmd)


def context_folders(folder: str | Path) -> list[Path]:
    """The per-context folders an adapter folder's ``adapter.json`` names (none without one):
    what replacing that adapter removes besides :data:`ADAPTER_FILES` (no other folder of it)."""
    folder = Path(folder)
    try:
        named = read_json(folder / "adapter.json").get("contexts", [])
    except (OSError, ValueError):
        return []
    return [folder / c["folder"] for c in named if (folder / c["folder"]).is_dir()]


def contexts_of_their_own(sources: list[PerturbationData], target: PerturbationData, config: AdapterConfig,
                          source_contexts: Sequence[str] | None, target_contexts: Sequence[str] | None,
                          ) -> tuple[dict[str, list[PerturbationData]], list[str]]:
    """The target contexts that get a transport of their own (``per_context``: named by the
    source too, with at least ``min_context_cells`` control cells on each side), each with the
    source files that hold its controls, and the target contexts left to the pooled one. No
    context named alike by both files is an error naming both files' labels (raised before
    anything is fitted)."""
    def counts(data: PerturbationData, contexts: Sequence[str] | None) -> dict[str, int]:
        return {c: n for c, n in data.control_cells_by_context().items() if not contexts or c in contexts}

    on_target = counts(target, target_contexts)
    by_source = [counts(data, source_contexts) for data in sources]
    on_source: Counter[str] = Counter()
    for held in by_source:
        on_source.update(held)
    shared = sorted(set(on_target) & set(on_source))
    if not shared:
        raise InputError(
            f"per_context needs contexts that both datasets name; the target's controls are of "
            f"{sorted(on_target)[:10]}, the source's of {sorted(on_source)[:10]}. Relabel one file's context column "
            "to match the other's, or learn one pooled transport (leave out --per-context)."
        )
    own = {c: [data for data, held in zip(sources, by_source) if c in held]
           for c in shared if min(on_target[c], on_source[c]) >= config.min_context_cells}
    return own, sorted(set(on_target) - set(own))


def fit_per_context(model: PerturbationModel, target: PerturbationData, config: AdapterConfig,
                    contexts: dict[str, list[PerturbationData]],
                    ) -> tuple[dict[str, Transport], dict[str, tuple[float, float]]]:
    """One transport per context of ``contexts`` (:func:`contexts_of_their_own`: each with the
    source files holding its controls), fitted on that context's control cells of both sides;
    returns the transports and each one's held-out MMD before and after. Each context draws its
    cells with its own generator (seeded by the seed and its name), so that its transport does
    not depend on the other contexts."""
    device = inference_device()
    by_context: dict[str, Transport] = {}
    context_mmd: dict[str, tuple[float, float]] = {}
    for context, holders in contexts.items():
        rng = np.random.default_rng([config.seed, zlib.crc32(context.encode())])
        source_x = read_controls(holders, model.genes, [context], config.max_cells, rng)
        target_x = read_controls([target], model.genes, [context], config.max_cells, rng)
        fit = fit_transport(model.control_embedding, torch.from_numpy(source_x).to(device),
                            torch.from_numpy(target_x).to(device), config)
        by_context[context] = fit.transport
        context_mmd[context] = (float(fit.mmd_before), float(fit.mmd_after))
    return by_context, context_mmd


def plot_history(history: pd.DataFrame, path: Path) -> None:
    """The MMD over the steps (``history``: columns step, mmd), written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    ax.plot(history["step"], history["mmd"], marker=".", lw=1)
    ax.axhline(history["mmd"].iloc[0], color="grey", lw=0.5, ls="--")  # the identity's
    ax.set_xlabel("step")
    ax.set_ylabel("MMD² (mean over genes)")
    ax.set_title("held-out control embeddings: source vs transported target", fontsize=9)
    ax.axhline(0, color="black", lw=0.5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
