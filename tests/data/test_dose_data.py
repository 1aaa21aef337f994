"""Dose in the data layer: conditions (perturbation@dose), the dose split, batches that carry each
target cell's dose, and data without a dose column left exactly as it was."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pertflow.data.batches import PairedBatches
from pertflow.data.dataset import PerturbationData
from pertflow.data.keys import BATCH_KEYS
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


def _fingerprint(data: PerturbationData, steps: int = 6) -> tuple[set[str], str]:
    view = SplitView(data, make_split(data, "random", test_fraction=0.2))
    batches = PairedBatches(view, view.rows.train, batch_size=8, seed=0, max_components=2)
    h, keys = hashlib.sha256(), set()
    for _ in range(steps):
        batch = batches.next_batch()
        keys |= set(batch)
        for key in sorted(batch):
            values = batch[key].numpy()  # floats to 4 decimals: the same batches, not the same last bits
            h.update((np.round(values, 4) if values.dtype.kind == "f" else values).tobytes())
    return keys, h.hexdigest()


def test_without_a_dose_column_nothing_changes(synthetic_adata, dosed_adata):
    data = PerturbationData.from_anndata(synthetic_adata)
    assert data.spec.dose_col is None and not data.doses.any()
    assert not any("@" in p for p in data.perturbations)
    keys, digest = _fingerprint(data)
    assert keys == {BATCH_KEYS.TARGET, BATCH_KEYS.CONTROL, BATCH_KEYS.PERT_IDS}
    # the batches pertflow drew before it knew doses (this seed, these data)
    assert digest == BATCHES_BEFORE_DOSE
    # a dose column that the spec does not name changes nothing either
    renamed = dosed_adata.copy()
    renamed.obs = renamed.obs.rename(columns={"dose": "exposure"})
    plain = dosed_adata.copy()
    del plain.obs["dose"]
    assert _fingerprint(PerturbationData.from_anndata(renamed)) == _fingerprint(PerturbationData.from_anndata(plain))


BATCHES_BEFORE_DOSE = "3da2c3985f592ec467e2a5a71b604e3585e6d79007a1e0f09e35d178eac933f3"  # main at 91864c6


def test_the_cli_holds_out_a_dose(dosed_adata, tmp_path):
    from pertflow.cli import main
    from pertflow.data.splits import Split

    path = tmp_path / "dosed.h5ad"
    renamed = dosed_adata.copy()
    renamed.obs = renamed.obs.rename(columns={"dose": "uM"})  # a name detection does not know
    renamed.write_h5ad(path)
    out = tmp_path / "split.json"
    assert main(["split", "--data", str(path), "--kind", "dose", "--out", str(out)]) == 2  # no dose column: refused
    assert main(["split", "--data", str(path), "--dose-col", "uM", "--kind", "dose", "--held-out-doses", "0.3,3",
                 "--perturbations", "drug_00", "--out", str(out)]) == 0
    assert Split.load(out).test_perturbations == ["drug_00@0.3", "drug_00@3"]
