"""scGPT family: learning, every objective, attention math, public checkpoints, frozen extraction.

Everything runs at tiny width (d 16-32, 2 layers) on CPU.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pertflow.errors import InputError
from pertflow.foundation.scgpt import (
    FeatureCache,
    FrozenScGPTExtractor,
    MultiOmicTransformerModel,
    ScGPTConfig,
    TransformerGenerator,
    TransformerModel,
    export_pretrained,
    load_pretrained,
    random_mask_value,
    scgpt_loss,
)
from pertflow.foundation.scgpt.state_layout import (
    from_public_state_dict,
    infer_architecture,
    scgpt_human_reference_shapes,
    to_public_state_dict,
)
from pertflow.foundation.scgpt.extractor import RunningFeatureNorm, bin_expression
from pertflow.foundation.scgpt.losses import (
    cls_loss,
    contrastive_cell_loss,
    dab_loss,
    elastic_cell_similarity_loss,
    masked_mse_loss,
    mvc_loss,
    perturbation_loss,
    zero_prob_nll,
)
from pertflow.foundation.scgpt.layers import DomainSpecificBatchNorm1d, ScGPTEncoderLayer, grad_reverse

N_GENES = 36
PAD, CLS, EOC = N_GENES, N_GENES + 1, N_GENES + 2
NTOKEN = N_GENES + 3
PAD_VALUE, MASK_VALUE = -2.0, -1.0


def gene_names(n: int = N_GENES) -> list[str]:
    return [f"G{i}" for i in range(n)]


def make_vocab() -> dict[str, int]:
    vocab = {g: i for i, g in enumerate(gene_names())}
    vocab.update({"<pad>": PAD, "<cls>": CLS, "<eoc>": EOC})
    return vocab


def tiny(**overrides) -> ScGPTConfig:
    base = dict(ntoken=NTOKEN, pad_token_id=PAD, cls_token_id=CLS, d_model=32, nhead=4, d_hid=32, nlayers=2,
                dropout=0.0, pad_value=PAD_VALUE, mask_value=MASK_VALUE)
    base.update(overrides)
    return ScGPTConfig(**base)


def synthetic_cells(batch: int, length: int, seed: int, gene_weight: torch.Tensor, with_cls: bool = True):
    """Cells whose values are ``scale_cell * weight_gene``: masked values need the cell's context."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(N_GENES, generator=g)[:length] for _ in range(batch)])
    scale = 0.5 + 1.5 * torch.rand(batch, 1, generator=g)
    values = scale * gene_weight[ids]
    if with_cls:
        ids = torch.cat([torch.full((batch, 1), CLS), ids], 1)
        values = torch.cat([torch.full((batch, 1), PAD_VALUE), values], 1)
    return ids, values


def adam_steps(model, loss_fn, steps: int, lr: float = 3e-3) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: extra intra-op threads only spin, and on a busy 2-core machine that
    # multiplies the run time. Restore the setting for the other test modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ============================================================================ learning


def test_mlm_learns_a_masked_value_from_the_cells_context():
    weight = 1.0 + 2.0 * torch.rand(N_GENES, generator=torch.Generator().manual_seed(7))
    model = TransformerModel(tiny())
    mask_gen = torch.Generator().manual_seed(1)
    data_gen = torch.Generator().manual_seed(2)

    def mlm_loss(ids, values):
        masked = random_mask_value(values, 0.3, MASK_VALUE, PAD_VALUE, keep_first_n=1, generator=mask_gen)
        return masked_mse_loss(model(ids, masked.values).mlm_output, values, masked.mask), masked.mask

    held_out = synthetic_cells(256, 16, 10**6, weight)
    with torch.no_grad():
        initial = mlm_loss(*held_out)[0].item()
    history = adam_steps(
        model, lambda: mlm_loss(*synthetic_cells(64, 16, int(torch.randint(10**5, (1,), generator=data_gen)),
                                                 weight))[0], steps=120)
    with torch.no_grad():
        final, mask = mlm_loss(*held_out)
    # The best prediction from the gene identity alone is E[scale] * weight, whose error is
    # Var(scale) * weight^2 with scale ~ U(0.5, 2); beating it needs the cell's other genes.
    gene_only = (1.5**2 / 12) * float((weight[held_out[0][:, 1:]][mask[:, 1:]] ** 2).mean())
    assert history[-1] < history[0]
    assert final.item() < 0.05 * initial
    assert final.item() < 0.25 * gene_only, f"{final.item():.3f} vs gene-only {gene_only:.3f}"


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("style", ["continuous", "category", "scaling"])
def test_value_encoders_and_norm_schemes_train(style, norm):
    n_bins = 12
    cfg = tiny(d_model=16, nhead=2, d_hid=16, input_emb_style=style, pre_norm=norm == "pre",
               n_input_bins=n_bins + 2 if style == "category" else None,
               pad_value=float(n_bins) if style == "category" else PAD_VALUE,
               mask_value=float(n_bins + 1) if style == "category" else MASK_VALUE)
    model = TransformerModel(cfg)
    names = set(model.state_dict())
    if style == "continuous":
        assert "value_encoder.linear1.weight" in names
    elif style == "category":
        assert model.state_dict()["value_encoder.embedding.weight"].shape == (n_bins + 2, 16)
    else:
        assert not any(k.startswith("value_encoder.") for k in names)
    weight = 1.0 + 2.0 * torch.rand(N_GENES)
    ids, values = synthetic_cells(32, 10, 3, weight)
    if style == "category":
        values = torch.clamp(values.round(), 0, n_bins - 1)
        values[:, 0] = cfg.pad_value
    masked = random_mask_value(values, 0.3, cfg.mask_value, cfg.pad_value)
    history = adam_steps(model, lambda: masked_mse_loss(model(ids, masked.values).mlm_output, values, masked.mask), 8)
    assert all(math.isfinite(h) for h in history)
    assert history[-1] < history[0]


def test_scaling_style_multiplies_gene_embedding_by_value():
    model = TransformerModel(tiny(input_emb_style="scaling")).eval()
    ids = torch.tensor([[3, 4]])
    total, gene_embs = model._embed(ids, torch.tensor([[2.0, 0.0]]))
    assert torch.allclose(total[0, 0], 2 * gene_embs[0, 0])
    assert torch.all(total[0, 1] == 0)


# ============================================================================ every objective


def _objective_case(name: str):
    """(model, loss closure, whether the loss must go down) for one objective."""
    weight = 1.0 + 2.0 * torch.rand(N_GENES)
    ids, values = synthetic_cells(16, 10, 11, weight)
    masked = random_mask_value(values, 0.3, MASK_VALUE, PAD_VALUE, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(16) % 3
    small = dict(d_model=16, nhead=2, d_hid=16)
    if name == "mlm":
        m = TransformerModel(tiny(**small))
        return m, lambda: masked_mse_loss(m(ids, masked.values).mlm_output, values, masked.mask), True
    if name == "zero":
        m = TransformerModel(tiny(**small, explicit_zero_prob=True))
        sparse = values * (torch.rand(values.shape) > 0.4)
        sparse[:, 0] = PAD_VALUE
        return m, lambda: zero_prob_nll(m(ids, masked.values).mlm_zero_probs, sparse, masked.mask), True
    if name == "cls":
        m = TransformerModel(tiny(**small, n_cls=3))
        return m, lambda: cls_loss(m(ids, values, CLS=True).cls_output, labels), True
    if name == "mvc-zero":
        m = TransformerModel(tiny(**small, do_mvc=True, explicit_zero_prob=True))
        return m, lambda: zero_prob_nll(m(ids, masked.values, MVC=True).mvc_zero_probs, values, masked.mask), True
    if name.startswith("mvc"):
        style = {"mvc": "inner product", "mvc-concat": "concat query", "mvc-sum": "sum query"}[name]
        m = TransformerModel(tiny(**small, do_mvc=True, mvc_decoder_style=style))
        return m, lambda: mvc_loss(m(ids, masked.values, MVC=True).mvc_output, values, masked.mask), True
    if name == "cce":
        m = TransformerModel(tiny(**small, dropout=0.2))
        return m, lambda: m(ids, values, CCE=True).loss_cce, True
    if name == "ecs":
        m = TransformerModel(tiny(**small))
        return m, lambda: m(ids, values, ECS=True).loss_ecs, True
    if name == "dab":
        m = TransformerModel(tiny(**small, do_dab=True, num_batch_labels=3))
        return m, lambda: dab_loss(m(ids, values).dab_output, labels), False
    if name == "batch-labels+dsbn":
        m = TransformerModel(tiny(**small, use_batch_labels=True, num_batch_labels=3, domain_spec_batchnorm=True,
                                  do_mvc=True))
        return m, lambda: scgpt_loss(m(ids, masked.values, batch_labels=labels, MVC=True), values,
                                     masked.mask).loss, True
    if name == "generator":
        m = TransformerGenerator(tiny(**small))
        flags = (torch.rand(ids.shape) < 0.1).long()
        target = values * (1 + flags)
        return m, lambda: perturbation_loss(m(ids, values, flags).mlm_output, target), True
    raise AssertionError(name)


OBJECTIVES = ["mlm", "zero", "cls", "mvc", "mvc-concat", "mvc-sum", "mvc-zero", "cce", "ecs", "dab",
              "batch-labels+dsbn", "generator"]


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_objective_runs_and_moves(name):
    model, loss_fn, must_fall = _objective_case(name)
    # CCE's two views differ by dropout draws, so its loss is noisy: give it more steps.
    history = adam_steps(model, loss_fn, steps=15 if name == "cce" else 6)
    assert all(math.isfinite(h) for h in history), history
    assert abs(history[-1] - history[0]) > 1e-5, f"{name} loss did not move: {history}"
    if must_fall:
        assert np.mean(history[-3:]) < np.mean(history[:3]), f"{name}: {history}"


def test_dab_reverses_the_gradient_into_the_encoder():
    x = torch.randn(4, 3, requires_grad=True)
    (grad_reverse(x, 0.5) * 2).sum().backward()
    assert torch.allclose(x.grad, torch.full((4, 3), -1.0))
    # The discriminator itself descends its loss while the encoder receives the reversed gradient.
    model = TransformerModel(tiny(d_model=16, nhead=2, d_hid=16, do_dab=True, num_batch_labels=2))
    ids, values = synthetic_cells(8, 6, 0, torch.ones(N_GENES))
    out = model(ids, values)
    cell = out.cell_emb
    cell.retain_grad()
    dab_loss(out.dab_output, torch.arange(8) % 2).backward()
    disc_in = cell.detach().requires_grad_(True)
    model.grad_reverse_discriminator.reverse_grad = False  # the same discriminator without reversal
    dab_loss(model.grad_reverse_discriminator(disc_in), torch.arange(8) % 2).backward()
    assert torch.allclose(cell.grad, -disc_in.grad, atol=1e-6)


def test_loss_functions_match_their_definitions():
    pred, target = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 0.0, 5.0]])
    mask = torch.tensor([[False, True, True]])
    assert torch.isclose(masked_mse_loss(pred, target, mask), torch.tensor((4 + 4) / 2))
    assert masked_mse_loss(pred, target, torch.zeros_like(mask)).item() == 0.0
    probs = torch.tensor([[0.5, 0.2, 0.9]])
    expected = -(math.log(0.8) + math.log(0.9)) / 2  # "non-zero" probability: target 0 -> log(1 - p)
    assert math.isclose(zero_prob_nll(probs, target, mask).item(), expected, rel_tol=1e-5)
    a = torch.randn(5, 8)
    ce = contrastive_cell_loss(a, a, temperature=0.5)
    sim = F.normalize(a, dim=1) @ F.normalize(a, dim=1).t() / 0.5
    assert torch.isclose(ce, F.cross_entropy(sim, torch.arange(5)), atol=1e-5)
    # ECS of two orthogonal cells: off-diagonal cos 0 -> every entry 1 - threshold^2.
    ecs = elastic_cell_similarity_loss(torch.eye(2), threshold=0.3)
    assert math.isclose(ecs.item(), 1 - 0.09, rel_tol=1e-6)


def test_random_mask_value():
    values = torch.tensor([[PAD_VALUE, 1.0, 2.0, 3.0, 4.0, PAD_VALUE], [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]])
    out = random_mask_value(values, 0.5, MASK_VALUE, PAD_VALUE, generator=torch.Generator().manual_seed(0))
    assert out.mask.sum(1).tolist() == [2, 3]  # int(4 * 0.5), int(6 * 0.5)
    assert bool((values[out.mask.logical_not()] == out.values[out.mask.logical_not()]).all())
    assert bool((out.values[out.mask] == MASK_VALUE).all())
    assert not bool(out.mask[values == PAD_VALUE].any())
    again = random_mask_value(values, 0.5, MASK_VALUE, PAD_VALUE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.mask, out.mask)
    assert not bool(random_mask_value(values, 0.5, keep_first_n=1, pad_value=PAD_VALUE).mask[:, 0].any())


def test_dsbn_normalises_each_domain_with_its_own_statistics():
    bn = DomainSpecificBatchNorm1d(4, 2).train()
    x = torch.randn(6, 4, 5)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    mixed = bn(x, labels)
    ref = DomainSpecificBatchNorm1d(4, 2).train()
    for d in (0, 1):
        assert torch.allclose(mixed[labels == d], ref(x[labels == d], torch.tensor([d])), atol=1e-5)
    assert set(bn.state_dict()) >= {"bns.0.running_mean", "bns.1.running_var"}


# ============================================================================ attention math


def test_post_norm_layer_equals_torch_encoder_layer():
    ours = ScGPTEncoderLayer(16, 4, 24, dropout=0.0, norm_scheme="post").eval()
    ref = torch.nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True).eval()
    ref.load_state_dict(ours.state_dict())  # identical names: in_proj_*, out_proj, linear1/2, norm1/2
    x = torch.randn(3, 7, 16)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    with torch.no_grad():
        a, b = ours(x, pad), ref(x, src_key_padding_mask=pad)
    valid = ~pad
    assert torch.allclose(a[valid], b[valid], atol=1e-5)


def _flash_layer_by_hand(x, params, nhead, key_padding_mask, norm_scheme="post", split="three h d"):
    """One scGPT FlashTransformerEncoderLayer from the public tensors with plain matmuls.

    flash-attn's FlashMHA: ``qkv = Wqkv(x)``, ``rearrange(qkv, 'b s (three h d) -> b s three h d')``,
    softmax(q k^T / sqrt(head_dim)) v per head over non-padding keys, ``out_proj``; then scGPT's
    residual/LayerNorm/ReLU feed-forward around it.
    """
    b, s, d = x.shape
    hd = d // nhead

    def attn(inp):
        qkv = inp @ params["self_attn.Wqkv.weight"].T + params["self_attn.Wqkv.bias"]
        if split == "three h d":
            qkv = qkv.view(b, s, 3, nhead, hd)
        else:  # a wrong convention, to show that the test can tell them apart
            qkv = qkv.view(b, s, nhead, 3, hd).transpose(2, 3)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, s, h, hd)
        scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        ctx = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v).reshape(b, s, d)
        return ctx @ params["self_attn.out_proj.weight"].T + params["self_attn.out_proj.bias"]

    def ln(inp, name):
        return F.layer_norm(inp, (d,), params[f"{name}.weight"], params[f"{name}.bias"], 1e-5)

    def ffn(inp):
        h = F.relu(inp @ params["linear1.weight"].T + params["linear1.bias"])
        return h @ params["linear2.weight"].T + params["linear2.bias"]

    if norm_scheme == "pre":
        x = ln(x, "norm1")
        x = x + attn(x)
        x = ln(x, "norm2")
        return x + ffn(x)
    x = ln(x + attn(x), "norm1")
    return ln(x + ffn(x), "norm2")


@pytest.mark.parametrize("norm_scheme", ["post", "pre"])
def test_fused_wqkv_split_order_matches_flash_attn(norm_scheme):
    d, nhead, d_hid = 16, 4, 24
    g = torch.Generator().manual_seed(5)
    public = {
        "self_attn.Wqkv.weight": torch.randn(3 * d, d, generator=g) * 0.3,
        "self_attn.Wqkv.bias": torch.randn(3 * d, generator=g) * 0.3,
        "self_attn.out_proj.weight": torch.randn(d, d, generator=g) * 0.3,
        "self_attn.out_proj.bias": torch.randn(d, generator=g) * 0.1,
        "linear1.weight": torch.randn(d_hid, d, generator=g) * 0.3,
        "linear1.bias": torch.randn(d_hid, generator=g) * 0.1,
        "linear2.weight": torch.randn(d, d_hid, generator=g) * 0.3,
        "linear2.bias": torch.randn(d, generator=g) * 0.1,
        "norm1.weight": 1 + 0.1 * torch.randn(d, generator=g),
        "norm1.bias": 0.1 * torch.randn(d, generator=g),
        "norm2.weight": 1 + 0.1 * torch.randn(d, generator=g),
        "norm2.bias": 0.1 * torch.randn(d, generator=g),
    }
    # Load through the checkpoint conversion, as a real checkpoint would be.
    prefixed = {f"transformer_encoder.layers.0.{k}": v for k, v in public.items()}
    ours_named, layout = from_public_state_dict(prefixed)
    assert layout == "flash"
    layer = ScGPTEncoderLayer(d, nhead, d_hid, 0.0, norm_scheme).eval()
    layer.load_state_dict({k.removeprefix("transformer_encoder.layers.0."): v for k, v in ours_named.items()})
    x = torch.randn(2, 6, d, generator=g)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    with torch.no_grad():
        got = layer(x, pad)
    expected = _flash_layer_by_hand(x, public, nhead, pad, norm_scheme)
    wrong = _flash_layer_by_hand(x, public, nhead, pad, norm_scheme, split="h three d")
    valid = ~pad
    assert torch.allclose(got[valid], expected[valid], atol=1e-5)
    assert not torch.allclose(got[valid], wrong[valid], atol=1e-3)


# ============================================================================ public checkpoints


def _whole_human_like(tmp_path: Path, nlayers: int = 2, d: int = 32, d_hid: int = 48) -> tuple[Path, TransformerModel]:
    """A folder in the released layout: real names, flash Wqkv, args.json keys of scGPT's pretrain.py."""
    cfg = tiny(d_model=d, nhead=4, d_hid=d_hid, nlayers=nlayers, dropout=0.2, do_mvc=True,
               use_generative_training=True, max_seq_len=1200)
    model = TransformerModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms, so that a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = model.state_dict()
    # Our own conversion to the flash layout, written independently of the library's.
    public = OrderedDict(
        (re.sub(r"self_attn\.in_proj_(weight|bias)$", r"self_attn.Wqkv.\1", k), v.clone()) for k, v in ours.items()
    )
    expected_shapes = scgpt_human_reference_shapes(NTOKEN, d, d_hid, nlayers)
    assert {k: tuple(v.shape) for k, v in public.items()} == expected_shapes
    assert to_public_state_dict(ours, "flash").keys() == public.keys()
    folder = tmp_path / "scGPT_human_tiny"
    folder.mkdir()
    torch.save(public, folder / "best_model.pt")
    args = {  # the keys examples/pretrain.py writes with vars(args), at test sizes
        "data_source": "/scratch/cellxgene/human", "save_dir": "/save", "load_model": None, "n_hvg": None,
        "valid_size_or_ratio": 0.003, "grad_accu_steps": 1, "pad_token": "<pad>", "input_style": "binned",
        "input_emb_style": "continuous", "n_bins": 51, "max_seq_len": 1200, "training_tasks": "both",
        "mask_ratio": [0.25, 0.5, 0.75], "trunc_by_sample": True, "vocab_path": "vocab.json",
        "local_rank": -1, "batch_size": 32, "eval_batch_size": 64, "epochs": 6, "lr": 0.0001,
        "scheduler_interval": 100, "scheduler_factor": 0.99, "warmup_ratio_or_step": 10000.0,
        "no_cls": True, "no_cce": True, "fp16": True, "fast_transformer": True, "nlayers": nlayers,
        "nheads": 4, "embsize": d, "d_hid": d_hid, "dropout": 0.2, "n_layers_cls": 3,
        "log_interval": 9000, "save_interval": 27000, "mask_value": -1, "pad_value": -2,
    }
    (folder / "args.json").write_text(json.dumps(args))
    (folder / "vocab.json").write_text(json.dumps(make_vocab()))
    return folder, model


def _encode_pair(a: TransformerModel, b: TransformerModel):
    ids, values = synthetic_cells(3, 12, 4, 1 + torch.rand(N_GENES))
    ids[2, 9:] = PAD
    values[2, 9:] = PAD_VALUE
    with torch.no_grad():
        return a.encode(ids, values), b.encode(ids, values), ids.ne(PAD)


def test_public_flash_checkpoint_loads_and_encodes_like_the_source_model(tmp_path):
    folder, source = _whole_human_like(tmp_path)
    loaded = load_pretrained(folder)
    assert loaded.report.layout == "flash"
    assert loaded.report.dropped == [] and loaded.report.initialized == []
    cfg = loaded.config
    assert (cfg.d_model, cfg.nhead, cfg.d_hid, cfg.nlayers, cfg.ntoken) == (32, 4, 48, 2, NTOKEN)
    assert cfg.do_mvc and cfg.use_generative_training and cfg.pad_value == -2 and cfg.cls_token_id == CLS
    assert not loaded.model.training
    a, b, valid = _encode_pair(source, loaded.model)
    assert torch.allclose(a[valid], b[valid], atol=1e-6)
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key


@pytest.mark.parametrize("layout,fmt", [("flash", "pt"), ("torch", "pt"), ("flash", "safetensors")])
def test_export_then_load_round_trip(tmp_path, layout, fmt):
    cfg = tiny(d_model=16, nhead=2, d_hid=16, do_mvc=True, n_cls=4, explicit_zero_prob=True,
               use_batch_labels=True, num_batch_labels=2, domain_spec_batchnorm="do_affine", do_dab=True)
    model = TransformerModel(cfg).eval()
    vocab = make_vocab()
    export_pretrained(model, vocab, cfg, tmp_path / "out", layout=layout, weights_format=fmt)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"args.json", "vocab.json"} <= names
    weights = tmp_path / "out" / ("best_model.pt" if fmt == "pt" else "best_model.safetensors")
    if fmt == "pt":
        raw = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file

        raw = load_file(str(weights))
    assert any("Wqkv" in k for k in raw) == (layout == "flash")
    args = json.loads((tmp_path / "out" / "args.json").read_text())
    assert args["embsize"] == 16 and args["nheads"] == 2 and args["fast_transformer"] == (layout == "flash")
    loaded = load_pretrained(tmp_path / "out")
    assert loaded.config.replace(use_fast_transformer=cfg.use_fast_transformer) == cfg
    assert loaded.vocab == vocab
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    ids, values = synthetic_cells(4, 8, 9, 1 + torch.rand(N_GENES))
    labels = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        o1 = model(ids, values, batch_labels=labels, CLS=True, MVC=True)
        o2 = loaded.model(ids, values, batch_labels=labels, CLS=True, MVC=True)
    for field in ("mlm_output", "mlm_zero_probs", "cls_output", "mvc_output", "dab_output", "cell_emb"):
        assert torch.allclose(getattr(o1, field), getattr(o2, field), atol=1e-6), field


def test_load_errors_name_the_problem(tmp_path):
    folder, _ = _whole_human_like(tmp_path)
    with pytest.raises(InputError, match="no such folder"):
        load_pretrained(tmp_path / "nope")
    for name in ("args.json", "vocab.json"):
        broken = tmp_path / f"no_{name}"
        broken.mkdir()
        for other in ("args.json", "vocab.json", "best_model.pt"):
            if other != name:
                (broken / other).write_bytes((folder / other).read_bytes())
        with pytest.raises(InputError, match=re.escape(name)):
            load_pretrained(broken)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for other in ("args.json", "vocab.json"):
        (no_weights / other).write_bytes((folder / other).read_bytes())
    with pytest.raises(InputError, match="best_model.pt"):
        load_pretrained(no_weights)
    with pytest.raises(InputError, match="Valid options"):
        load_pretrained(folder, not_an_option=1)
    # An unknown tensor is listed by name.
    state = torch.load(folder / "best_model.pt", weights_only=True)
    state["mystery_head.weight"] = torch.zeros(2)
    torch.save(state, folder / "best_model.pt")
    with pytest.raises(InputError, match="mystery_head.weight"):
        load_pretrained(folder)
    del state["mystery_head.weight"]
    # args.json that contradicts the tensors.
    torch.save(state, folder / "best_model.pt")
    args = json.loads((folder / "args.json").read_text())
    (folder / "args.json").write_text(json.dumps({**args, "embsize": 64}))
    with pytest.raises(InputError, match="d_model"):
        load_pretrained(folder)
    (folder / "args.json").write_text(json.dumps(args))
    # A pickled object is refused instead of being executed.
    torch.save({"encoder.embedding.weight": torch.zeros(1), "obj": _Pickled()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="tensor-only"):
        from pertflow.foundation.scgpt.checkpoint import load_state_dict_file

        load_state_dict_file(tmp_path / "evil.pt")


class _Pickled:
    pass


def test_optional_heads_dropped_renamed_or_initialised(tmp_path):
    folder, source = _whole_human_like(tmp_path)
    # Switching a head off drops its tensors, and says so.
    loaded = load_pretrained(folder, do_mvc=False, use_generative_training=False)
    assert not hasattr(loaded.model, "mvc_decoder")
    assert set(loaded.report.dropped) == {"mvc_decoder.gene2query.weight", "mvc_decoder.gene2query.bias",
                                          "mvc_decoder.W.weight", "flag_encoder.weight"}
    # A new classifier needs allow_missing_heads.
    with pytest.raises(InputError, match="allow_missing_heads"):
        load_pretrained(folder, n_cls=5)
    loaded = load_pretrained(folder, n_cls=5, allow_missing_heads=True)
    assert loaded.report.initialized and all(k.startswith("cls_decoder.") for k in loaded.report.initialized)
    # Old checkpoints: DDP "module." prefix and an always-built 1-class cls_decoder.
    state = torch.load(folder / "best_model.pt", weights_only=True)
    old = OrderedDict(("module." + k, v) for k, v in state.items())
    head = TransformerModel(tiny(d_model=32, nhead=4, d_hid=48, nlayers=2, n_cls=2)).cls_decoder.state_dict()
    for k, v in head.items():
        old["module.cls_decoder." + k] = v[:1] if k.startswith("out_layer") else v
    torch.save(old, folder / "best_model.pt")
    loaded = load_pretrained(folder)
    assert any(k.startswith("cls_decoder.") for k in loaded.report.dropped)
    a, b, valid = _encode_pair(source, loaded.model)
    assert torch.allclose(a[valid], b[valid], atol=1e-6)
    # A fine-tuned classifier (K rows) is kept, with K read from the tensors.
    sd = {k: v for k, v in state.items()}
    for k, v in TransformerModel(tiny(d_model=32, nhead=4, d_hid=48, nlayers=2, n_cls=7, nlayers_cls=2)
                                 ).cls_decoder.state_dict().items():
        sd["cls_decoder." + k] = v
    torch.save(sd, folder / "best_model.pt")
    loaded = load_pretrained(folder)
    assert (loaded.config.n_cls, loaded.config.nlayers_cls) == (7, 2) and not loaded.report.dropped


def test_infer_architecture_reads_heads_off_the_tensors():
    cfg = tiny(input_emb_style="category", n_input_bins=53, do_mvc=True, mvc_decoder_style="concat query",
               use_batch_labels=True, num_batch_labels=4, domain_spec_batchnorm="dsbn", n_cls=3)
    found = infer_architecture(TransformerModel(cfg).state_dict())
    assert found["input_emb_style"] == "category" and found["n_input_bins"] == 53
    assert found["mvc_decoder_style"] == "concat query" and found["n_cls"] == 3
    assert found["domain_spec_batchnorm"] == "dsbn" and found["num_batch_labels"] == 4
    assert found["nlayers"] == 2 and found["d_hid"] == 32


def test_generator_starts_from_a_foundation_checkpoint_and_predicts(tmp_path):
    folder, source = _whole_human_like(tmp_path)
    loaded = load_pretrained(folder, kind="generator", prefixes=("encoder", "value_encoder", "transformer_encoder"),
                             do_mvc=False)
    gen = loaded.model
    assert isinstance(gen, TransformerGenerator)
    assert torch.equal(gen.encoder.embedding.weight, source.encoder.embedding.weight)
    assert any(k.startswith("pert_encoder.") for k in loaded.report.initialized)
    assert "flag_encoder.weight" in loaded.report.dropped
    assert gen.pert_encoder.padding_idx == 2 and gen.pert_encoder.weight.shape[0] == 3
    values = torch.rand(3, N_GENES) * (torch.rand(3, N_GENES) > 0.5)
    flags = torch.zeros(3, N_GENES, dtype=torch.long)
    flags[:, 4] = 1
    ids = torch.arange(N_GENES)
    pred = gen.pred_perturb(values, flags, ids, include_zero_gene="all")
    assert pred.shape == (3, N_GENES) and torch.isfinite(pred).all()
    batchwise = gen.pred_perturb(values, flags, ids, include_zero_gene="batch-wise")
    assert bool((batchwise[:, values.ne(0).any(0).logical_not()] == 0).all())


def test_generator_affine_decoder_is_a_times_x_plus_b():
    gen = TransformerGenerator(tiny(d_model=16, nhead=2, d_hid=16)).eval()
    ids, values = synthetic_cells(2, 5, 1, torch.ones(N_GENES), with_cls=False)
    flags = torch.zeros_like(ids)
    with torch.no_grad():
        h = gen.encode(ids, values, flags)
        a = gen.decoder.coeff_decoder(h).pred
        b = gen.decoder.bias_decoder(h).pred
        assert torch.allclose(gen(ids, values, flags).mlm_output, a * values + b, atol=1e-6)


def test_multiomic_model_uses_modality_embeddings():
    cfg = tiny(d_model=16, nhead=2, d_hid=16, use_mod=True, ntokens_mod=3, do_mvc=True,
               use_batch_labels=True, num_batch_labels=2)
    model = MultiOmicTransformerModel(cfg).eval()
    assert model.decoder.fc[0].weight.shape == (16, 32)
    ids, values = synthetic_cells(4, 8, 2, 1 + torch.rand(N_GENES))
    mods = torch.randint(0, 3, ids.shape)
    with torch.no_grad():
        out = model(ids, values, batch_labels=torch.tensor([0, 1, 0, 1]), mod_types=mods, MVC=True)
        other = model(ids, values, batch_labels=torch.tensor([0, 1, 0, 1]), mod_types=(mods + 1) % 3, MVC=True)
    assert out.mlm_output.shape == ids.shape and out.mvc_output.shape == ids.shape
    assert not torch.allclose(out.mlm_output, other.mlm_output)


def test_config_from_and_to_scgpt_args():
    vocab = make_vocab()
    args = {"embsize": 64, "nheads": 4, "d_hid": 96, "nlayers": 3, "n_layers_cls": 3, "dropout": 0.2,
            "pad_token": "<pad>", "pad_value": -2, "mask_value": -1, "n_bins": 51, "input_emb_style": "category",
            "fast_transformer": "False", "training_tasks": "pcpt", "lr": 1e-4, "DSBN": False}
    cfg = ScGPTConfig.from_scgpt_args(args, vocab)
    assert (cfg.d_model, cfg.nhead, cfg.d_hid, cfg.nlayers, cfg.n_input_bins) == (64, 4, 96, 3, 53)
    assert cfg.use_fast_transformer is False and cfg.use_generative_training is False
    assert cfg.pad_token_id == PAD and cfg.cls_token_id == CLS and cfg.ntoken == NTOKEN
    assert cfg.extra["lr"] == 1e-4
    back = cfg.to_scgpt_args()
    assert back["n_bins"] == 51 and back["embsize"] == 64
    assert ScGPTConfig.from_scgpt_args(back, vocab) == cfg
    with pytest.raises(InputError, match="divisible"):
        cfg.replace(nhead=5)
    with pytest.raises(InputError, match="Valid options"):
        cfg.replace(embsize=3)
    with pytest.raises(InputError, match="num_batch_labels"):
        tiny(use_batch_labels=True)


# ============================================================================ frozen extraction


@pytest.fixture()
def extractor_model():
    model = TransformerModel(tiny(d_model=16, nhead=2, d_hid=16, max_seq_len=12)).eval()
    return model


def test_extractor_shapes_masks_and_scatter(extractor_model):
    genes = gene_names(8) + ["NOT_A_GENE", "G20", "<cls>"]
    expr = torch.rand(3, len(genes))
    ex = FrozenScGPTExtractor(extractor_model, make_vocab(), warmup_batches=2)
    assert not any(p.requires_grad for p in extractor_model.parameters())
    raw = ex.extract(expr, genes, normalize=False)
    assert raw.features.shape == (3, len(genes), 16)
    assert raw.mask.tolist() == [True] * 8 + [False, True, False]
    assert bool((raw.features[:, ~raw.mask] == 0).all())
    # Same as running the encoder by hand: <cls> (value = pad_value) first, then the valid genes.
    ids = torch.tensor([CLS] + list(range(8)) + [20]).expand(3, -1)
    values = torch.cat([torch.full((3, 1), PAD_VALUE), expr[:, :8], expr[:, 9:10]], 1)
    with torch.no_grad():
        direct = extractor_model.encode(ids, values)
    assert torch.allclose(raw.features[:, raw.mask], direct[:, 1:], atol=1e-6)
    same = ex.extract(expr, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -1, 20, CLS]), normalize=False)
    assert torch.allclose(same.features, raw.features)
    with pytest.raises(InputError, match="genes"):
        ex.extract(expr[:, :5], genes)


def test_extractor_in_blocks_encodes_each_block_on_its_own(extractor_model):
    genes = gene_names(8) + ["NOT_A_GENE", "G20"]
    expr = torch.rand(3, len(genes))
    ex = FrozenScGPTExtractor(extractor_model, make_vocab())
    whole = ex.extract(expr, genes, normalize=False)
    one_block = ex.extract_in_blocks(expr, genes, block=len(genes))
    assert torch.allclose(one_block.features, whole.features) and torch.equal(one_block.mask, whole.mask)
    blocks = ex.extract_in_blocks(expr, genes, block=4)  # genes 0-3, 4-7, then NOT_A_GENE and G20
    assert blocks.features.shape == whole.features.shape and torch.equal(blocks.mask, whole.mask)
    for start in (0, 4, 8):
        alone = ex.extract(expr[:, start:start + 4], genes[start:start + 4], normalize=False)
        assert torch.allclose(blocks.features[:, start:start + 4], alone.features, atol=1e-6)
    # a gene's features see its own block only: not those of the whole sequence
    assert not torch.allclose(blocks.features[:, :4], whole.features[:, :4], atol=1e-4)


def test_extractor_samples_when_genes_do_not_fit(extractor_model):
    genes = gene_names(30)  # 30 + 1 > max_seq_len = 12
    expr = torch.rand(2, 30)
    ex = FrozenScGPTExtractor(extractor_model, make_vocab(), seed=3)
    first = ex.extract(expr, genes, normalize=False)
    assert int(first.mask.sum()) == 11
    assert bool((first.features[:, ~first.mask] == 0).all())
    assert bool((first.features[:, first.mask].abs().sum(-1) > 0).all())
    second = ex.extract(expr, genes, normalize=False)
    assert not torch.equal(first.mask, second.mask)  # a new draw per call
    replay = FrozenScGPTExtractor(extractor_model, make_vocab(), seed=3).extract(expr, genes, normalize=False)
    assert torch.equal(replay.mask, first.mask) and torch.allclose(replay.features, first.features)


def test_extractor_normalisation_warms_up_then_freezes(extractor_model):
    genes = gene_names(10)
    ex = FrozenScGPTExtractor(extractor_model, make_vocab(), warmup_batches=3, target_std=0.5)
    batches = [torch.rand(8, 10) * 3 for _ in range(5)]
    outs = [ex.extract(b, genes) for b in batches[:3]]
    assert ex.normalizer.frozen
    frozen_state = {k: v.clone() for k, v in ex.normalizer.state_dict().items()}
    ex.extract(batches[3], genes)
    for k, v in ex.normalizer.state_dict().items():
        assert torch.equal(v, frozen_state[k]), k
    # The statistics are the exact pooled mean/std of the warm-up features.
    raw = torch.cat([ex.extract(b, genes, normalize=False).features.reshape(-1, 16) for b in batches[:3]])
    assert torch.allclose(ex.normalizer.mean.float(), raw.mean(0), atol=1e-5)
    assert torch.allclose(ex.normalizer.var.float(), raw.var(0, unbiased=False), atol=1e-5)
    pooled = torch.cat([ex.normalize(ex.extract(b, genes, normalize=False)).reshape(-1, 16) for b in batches[:3]])
    assert torch.allclose(pooled.std(0, unbiased=False), torch.full((16,), 0.5), atol=1e-3)
    assert outs[0].features.shape == (8, 10, 16)
    # The state saves and restores.
    fresh = RunningFeatureNorm(16, warmup_batches=3, target_std=0.5)
    fresh.load_state_dict(ex.normalizer.state_dict())
    assert fresh.frozen


def test_cell_embeddings(extractor_model):
    genes = gene_names(10) + ["UNKNOWN"]
    expr = torch.rand(4, 11) * (torch.rand(4, 11) > 0.3)
    ex = FrozenScGPTExtractor(extractor_model, make_vocab())
    emb = ex.cell_embeddings(expr, genes)
    assert emb.shape == (4, 16)
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    # Cell 0 alone, tokenised over its own non-zero genes, gives the same CLS embedding.
    nz = [i for i in range(10) if expr[0, i] != 0]
    ids = torch.tensor([[CLS] + nz])
    values = torch.cat([torch.tensor([[PAD_VALUE]]), expr[0:1, nz]], 1)
    with torch.no_grad():
        alone = F.normalize(extractor_model.encode(ids, values)[:, 0], dim=1)
    assert torch.allclose(emb[0], alone[0], atol=1e-5)


def test_bin_expression_follows_scgpt_binning():
    expr = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 0.0], [5.0, 5.0, 5.0, 0.0, 0.0, 0.0]])
    bins = bin_expression(expr, n_bins=5, generator=torch.Generator().manual_seed(0))
    assert bool((bins[expr == 0] == 0).all())
    assert bool(((bins[expr > 0] >= 1) & (bins[expr > 0] <= 4)).all())
    assert bins[0, 1:5].tolist() == sorted(bins[0, 1:5].tolist())
    ex = FrozenScGPTExtractor(TransformerModel(tiny(d_model=16, nhead=2, d_hid=16)), make_vocab(), n_bins=5)
    a = ex.extract(expr, gene_names(6), normalize=False)
    b = ex.extract(expr, gene_names(6), normalize=False)
    assert torch.equal(a.features, b.features)  # tie-breaks are seeded per call


def test_feature_cache_matches_live_features(tmp_path, extractor_model):
    genes = gene_names(9) + ["NOPE"]
    cells = torch.rand(10, 10) * 2
    ex = FrozenScGPTExtractor(extractor_model, make_vocab(), warmup_batches=1)
    ex.extract(cells[:5], genes)  # warm up and freeze
    assert ex.normalizer.frozen
    with FeatureCache.create(tmp_path / "cache", genes, n_cells=10, d_model=16, metadata={"note": "test"}) as w:
        for start in (0, 4, 8):
            idx = torch.arange(start, min(start + 4, 10))
            w.write(idx, ex.extract(cells[idx], genes, normalize=False))
    cache = FeatureCache(tmp_path / "cache", genes)
    order = torch.tensor([7, 2, 9])
    cached = cache.read(order)
    assert cached.features.shape == (3, 10, 16) and cached.mask.shape == (3, 10)
    live = ex.extract(cells[order], genes)
    from_cache = ex.normalize(cached)
    assert torch.allclose(from_cache, live.features, atol=2e-2, rtol=1e-2)
    assert torch.equal(cached.mask, live.mask.expand(3, -1))
    assert json.loads(next((tmp_path / "cache").glob("*.json")).read_text())["metadata"] == {"note": "test"}
    with pytest.raises(InputError, match="out of range"):
        cache.read([10])
    with pytest.raises(InputError, match="No feature cache"):
        FeatureCache(tmp_path / "cache", genes[:5])


def test_feature_cache_is_not_saved_when_incomplete(tmp_path, extractor_model):
    genes = gene_names(4)
    ex = FrozenScGPTExtractor(extractor_model, make_vocab())
    with pytest.raises(InputError, match="never written"):
        with FeatureCache.create(tmp_path / "c", genes, n_cells=3, d_model=16) as w:
            w.write([0], ex.extract(torch.rand(1, 4), genes, normalize=False))
    assert list((tmp_path / "c").iterdir()) == []
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureCache.create(tmp_path / "c", genes, n_cells=1, d_model=16) as w:
            w.write([0], ex.extract(torch.rand(1, 4), genes, normalize=False))
            raise RuntimeError("boom")
    assert list((tmp_path / "c").iterdir()) == []


def test_key_conversion_handles_aliases_and_refuses_linear_attention():
    w = torch.zeros(6, 2)
    state, layout = from_public_state_dict({
        "module.transformer_encoder.layers.3.self_attn._impl.Wqkv.weight": w,
        "transformer_encoder.layers.3.self_attn._impl.out_proj.bias": torch.zeros(2),
        "encoder.embedding.weight": torch.zeros(4, 2),
    })
    assert layout == "flash"
    assert set(state) == {"transformer_encoder.layers.3.self_attn.in_proj_weight",
                          "transformer_encoder.layers.3.self_attn.out_proj.bias", "encoder.embedding.weight"}
    assert to_public_state_dict(state, "torch").keys() == state.keys()
    with pytest.raises(InputError, match="linear"):
        from_public_state_dict({"transformer_encoder.fast_transformer_encoder.layers.0.x": w})


def test_avg_pool_ignores_padding_and_extractor_loads_a_folder(tmp_path):
    model = TransformerModel(tiny(d_model=16, nhead=2, d_hid=16, cell_emb_style="avg-pool")).eval()
    ids, values = synthetic_cells(1, 6, 0, 1 + torch.rand(N_GENES))
    padded_ids = torch.cat([ids, torch.full((1, 3), PAD)], 1)
    padded_values = torch.cat([values, torch.full((1, 3), PAD_VALUE)], 1)
    with torch.no_grad():
        short = model(ids, values).cell_emb
        long = model(padded_ids, padded_values).cell_emb
    assert torch.allclose(short, long, atol=1e-5)
    export_pretrained(model, make_vocab(), model.config, tmp_path / "m")
    ex = FrozenScGPTExtractor.from_pretrained(tmp_path / "m", warmup_batches=1)
    assert ex.cell_embeddings(torch.rand(2, 5) + 0.1, gene_names(5)).shape == (2, 16)
    assert ex.cls_value == PAD_VALUE


def test_loss_batch_contract_for_the_shared_trainer():
    weight = 1.0 + 2.0 * torch.rand(N_GENES)
    ids, values = synthetic_cells(16, 10, 5, weight)
    masked = random_mask_value(values, 0.3, MASK_VALUE, PAD_VALUE, keep_first_n=1)
    model = TransformerModel(tiny(d_model=16, nhead=2, d_hid=16, do_mvc=True, n_cls=2, do_dab=True,
                                  num_batch_labels=2))
    batch = {"gene_ids": ids, "values": values, "masked_values": masked.values,
             "cls_labels": torch.arange(16) % 2, "batch_labels": (torch.arange(16) // 8)}
    out = model.loss(batch)
    assert set(out.metrics) == {"mlm", "mvc", "cls", "dab"}
    history = adam_steps(model, lambda: model.loss(batch).loss, steps=6)
    assert history[-1] < history[0]
    gen = TransformerGenerator(tiny(d_model=16, nhead=2, d_hid=16))
    flags = torch.zeros_like(ids)
    gen_batch = {"gene_ids": ids, "values": values, "pert_flags": flags, "target_values": values * 2}
    history = adam_steps(gen, lambda: gen.loss(gen_batch).loss, steps=6)
    assert history[-1] < history[0] and "mse" in gen.loss(gen_batch).metrics
