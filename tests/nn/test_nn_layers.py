"""Shared layers: shapes, scGPT parameter names, and the small behaviours they promise."""

from __future__ import annotations

import torch

from pertflow.nn import (
    BatchLabelEncoder,
    CategoryValueEncoder,
    ContinuousValueEncoder,
    ExprDecoder,
    GeneEncoder,
)


def test_gene_encoder_names_shapes_and_padding_row():
    enc = GeneEncoder(10, 8, padding_idx=9)
    assert set(enc.state_dict()) == {"embedding.weight", "enc_norm.weight", "enc_norm.bias"}
    out = enc(torch.tensor([[1, 2, 9]]))
    assert out.shape == (1, 3, 8)
    # The pad row stays zero, so its LayerNorm output is exactly the LayerNorm bias.
    assert torch.allclose(out[0, 2], enc.enc_norm.bias)
    out.sum().backward()
    assert torch.all(enc.embedding.weight.grad[9] == 0)


def test_continuous_value_encoder_clamps_from_above_only():
    enc = ContinuousValueEncoder(8, dropout=0.0, max_value=5.0).eval()
    assert set(enc.state_dict()) == {
        "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias", "norm.weight", "norm.bias"
    }
    values = torch.tensor([[5.0, 100.0, -2.0, -1.0]])
    out = enc(values)
    assert out.shape == (1, 4, 8)
    assert torch.allclose(out[0, 0], out[0, 1])  # 100 is clamped to 5
    assert not torch.allclose(out[0, 2], out[0, 3])  # pad (-2) and mask (-1) stay distinct


def test_category_and_batch_encoders():
    cat = CategoryValueEncoder(7, 8, padding_idx=5)
    assert cat(torch.tensor([[0.0, 3.9, 5.0]])).shape == (1, 3, 8)  # floats truncate to bins
    batch = BatchLabelEncoder(3, 8)
    assert batch(torch.tensor([0, 2])).shape == (2, 8)
    assert set(batch.state_dict()) == {"embedding.weight", "enc_norm.weight", "enc_norm.bias"}


def test_expr_decoder_concatenated_input_and_zero_head():
    dec = ExprDecoder(24, d_hidden=8, explicit_zero_prob=True)
    names = set(dec.state_dict())
    assert {"fc.0.weight", "fc.2.weight", "fc.4.weight", "zero_logit.0.weight", "zero_logit.4.bias"} <= names
    assert dec.fc[0].weight.shape == (8, 24) and dec.fc[4].weight.shape == (1, 8)
    out = dec(torch.randn(2, 5, 24))
    assert out.pred.shape == (2, 5)
    assert out.zero_probs is not None and bool(((out.zero_probs >= 0) & (out.zero_probs <= 1)).all())
    assert ExprDecoder(8)(torch.randn(2, 5, 8)).zero_probs is None
