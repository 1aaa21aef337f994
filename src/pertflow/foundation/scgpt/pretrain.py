"""``pertflow pretrain``: train a small scGPT ``TransformerModel`` on any ``.h5ad`` file.

The vocabulary is the data's genes (``<pad>``, ``<cls>``, ``<eoc>`` first, as scGPT's). A
training cell becomes a sequence ``<cls>`` + up to ``max_seq_len - 1`` of its genes (its
non-zero genes by default, a random subset when there are more), with values binned per cell
(the released models' input) or log1p values; a share ``mask_ratio`` of the values is replaced by
the mask value and the model predicts them (MLM). MVC, ECS, CCE and DAB (when the data has a
batch column) can be switched on. Training goes through the shared engine, so it checkpoints,
resumes and runs on CPU or GPU; the result is written as a public scGPT folder (``args.json``,
``vocab.json``, ``best_model.pt``) that :func:`~pertflow.foundation.scgpt.load_pretrained` and
:class:`~pertflow.foundation.scgpt.FrozenScGPTExtractor` read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pertflow.configs import to_dict
from pertflow.data.dataset import PerturbationData
from pertflow.data.sampler import SeededStream
from pertflow.errors import InputError
from pertflow.io import write_json
from pertflow.data.view import ExpressionCache
from pertflow.foundation.scgpt.checkpoint import ARGS_FILE, TORCH_WEIGHTS_FILE, VOCAB_FILE, export_pretrained
from pertflow.foundation.scgpt.config import ScGPTConfig
from pertflow.foundation.scgpt.tokens import CLS, PAD, SPECIAL_TOKENS
from pertflow.foundation.scgpt.extractor import bin_expression
from pertflow.foundation.scgpt.losses import ScGPTLossWeights, random_mask_value
from pertflow.foundation.scgpt.transformer import TransformerModel
from pertflow.train import Trainer, TrainConfig

# What `pretrain` writes into its folder (the public scGPT files, its own record, the run's log and checkpoints).
PRETRAIN_FILES = (ARGS_FILE, VOCAB_FILE, TORCH_WEIGHTS_FILE, "pretrain.json", "checkpoints", "history.csv")


@dataclass(frozen=True)
class PretrainConfig(ScGPTConfig):
    """The ``model`` section of ``pertflow pretrain``: an :class:`ScGPTConfig` (scGPT's names; the
    defaults here are a small CPU size; the vocabulary fields, ``do_mvc``, ``do_dab`` and
    ``num_batch_labels`` are set from the data and the weights below) plus what pretraining needs.

    Attributes
    ----------
    n_bins
        Per-cell value bins (51 in the released models); None feeds log1p values.
    include_zero_genes
        Sample a cell's genes among all genes, not only its non-zero ones.
    mask_ratio
        Share of a cell's values to mask and predict.
    mvc, ecs, cce, dab
        Weights of the extra objectives (0 off). DAB needs a batch column in the data spec.
    val_fraction
        Share of cells held out for validation (seeded).
    """

    d_model: int = 64
    nhead: int = 4
    d_hid: int = 128
    nlayers: int = 2
    dropout: float = 0.1
    max_seq_len: int = 256
    n_bins: int | None = 51
    include_zero_genes: bool = False
    mask_ratio: float = 0.4
    mvc: float = 0.0
    ecs: float = 0.0
    cce: float = 0.0
    dab: float = 0.0
    val_fraction: float = 0.05


class MaskedCellBatches(SeededStream):
    """Seeded batches of masked cells for MLM; the state saved with checkpoints is the generator's."""

    def __init__(self, cache: ExpressionCache, rows: np.ndarray, gene_tokens: np.ndarray, config: PretrainConfig,
                 scgpt: ScGPTConfig, batch_size: int, seed: int, batch_labels: np.ndarray | None = None):
        self.cache, self.rows, self.gene_tokens = cache, rows, gene_tokens
        self.config, self.scgpt, self.batch_size = config, scgpt, batch_size
        self.batch_labels = batch_labels
        super().__init__(seed)

    def next_batch(self) -> dict[str, torch.Tensor]:
        cfg, sc = self.config, self.scgpt
        rows = self.rng.choice(self.rows, size=self.batch_size, replace=len(self.rows) < self.batch_size)
        expr = self.cache.get(rows)
        seed = int(self.rng.integers(2**31 - 1))
        generator = torch.Generator().manual_seed(seed)
        cell_values = torch.from_numpy(expr)
        if cfg.n_bins:
            cell_values = bin_expression(cell_values, cfg.n_bins, generator)
        chosen = []
        for i in range(len(rows)):
            genes = np.arange(expr.shape[1]) if cfg.include_zero_genes else np.flatnonzero(expr[i] > 0)
            if len(genes) > cfg.max_seq_len - 1:
                genes = np.sort(self.rng.choice(genes, size=cfg.max_seq_len - 1, replace=False))
            chosen.append(genes)
        # padded to the batch's longest cell, not to max_seq_len: padding is masked out, and with
        # many genes (max_seq_len 2001 for 2000) most of a full-length sequence would be padding
        length = 1 + max(len(g) for g in chosen)
        ids = np.full((len(rows), length), sc.pad_token_id, dtype=np.int64)
        values = np.full((len(rows), length), sc.pad_value, dtype=np.float32)
        ids[:, 0], values[:, 0] = sc.cls_token_id, sc.pad_value  # scGPT gives <cls> the pad value
        for i, genes in enumerate(chosen):
            ids[i, 1 : 1 + len(genes)] = self.gene_tokens[genes]
            values[i, 1 : 1 + len(genes)] = cell_values[i, genes].numpy()
        values_t = torch.from_numpy(values)
        masked = random_mask_value(values_t, cfg.mask_ratio, sc.mask_value, sc.pad_value, keep_first_n=1,
                                   generator=generator)
        batch = {
            "gene_ids": torch.from_numpy(ids),
            "values": values_t,
            "masked_values": masked.values,
            "src_key_padding_mask": torch.from_numpy(ids == sc.pad_token_id),
        }
        if self.batch_labels is not None:
            batch["batch_labels"] = torch.from_numpy(self.batch_labels[rows])
        return batch


def pretrain(data: PerturbationData, out: str | Path, config: PretrainConfig, train_config: TrainConfig,
             resume: bool = False, rows: np.ndarray | None = None) -> TransformerModel:
    """Pretrain a ``TransformerModel`` on the cells of ``data`` (``rows``; all when None); write a
    public scGPT folder to ``out``.

    Returns the model with the best validation weights.
    """
    out = Path(out)
    if (out / ARGS_FILE).is_file() and not resume:
        raise InputError(f"{out} already holds a pretrained model. Choose a new --out, or resume with --resume.")
    symbols = [str(s) for s in data.gene_symbols]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *symbols])}
    if len(vocab) != len(SPECIAL_TOKENS) + len(symbols):
        raise InputError(f"gene symbols collide with scGPT's special tokens {SPECIAL_TOKENS}; rename those genes.")
    batch_col = data.spec.batch_col
    if config.dab and batch_col is None:
        raise InputError("the DAB objective needs a batch column: set batch_col in the data spec (--batch-col) or "
                         "dab=0.")
    labels = None
    n_batches = None
    if config.dab:
        codes = np.unique(data.adata.obs[batch_col].astype(str).to_numpy(), return_inverse=True)[1]
        labels, n_batches = codes.astype(np.int64), int(codes.max()) + 1
    scgpt = config.architecture(
        ntoken=len(vocab), pad_token_id=vocab[PAD], cls_token_id=vocab[CLS], do_mvc=config.mvc > 0,
        do_dab=config.dab > 0, num_batch_labels=n_batches,
    )
    rng = np.random.default_rng(train_config.seed)
    all_rows = np.arange(data.n_cells) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    n_val = int(round(config.val_fraction * len(all_rows)))
    val_rows = np.sort(rng.choice(all_rows, size=n_val, replace=False)) if n_val else np.array([], dtype=np.int64)
    train_rows = np.setdiff1d(all_rows, val_rows)
    cache = ExpressionCache(data, all_rows, np.arange(data.adata.n_vars))
    gene_tokens = np.array([vocab[s] for s in symbols], dtype=np.int64)
    torch.manual_seed(train_config.seed)
    weights = ScGPTLossWeights(mlm=1.0, zero=1.0, cls=0.0, mvc=config.mvc, cce=config.cce, ecs=config.ecs,
                               dab=config.dab)
    model = TransformerModel(scgpt, loss_weights=weights)
    batches = MaskedCellBatches(cache, train_rows, gene_tokens, config, scgpt, train_config.batch_size,
                                train_config.seed, labels)
    val = None
    if len(val_rows):
        source = MaskedCellBatches(cache, val_rows, gene_tokens, config, scgpt, train_config.batch_size,
                                   train_config.seed + 1, labels)
        val = [source.next_batch() for _ in range(train_config.val_batches)]
    metadata = {"pretrain_config": to_dict(config), "scgpt_config": scgpt.to_dict(), "spec": data.spec.to_dict()}
    trainer = Trainer(model, train_config, out, batches, val, metadata=metadata)
    trainer.fit(resume=resume)
    model.load_state_dict(trainer.final_weights())
    model.to("cpu")
    export_pretrained(model, vocab, scgpt, out)
    write_json(out / "pretrain.json", {**metadata, "train_config": to_dict(train_config)})
    return model
