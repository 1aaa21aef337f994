"""The MMD domain adapter on the AnnData side: read the control cells of a model's source data and
of new target data, learn the target's per-gene shift (:mod:`pertflow.adapt.shift`), and save or
load it as an adapter folder.

An adapter folder holds (no pickles; every file written atomically):

* ``shift.csv``: columns ``gene,shift``, the shift added to the target's log1p expression (then
  clipped at 0) before the model reads it, one row per model gene in the model's order;
* ``adapter.json``: the settings (seed included), the run, the data files (the source's as a list)
  and contexts read, the number of control cells of each side, the genes, the MMD before and after;
* ``mmd.csv`` (``step,mmd``) and ``mmd.png``: the MMD over the steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from pertflow.adapt.shift import AdapterConfig, fit_shift
from pertflow.configs import build, to_dict
from pertflow.data.dataset import GENE_PANEL_FIX, PerturbationData
from pertflow.errors import InputError
from pertflow.io import atomic_path, read_json, write_json
from pertflow.models.base import PerturbationModel
from pertflow.models.network import inference_device

ADAPTER_FORMAT_VERSION = 1
#: What an adapter folder holds (a folder holding one of them already holds an adapter).
ADAPTER_FILES = ("shift.csv", "adapter.json", "mmd.csv", "mmd.png")
MMD_CONVENTION = (
    "mean over genes of the unbiased multi-bandwidth RBF MMD^2 (pertflow.ops.kernels.mmd2_rbf) between each "
    "gene's control embeddings of the source and of the shifted target, on a fixed sample of eval_cells cells a side"
)


@dataclass
class Adapter:
    """A learnt per-gene shift of a target dataset's expression, for one model.

    Attributes
    ----------
    genes
        The model's genes, in its order.
    shift
        (G,) float32, added to the target's log1p expression (then clipped at 0).
    config
        The settings it was learnt with.
    history
        (step, MMD) records (see :data:`MMD_CONVENTION`).
    info
        What it was learnt from: run, data files, contexts, cells read.
    """

    genes: list[str]
    shift: np.ndarray
    config: AdapterConfig
    history: list[tuple[int, float]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def mmd_before(self) -> float:
        return self.history[0][1]

    @property
    def mmd_after(self) -> float:
        return self.history[-1][1]

    def apply(self, controls: np.ndarray) -> np.ndarray:
        """(n, G) log1p expression on :attr:`genes` -> shifted and clipped at 0."""
        return np.clip(controls + self.shift[None, :], 0, None).astype(np.float32)

    def check_genes(self, model: PerturbationModel) -> None:
        """The adapter must have been learnt for the model's genes, in its order."""
        if list(model.genes) != self.genes:
            raise InputError(
                f"the adapter's {len(self.genes)} genes are not the model's {len(model.genes)} genes in the model's order. "
                "Learn the adapter for this model (`pertflow adapt --run RUN ...`)."
            )

    # ------------------------------------------------------------------ persistence
    def save(self, out: str | Path) -> None:
        """Write the adapter folder (see the module docstring)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "shift.csv") as tmp:
            pd.DataFrame({"gene": self.genes, "shift": self.shift}).to_csv(tmp, index=False, float_format="%.6g")
        history = pd.DataFrame(self.history, columns=["step", "mmd"])
        with atomic_path(out / "mmd.csv") as tmp:
            history.to_csv(tmp, index=False, float_format="%.6g")
        plot_history(history, out / "mmd.png")
        write_json(out / "adapter.json", {
            "format_version": ADAPTER_FORMAT_VERSION,
            **self.info,
            "settings": to_dict(self.config),
            "steps": self.config.steps,
            "mmd_before": self.mmd_before,
            "mmd_after": self.mmd_after,
            "mmd": MMD_CONVENTION,
            "genes": self.genes,
        })

    @classmethod
    def load(cls, folder: str | Path) -> Adapter:
        """Read an adapter folder written by :meth:`save`."""
        folder = Path(folder)
        if not (folder / "adapter.json").is_file() or not (folder / "shift.csv").is_file():
            raise InputError(f"{folder} is not an adapter folder (adapter.json and shift.csv are missing). Make one with `pertflow adapt`.")
        meta = read_json(folder / "adapter.json")
        if meta.get("format_version", 0) != ADAPTER_FORMAT_VERSION:
            raise InputError(f"{folder} was written by another pertflow (adapter format {meta.get('format_version')}); run `pertflow adapt` again.")
        table = pd.read_csv(folder / "shift.csv")
        if list(table.columns) != ["gene", "shift"] or list(table["gene"].astype(str)) != meta["genes"]:
            raise InputError(f"{folder / 'shift.csv'} does not hold the columns gene,shift for the genes of adapter.json. Run `pertflow adapt` again.")
        history = pd.read_csv(folder / "mmd.csv") if (folder / "mmd.csv").is_file() else pd.DataFrame({"step": [0], "mmd": [meta["mmd_before"]]})
        info = {k: v for k, v in meta.items() if k not in ("format_version", "settings", "steps", "mmd_before", "mmd_after", "mmd", "genes")}
        return cls(
            genes=list(meta["genes"]),
            shift=table["shift"].to_numpy(np.float32),
            config=build(AdapterConfig, meta["settings"], "adapter"),
            history=[(int(s), float(m)) for s, m in zip(history["step"], history["mmd"])],
            info=info,
        )


def control_rows(data: PerturbationData, contexts: Sequence[str] | None) -> np.ndarray:
    """Sorted rows of the control cells of ``contexts`` (all contexts when None); a file without
    any is an error naming it."""
    mask = data.is_control.copy()
    if contexts:
        unknown = sorted(set(contexts) - set(data.contexts))
        if unknown:
            raise InputError(f"contexts {unknown} are not in {data.path or 'the data'}; its contexts: {sorted(set(data.contexts))[:20]}.")
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
    if bounds[-1] < 2:
        raise InputError(f"{bounds[-1]} control cell in {[str(d.path or 'the data') for d in datasets]}; the adapter needs "
                         "at least 2 a side. Give more control cells (other files or contexts).")
    chosen = np.sort(rng.choice(bounds[-1], size=max_cells, replace=False)) if bounds[-1] > max_cells else np.arange(bounds[-1])
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
    sources = [source] if isinstance(source, PerturbationData) else list(source)
    if not sources:
        raise InputError("no source data given: name the file(s) the model was trained on (--source-data).")
    rng = np.random.default_rng(config.seed)
    device = inference_device()
    source_x = torch.from_numpy(read_controls(sources, model.genes, source_contexts, config.max_cells, rng)).to(device)
    target_x = torch.from_numpy(read_controls([target], model.genes, target_contexts, config.max_cells, rng)).to(device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc="adapting", unit="step")
    fit = fit_shift(model.control_embedding, source_x, target_x, config,
                    progress=None if bar is None else (lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4f}"))))
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
    return Adapter(list(model.genes), fit.shift.numpy().astype(np.float32), config, fit.history, info)


def plot_history(history: pd.DataFrame, path: Path) -> None:
    """The MMD over the steps (``history``: columns step, mmd), written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    ax.plot(history["step"], history["mmd"], marker=".", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("MMD² (mean over genes)")
    ax.set_title("control embeddings: source vs shifted target", fontsize=9)
    ax.axhline(0, color="black", lw=0.5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
