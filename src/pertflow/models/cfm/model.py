"""``CFM``: the gene-space flow model as a pertflow model (AnnData-facing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pertflow.data.vocab import SPECIAL_TOKENS
from pertflow.models.base import FitData, PairedTensorBatches, PerturbationModel, validation_batches
from pertflow.models.cfm.config import CFMConfig
from pertflow.models.cfm.module import CFMModule
from pertflow.train import Trainer, TrainConfig


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class CFM(PerturbationModel):
    """Gene-space conditional flow matching (scDFM backbone); see :mod:`pertflow.models.cfm.module`."""

    name = "cfm"
    config_class = CFMConfig

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.module = self.build_module()

    def build_module(self) -> CFMModule:
        vocab = self.vocab
        descriptors = vocab.descriptor_matrix()
        first_other = len(SPECIAL_TOKENS) + len(vocab.expression_genes) + len(vocab.perturbed_genes)
        return CFMModule(
            self.config,
            torch.from_numpy(vocab.gene_ids(vocab.expression_genes)),
            n_tokens=len(vocab),
            first_other_token=first_other,
            pad_id=vocab.pad_id,
            descriptors=None if descriptors is None else torch.from_numpy(descriptors),
        )

    def fit(self, fit_data: FitData, train_config: TrainConfig, run_dir: Path, resume: bool = False) -> None:
        torch.manual_seed(train_config.seed)
        self.module = self.build_module()
        batches = PairedTensorBatches(
            fit_data,
            fit_data.rows.train,
            train_config.batch_size,
            train_config.seed,
            self.config.max_components,
            weighting=train_config.weighting,
            include_controls=train_config.include_controls,
        )
        val = validation_batches(fit_data, train_config, self.config.max_components)
        trainer = Trainer(self.module, train_config, run_dir, batches, val, metadata=self.describe())
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

    def generate(self, controls: np.ndarray, perturbation: str, context: str, rng: np.random.Generator) -> np.ndarray:
        device = inference_device()
        module = self.module.to(device).eval()
        ids = torch.from_numpy(self.vocab.encode([self.components(perturbation)], self.config.max_components))
        out = []
        for start in range(0, len(controls), self.config.predict_batch_size):
            block = torch.from_numpy(controls[start : start + self.config.predict_batch_size]).to(device)
            generator = torch.Generator().manual_seed(int(rng.integers(2**31 - 1)))
            out.append(module.sample(block, ids.expand(len(block), -1).to(device), generator).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.genes)), dtype=np.float32)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(tensors)
