"""A dataset seen through a split: what a model may use to fit, to predict and to be scored.

A :class:`SplitView` is built once from a :class:`~pertflow.data.dataset.PerturbationData` and
a :class:`~pertflow.data.split_file.Split` and handed to ``fit``, ``predict`` and ``evaluate``: the
split is checked against the data once, the gene list is worked out once, and the expression
of the cells a model may see (training and validation cells, never test cells) is read once.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertflow.data.dataset import GENE_PANEL_FIX, PerturbationData, missing_genes_error
from pertflow.data.split_file import Split, SplitRows
from pertflow.data.vocab import build_vocabulary, load_descriptors
from pertflow.errors import InputError

DEFAULT_CACHE_BYTES = 4 * 2**30


def restrict_genes(genes: Sequence[str], keep: Sequence[str], where: str) -> list[str]:
    """The names of ``genes`` that ``keep`` names, in the order of ``genes``.

    A name of ``keep`` missing from ``genes`` raises :func:`missing_genes_error` ("... are not
    ``where``"), with the fix of training on a shared gene panel.
    """
    keep = [str(g) for g in keep]
    present = set(map(str, genes))
    missing = [g for g in keep if g not in present]
    if missing:
        raise missing_genes_error(missing, where, GENE_PANEL_FIX)
    wanted = set(keep)
    return [str(g) for g in genes if str(g) in wanted]


def read_gene_list(path: str | Path) -> list[str]:
    """Gene names from a text file, one per line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such gene file. Give a text file with one gene name per line.")
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise InputError(f"{path} names no genes. Write one gene name per line.")
    duplicated = sorted(n for n, count in Counter(names).items() if count > 1)
    if duplicated:
        raise InputError(f"{path} names {len(duplicated)} genes twice, e.g. {duplicated[:5]}. List each gene once.")
    return names


class ExpressionCache:
    """Dense log1p expression of some rows of a dataset, on some genes.

    Rows are materialised once when they fit in ``max_bytes``; otherwise each request reads its
    rows from the file (backed data stays on disk: out-of-core training). Asking for a row
    outside the cached set is an error: that is how test cells stay out of a model's reach.
    """

    def __init__(self, data: PerturbationData, rows: np.ndarray, gene_idx: np.ndarray,
                 max_bytes: int = DEFAULT_CACHE_BYTES):
        self.data = data
        self.gene_idx = gene_idx
        self.rows = np.unique(rows)  # sorted: a row's position is found by bisection
        self.allowed = np.zeros(data.n_cells, dtype=bool)
        self.allowed[self.rows] = True
        self.matrix: np.ndarray | None = None
        if len(self.rows) * len(gene_idx) * 4 <= max_bytes:
            self.matrix = data.log_expression(self.rows, gene_idx)

    @property
    def in_memory(self) -> bool:
        return self.matrix is not None

    def _check(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        missing = ~self.allowed[rows]
        if missing.any():
            raise RuntimeError(f"rows {rows[missing][:5]} are not visible to the model (test cells are never cached)")
        return rows

    def get(self, rows: np.ndarray) -> np.ndarray:
        """(n, G) float32 expression of ``rows`` (rows of the dataset)."""
        rows = self._check(rows)
        if self.matrix is None:
            return self.data.log_expression(rows, self.gene_idx)
        return self.matrix[np.searchsorted(self.rows, rows)]

    def group_means(self, groups: dict[Any, np.ndarray], chunk: int = 4096) -> dict[Any, np.ndarray]:
        """(G,) float32 mean expression of each group of rows.

        In memory, each group's rows are averaged; on disk, the groups' rows are read once in
        file order, ``chunk`` rows at a time, and summed per group (memory bounded by the chunk,
        not by the groups' sizes).
        """
        if self.matrix is not None:
            return {key: self.get(rows).mean(0) for key, rows in groups.items()}
        keys = list(groups)
        rows = np.concatenate([self._check(groups[k]) for k in keys]) if keys else np.zeros(0, dtype=np.int64)
        group_of = np.repeat(np.arange(len(keys)), [len(groups[k]) for k in keys])
        order = np.argsort(rows, kind="stable")
        rows, group_of = rows[order], group_of[order]
        sums = np.zeros((len(keys), len(self.gene_idx)), dtype=np.float64)
        for start in range(0, len(rows), chunk):
            part = slice(start, start + chunk)
            block = self.data.log_expression_csr(rows[part], self.gene_idx)
            members = sp.csr_matrix((np.ones(block.shape[0]), (group_of[part], np.arange(block.shape[0]))),
                                    shape=(len(keys), block.shape[0]))
            sums += np.asarray((members @ block).todense())
        sizes = np.array([max(1, len(groups[k])) for k in keys], dtype=np.float64)[:, None]
        return {k: (sums[i] / sizes[i]).astype(np.float32) for i, k in enumerate(keys)}


class CountsCache:
    """Raw counts of some rows on some genes, with each cell's library size (for models of counts).

    ``get(rows)`` gives (n, G + 1) float32: the counts of the G genes, then the rest of the cell's
    library, ``L - sum_g c_g``. ``L`` is the library size the data's log1p expression was
    normalised with, ``x = log1p(c * target_sum / L)``, read off the two:
    ``L = target_sum * sum_g c_g / sum_g expm1(x_g)`` over the G genes. It is exact when the
    expression is the counts normalised (over all the file's genes, as pertflow reads counts) and
    the best fit for reconstructed counts (whose ``X`` was normalised with the library of the whole
    transcriptome). A model that predicts each cell's fractions of ``L`` (genes and rest) can then
    write its cells exactly as the data's expression is written: ``log1p(c / L * target_sum)``.
    Rows are materialised once when they fit in ``max_bytes``; otherwise read on request.
    """

    def __init__(self, data: PerturbationData, rows: np.ndarray, gene_idx: np.ndarray, expression: ExpressionCache,
                 layer: str | None = None, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.source = data.counts_source(layer)
        self.gene_idx = gene_idx
        self.expression = expression
        self.target_sum = float(data.spec.target_sum)
        rows = np.unique(rows)
        self.position = pd.Series(np.arange(len(rows)), index=rows)
        self.matrix = self._read(rows) if len(rows) * (len(gene_idx) + 1) * 4 <= max_bytes else None

    def _read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), len(self.gene_idx) + 1), dtype=np.float32)
        for start in range(0, len(rows), 4096):
            chunk = rows[start : start + 4096]
            block = self.source.read_rows(chunk)
            block = block[:, self.gene_idx]
            counts = np.asarray(block.toarray() if hasattr(block, "toarray") else block, dtype=np.float64)
            normalised = np.expm1(self.expression.get(chunk).astype(np.float64)).sum(1)
            in_genes = counts.sum(1)
            with np.errstate(divide="ignore", invalid="ignore"):
                library = np.where(normalised > 0, self.target_sum * in_genes / normalised, in_genes)
            library = np.maximum(np.maximum(library, in_genes), 1.0)
            out[start : start + len(chunk), :-1] = counts
            out[start : start + len(chunk), -1] = library - in_genes
        return out

    def get(self, rows: np.ndarray) -> np.ndarray:
        """(n, G + 1) float32: counts of ``rows`` (rows of the dataset) on the genes, then the rest of the library."""
        rows = np.asarray(rows)
        missing = ~np.isin(rows, self.position.index)
        if missing.any():
            raise RuntimeError(f"rows {rows[missing][:5]} are not visible to the model (test cells are never cached)")
        if self.matrix is None:
            return self._read(rows)
        return self.matrix[self.position.loc[rows].to_numpy()]


class SplitView:
    """A dataset seen through a split (see the module docstring).

    Attributes
    ----------
    data
        The dataset.
    split
        The split.
    rows
        Row indices of the training, validation and test cells (checked against the data).
    genes
        The split's genes, in order (all genes of the data when the split names none).
    gene_idx
        Their column indices in the data.
    vocab
        The token vocabulary of the genes and the data's perturbations.
    expression
        Cached expression of the visible (training and validation) cells on :attr:`genes`.

    Parameters
    ----------
    max_cache_bytes
        The most bytes of visible expression held in memory. None: 4 GiB for data in memory,
        0 for backed data (read with ``backed=True``), which then streams from disk: every
        batch reads its rows from the file (out-of-core training).
    genes
        Use only these genes of the split (a gene panel, or a model's genes when it predicts
        other data): the split's genes that are named, in the split's order. A name the split
        (or, without a gene list, the data) lacks raises an error naming it.
    """

    def __init__(self, data: PerturbationData, split: Split, max_cache_bytes: int | None = None,
                 genes: Sequence[str] | None = None):
        self.data = data
        self.split = split
        self.rows: SplitRows = split.rows(data)
        self.genes: list[str] = list(split.genes) if split.genes is not None else list(map(str, data.gene_names))
        if genes is not None:
            where = "among the split's genes" if split.genes is not None else f"in {data.path or 'the data'}"
            self.genes = restrict_genes(self.genes, genes, where)
        self.gene_idx = data.gene_indices(self.genes)
        if len(self.genes) == 0:
            raise InputError("the split selects no genes, so there is nothing to model. Rebuild the split with genes.")
        symbols = [str(s) for s in data.gene_symbols[self.gene_idx]]
        descriptors = load_descriptors(data.spec.descriptors_key, data.adata.uns) if data.spec.descriptors_key else None
        self.vocab = build_vocabulary(symbols, (data.components(p) for p in data.perturbation_names), data.spec.genetic,
                                      descriptors)
        self.visible = np.concatenate([self.rows.train, self.rows.val])
        if max_cache_bytes is None:
            max_cache_bytes = 0 if data.source.on_disk else DEFAULT_CACHE_BYTES
        self.expression = ExpressionCache(data, self.visible, self.gene_idx, max_cache_bytes)

    def with_rows(self, train: np.ndarray, val: np.ndarray) -> SplitView:
        """The same view (data, split, genes, vocabulary, cached expression) with other training
        and validation rows, all of them visible here: an inner split of the visible cells."""
        outside = np.setdiff1d(np.concatenate([train, val]), self.visible)
        if len(outside):
            raise ValueError(f"{len(outside)} rows of the inner split are not visible cells of the view")
        inner = copy.copy(self)
        inner.rows = SplitRows(np.asarray(train), np.asarray(val), self.rows.test)
        inner.visible = np.concatenate([inner.rows.train, inner.rows.val])
        return inner

    def __repr__(self) -> str:
        return (
            f"SplitView({self.split.name or 'split'}: {len(self.rows.train)} train, {len(self.rows.val)} val, "
            f"{len(self.rows.test)} test cells; {len(self.genes)} genes)"
        )

    # ------------------------------------------------------------------ groups
    def groups(self, rows: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
        """Rows by (perturbation, context), controls included under the control label."""
        keys = pd.MultiIndex.from_arrays([self.data.perturbations[rows], self.data.contexts[rows]])
        return {k: rows[v] for k, v in pd.Series(np.arange(len(rows))).groupby(keys).indices.items()}

    def control_rows(self, context: str) -> np.ndarray:
        """The control cells of a context that a model may see (train and validation), sorted."""
        visible = self.visible
        found = np.sort(visible[self.data.is_control[visible] & (self.data.contexts[visible] == context)])
        if not len(found):
            raise InputError(f"context '{context}' has no visible control cells, so nothing can be predicted from "
                             "them.")
        return found

    def test_groups(self) -> dict[tuple[str, str], np.ndarray]:
        """Test rows by (perturbation, context)."""
        return self.groups(self.rows.test)

    @property
    def test_contexts(self) -> list[str]:
        return sorted(set(self.data.contexts[self.rows.test]))

    @property
    def context_col(self) -> str | None:
        """The context column to evaluate by: the split's, else the spec's when the test cells
        span several contexts, else None."""
        return self.split.context_col or self.data.single_context_col(self.rows.test)

    @property
    def training_perturbations(self) -> list[str]:
        """Perturbations with training cells (control excluded), sorted."""
        return sorted(set(self.data.perturbations[self.rows.train]) - {self.data.spec.control})

    @property
    def training_components(self) -> list[str]:
        """Components of the perturbations with training cells (a combination's singles), sorted."""
        return sorted({c for p in self.training_perturbations for c in self.data.components(p)})

    def counts(self, layer: str | None = None) -> CountsCache:
        """Raw counts and library sizes of the visible cells on :attr:`genes` (see :class:`CountsCache`;
        ``layer``: the counts layer, found when None)."""
        return CountsCache(self.data, self.visible, self.gene_idx, self.expression, layer)

    # ------------------------------------------------------------------ batches
    def paired_batches(self, rows: np.ndarray, batch_size: int, seed: int, max_components: int, **options: Any):
        """Paired training batches over ``rows`` (see :class:`pertflow.data.batches.PairedBatches`)."""
        from pertflow.data.batches import PairedBatches

        return PairedBatches(self, rows, batch_size, seed, max_components, **options)

    def validation_batches(self, n_batches: int, batch_size: int, seed: int, max_components: int,
                           **options: Any) -> list[dict] | None:
        """A fixed list of batches of the split's validation cells (never test cells), or None.

        Validation targets are the validation cells; their controls are drawn from all visible
        controls of the same context (validation controls alone may be too few).
        """
        data = self.data
        val_targets = self.rows.val[~data.is_control[self.rows.val]]
        if len(val_targets) == 0:
            return None
        controls = self.visible[data.is_control[self.visible]]
        if not set(data.contexts[val_targets]) <= set(data.contexts[controls]):
            return None
        source = self.paired_batches(np.concatenate([val_targets, controls]), batch_size, seed, max_components,
                                     **options)
        return [source.next_batch() for _ in range(n_batches)]

    # ------------------------------------------------------------------ AnnData views
    def real_test_anndata(self) -> ad.AnnData:
        """The real cells a prediction is scored against: test cells plus the test contexts'
        visible controls, dense log1p on :attr:`genes`."""
        controls = [self.control_rows(ctx) for ctx in self.test_contexts]
        real = self.data.to_anndata(np.concatenate([self.rows.test, *controls]), self.gene_idx)
        real.var_names = self.genes
        return real

    def train_anndata(self) -> ad.AnnData:
        """The real training cells (CSR log1p on :attr:`genes`), for the evaluator's PCA and Systema reference."""
        train = self.data.to_anndata(self.rows.train, self.gene_idx, sparse=True)
        train.var_names = self.genes
        return train
