import numpy as np
import pandas as pd
import pytest

from pertflow.data.vocab import Vocabulary, build_vocabulary, load_descriptors
from pertflow.errors import InputError


def test_genetic_perturbations_share_gene_tokens():
    vocab = build_vocabulary(["A", "B", "C"], [("A",), ("B", "X"), ()], genetic=True)
    assert vocab.tokens[:2] == ["<pad>", "<cls>"]
    assert vocab.id_of("A") == vocab.gene_ids(["A"])[0]  # the perturbation token is the gene token
    assert vocab.perturbed_genes == ["X"] and vocab.is_gene_token("X")
    ids = vocab.encode([("A",), ("B", "X"), ()])
    assert ids.shape == (3, 2)
    assert ids[0, 1] == vocab.pad_id and (ids[2] == vocab.pad_id).all()
    assert ids[1, 1] == vocab.id_of("X")


def test_drugs_get_their_own_tokens():
    vocab = build_vocabulary(["A", "B"], [("dex",), ("dex", "A")], genetic=False)
    assert vocab.other_tokens == ["dex"] and not vocab.is_gene_token("dex")
    assert vocab.is_gene_token("A")


def test_unknown_token_and_too_many_components():
    vocab = build_vocabulary(["A", "B"], [("A",)], genetic=True)
    with pytest.raises(InputError, match="'Z' is not in the model's vocabulary.*descriptor"):
        vocab.encode([("Z",)])
    with pytest.raises(InputError, match="3 components; this model takes at most 2"):
        vocab.encode([("A", "B", "A")])


def test_round_trip_with_descriptors():
    desc = pd.DataFrame(np.arange(6.0).reshape(3, 2), index=["A", "X", "dex"])
    vocab = Vocabulary(["A", "B"], ["X"], ["dex"], desc)
    again = Vocabulary.from_dict(vocab.to_dict())
    assert again.tokens == vocab.tokens
    m = again.descriptor_matrix()
    assert m.shape == (len(vocab), 2)
    np.testing.assert_array_equal(m[again.id_of("X")], [2.0, 3.0])
    np.testing.assert_array_equal(m[again.id_of("B")], [0.0, 0.0])


def test_load_descriptors(tmp_path):
    uns = {"esm": {"A": [1.0, 2.0], "B": [3.0, 4.0]}}
    assert load_descriptors("esm", uns).loc["B"].tolist() == [3.0, 4.0]
    pd.DataFrame([[1.0, 2.0]], index=["A"]).to_csv(tmp_path / "d.csv")
    assert load_descriptors(tmp_path / "d.csv").shape == (1, 2)
    np.savez(tmp_path / "d.npz", names=np.array(["A", "B"]), values=np.ones((2, 3)))
    assert load_descriptors(tmp_path / "d.npz").shape == (2, 3)
    with pytest.raises(InputError, match="neither a key of uns nor a file"):
        load_descriptors("nothing", uns)
    pd.DataFrame([[np.nan]], index=["A"]).to_csv(tmp_path / "nan.csv")
    with pytest.raises(InputError, match="NaN"):
        load_descriptors(tmp_path / "nan.csv")
