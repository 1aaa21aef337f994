"""The gene-space flow model learns on synthetic data, and its runs save, load and resume exactly."""

import numpy as np
import pandas as pd
import pytest
import torch

from pertflow.api import predict, train
from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.batches import PairedBatches
from pertflow.data.view import SplitView
from pertflow.errors import InputError
from pertflow.models.base import PerturbationModel
from pertflow.models.config import PredictConfig
from pertflow.models.cfm.config import CFMConfig
from pertflow.models.cfm.model import CFM
from pertflow.models.cfm.module import CFMModule
from pertflow.models.flow import flow_matching
from pertflow.nn.attention import DifferentialAttention
from pertflow.train import TrainConfig

TINY = CFMConfig(d_model=32, n_heads=4, n_layers=1, genes_per_step=60, dropout=0.0)
# two midpoint steps, 4 network calls (4 RK4 steps take 16): a tiny run spends most of its time
# generating validation cells, at every val_every and once more to choose the prediction mode
FEW_STEPS = PredictConfig(ode_steps=2, ode_method="midpoint")


def make_module(config: CFMConfig, gene_tokens, n_tokens, first_other, pad, unk) -> CFMModule:
    return CFMModule(config, flow_matching(config), gene_tokens, n_tokens, first_other, pad, unk)


@pytest.fixture(scope="module")
def view(synthetic_adata):
    data = PerturbationData.from_anndata(synthetic_adata)
    return SplitView(data, make_split(data, "random", test_fraction=0.25))


def mean_error(model, view, perturbations, context="line_A"):
    """Mean squared error between generated and real mean profiles of test perturbations."""
    data = view.data
    test = view.rows.test
    rng = np.random.default_rng(0)
    errors = []
    for pert in perturbations:
        rows = test[(data.perturbations[test] == pert) & (data.contexts[test] == context)]
        real = data.log_expression(rows)
        controls = view.expression.get(view.control_rows(context)[: len(rows)])
        errors.append(((model.generate(controls, pert, context, rng).mean(0) - real.mean(0)) ** 2).mean())
    return float(np.mean(errors))


def test_tiny_model_learns(view, tmp_path):
    perts = view.data.perturbation_names[:4]
    untrained = CFM.from_view(view, TINY, FEW_STEPS)
    torch.manual_seed(0)
    untrained.module = untrained.build_module()
    model = CFM.from_view(view, TINY, FEW_STEPS)
    config = TrainConfig(max_steps=150, batch_size=32, lr=2e-3, val_every=75, checkpoint_every=150, log_every=5, progress=False)
    model.fit(view, config, tmp_path)
    model.prediction_mode = "flow"  # the flow itself, whichever way validation chose to predict
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["loss"].tail(6).mean() < 0.6 * history["loss"].head(3).mean()
    assert history["val_loss"].dropna().iloc[-1] < history["val_loss"].dropna().iloc[0]
    before, after = mean_error(untrained, view, perts), mean_error(model, view, perts)
    assert after < 0.4 * before, (before, after)


def test_save_load_reproduces_predictions(view, tmp_path):
    model = CFM.from_view(view, TINY, FEW_STEPS)
    model.fit(view, TrainConfig(max_steps=3, batch_size=8, progress=False), tmp_path)
    model.save(tmp_path)
    again = PerturbationModel.load(tmp_path)
    assert isinstance(again, CFM)
    controls = view.expression.get(view.control_rows("line_B")[:10])
    pert = view.data.perturbation_names[0]
    a = model.generate(controls, pert, "line_B", np.random.default_rng(5))
    b = again.generate(controls, pert, "line_B", np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert (a >= 0).all()


def test_interrupted_run_resumes_to_the_same_weights(synthetic_file, tmp_path, monkeypatch):
    data = PerturbationData.read(synthetic_file)
    split = make_split(data, "combinations", seen=[2])
    sets = ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.genes_per_step=20", "predict.ode_steps=2",
            "predict.ode_method=euler", "train.batch_size=8", "train.max_steps=9", "train.checkpoint_every=3",
            "train.val_every=3", "train.val_batches=2", "train.progress=false"]
    train("cfm", data, split, tmp_path / "unbroken", sets=sets)

    original = PairedBatches.next_batch
    calls = {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 2 + 6:  # 2 validation batches are drawn first; then step 6, after the step-3 checkpoint
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(PairedBatches, "next_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train("cfm", data, split, tmp_path / "broken", sets=sets)
    monkeypatch.setattr(PairedBatches, "next_batch", original)
    assert not (tmp_path / "broken" / "model.json").exists()
    train("cfm", data, split, tmp_path / "broken", sets=sets, resume=True)
    a = PerturbationModel.load(tmp_path / "unbroken").state_tensors()
    b = PerturbationModel.load(tmp_path / "broken").state_tensors()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    pred = predict(tmp_path / "unbroken", data, split, seed=1)
    view = SplitView(data, split)  # a group is generated from every control of its context (predict.control_cells)
    generated = sum(PredictConfig().cells_to_generate(len(rows), len(view.control_rows(ctx)))
                    for (_, ctx), rows in view.test_groups().items())
    assert pred.n_obs == generated + len(split.test_controls)
    assert list(pred.var_names) == split.genes


def test_unseen_genetic_and_drug_perturbations(synthetic_adata, tmp_path):
    data = PerturbationData.from_anndata(synthetic_adata)
    held = data.perturbation_names[0]
    split = make_split(data, "perturbations", test_perturbations=[held], include_combinations=False)
    fit = SplitView(data, split)
    assert held in fit.vocab and fit.vocab.is_gene_token(held)  # the target gene's own token
    model = CFM.from_view(fit, CFMConfig(d_model=16, n_heads=2, n_layers=1), PredictConfig(ode_steps=2))
    model.trained_components = ["G0001"]
    assert model.known_components(held) == [held]  # a measured gene: its token is learnt from expression
    assert model.known_components("NOTAGENE") == ["<unk>"]  # never trained, no descriptor
    out = model.generate(fit.expression.get(fit.control_rows("line_A")[:3]), held, "line_A", np.random.default_rng(0))
    assert out.shape == (3, 60)

    from pertflow.data.synthetic import make_synthetic

    drugs = PerturbationData.from_anndata(make_synthetic(n_genes=30, n_singles=3, n_combos=1, cells_per_group=8,
                                                         controls_per_context=10, n_effect_genes=5, genetic=False))
    combo_parts = {c for p in drugs.perturbation_names if "+" in p for c in p.split("+")}
    held = next(p for p in drugs.perturbation_names if "+" not in p and p not in combo_parts)
    seen = next(p for p in drugs.perturbation_names if "+" not in p and p != held)
    split = make_split(drugs, "perturbations", test_perturbations=[held])
    fit = SplitView(drugs, split)
    assert fit.vocab.other_tokens and not fit.vocab.is_gene_token(seen)
    model = CFM.from_view(fit, CFMConfig(d_model=16, n_heads=2, n_layers=1, genes_per_step=30), PredictConfig(ode_steps=2))
    model.fit(fit, TrainConfig(max_steps=2, batch_size=4, progress=False), tmp_path)
    assert model.known_components(seen) == [seen]  # seen in training: its own token
    assert model.known_components(held) == ["<unk>"]  # held out, no descriptor
    assert model.generate(fit.expression.get(fit.control_rows("line_A")[:2]), held, "line_A", np.random.default_rng(0)).shape == (2, 30)


def test_non_gene_tokens_use_their_own_table():
    gene_tokens = torch.arange(2, 12)
    module = make_module(CFMConfig(d_model=16, n_heads=2, n_layers=1), gene_tokens, 14, 12, 0, 1)
    drug = torch.tensor([[12, 0]])
    gene = torch.tensor([[3, 0]])
    # zero-initialised drug table: an unseen drug adds nothing; a gene goes through the gene encoder
    assert torch.equal(module.perturbation_encoder(drug, module.gene_encoder), torch.zeros(1, 16))
    assert module.perturbation_encoder(gene, module.gene_encoder).abs().sum() > 0
    both = module.perturbation_encoder(torch.tensor([[3, 5]]), module.gene_encoder)
    each = [module.perturbation_encoder(torch.tensor([[i, 0]]), module.gene_encoder) for i in (3, 5)]
    torch.testing.assert_close(both, each[0] + each[1])  # a combination composes (sums) its tokens


def test_differential_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = DifferentialAttention(8, 2, depth=1)
    x, ref = torch.randn(3, 5, 8), torch.randn(3, 5, 8)

    def heads(t):
        return t.view(3, 5, 2, 4).transpose(1, 2)

    v = heads(attn.v(x))
    a1 = torch.softmax(heads(attn.q1(x)) @ heads(attn.k1(x)).transpose(-1, -2) / 2.0, -1)
    a2 = torch.softmax(heads(attn.q2(ref)) @ heads(attn.k2(ref)).transpose(-1, -2) / 2.0, -1)
    expected = attn.difference.head_norm((a1 - attn.difference.lam() * a2) @ v) * (1 - attn.difference.lambda_init)
    expected = attn.out(expected.transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(attn(x, ref), expected, rtol=1e-5, atol=1e-6)
    plain = DifferentialAttention(8, 2, depth=1, differential=False)
    assert not hasattr(plain, "q2")


def test_chunked_inference_covers_every_gene():
    torch.manual_seed(0)
    module = make_module(CFMConfig(d_model=16, n_heads=2, n_layers=1), torch.arange(2, 12), 14, 12, 0, 1)
    chunks = module.gene_chunks(4, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(chunks).tolist()) == list(range(10)) and len(chunks) == 3
    out = module.sample(torch.rand(3, 10), torch.tensor([[3, 0]] * 3), PredictConfig(gene_chunk=4, ode_steps=2), torch.Generator().manual_seed(1))
    assert out.shape == (3, 10) and (out >= 0).all()


def test_control_source_starts_the_flow_at_the_control_cells():
    config = CFMConfig(d_model=16, n_heads=2, n_layers=1, source="control", source_noise=0.0, coupling="ot")
    module = make_module(config, torch.arange(2, 12), 14, 12, 0, 1)
    control = torch.rand(4, 10)
    torch.testing.assert_close(module.flow.start(control, torch.Generator().manual_seed(0)), control)
    noisy = make_module(CFMConfig(d_model=16, n_heads=2, n_layers=1), torch.arange(2, 12), 14, 12, 0, 1)
    assert not torch.allclose(noisy.flow.start(control, torch.Generator().manual_seed(0)), control)
    out = module.loss({"target": torch.rand(4, 10), "control": control, "pert_ids": torch.tensor([[3, 0]] * 4)})
    assert torch.isfinite(out.loss)


def test_predict_settings_reach_the_network_and_the_architecture_stays(synthetic_file, tmp_path):
    data = PerturbationData.read(synthetic_file)
    split = make_split(data, "combinations", seen=[2])
    sets = ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "train.batch_size=8", "train.max_steps=3",
            "train.progress=false", "predict.ode_steps=3", "predict.ode_method=euler"]  # a network call a step
    model = train("cfm", data, split, tmp_path / "run", sets=sets)
    loaded = PerturbationModel.load(tmp_path / "run")
    assert loaded.predict_config.ode_steps == 3  # saved with the run
    loaded.prediction_mode = "flow"  # 3 steps of training lose to the prior on validation; the flow itself here
    one = predict(loaded, data, split, seed=1, sets=["predict.ode_steps=1"])
    seven = predict(loaded, data, split, seed=1, sets=["predict.ode_steps=7", "predict.gene_chunk=16"])
    assert not np.allclose(one.X, seven.X)
    assert model.config.d_model == 16
    with pytest.raises(InputError, match="fixed by the trained weights"):
        predict(tmp_path / "run", data, split, sets=["model.d_model=64"])


THREE_STEPS = PredictConfig(ode_steps=3)


def _randomised(module: CFMModule) -> CFMModule:
    """Random weights everywhere (a fresh decoder starts at zero velocity, which proves nothing)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.2)
    return module.eval()


def test_centred_flow_is_equivariant_to_a_per_gene_shift():
    """center=True: shifting every input cell by a per-gene constant shifts the output by it."""
    torch.manual_seed(0)
    control, target = torch.rand(6, 10) + 1.0, torch.rand(6, 10) + 1.0  # away from the clamp at 0
    shift = torch.linspace(0.5, 3.0, 10)
    ids = torch.tensor([[3, 0]] * 6)
    for source in ("control", "noise"):
        config = CFMConfig(d_model=16, n_heads=2, n_layers=1, dropout=0.0, source=source, center=True)
        module = _randomised(make_module(config, torch.arange(2, 12), 14, 12, 0, 1))
        out = module.sample(control, ids, THREE_STEPS, torch.Generator().manual_seed(1))
        assert not torch.allclose(out, control, atol=1e-2)  # the field moves the cells
        shifted = module.sample(control + shift, ids, THREE_STEPS, torch.Generator().manual_seed(1))
        kept = out > 0  # cells the clamp at 0 left alone (the shifted ones stay above it too)
        assert kept.float().mean() > 0.5
        torch.testing.assert_close(shifted[kept], (out + shift)[kept], rtol=1e-4, atol=1e-4)
        losses = []
        for s in (0.0, shift):
            torch.manual_seed(2)
            losses.append(module.loss({"target": target + s, "control": control + s, "pert_ids": ids}).loss)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    plain = CFMConfig(d_model=16, n_heads=2, n_layers=1, dropout=0.0, source="control")
    module = _randomised(make_module(plain, torch.arange(2, 12), 14, 12, 0, 1))
    low = control - 1.0  # near 0, where the value encoder is most sensitive
    out = module.sample(low, ids, THREE_STEPS, torch.Generator().manual_seed(1))
    shifted = module.sample(low + shift, ids, THREE_STEPS, torch.Generator().manual_seed(1))
    assert (shifted - out - shift)[out > 0].abs().max() > 1e-3  # ten times the centred tolerance


def _flow_from_the_controls(reference_cell: str) -> tuple[float, float]:
    """Trained without source noise on a perturbation that changes nothing: the variance of the
    generated over the control cells, and the largest error of the generated mean per gene."""
    torch.manual_seed(0)
    n_genes, batch = 8, 64
    config = CFMConfig(d_model=32, n_heads=4, n_layers=1, dropout=0.0, genes_per_step=n_genes, gamma=0.0,
                       source="control", source_noise=0.0, reference_cell=reference_cell)
    module = make_module(config, torch.arange(2, 2 + n_genes), n_genes + 4, n_genes + 2, 0, 1)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    ids = torch.tensor([[n_genes + 2, 0]])  # one non-gene perturbation token
    mu = torch.linspace(4.0, 6.0, n_genes)  # far from the clamp at 0
    for _ in range(300):
        batch_ = {"target": mu + torch.randn(batch, n_genes), "control": mu + torch.randn(batch, n_genes),
                  "pert_ids": ids.expand(batch, -1)}
        loss = module.loss(batch_).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    control = mu + torch.randn(256, n_genes)
    out = module.sample(control, ids.expand(256, -1), PredictConfig(ode_steps=8), torch.Generator().manual_seed(0))
    return float(out.var(0).mean() / control.var(0).mean()), float((out.mean(0) - mu).abs().max())


def test_flow_conditioned_on_another_control_cell_keeps_the_spread():
    """reference_cell='other' keeps the controls' spread; 'own' carries the cells to their mean."""
    kept, mean_error = _flow_from_the_controls("other")
    assert 0.6 < kept < 1.5 and mean_error < 0.4, (kept, mean_error)
    collapsed, _ = _flow_from_the_controls("own")
    assert collapsed < 0.5 * kept, (collapsed, kept)


def _mean_shift_errors(context_condition: bool) -> float:
    """Two contexts whose controls differ only in level, one responding +2, the other -1, learned
    by a centred flow (which removes the level from its tokens): the largest error of the
    generated mean shift over both contexts."""
    torch.manual_seed(0)
    n_genes, batch = 8, 32
    config = CFMConfig(d_model=32, n_heads=4, n_layers=1, dropout=0.0, genes_per_step=n_genes, gamma=0.0,
                       source="control", source_noise=0.1, center=True, context_condition=context_condition)
    module = make_module(config, torch.arange(2, 2 + n_genes), n_genes + 4, n_genes + 2, 0, 1)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    ids = torch.tensor([[n_genes + 2, 0]])
    contexts = {1.0: 2.0, 4.0: -1.0}  # control level -> response
    for step in range(200):
        level = list(contexts)[step % 2]
        control = level + 0.3 * torch.randn(batch, n_genes)
        target = level + contexts[level] + 0.3 * torch.randn(batch, n_genes)
        loss = module.loss({"target": target, "control": control, "pert_ids": ids.expand(batch, -1)}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    errors = []
    for level, response in contexts.items():
        control = level + 0.3 * torch.randn(128, n_genes)
        out = module.sample(control, ids.expand(128, -1), PredictConfig(ode_steps=4), torch.Generator().manual_seed(0))
        errors.append(float(((out - control).mean(0) - response).abs().max()))
    return max(errors)


def test_context_condition_lets_a_centred_flow_tell_contexts_apart():
    """Centred, the two contexts' cells look alike: without the context condition the flow can
    only learn one response for both; with it, each context's own."""
    with_context = _mean_shift_errors(True)
    assert with_context < 0.5, with_context
    without = _mean_shift_errors(False)
    assert without > 1.0, without
