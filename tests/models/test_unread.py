"""A prediction says which test perturbations hold components the model knows nothing of (never
trained on, no descriptor, not a gene learnt through expression): they are predicted as "some
perturbation", and the file names them."""

import anndata as ad
import pytest

from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.view import SplitView
from pertflow.models.cfm.config import CFMConfig
from pertflow.models.cfm.model import CFM
from pertflow.models.latent_shift.config import LatentShiftConfig
from pertflow.models.latent_shift.model import LatentShift
from pertflow.models.predict import predict_split, unread_note
from pertflow.train import TrainConfig

UNSEEN = ["G0011", "G0011+G0003"]  # G0011 in no training perturbation; G0003 a trained single
SHORT = TrainConfig(max_steps=10, batch_size=16, val_every=10, checkpoint_every=10, progress=False)


@pytest.fixture(scope="module")
def view(synthetic_file):
    data = PerturbationData.read(synthetic_file)
    return SplitView(data, make_split(data, "perturbations", test_perturbations=UNSEEN))


def fitted(view, tmp_path, descriptor):
    config = LatentShiftConfig(n_components=6, hidden=16, decoder_hidden=16, decoder_steps=10, prior="mean",
                               descriptor=descriptor)
    model = LatentShift.from_view(view, config)
    model.fit(view, SHORT, tmp_path)
    return model


def test_a_one_hot_model_names_the_unseen_component_of_each_test_perturbation(view, tmp_path):
    model = fitted(view, tmp_path, "onehot")
    assert model.unread_components("G0011+G0003") == ["G0011"] and model.unread_components("G0003") == []
    pred = predict_split(model, view, seed=0)
    found = pred.uns["pertflow_unread"]
    assert dict(zip(found["perturbation"], found["components"])) == {"G0011": "G0011", "G0011+G0003": "G0011"}
    pred.write_h5ad(tmp_path / "pred.h5ad")  # the record survives the file
    note = unread_note(ad.read_h5ad(tmp_path / "pred.h5ad"))
    assert note.startswith("2 test perturbation(s)") and "G0011+G0003 (G0011)" in note


def test_a_gene_descriptor_leaves_nothing_unread(view, tmp_path):
    model = fitted(view, tmp_path, "gene")  # every target is a measured gene: the PCA has its vector
    pred = predict_split(model, view, seed=0)
    assert "pertflow_unread" not in pred.uns and unread_note(pred) is None


def test_a_token_model_reads_measured_genes_and_names_the_rest(view):
    model = CFM.from_view(view, CFMConfig(d_model=16, n_heads=2, n_layers=1, genes_per_step=30))
    assert model.unread_components("G0011+G0003") == []  # expression genes: their tokens are learnt
    assert model.unread_components("drugX+G0003") == ["drugX"]
