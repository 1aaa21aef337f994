"""Perturbation descriptors of the latent-shift model: one vector per perturbation component.

A perturbation's descriptor is the sum of its components' vectors (a combination adds up); a
component without a vector counts as zeros (the model trains a zero descriptor as "some
perturbation", see ``train_unknown``). Three sources:

* ``onehot``: one coordinate per component of the training perturbations;
* ``gene``: the target gene's vector in the embedding (its PCA loadings, or scGPT's gene
  embedding), for the genes the embedding knows;
* ``file``: vectors read from a file keyed by component name (ESM2 embeddings, drug
  fingerprints...) through :func:`pertflow.data.vocab.load_descriptors`, or the data spec's own
  descriptors.

Vectors are scaled by one number so that a typical descriptor has norm 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from pertflow.data.view import SplitView
from pertflow.data.vocab import load_descriptors
from pertflow.errors import InputError


@dataclass
class DescriptorTable:
    """Vectors of named components: ``names`` (n,) and ``matrix`` (n, d)."""

    names: list[str]
    matrix: np.ndarray

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=np.float32).reshape(len(self.names), -1)
        self._row = {n: i for i, n in enumerate(self.names)}

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def vector(self, components: Iterable[str]) -> np.ndarray:
        """(d,) the sum of the components' vectors (zeros for an unknown component)."""
        out = np.zeros(self.dim, dtype=np.float32)
        for c in components:
            if c in self._row:
                out += self.matrix[self._row[c]]
        return out

    def knows(self, component: str) -> bool:
        return component in self._row

    def scaled(self) -> DescriptorTable:
        """The same vectors divided by their root mean square norm (rows of zeros left out)."""
        norms = np.linalg.norm(self.matrix, axis=1)
        norms = norms[norms > 0]
        scale = float(np.sqrt(np.mean(norms**2))) if len(norms) else 1.0
        return DescriptorTable(self.names, self.matrix / scale)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"descriptors": torch.from_numpy(np.ascontiguousarray(self.matrix))}

    def extra_state(self) -> dict[str, Any]:
        return {"names": self.names, "dim": self.dim}

    @classmethod
    def from_state(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> DescriptorTable:
        return cls(list(state["names"]), tensors["descriptors"].numpy().reshape(len(state["names"]), state["dim"]))


def onehot_descriptors(components: list[str]) -> DescriptorTable:
    names = sorted(set(components))
    return DescriptorTable(names, np.eye(len(names), dtype=np.float32))


def build_descriptors(kind: str, view: SplitView, training_components: list[str], embedding: Any,
                      descriptor_file: str | None = None) -> DescriptorTable:
    """The descriptor table of a run (``kind``: ``onehot``, ``gene`` or ``file``)."""
    if kind == "onehot":
        if not training_components:
            raise InputError("the training cells hold no perturbation, so a one-hot descriptor has no coordinate.")
        return onehot_descriptors(training_components)
    if kind == "gene":
        wanted = [*view.vocab.expression_genes,
                  *(c for p in view.data.perturbation_names for c in view.data.components(p))]
        names, matrix = embedding.gene_vectors(wanted)
        if not names:
            raise InputError(f"the {embedding.kind} embedding knows none of the data's genes, so the 'gene' descriptor "
                             "is empty. Use descriptor=onehot or a descriptor file.")
        return DescriptorTable(names, matrix).scaled()
    if descriptor_file is not None:
        table = load_descriptors(descriptor_file)
    elif view.vocab.descriptors is not None:
        table = view.vocab.descriptors
    else:
        raise InputError("descriptor 'file' needs vectors: set model.descriptor_file to a CSV / parquet file keyed by "
                         "perturbation (component) name, or give the data spec descriptors (descriptors_key).")
    if not any(c in set(table.index) for c in training_components):
        raise InputError("the descriptor file names none of the training perturbations (e.g. "
                         f"{training_components[:3]}); its first column (or index) must hold the perturbation names.")
    return DescriptorTable(list(map(str, table.index)), table.to_numpy(dtype=np.float32)).scaled()
