"""A perturbation model backed by a network that reads perturbations as vocabulary tokens.

The network (an ``nn.Module`` that knows only tensors) has ``loss(batch) -> LossOutput`` for the
training engine and ``sample(control, pert_ids, settings, generator) -> cells`` for prediction.
:class:`NetworkModel` does everything around it: training batches from the split view, the one
training engine, the unknown-perturbation token, generation in blocks, persistence.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pertflow.data.view import SplitView
from pertflow.data.vocab import UNK
from pertflow.models.base import PerturbationModel
from pertflow.models.config import PredictConfig
from pertflow.train.config import TrainConfig


ROW_INDEX_FILE = "row_index.npz"  # the training rows per (perturbation, context), cached beside the run


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The module in eval mode with no gradient to its weights (gradients still reach its
    inputs); its mode and ``requires_grad`` flags are restored afterwards."""
    was_training = module.training
    flags = [p.requires_grad for p in module.parameters()]
    module.eval()
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
        module.train(was_training)


class NetworkModel(PerturbationModel):
    """A network that reads perturbations as vocabulary tokens.

    It remembers the components it trained on, so that at inference a component it never learnt
    (not trained, not an expression gene, no descriptor) is read as ``<unk>``. Subclasses
    implement :meth:`build_module`; a model that needs more than expression in its batches
    overrides :meth:`batch_arrays`.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.trained_components: list[str] = []
        self.module = self.build_module()

    def build_module(self) -> torch.nn.Module:
        """The network: ``loss(batch) -> LossOutput`` and
        ``sample(control (B, G), pert_ids (B, K), settings, generator) -> (B, G)``."""
        raise NotImplementedError

    def batch_arrays(self, view: SplitView) -> dict[str, Any]:
        """Extra arrays of the training batches (``target_arrays``, ``control_arrays``,
        ``group_arrays`` of :class:`~pertflow.data.batches.PairedBatches`); none by default."""
        return {}

    @property
    def max_components(self) -> int:
        return self.config.max_components

    # ------------------------------------------------------------------ training
    def fit(self, view: SplitView, train_config: TrainConfig, run_dir: Path, resume: bool = False,
            selector: Any = None) -> None:
        """Train the network on paired batches with the shared engine; keep the best weights
        (by the validation loss, or by ``selector``'s score: see :class:`~pertflow.train.Trainer`)."""
        torch.manual_seed(train_config.seed)
        self.trained_components = view.training_components
        self.module = self.build_module()
        self.fit_report = self.train_network(view, train_config, Path(run_dir), resume, selector)

    def train_network(self, view: SplitView, train_config: TrainConfig, run_dir: Path, resume: bool,
                      selector: Any) -> dict[str, Any]:
        """Train :attr:`module` (built, untrained) and return the fit report: one run of the engine
        in ``run_dir``. A model trained in stages overrides this and calls :meth:`run_engine` per stage."""
        result = self.run_engine(view, train_config, run_dir, resume, selector)
        return {
            "steps": result.steps,
            "best_step": result.best_step,
            "best_criterion": result.best_criterion,
            "skipped_steps": result.skipped_steps,
            "parameters": sum(p.numel() for p in self.module.parameters()),
            "processes": result.processes,
            "steps_per_s": result.steps_per_s,
        }

    def run_engine(self, view: SplitView, train_config: TrainConfig, run_dir: Path, resume: bool, selector: Any = None,
                   include_controls: bool | None = None, metadata: dict[str, Any] | None = None) -> Any:
        """One run of the training engine on :attr:`module` in ``run_dir``; the module then holds
        the run's kept weights (on the CPU). Returns the :class:`~pertflow.train.TrainResult`.

        ``include_controls`` overrides ``train_config.include_controls`` for the batches;
        ``metadata`` is added to what every checkpoint records (a resumed run must match it).
        """
        from pertflow.train.engine import Trainer

        arrays = self.batch_arrays(view)
        controls = train_config.include_controls if include_controls is None else include_controls
        batches = view.paired_batches(
            view.rows.train, train_config.batch_size, train_config.seed, self.max_components,
            weighting=train_config.weighting, include_controls=controls, index_cache=Path(run_dir) / ROW_INDEX_FILE,
            **arrays,
        )
        val = view.validation_batches(train_config.val_batches, train_config.batch_size, train_config.seed + 1,
                                      self.max_components, **arrays)
        trainer = Trainer(self.module, train_config, run_dir, batches, val,
                          metadata={**self.describe(), **self.extra_state(), **(metadata or {})}, selector=selector)
        result = trainer.fit(resume=resume)
        self.module.load_state_dict(trainer.final_weights())
        self.module.to("cpu")
        return result

    # ------------------------------------------------------------------ prediction
    def generate(
        self,
        controls: np.ndarray,
        perturbation: str,
        context: str,
        rng: np.random.Generator,
        settings: PredictConfig | None = None,
    ) -> np.ndarray:
        module = self.module.to(inference_device())
        return self.sample_cells(module, controls, perturbation, rng, settings or self.predict_config)

    def sample_cells(
        self,
        module: torch.nn.Module,
        controls: np.ndarray,
        perturbation: str,
        rng: np.random.Generator,
        settings: PredictConfig,
        **cell_inputs: np.ndarray,
    ) -> np.ndarray:
        """Cells from ``module.sample`` (on the module's device), one per control cell, in blocks.

        ``cell_inputs``: more (n, G) arrays, one row per control cell, passed to the network's
        ``sample`` under their names, block by block.
        """
        device = next(module.parameters()).device
        ids = self.perturbation_ids(perturbation, 1)
        out = []
        # near-equal blocks of at most batch_size cells (no small trailing block: a model may use
        # statistics of the control block, e.g. cfm's ``center``)
        n_blocks = -(-len(controls) // settings.batch_size)
        with frozen(module):
            for rows in np.array_split(np.arange(len(controls)), n_blocks) if n_blocks else []:
                block = torch.from_numpy(np.ascontiguousarray(controls[rows])).to(device)
                extra = {k: torch.from_numpy(np.ascontiguousarray(v[rows])).to(device) for k, v in cell_inputs.items()}
                generator = torch.Generator().manual_seed(int(rng.integers(2**31 - 1)))
                cells = module.sample(block, ids.expand(len(block), -1).to(device), settings, generator, **extra)
                out.append(cells.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.genes)), dtype=np.float32)

    def known_components(self, perturbation: str) -> list[str]:
        """Components as the model can read them: one it has not learnt becomes ``<unk>``.

        A component is learnt when a training perturbation contained it, when it is an
        expression gene (its token is trained through expression), or when it has a descriptor.
        """
        described = set() if self.vocab.descriptors is None else set(self.vocab.descriptors.index)
        known = set(self.trained_components) | set(self.vocab.expression_genes) | described
        return [c if c in known else UNK for c in self.components(perturbation)]

    def unread_components(self, perturbation: str) -> list[str]:
        read_as = self.known_components(perturbation)
        return [c for c, known in zip(self.components(perturbation), read_as) if known == UNK]

    def perturbation_ids(self, perturbation: str, n: int) -> torch.Tensor:
        """(n, max_components) token ids of a perturbation, unknown components as ``<unk>``."""
        ids = self.vocab.encode([self.known_components(perturbation)], self.max_components)
        return torch.from_numpy(ids).expand(n, -1)

    # ------------------------------------------------------------------ persistence
    def extra_state(self) -> dict[str, Any]:
        return {"trained_components": self.trained_components}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.module.load_state_dict(tensors)
        self.trained_components = list(extra.get("trained_components", []))
