"""One token vocabulary for genes and perturbations.

Genetic perturbations are gene tokens, the same tokens that embed the expression genes, so a
model that learned a gene from expression already knows something about knocking it down. A
gene that is perturbed but not measured gets a gene token of its own after the measured genes.
Non-gene perturbations (drugs, cytokines) get their own tokens. Combinations are lists of
tokens. Optional descriptor vectors (from ``adata.uns`` or a file) describe perturbation
components, including ones never seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from pertflow.errors import InputError

PAD = "<pad>"
CLS = "<cls>"
UNK = "<unk>"  # a perturbation the model has not learnt; trained as "some perturbation"
SPECIAL_TOKENS = (PAD, CLS, UNK)


@dataclass
class Vocabulary:
    """Token ids: special tokens, then gene tokens, then non-gene perturbation tokens.

    Attributes
    ----------
    expression_genes
        The genes whose expression a model reads and writes, in column order.
    perturbed_genes
        Genes that are perturbation targets but not among ``expression_genes``.
    other_tokens
        Non-gene perturbation components (drugs, cytokines, stimulations).
    descriptors
        Optional descriptor vectors, one row per perturbation component.
    """

    expression_genes: list[str]
    perturbed_genes: list[str] = field(default_factory=list)
    other_tokens: list[str] = field(default_factory=list)
    descriptors: pd.DataFrame | None = None

    def __post_init__(self) -> None:
        self.tokens = [*SPECIAL_TOKENS, *self.expression_genes, *self.perturbed_genes, *self.other_tokens]
        self._id = {t: i for i, t in enumerate(self.tokens)}
        if len(self._id) != len(self.tokens):
            dup = pd.Index(self.tokens)[pd.Index(self.tokens).duplicated()].tolist()
            raise InputError(f"token names must be unique; repeated: {dup[:5]}. Rename the genes or perturbations.")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return self._id[PAD]

    @property
    def cls_id(self) -> int:
        return self._id[CLS]

    @property
    def unk_id(self) -> int:
        return self._id[UNK]

    @property
    def first_other_id(self) -> int:
        """Id of the first non-gene perturbation token (all ids below are special or gene tokens)."""
        return len(SPECIAL_TOKENS) + len(self.expression_genes) + len(self.perturbed_genes)

    def __contains__(self, token: str) -> bool:
        return token in self._id

    def id_of(self, token: str) -> int:
        try:
            return self._id[token]
        except KeyError:
            raise InputError(
                f"'{token}' is not in the model's vocabulary. A perturbation of an unmeasured gene or a new "
                "drug needs descriptor vectors (descriptors_key / --descriptors) or retraining with it."
            ) from None

    def gene_ids(self, genes: Sequence[str] | None = None) -> np.ndarray:
        """Token ids of genes (default: the expression genes), shape (G,)."""
        genes = self.expression_genes if genes is None else genes
        return np.array([self.id_of(g) for g in genes], dtype=np.int64)

    def is_gene_token(self, token: str) -> bool:
        return len(SPECIAL_TOKENS) <= self.id_of(token) < self.first_other_id

    def encode(self, components: Iterable[Sequence[str]], width: int = 2) -> np.ndarray:
        """Token ids of perturbations given as component lists, padded to ``width``.

        Parameters
        ----------
        components
            One sequence of component names per perturbation (``()`` for control).
        width
            Number of columns; combinations of more components raise an error.

        Returns
        -------
        np.ndarray
            (N, width) int64, padded with :attr:`pad_id` (a control row is all padding).
        """
        rows = []
        for comps in components:
            if len(comps) > width:
                raise InputError(
                    f"perturbation {'+'.join(comps)} has {len(comps)} components; this model takes at most {width}. "
                    "Raise max_components in the model config."
                )
            ids = [self.id_of(c) for c in comps]
            rows.append(ids + [self.pad_id] * (width - len(ids)))
        return np.array(rows, dtype=np.int64).reshape(-1, width)

    def descriptor_matrix(self) -> np.ndarray | None:
        """Descriptor vector of every token (zeros where none is known), shape (V, D)."""
        if self.descriptors is None:
            return None
        table = self.descriptors.reindex(self.tokens).fillna(0.0)
        return table.to_numpy(dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "expression_genes": list(self.expression_genes),
            "perturbed_genes": list(self.perturbed_genes),
            "other_tokens": list(self.other_tokens),
        }
        if self.descriptors is not None:
            out["descriptors"] = {
                "index": list(map(str, self.descriptors.index)),
                "columns": list(map(str, self.descriptors.columns)),
                "values": self.descriptors.to_numpy(dtype=float).tolist(),
            }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        desc = data.get("descriptors")
        table = None
        if desc is not None:
            table = pd.DataFrame(desc["values"], index=desc["index"], columns=desc["columns"])
        return cls(
            expression_genes=list(data["expression_genes"]),
            perturbed_genes=list(data.get("perturbed_genes", [])),
            other_tokens=list(data.get("other_tokens", [])),
            descriptors=table,
        )


def build_vocabulary(
    expression_genes: Sequence[str],
    perturbation_components: Iterable[Sequence[str]],
    genetic: bool,
    descriptors: pd.DataFrame | None = None,
) -> Vocabulary:
    """Vocabulary for a gene set and the perturbations of a dataset.

    A component that is an expression gene is that gene's token. Otherwise it becomes a gene
    token of its own when the perturbations are genetic, and a non-gene token when they are not.
    """
    expressed = set(expression_genes)
    extra_genes: list[str] = []
    others: list[str] = []
    seen: set[str] = set()
    for comps in perturbation_components:
        for c in comps:
            if c in expressed or c in seen:
                continue
            seen.add(c)
            (extra_genes if genetic else others).append(c)
    return Vocabulary(list(expression_genes), extra_genes, others, descriptors)


def load_descriptors(source: str | Path, uns: dict[str, Any] | None = None) -> pd.DataFrame:
    """Perturbation descriptor vectors, one row per component name.

    Parameters
    ----------
    source
        A key of ``uns`` (a DataFrame, or a dict name -> vector), or a file: ``.csv`` / ``.tsv``
        (first column = name), ``.parquet`` (the index holds the names, or the first column when
        the index is a plain row number) or ``.npz`` with arrays ``names`` (N,) and ``values`` (N, D).
    uns
        ``adata.uns``, searched first.
    """
    if uns is not None and str(source) in uns:
        value = uns[str(source)]
        if isinstance(value, pd.DataFrame):
            table = value
        elif isinstance(value, dict):
            table = pd.DataFrame({k: np.asarray(v, dtype=float).ravel() for k, v in value.items()}).T
        else:
            raise InputError(
                f"uns['{source}'] is a {type(value).__name__}; descriptors must be a DataFrame indexed by "
                "perturbation or a dict name -> vector."
            )
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"descriptors '{source}' are neither a key of uns nor a file. Check the name or path.")
        if path.suffix in (".csv", ".tsv"):
            table = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", index_col=0)
        elif path.suffix == ".parquet":
            table = pd.read_parquet(path)
            if isinstance(table.index, pd.RangeIndex):
                table = table.set_index(table.columns[0])
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                if "names" not in npz or "values" not in npz:
                    raise InputError(f"{path} must hold arrays 'names' (N,) and 'values' (N, D).")
                table = pd.DataFrame(npz["values"], index=npz["names"].astype(str))
        else:
            raise InputError(f"{path}: descriptors must be .csv, .tsv, .parquet or .npz.")
    table.index = table.index.astype(str)
    values = table.to_numpy(dtype=float)
    if not np.isfinite(values).all():
        raise InputError(f"descriptors '{source}' hold NaN or Inf values. Fill or drop those rows.")
    return table.astype(float)
