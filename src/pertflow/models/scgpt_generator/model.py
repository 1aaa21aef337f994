"""scGPT's ``TransformerGenerator`` as a pertflow perturbation model (``scgpt-generator``).

scGPT reads a control cell as tokens (gene id + expression value) and marks the perturbed genes
with a flag (0 not perturbed, 1 perturbed); the decoder predicts the perturbed cell's expression
of every gene (affine head ``A * x + b`` by default). Training pairs each perturbed cell with a
random control cell of its context (scGPT and GEARS do the same) and minimises the MSE.

pertflow's additions, so that every perturbation can be read, not only knock-downs of measured
genes: a component that is not an expression gene (an unmeasured target gene, a drug, a
cytokine) is appended as an extra token with value 0 and flag 1; a component the model never
learnt is read as ``<unk>``, a token trained on a share of batches as "some perturbation".
Training draws a random subset of genes per step (the perturbed genes always included);
prediction reads all genes, or chunks of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pertflow.data.keys import BATCH_KEYS
from pertflow.foundation.scgpt.config import ScGPTConfig
from pertflow.foundation.scgpt.generation_model import TransformerGenerator
from pertflow.foundation.scgpt.losses import perturbation_loss
from pertflow.models.config import PredictConfig
from pertflow.models.network import NetworkModel
from pertflow.nn.loss import LossOutput
from pertflow.nn.perturbation import unknown_perturbation_dropout

PERTURBED, NOT_PERTURBED, FLAG_PAD = 1, 0, 2


@dataclass(frozen=True)
class GeneratorConfig(ScGPTConfig):
    """The ``model`` section of a ``scgpt-generator`` run: an :class:`ScGPTConfig` (scGPT's names;
    the defaults here are a small CPU size, the vocabulary fields are filled in from the data)
    plus what training needs.

    Attributes
    ----------
    genes_per_step
        Random genes per training step (all genes when the data has fewer).
    max_components
        Most components of a combination.
    unknown_perturbation_p
        Share of training batches read as ``<unk>``.
    """

    d_model: int = 64
    nhead: int = 4
    d_hid: int = 128
    nlayers: int = 2
    dropout: float = 0.1
    genes_per_step: int = 512
    max_components: int = 2
    unknown_perturbation_p: float = 0.1


class GeneratorModule(nn.Module):
    """A ``TransformerGenerator`` and the assembly of its inputs from cells and perturbation tokens.

    Parameters
    ----------
    config
        The generator settings.
    gene_tokens
        (G,) vocabulary ids of the expression genes, in column order.
    n_tokens, pad_id, unk_id
        Vocabulary size, padding and unknown-perturbation tokens.
    """

    def __init__(self, config: GeneratorConfig, gene_tokens: Tensor, n_tokens: int, pad_id: int, unk_id: int):
        super().__init__()
        self.config = config
        self.pad_id, self.unk_id = pad_id, unk_id
        self.register_buffer("gene_tokens", gene_tokens.long())
        architecture = config.architecture(ntoken=n_tokens, pad_token_id=pad_id, n_pert_flags=3, pert_pad_id=FLAG_PAD)
        self.network = TransformerGenerator(architecture)

    def perturbed_columns(self, pert_ids: Tensor) -> Tensor:
        """Columns (expression genes) that are components of any perturbation of the batch."""
        return torch.nonzero(torch.isin(self.gene_tokens, pert_ids.reshape(-1))).flatten()

    def inputs(self, control: Tensor, columns: Tensor, pert_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Token ids, values, flags and padding mask of (B, g + K) sequences.

        The first g positions are the expression genes ``columns`` with the control cell's
        values; the last K hold the perturbation components that are not expression genes (value
        0, flag 1), padding elsewhere.
        """
        B = control.shape[0]
        tokens = self.gene_tokens[columns].unsqueeze(0).expand(B, -1)
        flags = (tokens.unsqueeze(-1) == pert_ids.unsqueeze(1)).any(-1).long()  # PERTURBED or NOT_PERTURBED
        pert_ids = pert_ids.contiguous()
        extra = torch.where(torch.isin(pert_ids, self.gene_tokens), torch.full_like(pert_ids, self.pad_id), pert_ids)
        extra_pad = extra == self.pad_id
        ids = torch.cat([tokens, extra], dim=1)
        values = torch.cat([control, torch.zeros_like(extra, dtype=control.dtype)], dim=1)
        flags = torch.cat([flags, torch.where(extra_pad, FLAG_PAD, PERTURBED)], dim=1)
        padding = torch.cat([torch.zeros_like(tokens, dtype=torch.bool), extra_pad], dim=1)
        return ids, values, flags, padding

    def predict_columns(self, control: Tensor, columns: Tensor, pert_ids: Tensor) -> Tensor:
        """(B, g) predicted expression of the genes ``columns`` (control given on those genes)."""
        ids, values, flags, padding = self.inputs(control, columns, pert_ids)
        return self.network(ids, values, flags, padding).mlm_output[:, : len(columns)]

    def loss(self, batch: dict[str, Tensor]) -> LossOutput:
        """MSE of the predicted perturbed cell on a random gene subset (perturbed genes included)."""
        target, control, pert_ids = batch[BATCH_KEYS.TARGET], batch[BATCH_KEYS.CONTROL], batch[BATCH_KEYS.PERT_IDS]
        if self.training:
            pert_ids = unknown_perturbation_dropout(pert_ids, self.pad_id, self.unk_id,
                                                    self.config.unknown_perturbation_p)
        n_genes = target.shape[1]
        columns = torch.arange(n_genes, device=target.device)
        if self.config.genes_per_step < n_genes:
            subset = torch.randperm(n_genes, device=target.device)[: self.config.genes_per_step]
            columns = torch.unique(torch.cat([subset, self.perturbed_columns(pert_ids)]))
        pred = self.predict_columns(control[:, columns], columns, pert_ids)
        mse = perturbation_loss(pred, target[:, columns])
        return LossOutput(loss=mse, metrics={"mse": float(mse.detach())})

    @torch.no_grad()
    def sample(self, control: Tensor, pert_ids: Tensor, settings: PredictConfig,
               generator: torch.Generator | None = None) -> Tensor:
        """(B, G) predicted expression of all genes, clamped at 0; genes in chunks of about
        ``settings.gene_chunk`` (the perturbed genes in every chunk) when it is set."""
        n_genes = control.shape[1]
        chunk = settings.gene_chunk
        if chunk is None or chunk >= n_genes:
            chunks = [torch.arange(n_genes, device=control.device)]
        else:
            perm = torch.randperm(n_genes, generator=generator).to(control.device)
            must = self.perturbed_columns(pert_ids)
            chunks = [torch.unique(torch.cat([c, must])) for c in perm.chunk(math.ceil(n_genes / chunk))]
        out = torch.empty_like(control)
        for columns in chunks:
            out[:, columns] = self.predict_columns(control[:, columns], columns, pert_ids).to(out.dtype)
        return out.clamp(min=0)


class ScGPTGenerator(NetworkModel):
    """scGPT's perturbation model; see the module docstring."""

    name = "scgpt-generator"
    config_class = GeneratorConfig
    default_predict_config = PredictConfig(batch_size=64)

    def build_module(self) -> GeneratorModule:
        vocab = self.vocab
        gene_tokens = torch.from_numpy(vocab.gene_ids(vocab.expression_genes))
        return GeneratorModule(self.config, gene_tokens, len(vocab), vocab.pad_id, vocab.unk_id)
