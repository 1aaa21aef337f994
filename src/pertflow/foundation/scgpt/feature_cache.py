"""An on-disk cache of frozen per-gene features, so training does not pay for the encoder at every
step: written atomically and only when complete, keyed by what the features depend on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pertflow.errors import InputError
from pertflow.io import atomic_path, read_json, write_json

GeneSpec = Sequence[str] | Tensor


@dataclass
class GeneFeatures:
    """Per-gene features of a batch of cells.

    Attributes
    ----------
    features
        ``(B, G, d)``; zero where ``mask`` is false.
    mask
        Bool, True where the features are real: ``(G,)`` from the extractor (every cell of one
        call is encoded over the same genes), ``(B, G)`` when read back from a :class:`FeatureCache`.
        False for genes outside the vocabulary and for genes left out by sampling.
    """

    features: Tensor
    mask: Tensor


def _gene_key(genes: GeneSpec) -> tuple[str, list[Any]]:
    listed = genes.tolist() if isinstance(genes, Tensor) else [str(g) for g in genes]
    digest = hashlib.sha1(json.dumps(listed).encode()).hexdigest()[:16]
    return digest, listed


class FeatureCache:
    """Raw per-cell ``(G, d)`` features on disk, read back by cell index.

    Layout, per gene set (key = hash of the gene list) inside ``folder``::

        <key>.npy        (n_cells, G, d) float16, memory-mapped on read
        <key>.mask.npy   (n_cells, G) bool, which features are real
        <key>.json       index: format_version, n_cells, genes, d_model, dtype, file names, metadata

    Files are written through temporary files and renamed into place only when every cell has been
    written; the index JSON comes last, so a cache that exists is complete. Store raw features
    (``extract(..., normalize=False)``) and normalise on read with
    :meth:`FrozenScGPTExtractor.normalize`, so that the warm-up statistics stay a training-time
    choice.

    Size is ``n_cells * G * d * 2`` bytes (e.g. 10k cells x 1000 genes x 512 = 10 GB); creation
    fails early if the disk has less free space.
    """

    FORMAT_VERSION = 1

    def __init__(self, folder: str | Path, genes: GeneSpec) -> None:
        self.folder = Path(folder)
        self.key, self.genes = _gene_key(genes)
        index_path = self.folder / f"{self.key}.json"
        if not index_path.is_file():
            raise InputError(
                f"No feature cache for this gene set in {self.folder} (expected {index_path.name}). "
                "Build it with FeatureCache.create(...)."
            )
        self.index = read_json(index_path)
        if self.index.get("format_version") != self.FORMAT_VERSION:
            raise InputError(f"{index_path} has an unknown format version; rebuild the cache.")
        self.n_cells = int(self.index["n_cells"])
        self.d_model = int(self.index["d_model"])
        self._features: np.ndarray | None = None
        self._mask: np.ndarray | None = None

    @classmethod
    def create(cls, folder: str | Path, genes: GeneSpec, n_cells: int, d_model: int,
               metadata: Mapping[str, Any] | None = None) -> FeatureCacheWriter:
        """Start writing a cache; use as a context manager.

        Parameters
        ----------
        folder
            Cache folder (created).
        genes
            The ``G`` genes (symbols or ids) the features are indexed by.
        n_cells
            Number of cells (rows), addressed ``0 .. n_cells - 1``.
        d_model
            Feature width.
        metadata
            JSON-serialisable notes stored in the index (e.g. model folder, n_bins).

        Returns
        -------
        FeatureCacheWriter
        """
        return FeatureCacheWriter(Path(folder), genes, n_cells, d_model, dict(metadata or {}))

    def _open(self) -> None:
        if self._features is None:
            self._features = np.load(self.folder / self.index["features_file"], mmap_mode="r")
            self._mask = np.load(self.folder / self.index["mask_file"], mmap_mode="r")

    def read(self, cell_indices: Sequence[int] | Tensor | np.ndarray) -> GeneFeatures:
        """Features of some cells.

        Parameters
        ----------
        cell_indices
            ``(b,)`` row indices.

        Returns
        -------
        GeneFeatures
            ``features`` ``(b, G, d)`` float32 and ``mask`` ``(b, G)`` bool, on CPU.
        """
        self._open()
        idx = np.asarray(cell_indices.cpu() if isinstance(cell_indices, Tensor) else cell_indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_cells):
            raise InputError(f"cell index out of range [0, {self.n_cells}).")
        feats = torch.from_numpy(np.asarray(self._features[idx], dtype=np.float32))
        mask = torch.from_numpy(np.asarray(self._mask[idx], dtype=bool))
        return GeneFeatures(feats, mask)


class FeatureCacheWriter:
    """Writes a :class:`FeatureCache`; created by :meth:`FeatureCache.create`."""

    def __init__(self, folder: Path, genes: GeneSpec, n_cells: int, d_model: int, metadata: dict[str, Any]) -> None:
        self.folder = folder
        self.key, self.genes = _gene_key(genes)
        self.n_cells, self.n_genes, self.d_model = int(n_cells), len(self.genes), int(d_model)
        self.metadata = metadata
        self._written = np.zeros(self.n_cells, dtype=bool)

    def __enter__(self) -> FeatureCacheWriter:
        self.folder.mkdir(parents=True, exist_ok=True)
        # Remove a previous index first: readers then see "no cache" rather than a stale index
        # pointing at files that are about to be replaced.
        (self.folder / f"{self.key}.json").unlink(missing_ok=True)
        nbytes = self.n_cells * self.n_genes * (self.d_model * 2 + 1)
        free = shutil.disk_usage(self.folder).free
        if nbytes > free:
            raise InputError(
                f"The feature cache needs {nbytes / 1e9:.1f} GB but {self.folder} has {free / 1e9:.1f} GB free. "
                "Cache fewer genes or cells, or choose another folder."
            )
        self._feat_ctx = atomic_path(self.folder / f"{self.key}.npy")
        self._mask_ctx = atomic_path(self.folder / f"{self.key}.mask.npy")
        feat_tmp = self._feat_ctx.__enter__()
        mask_tmp = self._mask_ctx.__enter__()
        shape = (self.n_cells, self.n_genes, self.d_model)
        self._features = np.lib.format.open_memmap(feat_tmp, mode="w+", dtype=np.float16, shape=shape)
        self._mask = np.lib.format.open_memmap(mask_tmp, mode="w+", dtype=bool, shape=shape[:2])
        return self

    def write(self, cell_indices: Sequence[int] | Tensor | np.ndarray, features: GeneFeatures) -> None:
        """Store the raw features of some cells.

        Parameters
        ----------
        cell_indices
            ``(b,)`` rows.
        features
            ``features`` ``(b, G, d)`` and ``mask`` ``(G,)`` or ``(b, G)``.
        """
        idx = np.asarray(cell_indices.cpu() if isinstance(cell_indices, Tensor) else cell_indices, dtype=np.int64)
        feats = features.features.detach().float().cpu()
        if feats.shape != (idx.size, self.n_genes, self.d_model):
            raise InputError(f"features have shape {tuple(feats.shape)}, expected "
                             f"({idx.size}, {self.n_genes}, {self.d_model}).")
        mask = features.mask.detach().cpu().bool().expand(feats.shape[:2])
        # float16 saturates at 65504; clamp rather than store inf.
        self._features[idx] = feats.clamp(-65504.0, 65504.0).numpy().astype(np.float16)
        self._mask[idx] = mask.numpy()
        self._written[idx] = True

    def __exit__(self, exc_type, exc, tb) -> None:
        for arr in (self._features, self._mask):
            arr.flush()
        del self._features, self._mask  # release the memory maps before the files are renamed
        missing = int((~self._written).sum())
        if exc_type is None and missing:
            exc = InputError(f"{missing} of {self.n_cells} cells were never written; the cache was not saved.")
            exc_type = InputError
        # Handing an exception to atomic_path deletes the temporary file instead of renaming it.
        self._mask_ctx.__exit__(exc_type, exc, tb)
        self._feat_ctx.__exit__(exc_type, exc, tb)
        if exc_type is InputError and missing and tb is None:
            raise exc
        if exc_type is not None:
            return
        write_json(self.folder / f"{self.key}.json", {
            "format_version": FeatureCache.FORMAT_VERSION,
            "n_cells": self.n_cells,
            "n_genes": self.n_genes,
            "d_model": self.d_model,
            "dtype": "float16",
            "features_file": f"{self.key}.npy",
            "mask_file": f"{self.key}.mask.npy",
            "genes": self.genes,
            "metadata": self.metadata,
        })
