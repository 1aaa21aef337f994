"""Faults a training system must survive (issue 30): damaged checkpoints and run records.

A checkpoint records the SHA-256 of its tensor files; resuming verifies them, falls back to the
newest complete checkpoint and says so, or stops with one line naming the damaged file.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pertflow.cli import main
from pertflow.models.base import PerturbationModel
from cli_helpers import TINY_CFM, one_error_line, sets


def six_steps(tiny_cfm_run, run):
    """A copy at ``run`` of the finished 6-step run of TINY_CFM (checkpoints at steps 3 and 6),
    trained once per session (the ``tiny_cfm_run`` fixture); returns its step-6 checkpoint."""
    shutil.copytree(tiny_cfm_run, run)
    return run / "checkpoints" / "step-00000006"


@pytest.fixture(scope="module")
def unbroken(tiny_cfm_run, tmp_path_factory):
    """The weights of the 6-step run extended to 9 steps from its intact step-3 checkpoint (the
    step-6 one removed cleanly): what a resume that passes over a damaged step 6 must give."""
    run = tmp_path_factory.mktemp("unbroken") / "run"
    newest = six_steps(tiny_cfm_run, run)
    shutil.rmtree(newest)
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 3, "dir": "step-00000003"}))
    assert main(["train", "--resume", "--out", str(run), "--set", "train.max_steps=9"]) == 0
    return PerturbationModel.load(run).state_tensors()


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path):
    path.write_bytes(b"")


def other_tensors(path):
    shutil.copy(path.parents[1] / "step-00000003" / path.name, path)  # valid safetensors, the wrong ones


@pytest.mark.parametrize("damage", [truncate, empty, other_tensors], ids=lambda f: f.__name__)
def test_resume_passes_over_a_damaged_checkpoint_and_says_so(tiny_cfm_run, tmp_path, capsys, unbroken, damage):
    newest = six_steps(tiny_cfm_run, tmp_path / "run")
    damage(newest / "model.safetensors")
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--set", "train.max_steps=9"]) == 0
    out = capsys.readouterr().out
    assert "resuming from step-00000003, the newest complete checkpoint" in out and str(newest / "model.safetensors") in out
    # resumed from step 3: the weights of the same run resumed from an intact step 3
    for name, value in PerturbationModel.load(tmp_path / "run").state_tensors().items():
        torch.testing.assert_close(value, unbroken[name], rtol=0, atol=0)


def test_a_damaged_latest_pointer_falls_back_to_the_newest_folder(tiny_cfm_run, tmp_path, capsys):
    six_steps(tiny_cfm_run, tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "latest.json").write_text('{"step": 6, "di')
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--set", "train.max_steps=9"]) == 0
    assert "latest.json is damaged" in capsys.readouterr().out
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    steps = [int(line.split(",")[0]) for line in history[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 9  # continued from step 6, nothing trained twice


def test_no_complete_checkpoint_stops_with_one_line_naming_the_file(tiny_cfm_run, tmp_path, capsys):
    newest = six_steps(tiny_cfm_run, tmp_path / "run")
    truncate(newest / "optimizer.safetensors")
    empty(newest.parent / "step-00000003" / "model.safetensors")
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--set", "train.max_steps=9"]) == 2
    line = one_error_line(capsys, "train")
    assert "no complete checkpoint" in line and str(newest / "optimizer.safetensors") in line


def test_a_damaged_run_record_or_weights_file_is_named_when_read(synthetic_file, split_file, tiny_cfm_run, tmp_path, capsys):
    run = tmp_path / "run"
    six_steps(tiny_cfm_run, run)
    predict = ["predict", "--run", str(run), "--data", str(synthetic_file), "--split", str(split_file)]
    truncate(run / "model.safetensors")
    assert main([*predict, "--out", str(tmp_path / "a.h5ad")]) == 2
    assert f"{run / 'model.safetensors'} is damaged" in one_error_line(capsys, "predict")
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps(meta)[:100])
    assert main([*predict, "--out", str(tmp_path / "b.h5ad")]) == 2
    assert f"{run / 'model.json'} is not valid JSON" in one_error_line(capsys, "predict")
    (run / "run.json").write_text("{")
    assert main(["train", "--resume", "--out", str(run), "--set", "train.max_steps=9"]) == 2
    assert str(run / "run.json") in one_error_line(capsys, "train")


# ---------------------------------------------------------------------------- one writer per run folder
def test_a_second_writer_of_a_run_folder_stops_at_once_naming_the_holder(tiny_cfm_run, tmp_path, capsys):
    import os
    import socket
    import subprocess
    import sys

    from pertflow.io import LOCK_FILE, folder_lock

    run = tmp_path / "run"
    six_steps(tiny_cfm_run, run)
    assert not (run / LOCK_FILE).exists()  # released when the run ended
    # a live holder (another process of this host): the resume stops at once, naming it
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        assert main(["train", "--resume", "--out", str(run), "--set", "train.max_steps=9"]) == 2
        line = one_error_line(capsys, "train")
        assert f"{run} is in use" in line and f"pid {holder.pid}" in line
        assert json.loads((run / "model.json").read_text())["fit_report"]["steps"] == 6  # nothing trained
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its stale lock is taken over with a note, and the resume trains
    assert main(["train", "--resume", "--out", str(run), "--set", "train.max_steps=9"]) == 0
    assert f"pid {holder.pid}, which no longer runs; taking it over" in capsys.readouterr().out
    assert json.loads((run / "model.json").read_text())["fit_report"]["steps"] == 9
    assert not (run / LOCK_FILE).exists()
    # within one process the lock is exclusive too, and is released on an error
    with folder_lock(tmp_path / "other"):
        with pytest.raises(Exception, match=f"pid {os.getpid()}"):
            with folder_lock(tmp_path / "other"):
                pass
    assert not (tmp_path / "other" / LOCK_FILE).exists()


# ---------------------------------------------------------------------------- a full disk
def test_a_full_disk_during_a_checkpoint_stops_with_one_line_and_the_run_resumes(synthetic_file, split_file, tiny_cfm_run,
                                                                                  tmp_path, monkeypatch, capsys):
    import errno

    import pertflow.train.checkpoint as checkpoint

    args = ["train", "--model", "cfm", "--data", str(synthetic_file), "--split", str(split_file)]
    real_save = checkpoint.save_file
    calls = {"n": 0}

    def full_disk(tensors, filename, metadata=None):
        calls["n"] += 1
        if "step-00000006" in filename:  # the second checkpoint: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main([*args, "--out", str(run), *sets([*TINY_CFM, "train.max_steps=6"])]) == 2
    line = one_error_line(capsys, "train")
    assert "No space left on device" in line and "free space" in line and str(run / "checkpoints") in line
    # no partial checkpoint under a final name; the earlier one intact and pointed at
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000003"]
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 3
    monkeypatch.undo()  # space freed: the run resumes and ends as the one that never met a full disk
    assert main(["train", "--resume", "--out", str(run)]) == 0
    unbroken = PerturbationModel.load(tiny_cfm_run).state_tensors()  # the same run that never met a full disk
    for name, value in PerturbationModel.load(run).state_tensors().items():
        torch.testing.assert_close(value, unbroken[name], rtol=0, atol=0)


# ---------------------------------------------------------------------------- bad input that was silent
def test_a_file_whose_later_cells_break_the_transform_is_caught_in_the_whole_pass(tmp_path):
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from pertflow.data.dataset import PerturbationData
    from pertflow.errors import InputError

    rng = np.random.default_rng(0)
    n = 3000
    counts = rng.poisson(1.0, size=(n, 20)).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.obs_names = [f"c{i}" for i in range(n)]
    adata.var_names = [f"G{i}" for i in range(20)]
    adata.obs["perturbation"] = np.where(np.arange(n) % 3 == 0, "control", np.where(np.arange(n) % 3 == 1, "G1", "G2"))
    sampled = set(np.random.default_rng(0).choice(n, size=2000, replace=False))  # the cells the detection reads
    broken = max(set(range(n)) - sampled)
    x = adata.X.tolil()
    x[broken, 3] = 2.5  # a corrected value in one cell the sample does not read
    adata.X = x.tocsr()
    with pytest.raises(InputError, match=rf"not a whole number: 2.5 in cell 'c{broken}'"):
        PerturbationData.from_anndata(adata, pert_col="perturbation", control="control", is_counts=True).validate()


def test_a_split_that_names_a_cell_twice_or_in_two_parts_is_refused(synthetic_adata):
    from pertflow.data.dataset import PerturbationData
    from pertflow.data.splits import make_split
    from pertflow.errors import InputError

    data = PerturbationData.from_anndata(synthetic_adata)
    split = make_split(data, "random", test_fraction=0.2)
    twice = dataclasses_replace(split, train=split.train + split.train[:2])
    with pytest.raises(InputError, match="names 2 cells twice in 'train'"):
        twice.rows(data)
    both = dataclasses_replace(split, val=split.val + split.train[:3])
    with pytest.raises(InputError, match="3 cells are both in train and in val"):
        both.rows(data)


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


# ---------------------------------------------------------------------------- kill -9 at any moment
def killed(args: list[str], point: str, cwd=None) -> int:
    """Run ``pertflow ARGS`` in a subprocess that kills itself (SIGKILL) at a crash point."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PERTFLOW_CRASH_AT": point}
    done = subprocess.run([sys.executable, "-m", "pertflow.cli", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    return done.returncode


@pytest.fixture(scope="module")
def nine_steps(synthetic_file, split_file, tmp_path_factory):
    """The weights of a 9-step run (checkpoints at 3, 6, 9) trained without a fault."""
    run = tmp_path_factory.mktemp("nine") / "run"
    args = ["train", "--model", "cfm", "--data", str(synthetic_file), "--split", str(split_file), "--out", str(run)]
    assert main([*args, *sets([*TINY_CFM, "train.max_steps=9"]), "--threads", "1"]) == 0  # threads: as the killed runs
    return PerturbationModel.load(run).state_tensors()


@pytest.mark.parametrize("point", ["train-step:2", "checkpoint-write:2", "validation:2"])
def test_train_killed_at_any_moment_resumes_to_the_uninterrupted_weights(synthetic_file, split_file, tmp_path, nine_steps,
                                                                         point):
    import signal

    run = tmp_path / "run"
    args = ["train", "--model", "cfm", "--data", str(synthetic_file), "--split", str(split_file), "--out", str(run),
            *sets([*TINY_CFM, "train.max_steps=9"])]
    assert killed([*args, "--threads", "1"], point) == -signal.SIGKILL
    assert not (run / "model.json").exists()  # it died before the end
    # the next resume continues from the last complete checkpoint (none: from step 0), lock taken over
    assert main(["train", "--resume", "--out", str(run), "--threads", "1"]) == 0
    for name, value in PerturbationModel.load(run).state_tensors().items():
        torch.testing.assert_close(value, nine_steps[name], rtol=0, atol=0)


DEMO_SCRIPT = """
import sys
from pathlib import Path
from pertflow.demo import DEMO_CONFIGS, run_demo
from pertflow.runtime import set_threads

set_threads(1)
cfm = DEMO_CONFIGS["cfm"]
tiny = {"model": {**cfm["model"], "d_model": 16}, "predict": cfm["predict"],
        "train": {**cfm["train"], "max_steps": 4, "val_every": 2, "checkpoint_every": 2, "log_every": 1, "progress": False}}
run_demo(Path(sys.argv[1]), models=("cfm",), configs={"cfm": tiny}, threads=1)
"""


def test_a_benchmark_killed_while_predicting_finishes_on_a_rerun_with_the_same_cells(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import anndata as ad
    import numpy as np

    from pertflow.api import predict, split_view
    from pertflow.data.dataset import PerturbationData
    from pertflow.data.synthetic import make_synthetic
    from pertflow.data.tasks import Task
    from pertflow.io import write_h5ad

    out = tmp_path / "demo"
    run = out / "benchmark" / "runs" / "synthetic-combo-seen2" / "cfm"
    # the demo's task on smaller data (the demo uses a synthetic.h5ad it finds): the same 15 test
    # groups (5 combinations x 3 contexts), fewer genes and cells to train on, predict and score
    out.mkdir()
    write_h5ad(out / "synthetic.h5ad", make_synthetic(n_genes=60, cells_per_group=20, controls_per_context=40))
    # the first run is killed before cfm predicts its second test group
    env = {**os.environ, "PERTFLOW_CRASH_AT": "predict:2"}
    first = subprocess.run([sys.executable, "-c", DEMO_SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert (run / "model.json").is_file() and not (run / "pred.h5ad").exists()  # trained, killed while predicting
    rerun = subprocess.run([sys.executable, "-c", DEMO_SCRIPT, str(out)], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (out / "report.md").is_file() and not list(run.glob(".pred*"))  # no half-written prediction left
    # the prediction the rerun wrote is the one the run gives with the same seed
    task = Task(name="synthetic-combo-seen2", dataset="synthetic.h5ad", kind="combinations", options={"seen": [2]})
    with PerturbationData.read(out / "synthetic.h5ad") as data:
        again = predict(run, split_view(data, task.build(data)), None, seed=0)
    written = ad.read_h5ad(run / "pred.h5ad")
    np.testing.assert_array_equal(np.asarray(written.X), np.asarray(again.X))


# ---------------------------------------------------------------------------- same seed, same cells
FAMILIES = {
    "mean": [],
    "cfm": ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.genes_per_step=30", "predict.ode_steps=2",
            "predict.ode_method=euler"],
    "ccfm": ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.genes_per_step=30", "model.foundation_d_model=8",
             "model.foundation_layers=1", "model.foundation_steps=4", "model.foundation_batch_size=8", "model.bottleneck_dim=8",
             "model.dh_depth=1", "model.warmup_batches=2", "predict.ode_steps=1", "predict.ode_method=euler"],
    "cfmvc": ["model.n_latent=4", "model.n_tech=2", "model.hidden=16", "model.n_layers=1", "model.flow_hidden=16",
              "model.d_context=8", "model.n_basis=4", "model.vae_steps=4", "model.prior=none", "predict.ode_steps=2"],
    "latent-shift": ["model.n_components=6", "model.hidden=16", "model.decoder_hidden=16", "model.decoder_steps=4"],
    "scgpt-generator": ["model.d_model=16", "model.nhead=2", "model.d_hid=32", "model.nlayers=1", "model.genes_per_step=30"],
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_same_seed_gives_the_same_weights_and_cells(synthetic_file, split_file, tmp_path, family):
    import numpy as np

    from pertflow.api import predict

    common = ["train.max_steps=4", "train.batch_size=8", "train.val_every=2", "train.checkpoint_every=2", "train.progress=false"]
    preds, weights = [], []
    for name in ("a", "b"):
        args = ["train", "--model", family, "--data", str(synthetic_file), "--split", str(split_file), "--out",
                str(tmp_path / name), "--threads", "1", *sets([*common, *FAMILIES[family]])]
        assert main(args) == 0
        weights.append(PerturbationModel.load(tmp_path / name).state_tensors())
        preds.append(predict(tmp_path / name, str(synthetic_file), split_file, seed=3))
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(preds[0].X), np.asarray(preds[1].X))  # bit for bit


def test_a_prediction_into_a_full_disk_stops_with_one_line_and_leaves_no_file(synthetic_file, split_file, tmp_path,
                                                                              monkeypatch, capsys):
    import errno

    import anndata as ad

    args = ["--data", str(synthetic_file), "--split", str(split_file)]
    assert main(["train", "--model", "mean", *args, "--out", str(tmp_path / "run")]) == 0

    def full_disk(self, filename, *rest, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1024)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(ad.AnnData, "write_h5ad", full_disk)
    capsys.readouterr()
    out = tmp_path / "preds" / "pred.h5ad"
    assert main(["predict", "--run", str(tmp_path / "run"), *args, "--out", str(out)]) == 2
    line = one_error_line(capsys, "predict")
    assert "No space left on device" in line and "free space" in line
    assert not out.exists() and not list(out.parent.glob("*.h5ad")) and not list(out.parent.glob(".*"))  # nothing left


def test_pretrain_killed_mid_run_resumes_to_the_uninterrupted_weights(synthetic_file, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from pertflow.foundation.scgpt import load_pretrained

    flags = ["--data", str(synthetic_file), *sets(["train.max_steps=6", "train.batch_size=8", "train.val_every=3",
                                                     "train.checkpoint_every=3", "train.progress=false", "model.max_seq_len=32",
                                                     "model.d_model=16", "model.d_hid=32"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PERTFLOW_CRASH_AT": "train-step:5"}
    killed = subprocess.run([sys.executable, "-m", "pertflow.cli", "pretrain", *flags, "--out", str(tmp_path / "run")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed process's threads (pretrain does not set them)
    try:  # the uninterrupted run and the resume in this process
        assert main(["pretrain", *flags, "--out", str(tmp_path / "unbroken")]) == 0
        assert main(["pretrain", *flags, "--out", str(tmp_path / "run"), "--resume"]) == 0
    finally:
        torch.set_num_threads(before)
    expected = load_pretrained(tmp_path / "unbroken").model.state_dict()
    for name, value in load_pretrained(tmp_path / "run").model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_errors_speak_the_callers_terms(tmp_path, capsys):
    """The same refusal names the command line's flag to a CLI user and the keyword argument to a
    Python caller (issue 31, item 9)."""
    from pertflow.cli import main
    from pertflow.errors import InputError, in_api_terms
    from pertflow.io import check_output

    out = tmp_path / "pred.h5ad"
    out.write_text("x")
    with pytest.raises(InputError) as err:
        check_output(out, "prediction")
    assert "overwrite=True" in str(err.value) and "--overwrite" not in str(err.value)
    assert in_api_terms("Pass --pert-col perturbation, or see (CLI: --pert-col) and pertflow train ... --genes FILE") == \
        "Pass pert_col=perturbation, or see (CLI: --pert-col) and pertflow train ... --genes FILE"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    assert main(["train", "--model", "mean", "--data", str(out), "--out", str(tmp_path / "run")]) == 2
    assert "--overwrite" in capsys.readouterr().err
