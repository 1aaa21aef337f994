"""CCFM on a compact cell-level latent (``ccfm`` with ``latent_stream: cell``, issue 27).

The SPEC's cascade generates a frozen foundation's per-gene features first and expression second.
Its latent stream barely learned on the CPU (a G x D target per cell, from a foundation pretrained
for minutes). This variant keeps the cascade and makes its latent one a flow can learn:

1. **stage 1, the latent**: latent-shift's pipeline (:class:`~pertflow.models.latent_shift.model.LatentShift`):
   a PCA of the training cells, a frozen decoder, the prior, and a flow in the embedding that
   carries each (prior-shifted) control cell's embedding to a perturbed cell's, conditioned on the
   perturbation and the context;
2. **stage 2, expression given the latent**: a flow in gene space whose velocity ``v(t, x_t, z)``
   reads the generated embedding ``z``. It starts at the cell stage 1 decodes (with ``decode:
   residual``, the control cell plus the decoder's change ``dec(z) - dec(z_control)``, so each
   cell keeps its variation outside the embedding) plus noise, and ends at an expression cell.
   It is trained on pairs of training cells matched by optimal transport in the embedding (a
   control and a perturbed cell of one perturbation in one context): start at the control cell
   decoded onto the perturbed cell's true embedding, end at the perturbed cell, conditioned on
   that embedding. What it learns is what the embedding and the decoder miss: the part of a
   response outside the top components and the spread around the decoded mean. Its last layer
   starts at zero, so an untrained stage 2 returns stage 1's cells. Its cells stay within each
   gene's training range (or stage 1's, where that is wider).

The prior, the validation that imitates the test and the prediction mode are the anchored
contract's (:class:`~pertflow.models.anchored.AnchoredModel`), stage 2 included in the model's
own cells. The stages train in ``checkpoints/decoder``, ``checkpoints/predictor`` and
``checkpoints/expression`` of the run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pertflow.data.view import SplitView
from pertflow.models.ccfm.config import CellCascadeConfig
from pertflow.models.config import PredictConfig
from pertflow.models.latent_shift.model import LatentCells, LatentShift
from pertflow.models.latent_shift.predictors import FlowPredictor
from pertflow.models.latent_shift.training import stage_dir
from pertflow.models.validation import ValidationSet
from pertflow.train.config import TrainConfig, stage_config

EXPRESSION_PREFIX = "expression."


class CellCascade(LatentShift, variant=True):
    """The cascade on a cell-level latent (see the module docstring); the ``ccfm`` model when its
    config says ``latent_stream: cell``."""

    name = "ccfm"
    config_class = CellCascadeConfig

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.expression_flow: FlowPredictor | None = None
        self.expression_max: np.ndarray | None = None  # (G,) the largest training value of each gene

    @property
    def what(self) -> str:
        return "the cascade (latent flow, then expression flow)"

    # ------------------------------------------------------------------ fitting
    def fit_networks(self, view: SplitView, latent: LatentCells, train_config: TrainConfig, run_dir: Path,
                     validation: ValidationSet | None = None) -> None:
        """Stage 1 (decoder and latent predictor, its descriptor chosen on stage 1's decoded
        cells), then stage 2, the expression flow."""
        super().fit_networks(view, latent, train_config, run_dir, validation)
        self.fit_expression_flow(view, latent, train_config, run_dir)

    def build_expression_flow(self, train_config: TrainConfig | None = None) -> FlowPredictor:
        cfg = self.config
        return FlowPredictor(len(self.genes), self.latent_dim, hidden=cfg.expression_hidden,
                             n_layers=cfg.expression_layers, groups_per_step=cfg.groups_per_step,
                             train_config=train_config, source_noise=cfg.expression_noise, coupling="independent",
                             mean_weight=cfg.expression_mean_weight, reads_start=False)

    def fit_expression_flow(self, view: SplitView, latent: LatentCells, train_config: TrainConfig,
                            run_dir: Path) -> None:
        """Stage 2 on pairs of training cells (see the module docstring)."""
        cfg = self.config
        steps = cfg.expression_steps
        config = stage_config(train_config, max_steps=steps, batch_size=cfg.expression_batch_size, lr=cfg.expression_lr,
                              warmup_steps=min(100, steps // 10), min_lr_ratio=0.05, val_every=steps,
                              checkpoint_every=min(steps, max(1, train_config.checkpoint_every)),
                              log_every=max(1, min(train_config.log_every, steps)))
        source, target, z, groups = self.expression_pairs(view, latent, np.random.default_rng(train_config.seed + 1))
        self.expression_max = np.maximum(source.max(0), target.max(0)).astype(np.float32)
        self.expression_flow = self.build_expression_flow(config)
        self.expression_flow.train(source, target, z, groups=groups, run_dir=stage_dir(run_dir, "expression"),
                                   metadata={"model": self.name, "stage": "expression", "genes": self.genes})
        self.fit_report["expression_flow"] = dict(self.expression_flow.fit_report)

    def expression_pairs(self, view: SplitView, latent: LatentCells, rng: np.random.Generator
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(start cell, perturbed cell, its embedding, group) of every pair training stage 2.

        A group is one training (perturbation, context): up to ``expression_pairs`` of its cells,
        each matched by optimal transport in the embedding to one of the context's control cells,
        which is decoded onto the perturbed cell's embedding to give the start.
        """
        control, cap = self.spec.control, self.config.expression_pairs
        groups = view.groups(view.rows.train)
        pools = {ctx: rows for (pert, ctx), rows in groups.items() if pert == control}
        blocks = []
        for key in sorted(k for k in groups if k[0] != control and k[1] in pools):
            targets = groups[key]
            if len(targets) > cap:
                targets = rng.choice(targets, size=cap, replace=False)
            pool = pools[key[1]]
            controls = rng.choice(pool, size=len(targets), replace=len(pool) < len(targets))
            z_controls = latent.get(controls)
            targets = targets[self._ot_order(z_controls, latent.get(targets), rng)]
            z_targets, x_controls = latent.get(targets), view.expression.get(controls)
            blocks.append((self.decode(z_targets, x_controls, z_controls), view.expression.get(targets), z_targets))
        source, target, z = (np.concatenate(parts).astype(np.float32) for parts in zip(*blocks))
        if self.config.latent_augment > 0:  # the generated embedding is not exact: train on noised true ones
            z = z + rng.normal(size=z.shape).astype(np.float32) * (self.config.latent_augment * z.std(0, keepdims=True))
        return source, target, z, np.repeat(np.arange(len(blocks)), [len(b[0]) for b in blocks])

    # ------------------------------------------------------------------ prediction
    def own_cells(self, controls: np.ndarray, perturbation: str, context: str, shift: np.ndarray,
                  rng: np.random.Generator, settings: PredictConfig) -> np.ndarray:
        """Stage 1's embeddings, decoded, carried by stage 2 to expression."""
        predicted, start = self.predicted_cells(controls, perturbation, context, shift, rng, settings)
        generator = torch.Generator().manual_seed(int(rng.integers(2**31 - 1)))
        cells = self.expression_flow.predict(start, predicted, generator=generator, settings=settings)
        # within each gene's training range: a flow carried outside the cells it was trained on
        # (a zhao patient's embedding) reached log1p values of 15, which no measured cell has
        return np.clip(cells, 0, None if self.expression_max is None else np.maximum(self.expression_max, start.max(0)))

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        limit = {} if self.expression_max is None else {"expression_max": torch.from_numpy(self.expression_max)}
        return {**super().state_tensors(), **limit,
                **{EXPRESSION_PREFIX + k: v for k, v in self.expression_flow.state_tensors().items()}}

    def load_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        super().load_state({k: v for k, v in tensors.items() if not k.startswith(EXPRESSION_PREFIX)}, extra)
        limit = tensors.get("expression_max")  # absent in a run saved before the range was kept: no limit
        self.expression_max = None if limit is None else limit.numpy()
        self.expression_flow = self.build_expression_flow()
        self.expression_flow.load_state_tensors({k.removeprefix(EXPRESSION_PREFIX): v for k, v in tensors.items()
                                                 if k.startswith(EXPRESSION_PREFIX)})
