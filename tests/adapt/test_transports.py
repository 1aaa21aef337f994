"""The adapter's transports on synthetic data with a known change of each gene (tensors and numpy
only, no model: the embedding is a frozen random value encoder, the kind a flow model reads its
control cells with), and the never-worse guarantee of the MMD fit.

The source is log1p counts of 60 genes; the target is another draw of the same genes, its
positive values scaled by ``a_g`` and shifted by ``b_g`` (zeros stay zeros) and a further
fraction ``p_g`` of its positive values dropped to 0.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pertflow.adapt import Adapter, AdapterConfig, AffineTransport, QuantileTransport, ShiftTransport, fit_transport
from pertflow.adapt.transports import transport_class
from pertflow.errors import InputError
from pertflow.nn.embeddings import ContinuousValueEncoder

N_CELLS, N_GENES = 400, 60


def encoder():
    torch.manual_seed(0)
    module = ContinuousValueEncoder(16, dropout=0.0).eval().requires_grad_(False)
    return lambda x: module(x)


def counts(rng, n):
    means = np.exp(np.linspace(-0.5, 2.0, N_GENES))
    return np.log1p(rng.negative_binomial(5, 5 / (5 + means), size=(n, N_GENES))).astype(np.float32)


@pytest.fixture(scope="module")
def scale_and_dropout():
    rng = np.random.default_rng(0)
    source, target = counts(rng, N_CELLS), counts(rng, N_CELLS)
    a, b, p = rng.uniform(0.6, 1.6, N_GENES), rng.uniform(0.2, 0.8, N_GENES), rng.uniform(0.0, 0.3, N_GENES)
    positive = target > 0
    target = np.where(positive, a * target + b, 0.0)
    target[positive & (rng.random(target.shape) < p)] = 0.0
    return {"source": source, "target": target.astype(np.float32), "a": a, "b": b, "p": p}


def fit(data, **settings):
    config = AdapterConfig(**{"eval_every": 25, "seed": 1, **settings})
    return fit_transport(encoder(), torch.from_numpy(data["source"]), torch.from_numpy(data["target"]), config)


def test_affine_recovers_the_scale_under_dropout_and_the_offset_without(scale_and_dropout):
    d = scale_and_dropout
    result = fit(d, transport="affine", steps=120, genes_per_step=None, batch_size=64)
    t = result.transport
    assert isinstance(t, AffineTransport) and result.kept_step is not None
    assert result.mmd_after < 0.5 * result.mmd_before
    # the inverse of x -> a x + b on the positive values: its scale, whatever the extra dropout
    assert np.corrcoef(t.scale, 1 / d["a"])[0, 1] > 0.9
    assert np.median(np.abs(t.scale * d["a"] - 1)) < 0.25
    # the offset too where no extra dropout pulls the MMD's best fit away from it (quantile's case)
    rng = np.random.default_rng(3)
    source, target = counts(rng, N_CELLS), counts(rng, N_CELLS)
    target = np.where(target > 0, d["a"] * target + d["b"], 0.0).astype(np.float32)
    plain = fit({"source": source, "target": target}, transport="affine", steps=120, genes_per_step=None, batch_size=64)
    assert np.corrcoef(plain.transport.shift, -d["b"] / d["a"])[0, 1] > 0.8  # 0.89 measured: less sharp than the scale
    assert plain.mmd_after < 0.5 * plain.mmd_before


def test_quantile_matches_the_zero_fraction_and_mean(scale_and_dropout):
    d = scale_and_dropout
    result = fit(d, transport="quantile")
    assert isinstance(result.transport, QuantileTransport) and result.kept_step == 1
    assert result.mmd_after < 0.2 * result.mmd_before
    mapped = result.transport.apply(d["target"])
    source_zero, target_zero = (d["source"] == 0).mean(0), (d["target"] == 0).mean(0)
    assert np.abs(target_zero - source_zero).max() > 0.1  # the dropout differs before
    assert np.abs((mapped == 0).mean(0) - source_zero).max() < 0.06
    assert np.abs(mapped.mean(0) - d["source"].mean(0)).max() < 0.1 * d["source"].mean(0).max()
    # monotone: a larger value of a gene never maps lower
    order = np.argsort(d["target"][:, 5], kind="stable")
    positive = d["target"][order, 5] > 0
    assert np.all(np.diff(mapped[order, 5][positive]) >= -1e-6)
    np.testing.assert_array_equal(mapped, result.transport.apply(d["target"]))  # seeded: the same input, the same output


def test_shift_recovers_an_offset(scale_and_dropout):
    d = scale_and_dropout
    b = np.where(np.arange(N_GENES) % 2 == 0, d["b"], 0.0).astype(np.float32)
    result = fit({"source": d["source"], "target": counts(np.random.default_rng(5), N_CELLS) + b}, steps=150)
    s = result.transport.shift
    on = b != 0
    assert result.mmd_after < 0.5 * result.mmd_before
    assert np.corrcoef(s[on], -b[on])[0, 1] > 0.9
    assert abs(-s[on].mean() / b[on].mean() - 1) < 0.25


def test_a_too_large_step_never_makes_the_mmd_worse(scale_and_dropout):
    d = scale_and_dropout
    result = fit(d, transport="shift", lr=50.0, steps=60, eval_every=5, init="zero", patience=3)
    assert result.mmd_after <= result.mmd_before
    steps = [s for s, _, _ in result.history]
    assert result.kept_step is None or result.kept_step in steps
    rates = [lr for _, _, lr in result.history[1:]]
    assert rates[-1] < rates[0]  # the step was halved where the held-out MMD rose
    assert steps[-1] < 60  # and the fit stopped after `patience` rises
    # the same cells on both sides: no state beats the identity, which is kept and said so
    same = fit({"source": d["source"], "target": d["source"]}, lr=50.0, steps=30, eval_every=5, init="zero", patience=2)
    assert same.kept_step is None and not same.transport.shift.any() and same.mmd_after == same.mmd_before
    adapter = Adapter([f"G{i}" for i in range(N_GENES)], same.transport, AdapterConfig(), same.history,
                      kept_step=same.kept_step, mmd_before=same.mmd_before, mmd_after=same.mmd_after)
    assert "identity" in adapter.kept


def test_a_seed_repeats_each_transport(scale_and_dropout):
    for transport in ("shift", "affine", "quantile"):
        first, again = (fit(scale_and_dropout, transport=transport, steps=10, eval_every=5) for _ in range(2))
        assert first.history == again.history and first.kept_step == again.kept_step
        np.testing.assert_array_equal(first.transport.apply(scale_and_dropout["target"]),
                                      again.transport.apply(scale_and_dropout["target"]))


@pytest.mark.parametrize("transport", ["shift", "affine", "quantile"])
def test_each_transport_round_trips_through_its_files(scale_and_dropout, transport, tmp_path):
    result = fit(scale_and_dropout, transport=transport, steps=10, eval_every=5)
    genes = [f"G{i}" for i in range(N_GENES)]
    adapter = Adapter(genes, result.transport, AdapterConfig(transport=transport), result.history,
                      kept_step=result.kept_step, mmd_before=result.mmd_before, mmd_after=result.mmd_after)
    adapter.save(tmp_path)
    again = Adapter.load(tmp_path)
    assert again.transport.name == result.transport.name and again.kept_step == result.kept_step
    assert again.mmd_after == pytest.approx(result.mmd_after, rel=1e-5)
    np.testing.assert_allclose(again.apply(scale_and_dropout["target"]), adapter.apply(scale_and_dropout["target"]),
                               rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob("*.p*kl*"))


def test_a_format_1_folder_loads_as_a_shift(tmp_path):
    genes = ["A", "B", "C"]
    pd.DataFrame({"gene": genes, "shift": [0.5, -0.25, 0.0]}).to_csv(tmp_path / "shift.csv", index=False)
    pd.DataFrame({"step": [0, 10], "mmd": [0.3, 0.1]}).to_csv(tmp_path / "mmd.csv", index=False)
    settings = {"steps": 10, "lr": 0.05, "batch_size": 128, "genes_per_step": 64, "l2": 0.001, "min_bandwidth": 0.001,
                "max_cells": 5000, "eval_cells": 256, "eval_every": 10, "seed": 0}
    (tmp_path / "adapter.json").write_text(json.dumps({
        "format_version": 1, "settings": settings, "steps": 10, "mmd_before": 0.3, "mmd_after": 0.1, "genes": genes}))
    adapter = Adapter.load(tmp_path)
    assert isinstance(adapter.transport, ShiftTransport) and adapter.config.transport == "shift"
    np.testing.assert_allclose(adapter.apply(np.ones((2, 3), np.float32)), [[1.5, 0.75, 1.0]] * 2)
    assert adapter.mmd_before == 0.3 and adapter.mmd_after == 0.1


def test_an_unknown_transport_is_named_with_the_choices():
    with pytest.raises(InputError, match=r"unknown transport 'scale'.*shift, affine, quantile"):
        transport_class("scale")
    with pytest.raises(InputError, match="not a per-gene shift: map cells with Adapter.apply"):
        _ = Adapter(["A"], AffineTransport(np.ones(1), np.zeros(1)), AdapterConfig(), [(0, 1.0, 0.0)]).shift


def test_each_transport_maps_back_and_carries_a_change_onto_the_targets_scale():
    """``invert`` undoes ``apply`` where nothing was clipped, and a change made on the source's
    scale comes back on the target's: times the target's scale (``a``) for a scale change. The
    quantile map is checked on continuous values (on integer counts its knots tie)."""
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.6, 1.6, N_GENES), rng.uniform(0.2, 0.8, N_GENES)
    source = rng.lognormal(0.5, 0.4, size=(2000, N_GENES)).astype(np.float32)
    target = (a * rng.lognormal(0.5, 0.4, size=(2000, N_GENES)) + b).astype(np.float32)
    target[rng.random(target.shape) < 0.2] = 0.0  # dropout the source lacks
    transports = [QuantileTransport.fit(source, target), AffineTransport(1 / a, -b / a), ShiftTransport(-b)]
    middle = (target > np.quantile(target, 0.4, axis=0)) & (target < np.quantile(target, 0.8, axis=0))
    for transport in transports:
        mapped = transport.apply(target)
        back = transport.invert(mapped)
        assert np.median(np.abs(back - target)[middle]) < 0.05, transport.name
        change = transport.invert(mapped + 0.2) - back  # +0.2 on every gene, on the source's scale
        per_gene = np.nanmedian(np.where(middle, change, np.nan), axis=0) / 0.2
        expected = np.ones(N_GENES) if transport.name == "shift" else a
        assert np.median(np.abs(per_gene / expected - 1)) < 0.15, transport.name
    assert (transports[0].invert(np.zeros((3, N_GENES), np.float32)) == 0).all()  # nothing stays nothing


def test_the_quantile_map_carries_a_change_beyond_every_control_cell():
    """A perturbation can raise a gene above every control cell (interferon-stimulated genes in
    monocytes). Past its top quantile the quantile map keeps a value's excess, both ways, so a
    fold change over the top control cell survives a depth change (an offset in log1p space at
    high expression) instead of stopping at the top control value."""
    rng = np.random.default_rng(5)
    counts = rng.negative_binomial(5, 0.05, size=(2000, N_GENES))
    source = np.log1p(counts).astype(np.float32)
    target = np.log1p(rng.binomial(counts, 0.3) * (1 / 0.3 * 2)).astype(np.float32)  # thinned, normalised anew
    transport = QuantileTransport.fit(source, target)
    top = source.max(0)
    back = transport.invert(np.stack([top, top + 1.0]).astype(np.float32))
    np.testing.assert_allclose(back[1] - back[0], 1.0, atol=1e-5)  # +1 beyond the top stays +1
    assert np.median(np.abs(back[0] - target.max(0))) < 0.1  # the top maps onto the target's top
    beyond = transport.apply((target.max(0) + 0.5)[None, :].astype(np.float32))[0]
    np.testing.assert_allclose(beyond - transport.apply(target.max(0)[None, :])[0], 0.5, atol=1e-5)
    assert np.all(np.diff(transport.invert(np.linspace(0, top + 2, 50).astype(np.float32)), axis=0) >= -1e-6)


def test_a_gene_the_targets_controls_never_express_keeps_an_induced_response():
    """An interferon gene can be 0 in every target control cell (thinned) and still be induced:
    read backwards, a value above the source's top comes back with the two files' offset at high
    expression, not as the target's 0; a gene constant in the source comes back as it is."""
    rng = np.random.default_rng(6)
    counts = rng.negative_binomial(5, 0.05, size=(2000, N_GENES))
    source = np.log1p(counts).astype(np.float32)
    target = np.log1p(rng.binomial(counts, 0.3) * (1 / 0.3 * 2)).astype(np.float32)
    silent, constant = 0, 1
    source[:, silent] = np.log1p(rng.poisson(0.05, 2000))  # rare in the source's controls
    target[:, silent] = 0.0  # never in the target's
    source[:, constant] = 0.0
    transport = QuantileTransport.fit(source, target)
    assert transport.top_offset == pytest.approx(np.log(2.0), abs=0.25)  # normalised to twice the depth
    cells = np.zeros((3, N_GENES), np.float32)
    top, offset = source[:, silent].max(), transport.top_offset
    cells[:, silent] = [top + 2.0, top * 0.5, top]
    cells[:, constant] = [1.5, 0.2, 0.0]
    back = transport.invert(cells)
    assert back[0, silent] == pytest.approx(top + 2.0 + offset, abs=1e-5)  # carried with the offset
    assert back[1, silent] == 0.0 and back[2, silent] == 0.0  # within the source's controls: the target's 0
    np.testing.assert_allclose(back[:, constant], cells[:, constant])


# ---------------------------------------------------------------------------- one transport per context
def context_dependent_change():
    """A source file of three cell lines (200 controls each) and a target whose technical change
    differs by line: line_A's log1p values halved, line_B's expressed values raised by 0.8,
    line_C unchanged. No one per-gene map undoes all three."""
    import anndata as ad

    from pertflow.data import PerturbationData
    from pertflow.data.synthetic import make_synthetic

    adata = make_synthetic(n_genes=30, n_singles=2, n_combos=0, cells_per_group=10, controls_per_context=200,
                           n_effect_genes=5, seed=1)
    source = PerturbationData.from_anndata(adata)
    x = source.log_expression(np.arange(adata.n_obs), np.arange(adata.n_vars))
    line = adata.obs["cell_type"].to_numpy()
    changed = np.where(line[:, None] == "line_A", 0.5 * x, np.where(line[:, None] == "line_B", x + 0.8 * (x > 0), x))
    target = ad.AnnData(changed.astype(np.float32), obs=adata.obs.copy(), var=adata.var.copy(),
                        uns={"log1p": {"base": None}})
    return source, PerturbationData.from_anndata(target), x, changed, line


def expression_model(source, folder):
    """A tiny latent-shift (a few steps): its control embedding is each gene's expression itself,
    so the adapter's held-out MMD sees every change of the controls."""
    from pertflow import api
    from pertflow.data import SplitView, make_split

    view = SplitView(source, make_split(source, "random", test_fraction=0.25))
    return api.train("latent-shift", view, None, folder, sets=["model.n_components=4", "model.hidden=16",
                     "model.decoder_hidden=16", "model.decoder_steps=5", "train.max_steps=5", "train.val_every=5"])


def test_per_context_maps_undo_a_change_that_differs_by_context(tmp_path):
    from pertflow import api

    source, target, x, changed, line = context_dependent_change()
    model = expression_model(source, tmp_path / "run")
    settings = {"transport": "quantile", "per_context": True, "min_context_cells": 100}
    adapter = api.adapt(model, source, target, tmp_path / "adapter", settings=settings)
    assert sorted(adapter.by_context) == ["line_A", "line_B", "line_C"] and not adapter.info["pooled_contexts"]
    controls = source.is_control
    for context in ("line_A", "line_B"):
        rows = controls & (line == context)
        truth = x[rows].mean(0)
        own = np.abs(adapter.apply(changed[rows], context).mean(0) - truth).mean()
        pooled = np.abs(adapter.apply(changed[rows]).mean(0) - truth).mean()
        assert own < 0.15 and own < 0.35 * pooled, (context, own, pooled)  # 0.09 against 0.42 and 0.37 here
        back = adapter.invert(adapter.apply(changed[rows], context), context)
        assert np.abs(back.mean(0) - changed[rows].mean(0)).mean() < 0.05
    loaded = Adapter.load(tmp_path / "adapter")
    assert set(loaded.context_mmd) == set(adapter.context_mmd)
    for context, (before, after) in adapter.context_mmd.items():
        assert loaded.context_mmd[context] == pytest.approx((before, after)) and after <= before
    for context in ("line_A", "line_B", "line_C", "not_a_line"):  # an unknown context gets the pooled map
        np.testing.assert_allclose(loaded.apply(changed[:50], context), adapter.apply(changed[:50], context), atol=1e-6)
    # a context with too few controls on a side is left to the pooled map, and said so
    few = api.adapt(model, source, target, settings={**settings, "min_context_cells": 250})
    assert few.by_context == {} and few.info["pooled_contexts"] == ["line_A", "line_B", "line_C"]


def test_per_context_needs_a_context_both_files_name(tmp_path):
    from pertflow import api
    from pertflow.data import PerturbationData

    source, target, *_ = context_dependent_change()
    renamed = target.adata.copy()
    renamed.obs["cell_type"] = "lab2_" + renamed.obs["cell_type"].astype(str)
    model = expression_model(source, tmp_path / "run")
    with pytest.raises(InputError, match="Relabel one file's context column"):
        api.adapt(model, source, PerturbationData.from_anndata(renamed),
                  settings={"transport": "quantile", "per_context": True})


def test_a_context_with_few_controls_falls_back_to_the_pooled_map_and_overwriting_keeps_other_folders(tmp_path):
    from pertflow import api
    from pertflow.data import PerturbationData

    source, target, *_ = context_dependent_change()
    adata = target.adata
    line_c = np.flatnonzero((adata.obs["cell_type"] == "line_C").to_numpy() & target.is_control)
    few = PerturbationData.from_anndata(adata[np.setdiff1d(np.arange(adata.n_obs), line_c[3:])].copy())
    model = expression_model(source, tmp_path / "run")
    settings = {"transport": "quantile", "per_context": True, "min_context_cells": 100}
    folder = tmp_path / "adapter"
    adapter = api.adapt(model, source, few, folder, settings=settings)  # 3 line_C controls: no error
    assert sorted(adapter.by_context) == ["line_A", "line_B"] and adapter.info["pooled_contexts"] == ["line_C"]
    assert sorted(p.name for p in folder.glob("context_*")) == ["context_0", "context_1"]
    (folder / "context_notes").mkdir()  # a folder of the user's beside the adapter's
    api.adapt(model, source, few, folder, settings={"transport": "quantile"}, overwrite=True)
    assert sorted(p.name for p in folder.glob("context_*")) == ["context_notes"]  # the old tables went, not it
    assert Adapter.load(folder).by_context == {}
