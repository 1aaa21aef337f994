"""``CFMVC``: the count VAE with a covariate-aware latent flow as a pertflow model (AnnData-facing).

Fitting runs the stages of :mod:`pertflow.models.cfmvc.module` one after the other, each a run of
the one training engine in its own folder ``<run>/stages/<n>-<stage>/`` (checkpoints, history; the
stage's name is in every checkpoint), so that an interrupted run resumes in the stage it stopped
in, and a stage that trained anew makes the later stages start again:

1. ``vae``: ``model.vae_steps`` steps at ``model.vae_lr``, on batches that include every
   context's control cells (a held-out context's controls are visible and must be encoded well);
   the best step by the validation ELBO is kept.
2. ``flow``: ``train.max_steps`` steps, the VAE frozen; selection on validation metrics, as every
   model anchored on a prior (:class:`~pertflow.models.anchored.AnchoredNetwork`).
3. ``joint`` (``freeze_vae: false``): ``model.joint_steps`` steps of joint fine-tuning.

The prior (:mod:`pertflow.models.prior`) is applied in latent space: the flow starts from the
latent of the control cell shifted by the prior's predicted response. After training, the model
predicts as the flow, the flow moved onto the prior's mean, or the prior (chosen on validation).
``<run>/history.csv`` holds the stages' histories one after the other (a ``stage`` column).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pertflow.data.view import SplitView
from pertflow.data.vocab import UNK
from pertflow.errors import InputError
from pertflow.io import write_text
from pertflow.models.base import PerturbationModel
from pertflow.models.capabilities import ReadsControlExpression
from pertflow.models.cfmvc.config import CFMVCConfig
from pertflow.models.cfmvc.module import (
    CONTROL_COUNTS,
    CONTROL_COVARIATES,
    TARGET_COUNTS,
    TARGET_COVARIATES,
    TARGET_SPATIAL,
    CFMVCModule,
)
from pertflow.models.config import PredictConfig
from pertflow.models.descriptor_choice import ChoosesDescriptor
from pertflow.models.flow import flow_matching
from pertflow.models.anchored import AnchoredNetwork
from pertflow.models.network import frozen, inference_device
from pertflow.train.checkpoint import CheckpointDir, stage_dir
from pertflow.train.config import TrainConfig

NO_BATCH = "all"


class RowTable:
    """Per-cell rows of a table over all cells of a dataset (``get(rows)``, a batch array)."""

    def __init__(self, table: np.ndarray):
        self.table = table

    def get(self, rows: np.ndarray) -> np.ndarray:
        return self.table[np.asarray(rows)]


class CFMVC(ReadsControlExpression, ChoosesDescriptor, AnchoredNetwork):
    """CFM-VC (SPEC 2.4); see the module docstring and :mod:`pertflow.models.cfmvc.module`."""

    name = "cfmvc"
    config_class = CFMVCConfig
    descriptor_buffer = "context_encoder.descriptors"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.context_batch: dict[str, str] = {}  # each context's most common batch among its training controls
        self._counts = None

    @classmethod
    def from_view(cls, view: SplitView, config: Any = None,
                  predict_config: PredictConfig | None = None) -> PerturbationModel:
        """A model on the view's genes, with the covariates' categories read off the data."""
        config = config if config is not None else CFMVCConfig()
        data = view.data
        changes: dict[str, Any] = {}
        if not config.context_names:
            changes["context_names"] = tuple(sorted(set(map(str, data.contexts))))
        if not config.batch_names:
            col = data.spec.batch_col
            changes["batch_names"] = tuple(sorted(set(data.adata.obs[col].astype(str)))) if col else (NO_BATCH,)
        if config.spatial_key is not None:
            if config.spatial_key not in data.adata.obsm:
                raise InputError(f"model.spatial_key '{config.spatial_key}' is not in obsm (keys: "
                                 f"{list(data.adata.obsm)}). Give the obsm key of the spatial coordinates, or leave "
                                 "spatial_key unset.")
            changes["spatial_dim"] = int(np.asarray(data.adata.obsm[config.spatial_key]).shape[1])
        return super().from_view(view, dataclasses.replace(config, **changes), predict_config)

    def build_module(self) -> CFMVCModule:
        descriptors = self.descriptor_matrix()
        return CFMVCModule(self.config, flow_matching(self.config), len(self.genes), len(self.vocab), self.vocab.pad_id,
                           self.vocab.unk_id, self.spec.target_sum,
                           None if descriptors is None else torch.from_numpy(descriptors))

    def known_components(self, perturbation: str) -> list[str]:
        """Components as the flow reads them: one neither trained on nor described is ``<unk>``
        (its multi-hot column was never trained)."""
        known = set(self.trained_components) | self.described_components()
        return [c if c in known else UNK for c in self.components(perturbation)]

    # ------------------------------------------------------------------ covariates
    def covariate_table(self, view: SplitView) -> np.ndarray:
        """(n_cells, 2) int64: every cell's batch and context index."""
        data = view.data
        contexts = {c: i for i, c in enumerate(self.config.context_names)}
        unknown = sorted(set(map(str, data.contexts)) - set(contexts))
        if unknown:
            raise InputError(f"contexts {unknown[:5]} were not among the model's {list(contexts)[:5]}. Use data of the "
                             "same contexts.")
        batches = {b: i for i, b in enumerate(self.config.batch_names)}
        col = data.spec.batch_col
        labels = (data.adata.obs[col].astype(str).to_numpy() if col and NO_BATCH not in batches
                  else np.full(data.n_cells, NO_BATCH))
        return np.stack([np.array([batches.get(b, 0) for b in labels]),
                         np.array([contexts[str(c)] for c in data.contexts])], 1).astype(np.int64)

    def batch_arrays(self, view: SplitView) -> dict[str, Any]:
        arrays = super().batch_arrays(view)
        covariates = RowTable(self.covariate_table(view))
        arrays["target_arrays"] = {TARGET_COUNTS: self._counts, TARGET_COVARIATES: covariates}
        arrays["control_arrays"] = {CONTROL_COUNTS: self._counts, CONTROL_COVARIATES: covariates}
        if self.config.spatial_key is not None:
            coords = np.asarray(view.data.adata.obsm[self.config.spatial_key], dtype=np.float32)
            arrays["target_arrays"][TARGET_SPATIAL] = RowTable(coords)
        return arrays

    def fit_covariate_stats(self, view: SplitView) -> None:
        """From the training cells: each context's log-library location and scale, its most common
        batch among its controls, and the spatial standardisation."""
        train, data, module = view.rows.train, view.data, self.module
        table = self.covariate_table(view)
        log_library = np.log(self._counts.get(train).sum(1).astype(np.float64))
        for i, context in enumerate(self.config.context_names):
            here = table[train, 1] == i
            if here.any():
                module.library_loc[i] = float(log_library[here].mean())
                module.library_scale[i] = float(log_library[here].std())
            controls = train[here & data.is_control[train]]
            if len(controls):
                self.context_batch[context] = self.config.batch_names[int(np.bincount(table[controls, 0]).argmax())]
        if self.config.spatial_key is not None:
            coords = np.asarray(data.adata.obsm[self.config.spatial_key], dtype=np.float64)[train]
            module.spatial_loc.copy_(torch.from_numpy(coords.mean(0)))
            module.spatial_scale.copy_(torch.from_numpy(np.maximum(coords.std(0), 1e-6)))

    def fit_control_latents(self, view: SplitView) -> None:
        """Each context's control latents (posterior means of its training controls): mean and spread,
        what :meth:`generate_expression` draws from when given no control cells."""
        train = view.rows.train
        controls = train[view.data.is_control[train]]
        table = self.covariate_table(view)
        with frozen(self.module) as module:
            for i in range(len(self.config.context_names)):
                rows = controls[table[controls, 1] == i]
                if len(rows) < 2:
                    continue
                cov = torch.from_numpy(table[rows])
                post = module.vae.encode(torch.from_numpy(view.expression.get(rows)), cov[:, 0], cov[:, 1])
                z = torch.cat([post.int_mu, post.tech_mu], 1)
                module.control_loc[i] = z.mean(0)
                module.control_scale[i] = z.std(0).clamp(min=1e-4)

    # ------------------------------------------------------------------ training, in stages
    def stages(self, train_config: TrainConfig, selector: Any) -> list[tuple[str, TrainConfig, Any, bool | None]]:
        """(stage, its training settings, its selector, include_controls) in order."""
        cfg = self.config
        vae = dataclasses.replace(train_config, max_steps=cfg.vae_steps, lr=cfg.vae_lr, ema_decay=0.0,
                                  warmup_steps=min(train_config.warmup_steps, cfg.vae_steps // 10))
        out = [("vae", vae, None, True), ("flow", train_config, selector, None)]
        if not cfg.freeze_vae:
            joint = dataclasses.replace(train_config, max_steps=cfg.joint_steps, lr=cfg.joint_lr,
                                        warmup_steps=min(train_config.warmup_steps, cfg.joint_steps // 10))
            out.append(("joint", joint, selector, None))
        return out

    def train_network(self, view: SplitView, train_config: TrainConfig, run_dir: Path, resume: bool,
                      selector: Any) -> dict[str, Any]:
        self._counts = view.counts(self.config.counts_layer)
        self.fit_covariate_stats(view)
        reports: dict[str, dict[str, Any]] = {}
        retrained = False  # a stage trained in this call: the later stages' checkpoints are stale
        stages = self.stages(train_config, selector)
        for index, (stage, config, stage_selector, include_controls) in enumerate(stages, 1):
            folder = stage_dir(run_dir, index, stage)
            checkpoints = CheckpointDir(folder)
            if retrained and folder.exists():
                shutil.rmtree(folder)
            start = checkpoints.latest_step() if checkpoints.exists() else 0
            self.module.set_stage(stage)
            if stage != "vae" and self.config.context_from_controls:
                self.fit_control_latents(view)  # what the flow reads of a context
            result = self.run_engine(view, config, folder, resume and checkpoints.exists(), stage_selector,
                                     include_controls=include_controls, metadata={"stage": stage})
            retrained = retrained or result.steps > start
            reports[stage] = {"steps": result.steps, "best_step": result.best_step,
                              "best_criterion": result.best_criterion, "skipped_steps": result.skipped_steps,
                              "first_nonfinite_step": result.first_nonfinite_step}
        self.module.set_stage("flow")
        self.fit_control_latents(view)
        self._counts = None  # the counts are not part of the trained model
        self.write_history(run_dir, [s[0] for s in self.stages(train_config, selector)])
        last = reports["joint" if "joint" in reports else "flow"]
        return {
            "steps": reports["flow"]["steps"],
            "best_step": last["best_step"],
            "best_criterion": last["best_criterion"],
            "skipped_steps": reports["flow"]["skipped_steps"],
            "stages": reports,
            "parameters": sum(p.numel() for p in self.module.parameters()),
        }

    @staticmethod
    def write_history(run_dir: Path, stages: list[str]) -> None:
        """``<run>/history.csv``: the stages' histories one after the other, with a ``stage`` column."""
        rows: list[dict[str, Any]] = []
        for index, stage in enumerate(stages, 1):
            path = stage_dir(run_dir, index, stage) / "history.csv"
            if path.is_file():
                with path.open() as f:
                    rows += [{"stage": stage, **row} for row in csv.DictReader(f)]
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        write_text(Path(run_dir) / "history.csv", buf.getvalue())

    # ------------------------------------------------------------------ generation
    def context_index(self, context: str | None) -> int:
        names = list(self.config.context_names)
        if context is None and len(names) == 1:
            return 0
        if context not in names:
            raise InputError(f"unknown cell type / context {context!r}; the model knows {names}.")
        return names.index(context)

    def batch_index(self, batch: str | None, context: str | None) -> int:
        names = list(self.config.batch_names)
        batch = batch if batch is not None else self.context_batch.get(context or "", names[0])
        if batch not in names:
            raise InputError(f"unknown batch {batch!r}; the model knows {names}.")
        return names.index(batch)

    def cell_inputs(self, perturbation: str, context: str | None, n: int) -> dict[str, np.ndarray]:
        """Every generated cell of ``context`` gets the context and its most common training batch."""
        cov = np.array([[self.batch_index(None, context), self.context_index(context)]], dtype=np.int64)
        return {"covariates": np.repeat(cov, n, axis=0)}

    def generate_expression(self, perturbation: str, batch: str | None = None, cell_type: str | None = None,
                            spatial: np.ndarray | None = None, n_steps: int | None = None, use_mean: bool | None = None,
                            n_cells: int = 100, controls: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
        """Cells of ``perturbation`` (a name, ``A+B`` for a combination; the control label for
        controls) in a cell type and batch, through the flow (SPEC 2.4's ``generate_expression``).

        Parameters
        ----------
        batch, cell_type
            Category names (None: the only cell type; the cell type's most common batch).
        spatial
            (n_cells, S) or (S,) coordinates of the generated cells (None: the training mean).
        n_steps
            ODE steps (None: the run's ``predict.ode_steps``).
        use_mean
            The decoder's NB mean or a count sample (None: ``model.predict_mean``).
        controls
            (n, G) log1p control cells to start from (one cell each); None: ``n_cells`` control
            cells drawn from the cell type's fitted control latents and decoded.

        Returns
        -------
        np.ndarray
            (n, G) log1p expression, normalised as the data (``log1p(c / L * target_sum)``).
        """
        context_idx = self.context_index(cell_type)
        context = self.config.context_names[context_idx]
        batch_idx = self.batch_index(batch, context)
        settings = (self.predict_config if n_steps is None
                    else dataclasses.replace(self.predict_config, ode_steps=n_steps))
        generator = torch.Generator().manual_seed(seed)
        module = self.module.to(inference_device())
        device = next(module.parameters()).device
        with frozen(module):
            if controls is None:
                z_int, z_tech = module.control_latents(n_cells, context_idx, generator)
                rho = module.vae.decode(z_int, z_tech, torch.full((n_cells,), batch_idx, device=device))
                library = module.library_loc[context_idx].exp().expand(n_cells, 1)
                cells = module.vae.to_expression(rho, module.target_sum, library, generator)
            else:
                cells = torch.from_numpy(np.asarray(controls, dtype=np.float32)).to(device)
            n = len(cells)
            if perturbation == self.spec.control:
                ids = torch.full((n, self.max_components), self.vocab.pad_id, dtype=torch.long)
                shift = np.zeros(len(self.genes), np.float32)
            else:
                ids = self.perturbation_ids(perturbation, n)
                shift = (self.prior.delta(perturbation, context) if self.prior is not None
                         else np.zeros(len(self.genes), np.float32))
            covariates = torch.tensor([[batch_idx, context_idx]], device=device).expand(n, 2)
            coords = (None if spatial is None
                      else torch.as_tensor(np.asarray(spatial, np.float32), device=device).expand(n, -1))
            out = module.sample(cells, ids.to(device), settings, generator,
                                shift=torch.from_numpy(shift).to(device).expand(n, -1), covariates=covariates,
                                spatial=coords, use_mean=use_mean)
        return out.float().cpu().numpy()

    # ------------------------------------------------------------------ persistence
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "context_batch": self.context_batch}

    def load_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        super().load_state(tensors, extra)
        self.context_batch = dict(extra.get("context_batch", {}))
