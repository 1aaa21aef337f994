"""``CCFM``: the cascaded conditioned flow as a pertflow model (AnnData-facing).

Fitting a CCFM is three steps, each cached in the run folder so that a resumed or repeated run
redoes none of them:

1. the foundation: the scGPT folder of ``model.foundation``, or a small scGPT pretrained on the
   split's training cells (``<run>/foundation/``, the ``pertflow pretrain`` code);
2. the latent targets: the frozen foundation's per-gene features of every cell a model may see
   (training and validation cells), computed once into an on-disk float16 cache
   (``<run>/features/<fingerprint>/``, memory-mapped; the fingerprint changes with the foundation's
   weights, its input binning and the genes, so another foundation never reads stale features),
   normalised per dimension by running statistics frozen after ``warmup_batches`` batches;
3. the flow (:class:`~pertflow.models.flow_model.GeneFlowModel`: its prior, validation and
   prediction mode), with each training batch carrying its target cells' latents.

At inference the network generates the latent itself: the foundation is not loaded, not called.

``latent_stream: cell`` in the config selects the cascade on a compact cell-level latent instead
(:mod:`pertflow.models.ccfm.cell_cascade`), under the same model name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pertflow.data.view import SplitView
from pertflow.errors import InputError
from pertflow.models.ccfm.config import CCFMConfig
from pertflow.models.ccfm.module import TARGET_LATENT, CCFMModule
from pertflow.models.flow_model import GeneFlowModel
from pertflow.train.config import TrainConfig, stage_config

FEATURE_CHUNK = 128  # cells per pass of the frozen encoder


def cache_bytes(cache: Any) -> int:
    """Bytes on disk of a feature cache's features and mask."""
    return sum((cache.folder / cache.index[key]).stat().st_size for key in ("features_file", "mask_file"))


class LatentRows:
    """The normalised latent of dataset rows: ``get(rows) -> (n, G, D)`` float32 (a batch's
    ``target_latent``), read from the feature cache."""

    def __init__(self, cache: Any, rows: np.ndarray, normalizer: Any):
        self.cache = cache
        self.position = {int(r): i for i, r in enumerate(rows)}
        self.normalizer = normalizer

    def get(self, rows: np.ndarray) -> np.ndarray:
        raw = self.cache.read([self.position[int(r)] for r in rows])
        with torch.no_grad():
            return self.normalizer(raw.features, raw.mask, update=False).numpy()


class CCFM(GeneFlowModel):
    """Cascaded conditioned flow matching (SPEC 2.2); see :mod:`pertflow.models.ccfm.module`."""

    name = "ccfm"
    config_class = CCFMConfig

    @classmethod
    def variant_for(cls, config: Mapping[str, Any]) -> type:
        """``latent_stream: cell`` selects the cascade on a cell-level latent
        (:class:`~pertflow.models.ccfm.cell_cascade.CellCascade`)."""
        if config.get("latent_stream") == "cell":
            from pertflow.models.ccfm.cell_cascade import CellCascade

            return CellCascade
        return cls

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim or self.config.foundation_d_model

    def build_module(self) -> CCFMModule:
        return CCFMModule(self.config, latent_dim=self.latent_dim, **self.network_inputs())

    # ------------------------------------------------------------------ fitting
    def fit(self, view: SplitView, train_config: TrainConfig, run_dir: Path, resume: bool = False) -> None:
        run_dir = Path(run_dir)
        start = time.perf_counter()
        extractor = self.frozen_extractor(view, train_config, run_dir)
        foundation_s = time.perf_counter() - start
        width = int(extractor.config.d_model)
        if self.config.latent_dim not in (None, width):
            raise InputError(f"model.latent_dim is {self.config.latent_dim} but the foundation's features are {width} "
                             "wide; leave latent_dim unset (it is read off the foundation).")
        self.config = dataclasses.replace(self.config, latent_dim=width)
        start = time.perf_counter()
        self._latent_rows = self.latent_targets(view, extractor, run_dir)
        features_s = time.perf_counter() - start
        cache = self._latent_rows.cache
        super().fit(view, train_config, run_dir, resume)
        self._latent_rows = None  # the foundation and its features are not part of the trained model
        # what the two steps before the flow cost in this call (near 0 when a resumed run found them)
        self.fit_report["foundation_seconds"] = round(foundation_s, 2)
        self.fit_report["features_seconds"] = round(features_s, 2)
        self.fit_report["feature_cache"] = {"cells": cache.n_cells, "genes": len(cache.genes), "width": cache.d_model,
                                            "dtype": "float16", "bytes": cache_bytes(cache)}

    def batch_arrays(self, view: SplitView) -> dict[str, Any]:
        return {**super().batch_arrays(view), "target_arrays": {TARGET_LATENT: self._latent_rows}}

    def frozen_extractor(self, view: SplitView, train_config: TrainConfig, run_dir: Path):
        """The frozen foundation as a feature extractor: the given folder, else a small scGPT
        pretrained on the training cells into ``<run>/foundation`` (reused when already there)."""
        from pertflow.foundation.scgpt import FrozenScGPTExtractor, load_pretrained

        folder = Path(self.config.foundation) if self.config.foundation else run_dir / "foundation"
        if self.config.foundation is None and not (folder / "args.json").is_file():
            self.pretrain_foundation(view, train_config, folder)
        elif not (folder / "args.json").is_file():
            raise InputError(f"model.foundation: {folder} is not a scGPT model folder (no args.json). Give a folder "
                             "with args.json, vocab.json and best_model.pt, or leave foundation unset to pretrain one.")
        loaded = load_pretrained(folder)
        symbols = view.vocab.expression_genes
        # every gene's features: the run's own foundation was pretrained on sampled sequences but
        # has no positional limit; a given folder keeps the length it was trained for
        max_len = (len(symbols) + 1 if self.config.foundation is None
                   else min(len(symbols) + 1, int(loaded.config.max_seq_len)))
        extractor = FrozenScGPTExtractor(loaded.model, loaded.vocab, max_seq_len=max_len, n_bins=self.config.n_bins,
                                         warmup_batches=self.config.warmup_batches, target_std=self.config.target_std,
                                         seed=train_config.seed, chunk_size=32)
        extractor.folder = folder
        return extractor

    def pretrain_foundation(self, view: SplitView, train_config: TrainConfig, folder: Path) -> None:
        from pertflow.foundation.scgpt.pretrain import PretrainConfig, pretrain

        cfg = self.config
        config = PretrainConfig(d_model=cfg.foundation_d_model, nhead=4 if cfg.foundation_d_model % 4 == 0 else 1,
                                d_hid=2 * cfg.foundation_d_model, nlayers=cfg.foundation_layers,
                                max_seq_len=min(len(view.genes) + 1, cfg.foundation_max_seq_len), n_bins=cfg.n_bins)
        steps = cfg.foundation_steps
        schedule = stage_config(train_config, max_steps=steps, batch_size=cfg.foundation_batch_size,
                                lr=cfg.foundation_lr, warmup_steps=min(50, steps // 5), val_every=max(1, steps // 2),
                                checkpoint_every=max(1, steps // 2))
        resume = (folder / "checkpoints" / "latest.json").is_file()
        pretrain(view.data, folder, config, schedule, resume=resume, rows=view.rows.train)

    def latent_targets(self, view: SplitView, extractor: Any, run_dir: Path) -> LatentRows:
        """The normalised latents of the visible cells, from the feature cache (built when missing)."""
        from pertflow.foundation.scgpt import FeatureCache

        symbols = view.vocab.expression_genes
        rows = np.sort(view.visible)
        folder = run_dir / "features" / self.fingerprint(extractor, symbols)
        try:
            cache = FeatureCache(folder, symbols)
            if cache.n_cells != len(rows):
                raise InputError("stale cache")
        except InputError:
            with FeatureCache.create(folder, symbols, len(rows), extractor.config.d_model,
                                     {"foundation": str(extractor.folder), "n_bins": self.config.n_bins}) as writer:
                for start in range(0, len(rows), FEATURE_CHUNK):
                    chunk = rows[start : start + FEATURE_CHUNK]
                    expr = torch.from_numpy(view.expression.get(chunk))
                    writer.write(np.arange(start, start + len(chunk)), self.raw_features(extractor, expr, symbols))
            cache = FeatureCache(folder, symbols)
        train = np.isin(rows, view.rows.train)
        order = np.flatnonzero(train)  # the normalisation's statistics come from training cells, in a fixed order
        for start in range(0, len(order), 64):
            if extractor.normalizer.frozen:
                break
            raw = cache.read(order[start : start + 64])
            extractor.normalize(raw, update_stats=True)
        return LatentRows(cache, rows, extractor.normalizer)

    def raw_features(self, extractor: Any, expr: torch.Tensor, symbols: list[str]) -> Any:
        """The unnormalised features of some cells, over all genes or in ``feature_block`` blocks."""
        if self.config.feature_block is None:
            return extractor.extract(expr, symbols, normalize=False)
        return extractor.extract_in_blocks(expr, symbols, self.config.feature_block)

    def fingerprint(self, extractor: Any, genes: list[str]) -> str:
        """What the cached features depend on: the foundation's weights, its input binning, the genes."""
        digest = hashlib.sha256()
        for name, tensor in sorted(extractor.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        block = self.config.feature_block
        block = f";feature_block={block}" if block is not None and block < len(genes) else ""  # one block: all genes
        settings = f"n_bins={self.config.n_bins};max_seq_len={extractor.max_seq_len};seed={extractor.seed}{block}"
        digest.update(settings.encode())
        digest.update("\x1f".join(genes).encode())
        return digest.hexdigest()[:16]
