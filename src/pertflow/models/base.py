"""What every perturbation model shares: the data it fits on, persistence, and prediction of a split.

A model (baseline or network) is a :class:`PerturbationModel`: built from a config, the genes it
reads and writes and a token vocabulary; ``fit`` on a split's training cells; ``generate`` cells
of a perturbation from control cells; ``save`` / ``load`` a run folder. :func:`predict_split`
turns any model into a cell-eval-ready prediction file for a split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd
import torch

from pertflow.configs import build, to_dict
from pertflow.data.dataset import PerturbationData
from pertflow.data.spec import DataSpec, split_components
from pertflow.data.splits import Split, SplitRows
from pertflow.data.vocab import Vocabulary, build_vocabulary, load_descriptors
from pertflow.errors import InputError
from pertflow.io import read_json, write_json
from pertflow.train.checkpoint import load_tensors, save_tensors
from pertflow.train.config import TrainConfig

RUN_FORMAT_VERSION = 1
DEFAULT_CACHE_BYTES = 4 * 2**30


class ExpressionCache:
    """Dense log1p expression of the rows a model may see, on the model's genes.

    Rows are materialised once when they fit in ``max_bytes``; otherwise each request reads its
    rows from the file (backed data stays on disk).
    """

    def __init__(self, data: PerturbationData, rows: np.ndarray, gene_idx: np.ndarray, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.data = data
        self.gene_idx = gene_idx
        rows = np.unique(rows)
        self.position = pd.Series(np.arange(len(rows)), index=rows)
        self.matrix: np.ndarray | None = None
        if len(rows) * len(gene_idx) * 4 <= max_bytes:
            self.matrix = data.log_expression(rows, gene_idx)

    def get(self, rows: np.ndarray) -> np.ndarray:
        """(n, G) float32 expression of ``rows`` (rows of the dataset)."""
        rows = np.asarray(rows)
        missing = ~np.isin(rows, self.position.index)
        if missing.any():
            raise RuntimeError(f"rows {rows[missing][:5]} are not visible to the model (test cells are never cached)")
        if self.matrix is None:
            return self.data.log_expression(rows, self.gene_idx)
        return self.matrix[self.position.loc[rows].to_numpy()]


@dataclass
class FitData:
    """A dataset seen through a split: what a model may use to fit and to predict.

    Test cells are not in the expression cache: only training and validation cells are.
    """

    data: PerturbationData
    split: Split
    rows: SplitRows
    genes: list[str]
    gene_idx: np.ndarray
    vocab: Vocabulary
    expression: ExpressionCache

    @classmethod
    def prepare(cls, data: PerturbationData, split: Split, max_cache_bytes: int = DEFAULT_CACHE_BYTES) -> FitData:
        rows = split.rows(data)
        genes = list(split.genes) if split.genes is not None else list(map(str, data.gene_names))
        gene_idx = data.gene_indices(genes)
        symbols = [str(s) for s in data.gene_symbols[gene_idx]]
        descriptors = None
        if data.spec.descriptors_key:
            descriptors = load_descriptors(data.spec.descriptors_key, data.adata.uns)
        vocab = build_vocabulary(symbols, (data.components(p) for p in data.perturbation_names), data.spec.genetic, descriptors)
        visible = np.concatenate([rows.train, rows.val])
        return cls(data, split, rows, genes, gene_idx, vocab, ExpressionCache(data, visible, gene_idx, max_cache_bytes))

    def groups(self, rows: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
        """Rows by (perturbation, context), controls included under the control label."""
        keys = pd.MultiIndex.from_arrays([self.data.perturbations[rows], self.data.contexts[rows]])
        return {k: rows[v] for k, v in pd.Series(np.arange(len(rows))).groupby(keys).indices.items()}

    def control_rows(self, context: str) -> np.ndarray:
        """Visible (train and validation) control cells of a context."""
        return visible_control_rows(self.data, self.rows, context)


def visible_control_rows(data: PerturbationData, rows: SplitRows, context: str) -> np.ndarray:
    """The control cells of a context that a model may see (train and validation), sorted."""
    visible = np.concatenate([rows.train, rows.val])
    found = np.sort(visible[data.is_control[visible] & (data.contexts[visible] == context)])
    if not len(found):
        raise InputError(f"context '{context}' has no visible control cells, so nothing can be predicted from them.")
    return found


class PairedTensorBatches:
    """Training batches for paired models: B perturbed cells and B controls of one context.

    ``next_batch()`` returns ``target`` (B, G) and ``control`` (B, G) float32 expression and
    ``pert_ids`` (B, K) perturbation tokens; its state (the sampler's generator) is what a
    checkpoint saves, so a resumed run draws the same batches.
    """

    def __init__(
        self,
        fit_data: FitData,
        rows: np.ndarray,
        batch_size: int,
        seed: int,
        max_components: int,
        weighting: str = "cells",
        include_controls: bool = False,
    ):
        from pertflow.data.sampler import PairedBatchSampler

        self.fit_data = fit_data
        self.max_components = max_components
        self.sampler = PairedBatchSampler.from_data(
            fit_data.data, rows, batch_size, seed, weighting=weighting, include_controls=include_controls
        )

    def next_batch(self) -> dict[str, torch.Tensor]:
        b = self.sampler.sample()
        expr = self.fit_data.expression
        comps = self.fit_data.data.components(b.perturbation)
        ids = self.fit_data.vocab.encode([comps] * len(b.target_rows), self.max_components)
        return {
            "target": torch.from_numpy(expr.get(b.target_rows)),
            "control": torch.from_numpy(expr.get(b.control_rows)),
            "pert_ids": torch.from_numpy(ids),
        }

    def shard(self, process_index: int) -> None:
        self.sampler.shard(process_index)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def validation_batches(fit_data: FitData, train_config: TrainConfig, max_components: int) -> list[dict[str, torch.Tensor]] | None:
    """A fixed list of batches of the split's validation cells (never test cells), or None.

    Validation targets are the validation cells; their controls are drawn from all visible
    controls of the same context (validation controls alone may be too few).
    """
    data = fit_data.data
    val_targets = fit_data.rows.val[~data.is_control[fit_data.rows.val]]
    if len(val_targets) == 0:
        return None
    controls = np.concatenate([fit_data.rows.train, fit_data.rows.val])
    controls = controls[data.is_control[controls]]
    val_contexts = set(data.contexts[val_targets])
    if not val_contexts <= set(data.contexts[controls]):
        return None
    source = PairedTensorBatches(
        fit_data, np.concatenate([val_targets, controls]), train_config.batch_size, train_config.seed + 1, max_components
    )
    return [source.next_batch() for _ in range(train_config.val_batches)]


class PerturbationModel:
    """Base of every model: config, genes, vocabulary, spec; fit, generate, save, load.

    Subclasses set ``name`` (the registry key) and ``config_class`` (a frozen dataclass) and
    implement :meth:`fit`, :meth:`generate`, and, when they hold tensors, :meth:`state_tensors`
    and :meth:`load_state_tensors`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object

    def __init__(self, config: Any, genes: list[str], vocab: Vocabulary, spec: DataSpec):
        self.config = config
        self.genes = list(genes)
        self.vocab = vocab
        self.spec = spec
        self.fit_report: dict[str, Any] = {}

    @classmethod
    def from_fit_data(cls, fit_data: FitData, config: Any = None) -> PerturbationModel:
        config = config if config is not None else build(cls.config_class, {})
        return cls(config, fit_data.genes, fit_data.vocab, fit_data.data.spec)

    # ------------------------------------------------------------------ to implement
    def fit(self, fit_data: FitData, train_config: TrainConfig, run_dir: Path, resume: bool = False) -> None:
        raise NotImplementedError

    def generate(self, controls: np.ndarray, perturbation: str, context: str, rng: np.random.Generator) -> np.ndarray:
        """Cells of ``perturbation`` in ``context``, one per control cell given.

        Parameters
        ----------
        controls
            (n, G) log1p expression of control cells of the context, on :attr:`genes`.
        perturbation
            Canonical perturbation name (``A`` or ``A+B``).
        context
            Context label (as in :attr:`PerturbationData.contexts`).
        rng
            Generator for any randomness (noise seeds).

        Returns
        -------
        np.ndarray
            (n, G) non-negative log1p expression.
        """
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise InputError(f"model '{self.name}' holds no tensors but the run folder has {len(tensors)}.")

    def extra_state(self) -> dict[str, Any]:
        """JSON-ready state besides tensors (e.g. the keys of a table of deltas)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ helpers
    def components(self, perturbation: str) -> tuple[str, ...]:
        return split_components(perturbation, self.spec)

    # ------------------------------------------------------------------ persistence
    def describe(self) -> dict[str, Any]:
        """What a run folder and every checkpoint record about the model (JSON-ready)."""
        return {
            "format_version": RUN_FORMAT_VERSION,
            "model": self.name,
            "config": to_dict(self.config),
            "genes": self.genes,
            "vocab": self.vocab.to_dict(),
            "spec": self.spec.to_dict(),
        }

    def save(self, run_dir: str | Path) -> None:
        """Write ``model.json`` and ``model.safetensors`` into ``run_dir`` (atomically)."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_tensors(run_dir / "model.safetensors", self.state_tensors())
        write_json(run_dir / "model.json", {**self.describe(), "extra_state": self.extra_state(), "fit_report": self.fit_report})

    @staticmethod
    def load(run_dir: str | Path) -> PerturbationModel:
        """Load any model from a run folder written by :meth:`save`."""
        from pertflow.models.registry import model_class

        run_dir = Path(run_dir)
        if not (run_dir / "model.json").is_file():
            raise InputError(
                f"{run_dir} holds no trained model (model.json is missing). Train one with `pertflow train`, "
                "or resume an interrupted run with `pertflow train --resume`."
            )
        meta = read_json(run_dir / "model.json")
        if meta.get("format_version", 0) > RUN_FORMAT_VERSION:
            raise InputError(f"{run_dir} was written by a newer pertflow; upgrade pertflow to load it.")
        cls = model_class(meta["model"])
        model = cls(
            build(cls.config_class, meta["config"], "model"),
            meta["genes"],
            Vocabulary.from_dict(meta["vocab"]),
            DataSpec.from_dict(meta["spec"]),
        )
        model.load_state_tensors(load_tensors(run_dir / "model.safetensors"))
        model.load_extra_state(meta.get("extra_state", {}))
        model.fit_report = meta.get("fit_report", {})
        return model

    def replace_config(self, **changes: Any) -> None:
        """Change inference-time settings (e.g. ODE steps) of a loaded model."""
        self.config = dataclasses.replace(self.config, **changes)
        module = getattr(self, "module", None)
        if module is not None and hasattr(module, "config"):
            module.config = self.config  # the network reads its inference settings from here


class TokenPerturbationModel(PerturbationModel):
    """A network that reads perturbations as vocabulary tokens.

    It remembers the components it trained on, so that at inference a component it never learnt
    (not trained, not an expression gene, no descriptor) is read as ``<unk>``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.trained_components: list[str] = []
        self.module = self.build_module()

    def build_module(self) -> torch.nn.Module:
        """The network: an ``nn.Module`` with ``loss(batch) -> LossOutput`` for the trainer and
        ``sample(control (B, G), pert_ids (B, K), generator) -> (B, G)`` for prediction."""
        raise NotImplementedError

    def generate(self, controls: np.ndarray, perturbation: str, context: str, rng: np.random.Generator) -> np.ndarray:
        device = inference_device()
        module = self.module.to(device).eval()
        ids = self.perturbation_ids(perturbation, 1)
        out = []
        # near-equal blocks of at most predict_batch_size cells (no small trailing block: a model
        # may use statistics of the control block, e.g. cfm's ``center``)
        n_blocks = -(-len(controls) // self.config.predict_batch_size)
        for rows in np.array_split(np.arange(len(controls)), n_blocks) if n_blocks else []:
            block = torch.from_numpy(controls[rows]).to(device)
            generator = torch.Generator().manual_seed(int(rng.integers(2**31 - 1)))
            out.append(module.sample(block, ids.expand(len(block), -1).to(device), generator).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.genes)), dtype=np.float32)

    def fit(self, fit_data: FitData, train_config: TrainConfig, run_dir: Path, resume: bool = False) -> None:
        """Train the network on paired batches with the shared engine; keep the best weights."""
        from pertflow.train.engine import Trainer

        torch.manual_seed(train_config.seed)
        self.module = self.build_module()
        self.record_training_perturbations(fit_data)
        width = self.config.max_components
        batches = PairedTensorBatches(
            fit_data, fit_data.rows.train, train_config.batch_size, train_config.seed, width,
            weighting=train_config.weighting, include_controls=train_config.include_controls,
        )
        val = validation_batches(fit_data, train_config, width)
        trainer = Trainer(self.module, train_config, run_dir, batches, val, metadata={**self.describe(), **self.extra_state()})
        result = trainer.fit(resume=resume)
        self.module.load_state_dict(trainer.final_weights())
        self.module.to("cpu")
        self.fit_report = {
            "steps": result.steps,
            "best_step": result.best_step,
            "best_val_loss": result.best_val_loss,
            "skipped_steps": result.skipped_steps,
            "parameters": sum(p.numel() for p in self.module.parameters()),
        }

    def record_training_perturbations(self, fit_data: FitData) -> None:
        train_perts = set(fit_data.data.perturbations[fit_data.rows.train]) - {self.spec.control}
        self.trained_components = sorted({c for p in train_perts for c in fit_data.data.components(p)})

    def known_components(self, perturbation: str) -> list[str]:
        """Components as the model can read them: one it has not learnt becomes ``<unk>``.

        A component is learnt when a training perturbation contained it, when it is an
        expression gene (its token is trained through expression), or when it has a descriptor.
        """
        from pertflow.data.vocab import UNK

        described = set() if self.vocab.descriptors is None else set(self.vocab.descriptors.index)
        known = set(self.trained_components) | set(self.vocab.expression_genes) | described
        return [c if c in known else UNK for c in self.components(perturbation)]

    def perturbation_ids(self, perturbation: str, n: int) -> torch.Tensor:
        """(n, max_components) token ids of a perturbation, unknown components as ``<unk>``."""
        ids = self.vocab.encode([self.known_components(perturbation)], self.config.max_components)
        return torch.from_numpy(ids).expand(n, -1)

    def extra_state(self) -> dict[str, Any]:
        return {"trained_components": self.trained_components}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.trained_components = list(state.get("trained_components", []))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(tensors)


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------- prediction
def predict_split(
    model: PerturbationModel,
    data: PerturbationData,
    split: Split,
    seed: int = 0,
    progress: bool = False,
) -> ad.AnnData:
    """A cell-eval-ready prediction of a split's test cells.

    For every (perturbation, context) of the test cells, as many control cells of that context
    as there are real test cells are drawn (without replacement when there are enough) from the
    visible controls, and the model generates one cell from each. The file holds the predicted
    cells and, under the control label, the real control cells of every test context; ``X`` is
    non-negative log1p expression on the split's genes, in their order.
    """
    from tqdm.auto import tqdm

    if model.spec.pert_col != data.spec.pert_col:
        raise InputError(
            f"the model was trained with perturbation column '{model.spec.pert_col}', the data spec uses "
            f"'{data.spec.pert_col}'. Pass --pert-col {model.spec.pert_col}."
        )
    genes = list(split.genes) if split.genes is not None else list(map(str, data.gene_names))
    if genes != list(model.genes):
        missing = [g for g in model.genes if g not in set(genes)]
        raise InputError(
            f"the split's genes differ from the model's ({len(genes)} vs {len(model.genes)}; e.g. missing "
            f"{missing[:5]}). Predict with the split the model was trained on, or retrain."
        )
    rows = split.rows(data)
    test = rows.test
    keys = pd.MultiIndex.from_arrays([data.perturbations[test], data.contexts[test]])
    test_groups = {k: test[v] for k, v in pd.Series(np.arange(len(test))).groupby(keys).indices.items()}
    contexts = sorted({c for _, c in test_groups})
    pools = {ctx: visible_control_rows(data, rows, ctx) for ctx in contexts}
    # Only the test contexts' visible controls are read: a model never sees test cells.
    controls = ExpressionCache(data, np.concatenate(list(pools.values())), data.gene_indices(genes))
    rng = np.random.default_rng(seed)
    blocks, obs_rows = [], []
    context_cols = list(data.spec.context_cols)
    items = sorted(test_groups.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    for (pert, ctx), group in tqdm(items, desc="predicting", unit="group", disable=None if progress else True):
        pool = pools[ctx]
        chosen = rng.choice(pool, size=len(group), replace=len(pool) < len(group))
        pred = model.generate(controls.get(chosen), pert, ctx, rng)
        if pred.shape != (len(group), len(model.genes)) or not np.isfinite(pred).all():
            raise RuntimeError(f"model '{model.name}' returned a bad prediction for {pert} in {ctx}: shape {pred.shape}")
        blocks.append(np.clip(pred, 0, None).astype(np.float32))
        first = data.adata.obs.iloc[group[0]]
        obs_rows += [{data.spec.pert_col: pert, **{c: str(first[c]) for c in context_cols}, "source": "predicted"}] * len(group)
    for ctx in contexts:
        blocks.append(controls.get(pools[ctx]))
        ctx_obs = data.adata.obs.iloc[pools[ctx]]
        obs_rows += [{data.spec.pert_col: data.spec.control, **{c: str(v[c]) for c in context_cols}, "source": "control"} for _, v in ctx_obs.iterrows()]
    obs = pd.DataFrame(obs_rows)
    obs.index = [f"pred_{i}" for i in range(len(obs))]
    for col in obs.columns:
        obs[col] = pd.Categorical(obs[col])
    out = ad.AnnData(X=np.concatenate(blocks), obs=obs, var=pd.DataFrame(index=model.genes))
    out.uns["pertflow"] = {"model": model.name, "split": split.name or "", "seed": seed}
    return out


def real_test_anndata(data: PerturbationData, split: Split) -> ad.AnnData:
    """The real counterpart of :func:`predict_split`: test cells plus the test contexts' visible controls."""
    rows = split.rows(data)
    genes = data.gene_indices(split.genes) if split.genes is not None else None
    controls = [visible_control_rows(data, rows, ctx) for ctx in sorted(set(data.contexts[rows.test]))]
    real = data.to_anndata(np.concatenate([rows.test, *controls]), genes)
    if split.genes is not None:
        real.var_names = list(split.genes)
    return real
