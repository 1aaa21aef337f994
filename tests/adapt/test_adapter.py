"""The MMD domain adapter: it recovers a known shift of real control cells, repeats under a seed,
never densifies a sparse file whole, feeds its shift to the model's input only, matches genes by
name; and ``train --genes`` trains on a gene panel.

The model is a flow model with random weights on a panel of Kang's genes: its control encoder is
then a fixed random nonlinear map of each gene's value, and identifying a shift through it needs
no training.
"""

from __future__ import annotations

import json
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pertflow import api
from pertflow.adapt import Adapter, AdapterConfig, AffineTransport, ShiftTransport
from pertflow.cli import main
from pertflow.data import PerturbationData, SplitView, make_split
from pertflow.data import dataset as dataset_module
from pertflow.data.loading import ExpressionSource
from pertflow.data.values import SAMPLED_ROWS
from pertflow.errors import InputError
from pertflow.models.base import PerturbationModel
from pertflow.models.cfm.config import CFMConfig
from pertflow.models.cfm.model import CFM
from pertflow.models.prior import Prior

N_PANEL, N_SHIFTED = 120, 40
FAST = ["--steps", "150", "--batch-size", "64", "--genes-per-step", "40", "--seed", "3", "--eval-every", "50", "--eval-cells", "128"]


def random_flow_model(view: SplitView, run_dir, center: bool = False) -> CFM:
    """A cfm with random weights on the view's genes, saved to ``run_dir`` (no training)."""
    torch.manual_seed(0)
    model = CFM.from_view(view, CFMConfig(d_model=32, n_heads=4, n_layers=1, center=center))
    model.prior = Prior.fit("none", view)
    model.save(run_dir)
    return model


def write_h5ad(path, x: sp.csr_matrix, obs: pd.DataFrame, genes) -> None:
    ad.AnnData(sp.csr_matrix(x, dtype=np.float32), obs=obs, var=pd.DataFrame(index=list(genes))).write_h5ad(path)


@pytest.fixture(scope="module")
def kang_halves(shared_data, tmp_path_factory):
    """Kang's control cells split in two random halves: S (``source.h5ad``) and T
    (``target.h5ad``, plus 150 stimulated cells); T has a known positive shift on 40 genes of a
    120-gene panel (a negative shift of log1p values would clip zeros, which no shift undoes).
    Both files keep all 6998 genes (the model's panel is matched by name, the rest dropped)."""
    folder = tmp_path_factory.mktemp("kang_halves")
    kang = PerturbationData.read(shared_data / "kang18_pbmc_ifnb.h5ad", backed=True)
    controls = np.flatnonzero(kang.is_control)
    x = kang.log_expression_csr(controls)
    panel_idx = np.sort(np.argsort(-np.asarray((x > 0).mean(0)).ravel(), kind="stable")[:N_PANEL])
    panel = [str(g) for g in kang.gene_names[panel_idx]]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(controls))
    half_s, half_t = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])
    delta = np.zeros(N_PANEL, np.float32)
    delta[rng.choice(N_PANEL, N_SHIFTED, replace=False)] = rng.uniform(0.3, 1.2, N_SHIFTED)
    obs = kang.adata.obs[["condition", "cell_type"]]
    write_h5ad(folder / "source.h5ad", x[half_s], obs.iloc[controls[half_s]], kang.gene_names)
    target = x[half_t].toarray()
    target[:, panel_idx] += delta
    stimulated = np.flatnonzero(~kang.is_control)[:150]
    write_h5ad(folder / "target.h5ad", sp.vstack([sp.csr_matrix(target), kang.log_expression_csr(stimulated)]),
               pd.concat([obs.iloc[controls[half_t]], obs.iloc[stimulated]]), kang.gene_names)
    view = SplitView(kang, make_split(kang, "random", test_fraction=0.2), genes=panel)
    random_flow_model(view, folder / "run")
    return {"folder": folder, "delta": delta, "panel": panel, "n_target_controls": len(half_t)}


def adapt_cli(halves, out, *flags) -> int:
    f = halves["folder"]
    return main(["adapt", "--run", str(f / "run"), "--source-data", str(f / "source.h5ad"), "--data", str(f / "target.h5ad"),
                 "--out", str(out), *flags])


def test_adapt_recovers_a_known_shift_and_the_mmd_falls(kang_halves, tmp_path, capsys):
    assert adapt_cli(kang_halves, tmp_path / "adapter", *FAST) == 0
    assert "MMD" in capsys.readouterr().out
    shift = pd.read_csv(tmp_path / "adapter" / "shift.csv")
    assert list(shift.columns) == ["gene", "shift"] and list(shift["gene"]) == kang_halves["panel"]
    s, delta = shift["shift"].to_numpy(), kang_halves["delta"]
    on = delta != 0
    assert np.corrcoef(s[on], -delta[on])[0, 1] > 0.9
    assert np.abs(s[~on]).mean() < 0.15 * delta[on].mean()  # near 0 where nothing was shifted
    meta = api.Adapter.load(tmp_path / "adapter")
    assert meta.mmd_after < 0.2 * meta.mmd_before and meta.kept_step is not None
    assert meta.info["target_cells"] == kang_halves["n_target_controls"]  # control cells only
    history = pd.read_csv(tmp_path / "adapter" / "mmd.csv")
    assert list(history.columns) == ["step", "mmd", "lr"] and history["step"].iloc[-1] <= 150
    assert meta.kept_step in list(history["step"]) and meta.mmd_after == pytest.approx(history["mmd"].min(), rel=1e-5)
    assert (tmp_path / "adapter" / "mmd.png").stat().st_size > 0
    # a technical change of the same cells: the target's controls sit among the source's once transported
    assert (tmp_path / "adapter" / "controls.png").stat().st_size > 0
    support = meta.info["support"]
    assert support["trusted"] and support["outside_after"] < 0.1 and support["outside_after"] <= support["outside_before"]
    assert not list((tmp_path / "adapter").glob("*.p*kl*"))
    capsys.readouterr()
    assert adapt_cli(kang_halves, tmp_path / "adapter", "--steps", "1") == 2  # refused before any computing
    assert "--overwrite" in capsys.readouterr().err
    assert len(pd.read_csv(tmp_path / "adapter" / "mmd.csv")) == len(history)


def test_a_seed_repeats_a_run_exactly(kang_halves, tmp_path):
    f = kang_halves["folder"]
    runs = [api.adapt(f / "run", f / "source.h5ad", f / "target.h5ad", settings={"steps": 8, "seed": seed, "eval_every": 4, "eval_cells": 32})
            for seed in (5, 5, 6)]
    np.testing.assert_array_equal(runs[0].shift, runs[1].shift)
    assert runs[0].history == runs[1].history
    assert not np.array_equal(runs[0].shift, runs[2].shift)


def test_an_explicit_list_of_source_files_pools_their_controls(kang_halves, tmp_path):
    f = kang_halves["folder"]
    source = ad.read_h5ad(f / "source.h5ad")
    cut = source.n_obs // 3
    source[:cut].write_h5ad(tmp_path / "a.h5ad")
    source[cut:].write_h5ad(tmp_path / "b.h5ad")
    settings = {"steps": 4, "seed": 1, "eval_every": 2, "eval_cells": 32, "batch_size": 32}
    whole = api.adapt(f / "run", f / "source.h5ad", f / "target.h5ad", settings=settings)
    parts = api.adapt(f / "run", [tmp_path / "a.h5ad", tmp_path / "b.h5ad"], f / "target.h5ad", settings=settings)
    assert parts.info["source_cells"] == whole.info["source_cells"] == source.n_obs
    assert parts.info["source_data"] == [str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad")]
    np.testing.assert_array_equal(parts.shift, whole.shift)  # the same cells in the same order: the same run
    capped = api.adapt(f / "run", [tmp_path / "a.h5ad", tmp_path / "b.h5ad"], f / "target.h5ad",
                       settings={**settings, "max_cells": 100})
    assert capped.info["source_cells"] == 100


def test_a_sparse_target_is_read_in_row_chunks_of_its_controls(kang_halves, monkeypatch):
    f = kang_halves["folder"]
    chunk = 50
    monkeypatch.setattr(dataset_module, "MAX_VALUES_PER_READ", chunk * 6998)
    dense_rows, rows_read = [], []
    toarray = sp.csr_matrix.toarray
    read_rows = ExpressionSource.read_rows

    def recording_toarray(self, *args, **kwargs):
        dense_rows.append(self.shape[0])
        return toarray(self, *args, **kwargs)

    def recording_read_rows(self, rows):
        if not isinstance(rows, slice):
            rows_read.append((self, np.asarray(rows)))
        return read_rows(self, rows)

    monkeypatch.setattr(sp.csr_matrix, "toarray", recording_toarray)
    monkeypatch.setattr(ExpressionSource, "read_rows", recording_read_rows)
    target = PerturbationData.read(f / "target.h5ad", backed=True)
    assert target.source.is_sparse and target.source.on_disk
    dense_rows.clear()
    rows_read.clear()
    api.adapt(f / "run", f / "source.h5ad", target, settings={"steps": 1, "eval_cells": 8, "batch_size": 8})
    assert dense_rows and max(dense_rows) <= chunk  # densified a chunk of rows at a time, never whole
    target_reads = [r for source, r in rows_read if source is target.source]
    assert np.array_equal(np.sort(np.concatenate(target_reads)), np.flatnonzero(target.is_control))  # its controls only
    assert all(len(r) <= chunk for r in target_reads)  # in chunks
    # the source file (opened by adapt): the only larger read is its value-check sample (sparse, never densified)
    n_source = ad.read_h5ad(f / "source.h5ad", backed="r").n_obs
    assert [len(r) for source, r in rows_read if source is not target.source and len(r) > chunk] == [min(SAMPLED_ROWS, n_source)]


def test_missing_genes_are_named_with_the_fix(kang_halves, tmp_path):
    f = kang_halves["folder"]
    lacking = ad.read_h5ad(f / "target.h5ad")
    lacking = lacking[:, [g for g in lacking.var_names if g not in kang_halves["panel"][:7]]].copy()
    lacking.write_h5ad(tmp_path / "lacking.h5ad")
    with pytest.raises(InputError, match=r"7 genes are not in .*lacking.h5ad.*--genes FILE") as err:
        api.adapt(f / "run", f / "source.h5ad", tmp_path / "lacking.h5ad", settings={"steps": 1})
    assert kang_halves["panel"][0] in str(err.value)


def test_models_without_a_usable_control_embedding_are_refused(synthetic_adata, tmp_path):
    data = PerturbationData.from_anndata(synthetic_adata.copy())
    view = SplitView(data, make_split(data, "random", test_fraction=0.25))
    baseline = api.train("mean", view, None, tmp_path / "mean")
    with pytest.raises(InputError, match="exposes no control embedding"):
        api.adapt(baseline, data, data)
    centred = random_flow_model(view, tmp_path / "centred", center=True)
    with pytest.raises(InputError, match="model.center=false"):
        api.adapt(centred, data, data)  # the default transport is a shift, which a centred model cannot see
    # a change of scale reaches a centred model: an affine adapter is learnt (a few steps)
    adapter = api.adapt(centred, data, data, settings={"transport": "affine", "steps": 2, "eval_every": 1})
    assert adapter.config.transport == "affine"


def test_latent_shift_is_adapted_through_each_genes_expression(synthetic_adata, tmp_path):
    """latent-shift reads control cells through a linear embedding of their expression: its
    control embedding is the expression itself, so every transport can align it (issue 29, item 2)."""
    data = PerturbationData.from_anndata(synthetic_adata.copy())
    view = SplitView(data, make_split(data, "context", test_context="line_C"))
    model = api.train("latent-shift", view, None, tmp_path / "ls", sets=["model.n_components=4", "model.hidden=16",
                      "model.decoder_hidden=16", "model.decoder_steps=5", "train.max_steps=5", "train.val_every=5"])
    controls = torch.rand(3, len(model.genes))
    torch.testing.assert_close(model.control_embedding(controls), controls.unsqueeze(-1))
    adapter = api.adapt(model, data, data, settings={"transport": "quantile", "steps": 2, "eval_every": 1})
    assert adapter.config.transport == "quantile" and adapter.mmd_after <= adapter.mmd_before + 1e-9


# ---------------------------------------------------------------------------- predict with an adapter
@pytest.fixture(scope="module")
def synthetic_run(synthetic_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic_run")
    data = PerturbationData.read(synthetic_file)
    split = make_split(data, "context", test_context="line_C")
    split.save(folder / "split.json")
    model = random_flow_model(SplitView(data, split), folder / "run")
    shift = np.where(np.arange(len(model.genes)) % 3 == 0, 0.5, -0.25).astype(np.float32)
    Adapter(list(model.genes), ShiftTransport(shift), AdapterConfig(), [(0, 1.0, 0.0), (1, 0.5, 0.05)]).save(folder / "adapter")
    return {"folder": folder, "data": data, "shift": shift}


def recorded_predict(run, data, split, **kwargs):
    """Predict with the saved model, recording the control cells its ``generate`` is given."""
    model = PerturbationModel.load(run)
    seen = []
    generate = model.generate

    def recording(controls, *args, **kw):
        seen.append(controls.copy())
        return generate(controls, *args, **kw)

    model.generate = recording
    return api.predict(model, data, split, **kwargs), seen


def test_an_adapter_shifts_the_model_input_not_the_controls_in_the_file(synthetic_run, tmp_path):
    f, shift = synthetic_run["folder"], synthetic_run["shift"]
    plain, plain_inputs = recorded_predict(f / "run", synthetic_run["data"], f / "split.json", sets=["predict.ode_steps=1"])
    adapted, adapted_inputs = recorded_predict(f / "run", synthetic_run["data"], f / "split.json", out=tmp_path / "pred.h5ad",
                                               adapter=f / "adapter", sets=["predict.ode_steps=1"])
    for before, after in zip(plain_inputs, adapted_inputs, strict=True):
        np.testing.assert_allclose(after, np.clip(before + shift, 0, None), rtol=1e-6)
    is_control = (adapted.obs["source"] == "control").to_numpy()
    np.testing.assert_array_equal(adapted.X[is_control], plain.X[is_control])
    assert not np.allclose(adapted.X[~is_control], plain.X[~is_control])
    means = pd.read_csv(tmp_path / "pred_means.csv", index_col=0)
    perts = sorted(set(adapted.obs.loc[~is_control, "perturbation"]))
    assert sorted(means.index) == perts and list(means.columns) == list(adapted.var_names)
    first = (adapted.obs["perturbation"] == perts[0]).to_numpy() & ~is_control
    np.testing.assert_allclose(means.loc[perts[0]].to_numpy(), adapted.X[first].mean(0), rtol=1e-5)


def test_predict_matches_genes_by_name(synthetic_run, synthetic_adata, tmp_path):
    f = synthetic_run["folder"]
    genes = list(synthetic_adata.var_names)
    reordered = synthetic_adata[:, genes[::-1]].copy()  # the same genes in another order, and one extra gene
    reordered = ad.concat([reordered, ad.AnnData(sp.csr_matrix((reordered.n_obs, 1)), obs=reordered.obs,
                                                 var=pd.DataFrame(index=["EXTRA"]))], axis=1, merge="first")
    data = PerturbationData.from_anndata(reordered)
    pred = api.predict(f / "run", data, f / "split.json", adapter=f / "adapter", sets=["predict.ode_steps=1"])
    direct = api.predict(f / "run", synthetic_run["data"], f / "split.json", adapter=f / "adapter", sets=["predict.ode_steps=1"])
    assert list(pred.var_names) == genes  # the split's genes, in the split's order; EXTRA dropped
    np.testing.assert_allclose(pred.X, direct.X, rtol=1e-5, atol=1e-6)
    # a split whose genes are in another order than the model's: the file follows the split, each column its gene
    reversed_split = json.loads((f / "split.json").read_text())
    reversed_split["genes"] = reversed_split["genes"][::-1]
    (tmp_path / "reversed.json").write_text(json.dumps(reversed_split))
    flipped = api.predict(f / "run", synthetic_run["data"], tmp_path / "reversed.json", adapter=f / "adapter",
                          sets=["predict.ode_steps=1"])
    assert list(flipped.var_names) == genes[::-1]
    np.testing.assert_allclose(flipped[:, genes].X, direct.X, rtol=1e-5, atol=1e-6)
    lacking = PerturbationData.from_anndata(synthetic_adata[:, genes[3:]].copy())  # its own split names its own genes
    with pytest.raises(InputError, match=r"3 genes are not among the split's genes, e.g. \['G0000'.*pertflow train \.\.\. --genes FILE"):
        api.predict(f / "run", lacking, make_split(lacking, "context", test_context="line_C"), adapter=f / "adapter")


def test_shift_back_adds_the_predicted_change_to_the_unshifted_controls(synthetic_run):
    f, shift = synthetic_run["folder"], synthetic_run["shift"]
    model = PerturbationModel.load(f / "run")
    outputs = []
    generate = model.generate
    model.generate = lambda controls, *a, **kw: outputs.append(generate(controls, *a, **kw)) or outputs[-1]
    _, inputs = recorded_predict(f / "run", synthetic_run["data"], f / "split.json", adapter=f / "adapter", sets=["predict.ode_steps=1"])
    back = api.predict(model, synthetic_run["data"], f / "split.json", adapter=f / "adapter", shift_back=True,
                       sets=["predict.ode_steps=1"])
    plain, plain_inputs = recorded_predict(f / "run", synthetic_run["data"], f / "split.json", sets=["predict.ode_steps=1"])
    predicted = (back.obs["source"] == "predicted").to_numpy()
    expected = np.concatenate([np.clip(own + (out - shifted), 0, None)
                               for own, shifted, out in zip(plain_inputs, inputs, outputs, strict=True)])
    np.testing.assert_allclose(back.X[predicted], expected, rtol=1e-5, atol=1e-6)  # the model's genes are the split's here
    # not the shift subtracted: the shifted controls were clipped at 0, which subtracting cannot undo
    assert not np.allclose(back.X[predicted], np.clip(np.concatenate(outputs) - shift, 0, None), atol=1e-3)


def test_shift_back_reads_the_change_on_the_datas_scale(synthetic_run, tmp_path):
    """An affine adapter (scale a, offset b): a change the model makes on the training scale comes
    back divided by a, where the control cell expresses the gene and where it has a 0 alike."""
    f = synthetic_run["folder"]
    model = PerturbationModel.load(f / "run")
    n = len(model.genes)
    scale = np.where(np.arange(n) % 2 == 0, 2.0, 0.5).astype(np.float32)
    Adapter(list(model.genes), AffineTransport(scale, np.full(n, 0.1, np.float32)), AdapterConfig(),
            [(0, 1.0, 0.0), (1, 0.5, 0.05)]).save(tmp_path / "affine")
    outputs = []
    generate = model.generate
    model.generate = lambda controls, *a, **kw: outputs.append(generate(controls, *a, **kw)) or outputs[-1]
    _, mapped = recorded_predict(f / "run", synthetic_run["data"], f / "split.json", adapter=tmp_path / "affine",
                                 sets=["predict.ode_steps=1"])
    back = api.predict(model, synthetic_run["data"], f / "split.json", adapter=tmp_path / "affine", shift_back=True,
                       sets=["predict.ode_steps=1"])
    _, own = recorded_predict(f / "run", synthetic_run["data"], f / "split.json", sets=["predict.ode_steps=1"])
    own, mapped, outputs = np.concatenate(own), np.concatenate(mapped), np.concatenate(outputs)
    change = outputs - mapped
    expected = np.clip(own + change / scale, 0, None)
    predicted = (back.obs["source"] == "predicted").to_numpy()
    np.testing.assert_allclose(back.X[predicted], expected, rtol=1e-5, atol=1e-5)
    assert (own > 0).any() and (own == 0).any()  # both kinds of control value were read


def test_shift_back_needs_an_adapter(synthetic_run):
    f = synthetic_run["folder"]
    with pytest.raises(InputError, match="shift_back=True"):
        api.predict(f / "run", synthetic_run["data"], f / "split.json", shift_back=True)


# ---------------------------------------------------------------------------- train --genes
def test_train_on_a_gene_panel(synthetic_file, tmp_path, capsys):
    split = tmp_path / "split.json"
    assert main(["split", "--data", str(synthetic_file), "--kind", "random", "--out", str(split)]) == 0
    panel = ["G0042", "G0007", "G0013", "G0001"]
    (tmp_path / "genes.txt").write_text("# a shared panel\n" + "\n".join(panel) + "\n\n")
    assert main(["train", "--model", "mean", "--data", str(synthetic_file), "--split", str(split), "--out", str(tmp_path / "run"),
                 "--genes", str(tmp_path / "genes.txt")]) == 0
    assert PerturbationModel.load(tmp_path / "run").genes == sorted(panel)  # the split's order
    (tmp_path / "bad.txt").write_text("G0001\nNOT_A_GENE\n")
    assert main(["train", "--model", "mean", "--data", str(synthetic_file), "--split", str(split), "--out", str(tmp_path / "bad"),
                 "--genes", str(tmp_path / "bad.txt")]) == 2
    err = capsys.readouterr().err
    assert "1 genes are not" in err and "NOT_A_GENE" in err


@pytest.mark.parametrize("transport", ["affine", "quantile"])
def test_predict_reads_the_controls_through_any_transport(synthetic_run, transport, tmp_path):
    """An affine or quantile adapter maps the control cells the model reads at prediction (issue
    29, item 2), as the shift does; the controls written to the file stay the data's own."""
    from pertflow.adapt import AffineTransport, QuantileTransport

    f = synthetic_run["folder"]
    model = PerturbationModel.load(f / "run")
    n = len(model.genes)
    rng = np.random.default_rng(0)
    if transport == "affine":
        mapping = AffineTransport(np.linspace(0.5, 2.0, n), np.full(n, 0.1))
    else:
        mapping = QuantileTransport.fit(rng.gamma(2.0, 1.0, (300, n)), rng.gamma(1.0, 0.5, (300, n)), seed=0)
    Adapter(list(model.genes), mapping, AdapterConfig(transport=transport), [(0, 1.0, 0.0), (1, 0.5, 0.05)]).save(
        tmp_path / "adapter")
    plain, plain_inputs = recorded_predict(f / "run", synthetic_run["data"], f / "split.json", sets=["predict.ode_steps=1"])
    adapted, adapted_inputs = recorded_predict(f / "run", synthetic_run["data"], f / "split.json", adapter=tmp_path / "adapter",
                                               sets=["predict.ode_steps=1"])
    loaded = Adapter.load(tmp_path / "adapter")
    for before, after in zip(plain_inputs, adapted_inputs, strict=True):
        np.testing.assert_allclose(after, loaded.apply(before), rtol=1e-5, atol=1e-6)
        assert not np.allclose(after, before)
    is_control = (adapted.obs["source"] == "control").to_numpy()
    np.testing.assert_array_equal(adapted.X[is_control], plain.X[is_control])


def test_predict_maps_each_contexts_controls_with_its_own_transport(synthetic_run, tmp_path):
    """A per-context adapter (``--per-context``) maps the test context's controls with that
    context's transport, not the pooled one, and carries the change back through it."""
    f = synthetic_run["folder"]
    model = PerturbationModel.load(f / "run")
    n = len(model.genes)
    own = AffineTransport(np.full(n, 2.0), np.zeros(n))
    Adapter(list(model.genes), ShiftTransport.identity(n), AdapterConfig(transport="affine", per_context=True),
            [(0, 1.0, 0.0)], by_context={"line_C": own, "line_A": AffineTransport(np.full(n, 0.5), np.zeros(n))},
            context_mmd={"line_C": (1.0, 0.5), "line_A": (1.0, 0.7)}).save(tmp_path / "adapter")
    seen = []
    generate = model.generate

    def recording(controls, *args, **kw):
        seen.append((controls.copy(), generate(controls, *args, **kw)))
        return seen[-1][1]

    model.generate = recording
    pred = api.predict(model, synthetic_run["data"], f / "split.json", adapter=tmp_path / "adapter", shift_back=True,
                       sets=["predict.ode_steps=1"])
    assert set(pred.obs["cell_type"]) == {"line_C"}  # the split's test context
    made = pred.X[(pred.obs["source"] == "predicted").to_numpy()]
    mapped = np.concatenate([controls for controls, _ in seen])
    generated = np.concatenate([cells for _, cells in seen])
    own_controls = mapped / 2.0  # line_C's transport doubles; the pooled one would leave them as they are
    change = (generated - mapped) / 2.0  # read back through line_C's
    np.testing.assert_allclose(made, np.clip(own_controls + change, 0, None), rtol=1e-5, atol=1e-5)
    # a per-context adapter without line_C's own map says that line_C goes through the pooled one
    Adapter(list(model.genes), ShiftTransport.identity(n), AdapterConfig(per_context=True), [(0, 1.0, 0.0)],
            by_context={"line_A": own}).save(tmp_path / "no_line_c")
    with pytest.warns(UserWarning, match=r"no transport of its own for test context\(s\) \['line_C'\]"):
        api.predict(f / "run", synthetic_run["data"], f / "split.json", adapter=tmp_path / "no_line_c",
                    sets=["predict.ode_steps=1"])


def test_controls_of_another_cell_type_are_outside_the_sources_support_and_warn(shared_data):
    """T-cell controls against monocyte controls: no transport of the controls makes one the
    other, so the adapter warns; the other half of the same cells is inside (about 1%)."""
    from pertflow.adapt.support import measure_support, warn_if_untrusted

    kang = PerturbationData.read(shared_data / "kang18_pbmc_ifnb.h5ad", backed=True)
    types = kang.adata.obs["cell_type"].astype(str).to_numpy()
    genes = np.argsort(-np.asarray((kang.log_expression_csr(np.flatnonzero(kang.is_control)[:2000]) > 0).mean(0)).ravel())[:200]

    def controls(cell_type: str) -> np.ndarray:
        rows = np.flatnonzero(kang.is_control & (types == cell_type))[:600]
        return kang.log_expression_csr(rows)[:, np.sort(genes)].toarray()

    t_cells, mono = controls("CD4T"), controls("CD14+Mono")
    half = len(t_cells) // 2
    same = measure_support(t_cells[:half], t_cells[half:], t_cells[half:])
    assert same.trusted and same.outside_after < 0.1
    other = measure_support(t_cells, mono, mono)
    assert not other.trusted and other.outside_after > 0.5
    with pytest.warns(UserWarning, match="outside the source's controls"):
        warn_if_untrusted(other)


def test_cfmvc_is_adapted_through_each_genes_expression(synthetic_adata, tmp_path):
    """CFM-VC reads a control cell through its count encoder, an MLP of the whole expression
    vector: its control embedding is each gene's expression, so an adapter aligns the encoder's
    input gene by gene (issue 29, item 2), and predicting through one maps what the encoder reads."""
    data = PerturbationData.from_anndata(synthetic_adata.copy())
    view = SplitView(data, make_split(data, "context", test_context="line_C"))
    model = api.train("cfmvc", view, None, tmp_path / "cfmvc", sets=[
        "model.n_latent=4", "model.n_tech=2", "model.hidden=16", "model.n_layers=1", "model.flow_hidden=16",
        "model.d_context=8", "model.vae_steps=5", "model.predict_residual=true", "train.max_steps=5",
        "train.val_every=5", "train.progress=false", "predict.ode_steps=1"])
    controls = torch.rand(3, len(model.genes))
    torch.testing.assert_close(model.control_embedding(controls), controls.unsqueeze(-1))
    adapter = api.adapt(model, data, data, settings={"transport": "quantile"})
    assert adapter.mmd_after <= adapter.mmd_before + 1e-9
    pred = api.predict(model, data, view.split, adapter=adapter, shift_back=True)
    assert np.isfinite(pred.X).all() and (pred.obs["source"] == "predicted").any()
