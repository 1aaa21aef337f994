"""Atomic writes: a file appears whole or not at all, with a normal file's permissions."""

import os
import stat

import pytest
import torch

from pertflow.io import atomic_path, write_json
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
