"""Dose in the data layer: conditions (perturbation@dose), the dose split, batches that carry each
target cell's dose, and data without a dose column left exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest

from pertflow.data.batches import PairedBatches
from pertflow.data.dataset import PerturbationData
from pertflow.data.keys import BATCH_KEYS
from pertflow.data.sampler import PairedBatch
from pertflow.data.splits import make_split
from pertflow.data.synthetic import make_synthetic
from pertflow.data.view import SplitView
from pertflow.errors import InputError

DOSES = (0.1, 0.3, 1.0, 3.0, 10.0)


@pytest.fixture(scope="module")
def dosed_adata():
    return make_synthetic(n_genes=30, n_contexts=2, n_singles=3, n_combos=0, cells_per_group=12, n_effect_genes=8,
                          controls_per_context=30, genetic=False, doses=DOSES, seed=3)


@pytest.fixture(scope="module")
def dosed(dosed_adata):
    return PerturbationData.from_anndata(dosed_adata)


def test_a_condition_is_a_perturbation_at_a_dose(dosed, dosed_adata):
    assert dosed.spec.dose_col == "dose" and dosed.evidence["dose_col"] == "known column name"
    obs = dosed_adata.obs
    drug, dose = obs["perturbation"].astype(str).to_numpy(), obs["dose"].to_numpy()
    perturbed = drug != "control"
    expected = [f"{d}@{v:g}" for d, v in zip(drug[perturbed], dose[perturbed])]
    assert list(dosed.perturbations[perturbed]) == expected
    assert set(dosed.perturbations[~perturbed]) == {"control"} and (dosed.doses[~perturbed] == 0).all()
    np.testing.assert_array_equal(dosed.doses[perturbed], dose[perturbed])
    assert {"drug_00@0.1", "drug_00@1", "drug_00@10"} <= set(dosed.perturbations)
    assert dosed.components("drug_00@0.3") == ("drug_00",)
    assert dosed.spec.split_dose("drug_00@0.3") == ("drug_00", 0.3)
    assert dosed.spec.replace(dose_col=None).split_dose("drug_00@0.3") == ("drug_00@0.3", None)
    view = SplitView(dosed, make_split(dosed, "random", test_fraction=0.2))
    assert not [t for t in view.vocab.tokens if "@" in t]  # a dose is no token


def test_a_dose_column_that_is_not_numeric_is_not_taken_and_refused_when_named(dosed_adata):
    adata = dosed_adata.copy()
    adata.obs["dose"] = [f"{v:g}uM" for v in adata.obs["dose"]]
    data = PerturbationData.from_anndata(adata)
    assert data.spec.dose_col is None and "not numeric" in data.evidence["dose_col"]
    with pytest.raises(InputError, match=r"must hold numbers.*uM"):
        PerturbationData.from_anndata(adata, dose_col="dose")


def test_the_dose_split_holds_out_each_drugs_middle_dose(dosed):
    split = make_split(dosed, "dose")
    drugs = ["drug_00", "drug_01", "drug_02"]
    assert split.test_perturbations == [f"{d}@1" for d in drugs]
    assert split.subgroups == {f"{d}@1": "dose_interpolation" for d in drugs}
    seen = set(dosed.perturbations[dosed.rows_of(split.train)])
    assert {f"{d}@{v:g}" for d in drugs for v in DOSES if v != 1.0} <= seen and not {f"{d}@1" for d in drugs} & seen
    assert set(dosed.perturbations[dosed.rows_of(split.test)]) == {f"{d}@1" for d in drugs}

    top = make_split(dosed, "dose", held_out_doses=[10], perturbations=["drug_01"])
    assert top.test_perturbations == ["drug_01@10"] and top.subgroups == {"drug_01@10": "dose_extrapolation"}
    whole = make_split(dosed, "perturbations", test_perturbations=["drug_02"])  # a drug name holds out every dose
    assert whole.test_perturbations == [f"drug_02@{v:g}" for v in sorted(DOSES, key=lambda v: f"{v:g}")]


def test_the_dose_split_says_what_is_wrong(dosed, dosed_adata, synthetic_adata):
    with pytest.raises(InputError, match="needs a dose column"):
        make_split(PerturbationData.from_anndata(synthetic_adata), "dose")
    with pytest.raises(InputError, match="no perturbation is measured at the doses"):
        make_split(dosed, "dose", held_out_doses=[5.0])
    two = dosed_adata[dosed_adata.obs["dose"].isin([0.0, 0.1, 1.0]).to_numpy()].copy()
    data = PerturbationData.from_anndata(two)
    with pytest.raises(InputError, match="three doses or more"):
        make_split(data, "dose")
    with pytest.raises(InputError, match="only at the held-out doses"):
        make_split(data, "dose", held_out_doses=[0.1, 1.0])


def test_batches_carry_each_target_cells_dose(dosed):
    view = SplitView(dosed, make_split(dosed, "dose"))
    batches = PairedBatches(view, view.rows.train, batch_size=8, seed=0, max_components=1)
    for _ in range(5):
        state = batches.state_dict()
        rows = batches.next_rows()
        batches.load_state_dict(state)  # the same draw again, as a batch
        dose = batches.next_batch()[BATCH_KEYS.DOSE].numpy()
        assert dose.dtype == np.float32
        np.testing.assert_array_equal(dose, dosed.doses[rows.target_rows].astype(np.float32))
        assert (dose == np.float32(dosed.spec.split_dose(rows.perturbation)[1])).all() and (dose != 1.0).all()  # 1: held out


def _batches(data: PerturbationData, steps: int = 6) -> list[tuple[PairedBatch, dict[str, np.ndarray]]]:
    """Six seeded batches of a random split, each with the rows it was read from."""
    view = SplitView(data, make_split(data, "random", test_fraction=0.2))
    batches = PairedBatches(view, view.rows.train, batch_size=8, seed=0, max_components=2)
    drawn = []
    for _ in range(steps):
        state = batches.state_dict()
        rows = batches.next_rows()
        batches.load_state_dict(state)  # the same draw again, as a batch
        drawn.append((rows, {k: v.numpy() for k, v in batches.next_batch().items()}))
    return drawn


def test_without_a_dose_column_nothing_changes(synthetic_adata, dosed_adata):
    data = PerturbationData.from_anndata(synthetic_adata)
    assert data.spec.dose_col is None and not data.doses.any()
    assert not any("@" in p for p in data.perturbations)
    view = SplitView(data, make_split(data, "random", test_fraction=0.2))
    for rows, batch in _batches(data):
        # the batch is what pertflow read before it knew doses: the rows' expression and the
        # perturbation's tokens, recomputed here (compared with a tolerance: no frozen digest of floats)
        assert set(batch) == {BATCH_KEYS.TARGET, BATCH_KEYS.CONTROL, BATCH_KEYS.PERT_IDS}
        np.testing.assert_allclose(batch[BATCH_KEYS.TARGET], view.expression.get(rows.target_rows), rtol=1e-6)
        np.testing.assert_allclose(batch[BATCH_KEYS.CONTROL], view.expression.get(rows.control_rows), rtol=1e-6)
        ids = view.vocab.encode([data.components(rows.perturbation)] * len(rows.target_rows), 2)
        np.testing.assert_array_equal(batch[BATCH_KEYS.PERT_IDS], ids)
    # a dose column that the spec does not name changes nothing either: the same rows, the same values
    renamed = dosed_adata.copy()
    renamed.obs = renamed.obs.rename(columns={"dose": "exposure"})
    plain = dosed_adata.copy()
    del plain.obs["dose"]
    for (rows_a, a), (rows_b, b) in zip(_batches(PerturbationData.from_anndata(renamed)),
                                        _batches(PerturbationData.from_anndata(plain))):
        np.testing.assert_array_equal(rows_a.target_rows, rows_b.target_rows)
        np.testing.assert_array_equal(rows_a.control_rows, rows_b.control_rows)
        assert set(a) == set(b) and BATCH_KEYS.DOSE not in a
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6)


def test_the_cli_holds_out_a_dose(dosed_adata, tmp_path):
    from pertflow.cli import main
    from pertflow.data.split_file import Split

    path = tmp_path / "dosed.h5ad"
    renamed = dosed_adata.copy()
    renamed.obs = renamed.obs.rename(columns={"dose": "uM"})  # a name detection does not know
    renamed.write_h5ad(path)
    out = tmp_path / "split.json"
    assert main(["split", "--data", str(path), "--kind", "dose", "--out", str(out)]) == 2  # no dose column: refused
    assert main(["split", "--data", str(path), "--dose-col", "uM", "--kind", "dose", "--held-out-doses", "0.3,3",
                 "--perturbations", "drug_00", "--out", str(out)]) == 0
    assert Split.load(out).test_perturbations == ["drug_00@0.3", "drug_00@3"]
