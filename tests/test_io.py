"""Atomic writes (a file appears whole or not at all, with a normal file's permissions), the one
check of an output before any work, and YAML errors that say where."""

import os
import stat

import pytest
import torch

from pertflow.errors import InputError
from pertflow.io import atomic_path, check_output, read_yaml, write_json
from pertflow.train.checkpoint import save_tensors


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_get_the_permissions_of_a_normal_file(tmp_path):
    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"a": 1})
        save_tensors(tmp_path / "w.safetensors", {"w": torch.ones(2)})  # safetensors recreates its file
        assert _mode(tmp_path / "a.json") == 0o644
        assert _mode(tmp_path / "w.safetensors") == 0o644
    finally:
        os.umask(umask)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text().strip().startswith("{") and "half" not in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_check_output_refuses_an_existing_output_unless_overwrite(tmp_path):
    target = tmp_path / "new" / "pred.h5ad"
    assert check_output(target, "prediction") == []
    assert target.parent.is_dir() and list(target.parent.iterdir()) == []  # the folder made, no probe left
    target.write_text("old")
    with pytest.raises(InputError, match=r"the prediction .*pred.h5ad exists\. Choose another out=\.\.\., or pass overwrite=True"):
        check_output(target, "prediction")
    assert check_output(target, "prediction", overwrite=True) == [target]
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "notes.txt").write_text("unrelated")
    assert check_output(folder, "evaluation folder", holds=["results.csv"]) == []  # an unrelated folder is fine
    (folder / "results.csv").write_text("x")
    with pytest.raises(InputError, match="already holds results.csv"):
        check_output(folder, "evaluation folder", holds=["results.csv"])
    with pytest.raises(InputError, match="is a folder; give a file name"):
        check_output(folder, "prediction")
    with pytest.raises(InputError, match="is a file; give a folder"):
        check_output(folder / "notes.txt", "run folder", holds=["model.json"])


def test_check_output_finds_an_unwritable_place_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InputError, match=r"cannot write to .*a-file/sub .*Choose another out="):
        check_output(blocker / "sub" / "pred.h5ad", "prediction")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_check_output_finds_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(InputError, match="cannot write to .*Permission denied"):
            check_output(folder / "pred.h5ad", "prediction")
    finally:
        folder.chmod(0o700)


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 5\n  lr: [1e-3\n")
    with pytest.raises(InputError, match=r"c\.yaml: invalid YAML at line 4, column 1: .*flow sequence at line 3, column 7"):
        read_yaml(path)
