"""The benchmark's plots: the shared 2-D embedding of predicted and real cells, and a run's
training losses."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
from evaldata import CONTROL, TEST_PERTS

from pertflow.benchmark import _write_pred_embedding, _write_real_embedding
from pertflow.eval.plots import plot_embeddings, plot_training, project, shared_pca


def _cells(synthetic, context: str, label: str) -> np.ndarray:
    obs = synthetic.real.obs
    return synthetic.real.X[((obs["cell_type"] == context) & (obs["condition"] == label)).to_numpy()]


def test_the_embedding_is_the_real_cells_pca_and_a_prediction_is_projected_not_refitted(synthetic):
    from sklearn.decomposition import PCA

    control, perturbed = _cells(synthetic, "c1", CONTROL), _cells(synthetic, "c1", "A")
    real = np.vstack([control, perturbed]).astype(np.float64)
    for n_genes in (None, 12):
        projection = shared_pca(control, perturbed, n_genes=n_genes)
        coords = project(real, projection)
        # the real cells' coordinates are their own first two principal components (up to each
        # axis' sign), on the genes with the largest mean shift (A moves 10 of the 60)
        genes = np.arange(real.shape[1]) if n_genes is None else \
            np.argsort(-np.abs(perturbed.mean(0) - control.mean(0)))[:n_genes]
        reference = PCA(n_components=2).fit_transform(real[:, genes])
        signs = np.sign((coords * reference).sum(axis=0))
        np.testing.assert_allclose(coords * signs, reference, atol=1e-6)
        assert coords[:, 0].var() >= coords[:, 1].var()
        assert np.count_nonzero(np.abs(projection.components).sum(axis=0)) == len(genes)
        # other cells land where the real cells' PCA puts them: a prediction shifted by a vector
        # moves by that vector's projection on the real cells' axes
        shift = np.linspace(-1, 1, real.shape[1])
        moved = project(real + shift, projection)
        np.testing.assert_allclose(moved - coords, np.broadcast_to(shift @ projection.components.T, coords.shape),
                                   atol=1e-9)
    # on the shifted genes the perturbed cells stand apart from the controls
    xy = project(real, shared_pca(control, perturbed))
    gap = np.linalg.norm(xy[:len(control)].mean(0) - xy[len(control):].mean(0))
    assert gap > 2 * np.sqrt(xy[:len(control)].var(0).sum())


def test_benchmark_writes_the_shared_embedding_and_predicted_real_cells_land_on_the_real_ones(synthetic, tmp_path):
    split_dir = tmp_path / "runs" / "task"
    inputs = SimpleNamespace(real=synthetic.real, pert_col="condition", control=CONTROL, context_col="cell_type")
    _write_real_embedding(split_dir, inputs)
    for model, pred in (("perfect", synthetic.real), ("no-change", _no_change(synthetic.real))):
        (split_dir / model).mkdir(parents=True)
        _write_pred_embedding(split_dir / model, inputs, pred)
    with np.load(split_dir / "embedding.npz") as real, np.load(split_dir / "perfect" / "embedding.npz") as perfect, \
            np.load(split_dir / "no-change" / "embedding.npz") as none:
        assert len(real["context"]) == 2 * len(TEST_PERTS)  # every held-out (context, perturbation)
        for case in range(len(real["context"])):
            truth = real["xy"][(real["case"] == case) & (real["kind"] == 1)]
            # a prediction that is the real cells sits exactly on the real perturbed cells' coordinates
            np.testing.assert_allclose(perfect["xy"][perfect["case"] == case], truth, atol=1e-4)
            # one that predicts the controls sits on the controls, away from the perturbed cells
            predicted = none["xy"][none["case"] == case].mean(axis=0)
            controls = real["xy"][(real["case"] == case) & (real["kind"] == 0)].mean(axis=0)
            assert np.linalg.norm(predicted - controls) < 0.5 * np.linalg.norm(truth.mean(axis=0) - controls)
    results = pd.DataFrame([{"task": "task", "fold": "", "context": c, "perturbation": p}
                            for c in ("c1", "c2") for p in TEST_PERTS])
    paths = plot_embeddings(results, tmp_path, ["perfect", "no-change", "ceiling"])
    assert [p.name for p in paths] == ["task_embedding.png", "task_embedding_2.png"]  # 6 perturbations, 5 a page
    assert all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def _no_change(real):
    """Each context's perturbed cells replaced by (a cycle of) its control cells."""
    pred = real.copy()
    for context in ("c1", "c2"):
        in_ctx = (real.obs["cell_type"] == context).to_numpy()
        controls = real.X[in_ctx & (real.obs["condition"] == CONTROL).to_numpy()]
        rows = np.flatnonzero(in_ctx & (real.obs["condition"] != CONTROL).to_numpy())
        pred.X[rows] = controls[np.arange(rows.size) % len(controls)]
    return pred


def test_training_plot_shows_both_streams_and_the_foundation(tmp_path):
    run = tmp_path / "run"
    (run / "foundation").mkdir(parents=True)
    steps = np.arange(5, 105, 5)
    pd.DataFrame({"step": steps, "loss": 3 / steps, "mse_expr": 2 / steps, "mse_latent": 1 / steps}).to_csv(
        run / "history.csv", index=False)
    pd.DataFrame({"step": steps, "loss": 800 / steps}).to_csv(run / "foundation" / "history.csv", index=False)
    path = plot_training(run, tmp_path / "plots" / "ccfm_training.png", "ccfm")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    assert plot_training(tmp_path / "baseline", tmp_path / "plots" / "none.png", "additive") is None
    assert not (tmp_path / "plots" / "none.png").exists()


def test_figure_titles_speak_no_config_keys():
    """A reader of a figure sees words, not config keys such as predict.interval (issue 31, item 8):
    no string in the plotting module names a config section's key."""
    import ast
    import re

    import pertflow.eval.plots as plots

    strings = [node.value for node in ast.walk(ast.parse(open(plots.__file__).read()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    human = [s for s in strings if " " in s]  # titles, labels and messages (not keys or paths)
    assert not [s for s in human if re.search(r"\b(predict|train|model)\.[a-z_]+", s)]
