"""Each kind of bad input stops with an error that names the problem and the fix."""

import numpy as np
import pytest
import scipy.sparse as sp

from pertflow.data.dataset import PerturbationData
from pertflow.data.split_file import Split
from pertflow.data.splits import make_split
from pertflow.errors import InputError


@pytest.fixture
def adata(synthetic_adata):
    return synthetic_adata.copy()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("backed", [False, True])
def test_nan_or_inf(tmp_path, adata, bad, backed):
    adata.X = adata.X.tocsr()
    adata.X.data[7] = bad
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(InputError, match=r"NaN or Inf values.*first in cell 'cell\d+'.*Remove or repair"):
        PerturbationData.read(path, backed=backed)


def test_nan_in_dense_matrix(adata):
    X = adata.X.toarray()
    X[3, 4] = np.nan
    adata.X = X
    with pytest.raises(InputError, match=f"first in cell '{adata.obs_names[3]}'"):
        PerturbationData.from_anndata(adata, pert_col="perturbation", control="control", is_counts=True)


def test_negative_values(adata):
    adata.X = sp.csr_matrix(adata.X.toarray() - 0.5)
    with pytest.raises(InputError, match="negative values.*undo scaling"):
        PerturbationData.from_anndata(adata)


def test_no_control_cells(adata):
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str).replace("control", "G9999")
    with pytest.raises(InputError, match="control.*control="):
        PerturbationData.from_anndata(adata)
    with pytest.raises(InputError, match="the control label 'control' does not occur.*most frequent values"):
        PerturbationData.from_anndata(adata, control="control")


def test_missing_control_label(adata):
    with pytest.raises(InputError, match=r"control label 'NTC' does not occur in obs\['perturbation'\]; its most frequent values are \[.*'control'"):
        PerturbationData.from_anndata(adata, pert_col="perturbation", control="NTC")


def test_missing_perturbation_column(adata):
    with pytest.raises(InputError, match=r"perturbation column 'guide' is not in obs. Columns: \['perturbation', 'cell_type', 'batch'\]"):
        PerturbationData.from_anndata(adata, pert_col="guide")
    undetectable = adata.copy()
    undetectable.obs = undetectable.obs.rename(columns={"perturbation": "my_label"})
    with pytest.raises(InputError, match=r"could not find a perturbation column.*Label columns in obs: \['my_label'"):
        PerturbationData.from_anndata(undetectable)


def test_too_few_cells(adata):
    with pytest.raises(InputError, match=r"fewer than min_cells=50 cells.*lower min_cells \(min_cells=\.\.\.\)"):
        PerturbationData.from_anndata(adata, min_cells=50)
    PerturbationData.from_anndata(adata, min_cells=20)


def test_duplicated_gene_names(adata):
    names = adata.var_names.to_numpy().copy()
    names[5] = names[4]
    adata.var_names = names
    with pytest.raises(InputError, match=r"1 duplicated gene names, e.g. \['G0004'\].*var_names_make_unique"):
        PerturbationData.from_anndata(adata)


def test_duplicated_cell_names(adata):
    names = adata.obs_names.to_numpy().copy()
    names[1] = names[0]
    adata.obs_names = names
    with pytest.raises(InputError, match="duplicated cell names.*obs_names_make_unique"):
        PerturbationData.from_anndata(adata)


def test_split_with_unknown_cells(adata):
    data = PerturbationData.from_anndata(adata)
    split = make_split(data, "random")
    split.test = split.test + ["not_a_cell", "neither"]
    with pytest.raises(InputError, match=r"2 test cells of the split are not in.*e.g. \['not_a_cell', 'neither'\].*rebuild it"):
        split.rows(data)


def test_empty_test_set(adata, tmp_path):
    data = PerturbationData.from_anndata(adata)
    split = make_split(data, "random")
    split.test = []
    with pytest.raises(InputError, match="test set is empty"):
        split.rows(data)
    with pytest.raises(InputError, match="test set is empty"):
        make_split(data, "context", test_context="line_A", perturbations=["not_there"])


def test_test_cells_in_train(adata):
    data = PerturbationData.from_anndata(adata)
    split = make_split(data, "random")
    split.train = split.train + split.test[:2]
    with pytest.raises(InputError, match="2 test cells are also in train or val"):
        split.rows(data)


def test_split_file_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        Split.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        Split.load(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text('{"train": []}')
    with pytest.raises(InputError, match=r"missing the keys \['val', 'test'\]"):
        Split.load(tmp_path / "partial.json")


def test_missing_genes(adata):
    data = PerturbationData.from_anndata(adata)
    with pytest.raises(InputError, match=r"2 genes are not in.*\['NOPE1', 'NOPE2'\]"):
        data.gene_indices(["G0001", "NOPE1", "NOPE2"])


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        PerturbationData.read(tmp_path / "nothing.h5ad")
    (tmp_path / "junk.h5ad").write_text("junk")
    with pytest.raises(InputError, match="could not be read as .h5ad"):
        PerturbationData.read(tmp_path / "junk.h5ad")
