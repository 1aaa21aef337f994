import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from pertflow.data.dataset import PerturbationData
from pertflow.data.loading import ExpressionSource, H5adFile, normalize_log1p


def scanpy_log1p(adata):
    ref = adata.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    return ref.X.toarray() if sp.issparse(ref.X) else ref.X


@pytest.mark.parametrize("storage", ["csr", "dense"])
def test_normalize_log1p_is_scanpys_including_empty_rows_and_integer_counts(storage):
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.3, size=(40, 300)).astype(np.int64) * rng.integers(1, 50, size=(40, 1))
    counts[7] = 0  # a cell with no counts stays zeros (no division by zero)
    block = sp.csr_matrix(counts) if storage == "csr" else counts
    got = normalize_log1p(block, 1e4)
    assert sp.issparse(got) == (storage == "csr") and got.dtype == np.float32
    got = got.toarray() if sp.issparse(got) else got
    np.testing.assert_allclose(got, scanpy_log1p(ad.AnnData(counts.astype(np.float32))), rtol=1e-6, atol=1e-6)
    assert not got[7].any() and np.isfinite(got).all()
    assert counts.dtype == np.int64 and counts[0].sum() == block[0].sum()  # the input is left as it was


@pytest.mark.parametrize("backed", [False, True])
@pytest.mark.parametrize("storage", ["csr", "dense"])
def test_log_expression_matches_scanpy_on_whole_matrix(tmp_path, synthetic_adata, backed, storage):
    adata = synthetic_adata.copy()
    if storage == "dense":
        adata.X = adata.X.toarray()
    path = tmp_path / "x.h5ad"
    adata.write_h5ad(path)
    expected = scanpy_log1p(adata)
    rows = np.array([17, 3, 3, 250, 0])  # unsorted and repeated on purpose
    genes = np.array([5, 1, 40])
    with PerturbationData.read(path, backed=backed) as data:
        assert data.spec.is_counts
        assert data.source.on_disk == backed
        got = data.log_expression(rows, genes)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected[rows][:, genes], rtol=1e-5, atol=1e-6)


def test_sparse_rows_stay_sparse_and_reads_are_chunked(synthetic_file, monkeypatch):
    import pertflow.data.dataset as dataset

    with PerturbationData.read(synthetic_file, backed=True) as data:
        block = data.log_expression_csr(np.arange(10))
        assert sp.issparse(block) and block.shape == (10, data.adata.n_vars)
        whole = data.log_expression(np.arange(100), np.array([3, 1]))
        reads = []
        original = data.source.read_rows
        monkeypatch.setattr(data.source, "read_rows", lambda rows: reads.append(len(rows)) or original(rows))
        monkeypatch.setattr(dataset, "MAX_VALUES_PER_READ", 25 * data.adata.n_vars)
        np.testing.assert_array_equal(data.log_expression(np.arange(100), np.array([3, 1])), whole)
        assert reads == [25, 25, 25, 25]  # never more than the read budget of whole rows at once


class CountingMatrix:
    """A sparse matrix that records which rows were read."""

    def __init__(self, X):
        self.X, self.shape, self.reads = X, X.shape, []

    def __getitem__(self, rows):
        self.reads.append(rows)
        return self.X[rows]


def test_source_reads_only_requested_rows(synthetic_adata):
    counting = CountingMatrix(synthetic_adata.X.tocsr())
    source = ExpressionSource(counting)
    out = source.read_rows(np.array([9, 2, 9]))
    np.testing.assert_array_equal(out.toarray(), synthetic_adata.X[[9, 2, 9]].toarray())
    assert [list(r) for r in counting.reads] == [[2, 9]]  # sorted unique rows, then reordered
    chunks = list(source.iter_chunks(100))
    assert sum(b.shape[0] for _, b in chunks) == synthetic_adata.n_obs
    assert all(b.shape[0] <= 100 for _, b in chunks)


def test_backed_file_keeps_layers_on_disk(tmp_path, synthetic_adata):
    adata = synthetic_adata.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    path = tmp_path / "layers.h5ad"
    adata.write_h5ad(path)
    f = H5adFile(path, backed=True)
    try:
        assert f.layer_names == ["counts"]
        assert f.source("counts").on_disk
    finally:
        f.close()
    with PerturbationData.read(path, backed=True, layer="counts") as data:
        assert data.spec.layer == "counts" and data.spec.is_counts
        np.testing.assert_allclose(data.log_expression(np.arange(5)), scanpy_log1p(ad.AnnData(adata.layers["counts"]))[:5], rtol=1e-5)


def test_log_input_is_used_as_is(synthetic_adata):
    adata = synthetic_adata.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    data = PerturbationData.from_anndata(adata)
    assert not data.spec.is_counts
    np.testing.assert_allclose(data.log_expression(np.arange(4)), adata.X[:4].toarray(), rtol=1e-6)


def test_to_anndata_uses_canonical_labels(synthetic_adata):
    data = PerturbationData.from_anndata(synthetic_adata)
    sub = data.to_anndata(np.arange(30), np.arange(10))
    assert sub.shape == (30, 10)
    assert list(sub.obs["perturbation"].astype(str)) == list(data.perturbations[:30])
    assert (sub.X >= 0).all()
