"""Out-of-core training data: grouped reads of on-disk CSR rows, the row index, epoch streams."""

import numpy as np
import pytest
import torch

from pertflow.data.dataset import PerturbationData
from pertflow.data.loading import read_csr_rows
from pertflow.data.sampler import PairedBatchSampler, RowIndex
from pertflow.data.splits import make_split
from pertflow.data.view import SplitView


@pytest.fixture(scope="module")
def split(synthetic_file):
    with PerturbationData.read(synthetic_file) as data:
        return make_split(data, "random", test_fraction=0.25)


@pytest.fixture()
def views(synthetic_file, split):
    memory = PerturbationData.read(synthetic_file)
    backed = PerturbationData.read(synthetic_file, backed=True)
    yield SplitView(memory, split), SplitView(backed, split)
    memory.close()
    backed.close()


def test_grouped_reads_give_the_rows_in_few_reads(synthetic_file):
    import h5py

    memory = PerturbationData.read(synthetic_file)
    with h5py.File(synthetic_file, "r") as f:
        group = f["X"]
        reads = []
        real = group["data"].__class__.__getitem__

        class Counted:
            def __init__(self, ds):
                self.ds = ds

            def __getitem__(self, key):
                reads.append(key)
                return real(self.ds, key)

            @property
            def dtype(self):
                return self.ds.dtype

        counted = {k: Counted(group[k]) for k in ("indptr", "indices", "data")}
        rows = np.array([3, 4, 5, 7, 9, 200, 201, 500])
        block = read_csr_rows(counted, rows, memory.adata.n_vars, max_gap=2)
        assert len(reads) == 3 * 3  # three runs: 3-9, 200-201, 500; three reads each
        np.testing.assert_array_equal(block.toarray(), memory.adata.X[rows].toarray())
    memory.close()


def test_backed_rows_match_in_memory_in_any_order(views):
    memory, backed = views
    assert memory.expression.in_memory and not backed.expression.in_memory  # backed data streams
    rows = np.random.default_rng(0).choice(memory.visible, size=40)  # unsorted, with repeats
    np.testing.assert_array_equal(backed.expression.get(rows), memory.expression.get(rows))


@pytest.mark.parametrize("weighting", ["cells", "epoch"])
def test_backed_and_in_memory_batches_are_identical(views, weighting):
    memory, backed = views
    a = memory.paired_batches(memory.rows.train, 8, seed=3, max_components=2, weighting=weighting)
    b = backed.paired_batches(backed.rows.train, 8, seed=3, max_components=2, weighting=weighting)
    for _ in range(6):
        x, y = a.next_batch(), b.next_batch()
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_group_means_stream_from_disk(views):
    memory, backed = views
    groups = memory.groups(memory.rows.train)
    a = memory.expression.group_means(groups)
    b = backed.expression.group_means(groups, chunk=50)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_every_training_row_once_per_epoch_across_processes(views):
    view = views[1]
    shards = [view.paired_batches(view.rows.train, 8, seed=5, max_components=2, weighting="epoch") for _ in range(2)]
    for rank, shard in enumerate(shards):
        shard.shard(rank, 2)
    per_epoch = shards[0].sampler.batches_per_epoch
    seen = []
    for step in range(-(-per_epoch // 2)):
        for rank, shard in enumerate(shards):
            b = shard.next_rows()
            if 2 * step + rank < per_epoch:
                seen.append(b.target_rows)
                assert len(set(view.data.perturbations[b.target_rows])) == 1  # one group per batch
    seen = np.concatenate(seen)
    train = view.rows.train
    perturbed = np.sort(train[~view.data.is_control[train]])
    np.testing.assert_array_equal(np.sort(seen), perturbed)  # every row exactly once
    # the two processes took different batches, and the next epoch is another order
    assert shards[0].sampler.epoch == shards[1].sampler.epoch


def test_no_row_of_another_split_is_read(views):
    view = views[1]
    source = view.data.source
    read = []
    original = source.read_rows

    def recording(rows):
        read.append(np.arange(rows.start, rows.stop) if isinstance(rows, slice) else np.asarray(rows))
        return original(rows)

    source.read_rows = recording
    batches = view.paired_batches(view.rows.train, 8, seed=1, max_components=2, weighting="epoch")
    for _ in range(batches.sampler.batches_per_epoch):
        batches.next_batch()
    train_read = np.unique(np.concatenate(read))
    assert set(train_read) <= set(view.rows.train)
    read.clear()
    view.validation_batches(4, 8, seed=2, max_components=2)
    assert set(np.unique(np.concatenate(read))) <= set(view.visible)
    assert not set(view.rows.test) & set(train_read)


def test_row_index_is_cached_beside_the_run(views, tmp_path, monkeypatch):
    view = views[1]
    cache = tmp_path / "row_index.npz"
    first = view.paired_batches(view.rows.train, 8, seed=2, max_components=2, index_cache=cache)
    assert cache.is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("the cached index should have been read")

    with monkeypatch.context() as m:
        m.setattr(RowIndex, "build", no_build)
        second = view.paired_batches(view.rows.train, 8, seed=2, max_components=2, index_cache=cache)
    for _ in range(4):
        x, y = first.next_batch(), second.next_batch()
        assert all(torch.equal(x[k], y[k]) for k in x)
    # other rows: the cache does not apply, the index is built again
    fewer = view.rows.train[::2]
    third = view.paired_batches(fewer, 8, seed=2, max_components=2, index_cache=cache)
    assert sum(len(g[2]) for g in third.sampler.groups) < sum(len(g[2]) for g in first.sampler.groups)


def test_epoch_stream_resumes_from_its_state(views):
    view = views[0]
    data = view.data
    a = PairedBatchSampler.from_data(data, view.rows.train, 8, seed=4, weighting="epoch")
    for _ in range(a.batches_per_epoch + 3):  # into the second epoch
        a.sample()
    b = PairedBatchSampler.from_data(data, view.rows.train, 8, seed=4, weighting="epoch")
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        x, y = a.sample(), b.sample()
        np.testing.assert_array_equal(x.target_rows, y.target_rows)
        np.testing.assert_array_equal(x.control_rows, y.control_rows)
