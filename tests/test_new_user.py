"""What a new user met on their own data (issue 31): each problem reproduced, and the answer now."""

from __future__ import annotations

import numpy as np
import pytest

from pertflow.cli import main
from pertflow.data.dataset import PerturbationData
from pertflow.errors import InputError
from pertflow.models.registry import model_class
from pertflow.runtime import available_cores
from cli_helpers import one_error_line



def test_nan_perturbation_labels_stop_with_a_count_and_the_fix(synthetic_adata):
    adata = synthetic_adata.copy()
    col = "perturbation"
    labels = adata.obs[col].astype(object).to_numpy()
    labels[:7] = np.nan
    labels[7:9] = ""
    adata.obs[col] = labels
    with pytest.raises(InputError, match=r"9 cells have no perturbation label \(NaN or empty\) in obs\['perturbation'\]"):
        PerturbationData.from_anndata(adata, pert_col=col)


def test_labels_with_spaces_or_another_case_are_not_silently_two_perturbations(synthetic_adata):
    adata = synthetic_adata.copy()
    labels = adata.obs["perturbation"].astype(str).to_numpy().copy()
    first = next(p for p in labels if p != "ctrl")
    spaced = labels.copy()
    spaced[np.flatnonzero(labels == first)[:3]] = first + " "
    adata.obs["perturbation"] = spaced
    with pytest.raises(InputError, match="leading or trailing spaces"):
        PerturbationData.from_anndata(adata, pert_col="perturbation")
    cased = labels.copy()
    cased[np.flatnonzero(labels == first)[:3]] = first.lower() if first != first.lower() else first.upper()
    adata.obs["perturbation"] = cased
    with pytest.raises(InputError, match="differ only by case"):
        PerturbationData.from_anndata(adata, pert_col="perturbation")


def test_labels_of_mixed_types_that_read_the_same_are_refused(synthetic_adata):
    adata = synthetic_adata.copy()
    labels = adata.obs["perturbation"].astype(str).to_numpy().astype(object)
    labels[labels == "control"] = "0"
    labels[np.flatnonzero(labels == "0")[:5]] = 0  # the same control label, once as a number
    adata.obs["perturbation"] = labels
    with pytest.raises(InputError, match=r"mix types \(int, str\) that read as the same label"):
        PerturbationData.from_anndata(adata, pert_col="perturbation", control="0")


def test_a_context_column_with_missing_values_stops_too(synthetic_adata):
    adata = synthetic_adata.copy()
    contexts = adata.obs["cell_type"].astype(object).to_numpy()
    contexts[-4:] = None
    adata.obs["cell_type"] = contexts
    with pytest.raises(InputError, match=r"4 cells have no context label"):
        PerturbationData.from_anndata(adata, pert_col="perturbation", context_cols=["cell_type"])


def test_threads_outside_the_cores_are_refused_on_every_command(synthetic_file, tmp_path, capsys):
    too_many = available_cores() + 1
    for args in (["train", "--model", "mean", "--data", str(synthetic_file), "--split", "x.json", "--out", str(tmp_path / "r")],
                 ["evaluate", "--data", str(synthetic_file), "--split", "x.json", "--pred", "p.h5ad", "--out", str(tmp_path / "e")]):
        for bad in (0, too_many):
            assert main([*args, "--threads", str(bad)]) == 2
            line = one_error_line(capsys, args[0])
            assert f"--threads must be between 1 and the {available_cores()} cores" in line and f"got {bad}" in line


def test_a_misspelled_model_says_what_was_meant(synthetic_file, tmp_path, capsys):
    with pytest.raises(InputError, match="unknown model 'latentshift', did you mean 'latent-shift'"):
        model_class("latentshift")
    assert main(["train", "--model", "latentshift", "--data", str(synthetic_file), "--split", "x.json",
                 "--out", str(tmp_path / "r")]) == 2
    assert "did you mean 'latent-shift'" in one_error_line(capsys, "train")


def test_evaluate_shows_the_result_beside_the_baselines_and_the_ceiling(synthetic_file, tmp_path, capsys):
    data = str(synthetic_file)
    split = tmp_path / "split.json"
    assert main(["split", "--data", data, "--kind", "combinations", "--seen", "2", "--out", str(split)]) == 0
    assert main(["train", "--model", "mean", "--data", data, "--split", str(split), "--out", str(tmp_path / "run")]) == 0
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", data, "--split", str(split),
                 "--out", str(tmp_path / "pred.h5ad")]) == 0
    capsys.readouterr()
    args = ["evaluate", "--data", data, "--split", str(split), "--pred", str(tmp_path / "pred.h5ad")]
    assert main([*args, "--out", str(tmp_path / "eval"), "--de-cache", str(tmp_path / "de")]) == 0
    out = capsys.readouterr().out
    assert "beside the baselines and the noise ceiling" in out and "E-distance (lower is better)" in out
    for name in ("no-change", "additive", "linear", "context-shift", "ceiling"):
        assert name in out
    assert out.count("- the prediction ") == 2 and "is better; rank " in out  # a verdict per headline metric
    import pandas as pd

    table = pd.read_csv(tmp_path / "eval" / "yardstick.csv", index_col=0)
    pd.testing.assert_series_equal(table.loc["prediction"], table.loc["mean"], check_names=False, atol=1e-6)  # it is the mean
    assert main([*args, "--out", str(tmp_path / "alone"), "--no-baselines"]) == 0
    assert "beside the baselines" not in capsys.readouterr().out and not (tmp_path / "alone" / "yardstick.csv").exists()


def test_the_split_file_is_the_source_of_truth_for_its_control_label(synthetic_adata, tmp_path, capsys):
    adata = synthetic_adata.copy()
    labels = adata.obs["perturbation"].astype(str)
    adata.obs["perturbation"] = labels.where(labels != "control", "zero").to_numpy()  # a label detection does not know
    path = tmp_path / "data.h5ad"
    adata.write_h5ad(path)
    split = tmp_path / "split.json"
    assert main(["split", "--data", str(path), "--kind", "combinations", "--seen", "2", "--control", "zero",
                 "--out", str(split)]) == 0
    # later commands read the control label from the split: no --control again
    assert main(["train", "--model", "mean", "--data", str(path), "--split", str(split), "--out", str(tmp_path / "run")]) == 0
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(path), "--split", str(split),
                 "--out", str(tmp_path / "pred.h5ad")]) == 0
    assert main(["evaluate", "--data", str(path), "--split", str(split), "--pred", str(tmp_path / "pred.h5ad"),
                 "--out", str(tmp_path / "eval"), "--no-baselines"]) == 0


def test_training_ends_with_a_short_readable_summary(synthetic_file, tmp_path, capsys):
    data = str(synthetic_file)
    split = tmp_path / "split.json"
    assert main(["split", "--data", data, "--kind", "context", "--test-context", "line_A", "--out", str(split)]) == 0
    capsys.readouterr()
    sets = ["model.n_components=8", "model.hidden=16", "model.decoder_hidden=16", "model.decoder_steps=10",
            "train.max_steps=10", "train.val_every=10", "train.checkpoint_every=10", "train.progress=false"]
    args = ["train", "--model", "latent-shift", "--data", data, "--split", str(split), "--out", str(tmp_path / "run")]
    assert main([*args, *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "validation: the perturbed cells of the training context(s) line_" in out and "context transfer" in out
    assert "predicts with " in out and "higher is better" in out
    assert "{" not in out and "0.0000000" not in out  # no raw Python record, no unrounded floats
    assert main(["train", "--model", "mean", "--data", data, "--split", str(split), "--out", str(tmp_path / "mean")]) == 0
    out = capsys.readouterr().out
    assert "no network: nothing to checkpoint" in out and "checkpoints of a network" not in out


def test_a_model_trained_in_stages_names_each_progress_bar(synthetic_file, split_file, tmp_path, monkeypatch):
    import pertflow.train.engine as engine

    names = []
    real = engine.progress_bar
    monkeypatch.setattr(engine, "progress_bar", lambda total, desc, *a, **k: names.append(desc) or real(total, desc, *a, **k))
    sets = ["model.n_components=8", "model.hidden=16", "model.decoder_hidden=16", "model.decoder_steps=5",
            "train.max_steps=5", "train.val_every=5", "train.checkpoint_every=5", "train.progress=false"]
    args = ["train", "--model", "latent-shift", "--data", str(synthetic_file), "--split", str(split_file),
            "--out", str(tmp_path / "run")]
    assert main([*args, *[a for s in sets for a in ("--set", s)]]) == 0
    assert names == ["training decoder", "training predictor"]


def test_a_file_with_no_control_cells_or_no_bytes_is_told_so(synthetic_adata, tmp_path, capsys):
    adata = synthetic_adata[synthetic_adata.obs["perturbation"].astype(str) != "control"].copy()
    path = tmp_path / "no_controls.h5ad"
    adata.write_h5ad(path)
    assert main(["inspect", str(path)]) == 2
    assert "if the file holds no control cells at all, add them" in one_error_line(capsys, "inspect")
    empty = tmp_path / "empty.h5ad"
    empty.write_bytes(b"")
    assert main(["inspect", str(empty)]) == 2
    line = one_error_line(capsys, "inspect")
    assert "is empty (0 bytes)" in line and "signature" not in line


def test_help_imports_neither_torch_nor_anndata():
    """`pertflow --help` answers at once: building the parser reads no model, tensor or data library."""
    import subprocess
    import sys

    code = ("import sys\nfrom pertflow.cli import main\n"
            "for args in (['--help'], ['train', '--help'], ['split', '--help'], ['adapt', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'anndata', 'scanpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_a_label_the_model_never_saw_is_named_or_refused(synthetic_adata, tmp_path, capsys):
    """A perturbation renamed in the file to predict ('stim' trained, 'stimulated' asked) is not
    predicted silently: a model that reads unseen perturbations says so per label, one that can
    only predict no change for it refuses, naming the fix (issue 31, item 4)."""
    from pertflow import api
    from pertflow.data.splits import make_split
    from pertflow.data.view import SplitView

    data = PerturbationData.from_anndata(synthetic_adata.copy())
    split = make_split(data, "context", test_context="line_C")
    mean = api.train("mean", SplitView(data, split), None, tmp_path / "mean")
    additive = api.train("additive", SplitView(data, split), None, tmp_path / "additive")
    renamed = synthetic_adata.copy()
    test = renamed.obs_names.isin(split.test)
    old = sorted(set(renamed.obs.loc[test, "perturbation"].astype(str)))[0]
    labels = renamed.obs["perturbation"].astype(str).to_numpy()
    labels[test & (labels == old)] = old + "_renamed"
    renamed.obs["perturbation"] = labels
    new_data = PerturbationData.from_anndata(renamed)
    new_split = make_split(new_data, "context", test_context="line_C")
    capsys.readouterr()
    api.predict(mean, new_data, new_split)
    out = capsys.readouterr().out
    assert f"'{old}_renamed': the model has never seen" in out and "map it" in out
    with pytest.raises(InputError, match=r"model 'additive' has never seen .*can only predict no change.*map them"):
        api.predict(additive, new_data, new_split)


def test_a_model_carried_to_a_file_labelled_another_way(synthetic_adata, tmp_path, capsys):
    """The user's path of issue 31 (item 3): train on one file, predict another whose columns are
    named differently (condition / celltype / sample_id) and where one perturbation has another
    label. No loop of flags: the file's own spec is read, labels match by value, and the one that
    differs is named once with --map-labels."""
    import anndata as ad

    from pertflow.data.splits import make_split

    a_path, b_path = tmp_path / "a.h5ad", tmp_path / "b.h5ad"
    synthetic_adata.write_h5ad(a_path)
    a_data = PerturbationData.read(a_path)
    make_split(a_data, "context", test_context="line_C").save(tmp_path / "split_a.json")
    assert main(["train", "--model", "additive", "--data", str(a_path), "--split", str(tmp_path / "split_a.json"),
                 "--out", str(tmp_path / "run")]) == 0
    other = synthetic_adata.copy()
    other.obs = other.obs.rename(columns={"perturbation": "condition", "cell_type": "celltype", "batch": "sample_id"})
    other.obs["condition"] = other.obs["condition"].astype(str).str.replace("G0011", "KO11")
    other.write_h5ad(b_path)
    b_data = PerturbationData.read(b_path)
    assert b_data.spec.pert_col == "condition"
    make_split(b_data, "context", test_context="line_C").save(tmp_path / "split_b.json")
    predict = ["predict", "--run", str(tmp_path / "run"), "--data", str(b_path), "--split", str(tmp_path / "split_b.json")]
    capsys.readouterr()
    assert main([*predict, "--out", str(tmp_path / "refused.h5ad")]) == 2
    line = one_error_line(capsys, "predict")
    assert "never seen ['KO11']" in line and "--map-labels MODEL_LABEL=FILE_LABEL" in line
    assert main([*predict, "--out", str(tmp_path / "b_pred.h5ad"), "--map-labels", "G0011=KO11"]) == 0
    out = capsys.readouterr().out
    assert "read as the model's 'perturbation'" in out
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", str(a_path), "--split", str(tmp_path / "split_a.json"),
                 "--out", str(tmp_path / "a_pred.h5ad")]) == 0
    pred_a, pred_b = ad.read_h5ad(tmp_path / "a_pred.h5ad"), ad.read_h5ad(tmp_path / "b_pred.h5ad")

    def shift(pred, col, label):
        cells = (pred.obs[col].astype(str) == label).to_numpy()
        controls = (pred.obs["source"] == "control").to_numpy()
        return np.asarray(pred.X[cells]).mean(0) - np.asarray(pred.X[controls]).mean(0)

    assert "KO11" in set(pred_b.obs["condition"].astype(str))  # the file's own names and labels
    model = model_class("additive").load(tmp_path / "run")
    mapped = shift(pred_b, "condition", "KO11")  # predicted from 20 drawn controls: the draw's noise stays
    ours = np.corrcoef(mapped, model.predicted_delta("G0011", "line_C"))[0, 1]
    other = np.corrcoef(mapped, model.predicted_delta("G0003", "line_C"))[0, 1]
    assert ours > 0.7 and ours > other + 0.3, (ours, other)
    assert np.corrcoef(shift(pred_a, "perturbation", "G0011"), model.predicted_delta("G0011", "line_C"))[0, 1] > 0.7


def test_the_readme_python_example_runs_as_written(synthetic_file, tmp_path, monkeypatch):
    """The README's Python example names no label of one dataset: it runs as written on a file it
    has never seen (here with a few training steps instead of the CPU config's thousand)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("The same from Python:")
    code = readme[readme.index("```python", start) + len("```python"):readme.index("```", readme.index("```python", start) + 9)]
    assert "KLF1" not in code and "K562" not in code
    code = code.replace('"data.h5ad"', repr(str(synthetic_file)))
    code = code.replace('config="cpu")', 'config="cpu", sets=["train.max_steps=2", "train.val_every=2"])')
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["cells"].n_obs > 0 and np.isfinite(namespace["arrays"]).all()
