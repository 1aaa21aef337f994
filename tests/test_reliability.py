"""Broken input and interruptions in a new user's hands (issue 20): one test per row of its table.

Each stops at the first command that meets the problem, with one line that names it and the fix
(no traceback), or now does the right thing, and loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

import torch

import pertflow.api
from pertflow.cli import main
from pertflow.data.batches import PairedBatches
from pertflow.data.dataset import PerturbationData
from pertflow.data.split_file import Split
from pertflow.data.synthetic import make_synthetic
from pertflow.models.base import PerturbationModel
from cli_helpers import TINY_CFM, one_error_line, sets

SIX_STEPS = [*TINY_CFM, "train.max_steps=6"]  # the tiny_cfm_run fixture's settings





def train_args(synthetic_file, split_file, out, model="cfm"):
    return ["train", "--model", model, "--data", str(synthetic_file), "--split", str(split_file), "--out", str(out)]


# ---------------------------------------------------------------------------- the declared transform
def test_counts_flag_on_a_log_normalised_file_stops_with_the_evidence(shared_data, tmp_path, capsys):
    out = tmp_path / "split.json"
    args = ["split", "--data", str(shared_data / "kang18_pbmc_ifnb.h5ad"), "--kind", "context", "--test-context", "NK"]
    assert main([*args, "--counts", "--out", str(out)]) == 2
    line = one_error_line(capsys, "split")
    assert "X is read as raw counts (--counts was given) but does not hold whole numbers" in line
    assert "the largest value is 6.7" in line and "pass --log" in line and "counts_reconstructed" in line
    assert not out.exists()
    # the raw counts the file holds in a layer are fine as counts
    assert main([*args, "--layer", "counts_reconstructed", "--counts", "--out", str(out)]) == 0


def test_log_flag_on_raw_counts_stops_with_the_evidence(shared_data, tmp_path, capsys):
    out = tmp_path / "split.json"
    args = ["split", "--data", str(shared_data / "zhao21_gbm_panobinostat.h5ad"), "--kind", "context", "--test-context", "PW030"]
    assert main([*args, "--log", "--out", str(out)]) == 2
    line = one_error_line(capsys, "split")
    assert "X is read as log-normalised (--log was given) but looks like raw counts" in line
    assert "the largest value is 1318, 100.0% of the non-zero values are whole numbers" in line and "Pass --counts" in line
    assert not out.exists()


# ---------------------------------------------------------------------------- empty inputs
def test_a_dataset_with_no_genes_stops_at_the_first_command(tmp_path, capsys):
    path = tmp_path / "no-genes.h5ad"
    adata = make_synthetic(n_genes=30, n_singles=3, n_combos=1, cells_per_group=10, controls_per_context=20, n_effect_genes=5)
    adata[:, []].copy().write_h5ad(path)
    out = tmp_path / "split.json"
    assert main(["split", "--data", str(path), "--kind", "random", "--out", str(out)]) == 2
    assert "holds no genes (" in one_error_line(capsys, "split") and not out.exists()


def test_a_dataset_with_no_cells_says_so(tmp_path, capsys):
    path = tmp_path / "no-cells.h5ad"
    adata = make_synthetic(n_genes=30, n_singles=3, n_combos=1, cells_per_group=10, controls_per_context=20, n_effect_genes=5)
    adata[[]].copy().write_h5ad(path)
    assert main(["inspect", str(path)]) == 2
    line = one_error_line(capsys, "inspect")
    assert "holds no cells (0 cells x 30 genes)" in line and "no control cells" not in line


def test_a_test_perturbation_without_test_cells_stops_training(synthetic_file, split_file, tmp_path, capsys):
    split = Split.load(split_file)
    with PerturbationData.read(synthetic_file) as data:
        trained = [p for p in data.perturbation_names if p not in split.test_perturbations]
    split.test_perturbations = [*split.test_perturbations, trained[0], "NOT-MEASURED"]
    bad = tmp_path / "bad-split.json"
    split.save(bad)
    assert main(train_args(synthetic_file, bad, tmp_path / "run", model="mean")) == 2
    line = one_error_line(capsys, "train")
    assert "2 test perturbations of the split have no test cells" in line and "NOT-MEASURED" in line


# ---------------------------------------------------------------------------- config files
def test_a_malformed_yaml_config_names_the_file_line_and_column(synthetic_file, split_file, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  max_steps: 5\n  lr: [1e-3\n")
    assert main([*train_args(synthetic_file, split_file, tmp_path / "run", model="mean"), "--config", str(config)]) == 2
    line = one_error_line(capsys, "train")
    assert f"{config}: invalid YAML at line 4, column 1" in line and "line 3, column 7" in line
    task = tmp_path / "task.yaml"
    task.write_text("name: t\nkind: [random\n")
    assert main(["split", "--task", str(task), "--out", str(tmp_path / "s.json")]) == 2
    assert f"{task}: invalid YAML at line 3" in one_error_line(capsys, "split")


# ---------------------------------------------------------------------------- interruptions and resuming
def interrupt_training_at(monkeypatch, call: int, signum: int = signal.SIGINT) -> None:
    """Send the process ``signum`` (as Ctrl-C does) while the ``call``-th batch is drawn."""
    original = PairedBatches.next_batch
    calls = {"n": 0}

    def next_batch(self):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signum)
        return original(self)

    monkeypatch.setattr(PairedBatches, "next_batch", next_batch)


def weights(run):
    return PerturbationModel.load(run).state_tensors()


def test_ctrl_c_during_training_writes_a_checkpoint_and_resume_alone_continues(synthetic_file, split_file, tiny_cfm_run,
                                                                               tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken"
    interrupt_training_at(monkeypatch, 2 + 2)  # 2 validation batches are drawn first: Ctrl-C during step 2
    assert main([*train_args(synthetic_file, split_file, broken), *sets(SIX_STEPS)]) == 130
    monkeypatch.undo()
    line = one_error_line(capsys, "train")
    found = re.fullmatch(r"pertflow train: interrupted at step (\d+); checkpoint written to (\S+); continue with: (.*)", line)
    assert found, line
    assert int(found[1]) == 2 and found[2] == str(broken / "checkpoints")  # the step in progress was finished
    assert found[3] == f"pertflow train --resume --out {broken}"
    assert json.loads((broken / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert main(["train", "--resume", "--out", str(broken)]) == 0  # no --model, --data, --split, --set again
    for name, value in weights(tiny_cfm_run).items():  # the same 6-step run, never interrupted
        torch.testing.assert_close(weights(broken)[name], value, rtol=0, atol=0)


def test_resume_extends_a_finished_run_and_refuses_other_settings(tiny_cfm_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_cfm_run, run)  # a finished 6-step run
    assert main(["train", "--resume", "--out", str(run)]) == 2
    assert "is a finished run of 6 steps" in one_error_line(capsys, "train")
    assert main(["train", "--resume", "--out", str(run), "--set", "train.lr=0.5"]) == 2
    assert "other settings (train.lr): only train.progress, train.max_steps, train.grad_checkpointing, train.accumulate may change" in one_error_line(capsys, "train")
    assert json.loads((run / "run.json").read_text())["config"]["train"]["lr"] == 5e-5  # the run's record is untouched
    assert main(["train", "--resume", "--out", str(run), "--set", "train.max_steps=9"]) == 0
    assert json.loads((run / "model.json").read_text())["fit_report"]["steps"] == 9
    assert int((run / "history.csv").read_text().splitlines()[-1].split(",")[0]) == 9
    assert json.loads((run / "run.json").read_text())["config"]["train"]["max_steps"] == 9


# ---------------------------------------------------------------------------- output paths
def test_an_unwritable_output_stops_before_any_computing(synthetic_file, split_file, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(train_args(synthetic_file, split_file, run, model="mean")) == 0

    def no_computing(*args, **kwargs):
        raise AssertionError("predicted before checking the output")

    monkeypatch.setattr(pertflow.api, "predict_split", no_computing)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = ["predict", "--run", str(run), "--data", str(synthetic_file), "--split", str(split_file)]
    assert main([*args, "--out", str(blocker / "preds" / "pred.h5ad")]) == 2
    assert f"cannot write to {blocker / 'preds'}" in one_error_line(capsys, "predict")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "pred.h5ad"))

    monkeypatch.setattr(pertflow.api, "predict", denied)  # a file-system error while writing
    assert main([*args, "--out", str(tmp_path / "pred.h5ad")]) == 2
    assert one_error_line(capsys, "predict").startswith(f"pertflow predict: error: {tmp_path / 'pred.h5ad'}: Permission denied.")


def test_every_command_refuses_an_existing_output_unless_overwrite(synthetic_file, split_file, tmp_path, capsys):
    data = str(synthetic_file)
    split = tmp_path / "split.json"
    split_args = ["split", "--data", data, "--kind", "random", "--seed", "1", "--out", str(split)]
    assert main(split_args) == 0
    before = split.read_text()
    assert main([*split_args[:-3], "2", "--out", str(split)]) == 2
    assert "the split file" in one_error_line(capsys, "split") and split.read_text() == before
    assert main([*split_args[:-3], "2", "--out", str(split), "--overwrite"]) == 0
    assert split.read_text() != before

    run = tmp_path / "run"
    assert main(train_args(synthetic_file, split, run, model="mean")) == 0
    assert main(train_args(synthetic_file, split, run, model="additive")) == 2
    line = one_error_line(capsys, "train")
    assert "already holds run.json, model.json" in line and "--resume" in line and "--overwrite" in line
    assert main([*train_args(synthetic_file, split, run, model="additive"), "--overwrite"]) == 0
    assert json.loads((run / "model.json").read_text())["model"] == "additive"

    pred = tmp_path / "pred.h5ad"
    predict_args = ["predict", "--run", str(run), "--data", data, "--split", str(split), "--out", str(pred)]
    assert main(predict_args) == 0
    assert main(predict_args) == 2
    assert "the prediction" in one_error_line(capsys, "predict")
    assert main([*predict_args, "--overwrite"]) == 0

    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "results.csv").write_text("earlier results")
    assert main(["evaluate", "--data", data, "--split", str(split), "--pred", str(pred), "--out", str(evaluation)]) == 2
    assert "already holds results.csv" in one_error_line(capsys, "evaluate")
    assert (evaluation / "results.csv").read_text() == "earlier results"

    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    assert main(["inspect", data, "--save-spec", str(spec)]) == 2
    assert main(["inspect", data, "--save-spec", str(spec), "--overwrite"]) == 0
    assert json.loads(spec.read_text())["pert_col"] == "perturbation"

    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    (pretrained / "args.json").write_text("{}")
    assert main(["pretrain", "--data", data, "--out", str(pretrained)]) == 2
    assert "already holds args.json" in one_error_line(capsys, "pretrain")
