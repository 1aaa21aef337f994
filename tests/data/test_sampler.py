import numpy as np
import pytest

from pertflow.data.dataset import PerturbationData
from pertflow.data.sampler import PairedBatchSampler
from pertflow.errors import InputError


@pytest.fixture(scope="module")
def data(synthetic_adata):
    return PerturbationData.from_anndata(synthetic_adata)


def test_batches_pair_one_group_with_controls_of_its_context(data):
    rows = np.arange(data.n_cells)
    sampler = PairedBatchSampler.from_data(data, rows, batch_size=8, seed=0)
    for _ in range(50):
        b = sampler.sample()
        assert len(b.target_rows) == len(b.control_rows) == 8
        assert set(data.perturbations[b.target_rows]) == {b.perturbation}
        assert set(data.contexts[b.target_rows]) == {b.context} == set(data.contexts[b.control_rows])
        assert data.is_control[b.control_rows].all() and not data.is_control[b.target_rows].any()


def test_seeded_and_resumable(data):
    rows = np.arange(data.n_cells)
    a = PairedBatchSampler.from_data(data, rows, 4, seed=3)
    b = PairedBatchSampler.from_data(data, rows, 4, seed=3)
    first = [a.sample() for _ in range(5)]
    assert all((x.target_rows == y.target_rows).all() for x, y in zip(first, [b.sample() for _ in range(5)]))
    state = a.state_dict()
    expected = [a.sample() for _ in range(3)]
    c = PairedBatchSampler.from_data(data, rows, 4, seed=99)
    c.load_state_dict(state)
    got = [c.sample() for _ in range(3)]
    assert all((x.control_rows == y.control_rows).all() for x, y in zip(expected, got))


def test_only_given_rows_are_used(data):
    rows = np.flatnonzero(data.contexts == "line_A")
    sampler = PairedBatchSampler.from_data(data, rows, 16, seed=0, weighting="uniform")
    seen = set()
    for _ in range(100):
        b = sampler.sample()
        seen.update(b.target_rows.tolist() + b.control_rows.tolist())
    assert seen <= set(rows.tolist())
    assert {g[1] for g in sampler.groups} == {"line_A"}


def test_context_without_controls_is_an_error(data):
    rows = np.flatnonzero(~(data.is_control & (data.contexts == "line_B")))
    with pytest.raises(InputError, match="context 'line_B' has perturbed cells.*no control cells"):
        PairedBatchSampler.from_data(data, rows, 8)


def test_include_controls_adds_identity_groups(data):
    sampler = PairedBatchSampler.from_data(data, np.arange(data.n_cells), 8, include_controls=True)
    assert sum(g[0] == "control" for g in sampler.groups) == 3
