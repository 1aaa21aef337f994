import pytest

from pertflow.data.dataset import PerturbationData
from pertflow.data.detect import detect_spec
from pertflow.data.spec import DataSpec, split_components
from pertflow.errors import InputError

# What `pertflow inspect` must find in each shared file (README of shared/data).
EXPECTED = {
    "norman19_mcfaline23_devel.h5ad": dict(
        pert_col="condition", control="control", n_control=400, n_combos=15, n_perts=33,
        contexts={"k562": 3375, "A172": 850, "T98G": 871, "U87MG": 865}, is_counts=False, genetic=True,
    ),
    "kang18_pbmc_ifnb.h5ad": dict(
        pert_col="condition", control="control", n_control=936, n_combos=0, n_perts=1,
        contexts={"CD4T": 634, "FCGR3A+Mono": 421, "CD14+Mono": 321, "B": 222, "NK": 141, "CD8T": 122, "Dendritic": 114},
        is_counts=False, genetic=False,
    ),
    "zhao21_gbm_panobinostat.h5ad": dict(
        pert_col="condition", control="ctrl", n_control=2500, n_combos=0, n_perts=1,
        contexts={p: 1000 for p in ("PW030", "PW032", "PW034", "PW036", "PW040")}, is_counts=True, genetic=False,
    ),
    "norman19_gears_micro.h5ad": dict(
        pert_col="condition", control="ctrl", n_control=6, n_combos=10, n_perts=41,
        contexts={"A549": 50}, is_counts=False, genetic=True,
    ),
}
CONTEXT_COL = {"zhao21_gbm_panobinostat.h5ad": "patient_id"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("backed", [False, True])
def test_inspect_shared_files(shared_data, name, backed):
    want = EXPECTED[name]
    with PerturbationData.read(shared_data / name, backed=backed) as data:
        s = data.summary()
    assert s["spec"]["pert_col"] == want["pert_col"]
    assert s["spec"]["control"] == want["control"]
    assert s["control_cells"] == want["n_control"]
    assert s["n_combinations"] == want["n_combos"]
    assert s["n_perturbations"] == want["n_perts"]
    assert s["spec"]["context_cols"] == [CONTEXT_COL.get(name, "cell_type")]
    assert s["contexts"] == want["contexts"]
    assert s["spec"]["is_counts"] == want["is_counts"]
    assert s["spec"]["genetic"] == want["genetic"]
    assert s["expression"]["storage"] == ("sparse on disk" if backed else "sparse")


def test_gears_names_are_canonical(shared_data):
    with PerturbationData.read(shared_data / "norman19_gears_micro.h5ad") as data:
        assert data.summary()["perturbations"]["ETS2"] == 2  # labelled 'ctrl+ETS2'
        labels = set(data.adata.obs["condition"].astype(str))
        assert {"ctrl+ETS2", "COL1A1+ctrl"} <= labels
        assert "ETS2" in data.perturbation_names and "COL1A1" in data.perturbation_names
        assert data.spec.gene_symbol_col == "feature_name"


def test_split_components():
    assert split_components("A+ctrl", "+", "ctrl") == ("A",)
    assert split_components("ctrl+A", "+", "ctrl") == ("A",)
    assert split_components("A+B", "+", "control") == ("A", "B")
    assert split_components("control", "+", "control") == ()


def test_detect_synthetic(synthetic_adata):
    det = detect_spec(synthetic_adata)
    assert det.spec.pert_col == "perturbation" and det.spec.control == "control"
    assert det.spec.context_cols == ("cell_type",)
    assert det.spec.batch_col == "batch"
    assert det.spec.is_counts and det.spec.genetic
    assert "whole numbers" in det.evidence["is_counts"]


def test_spec_json_round_trip(tmp_path, synthetic_adata):
    spec = detect_spec(synthetic_adata).spec
    spec.save(tmp_path / "spec.json")
    assert DataSpec.load(tmp_path / "spec.json") == spec
    data = PerturbationData.from_anndata(synthetic_adata, spec=tmp_path / "spec.json")
    assert data.spec == spec


def test_unknown_spec_key_is_refused(synthetic_adata):
    with pytest.raises(InputError, match="unknown data spec keys"):
        detect_spec(synthetic_adata, pert_column="perturbation")
    with pytest.raises(InputError, match="unknown data spec keys"):
        DataSpec.from_dict({"pert_col": "p", "control": "c", "colour": 1})


def test_ambiguous_perturbation_columns(synthetic_adata):
    adata = synthetic_adata.copy()
    adata.obs["condition"] = adata.obs["perturbation"].astype(str).where(adata.obs["batch"] == "b1", "control")
    with pytest.raises(InputError, match="several obs columns could be the perturbation column.*pert_col="):
        detect_spec(adata)
    assert detect_spec(adata, pert_col="perturbation").spec.pert_col == "perturbation"


def test_given_spec_keeps_explicit_none(synthetic_adata):
    spec = detect_spec(synthetic_adata).spec.replace(batch_col=None)
    data = PerturbationData.from_anndata(synthetic_adata, spec=spec)
    assert data.spec.batch_col is None


def test_gears_labels_of_one_perturbation_merge(synthetic_adata):
    adata = synthetic_adata.copy()
    labels = adata.obs["perturbation"].astype(str).to_numpy().copy()
    single = [p for p in dict.fromkeys(labels) if p != "control" and "+" not in p][0]
    rows = (labels == single).nonzero()[0]
    labels[rows[: len(rows) // 2]] = f"{single}+ctrl"
    labels[rows[len(rows) // 2 :]] = f"ctrl+{single}"
    adata.obs["perturbation"] = labels
    data = PerturbationData.from_anndata(adata)
    assert set(data.perturbations[rows]) == {single}
    assert data.components(single) == (single,)
