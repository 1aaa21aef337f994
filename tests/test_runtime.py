"""Threads, progress bars that reach log files, other libraries kept quiet."""

from __future__ import annotations

import io
import sys
import warnings

import pytest
import torch

from pertflow import runtime
from pertflow.errors import InputError


def test_progress_in_a_log_file_is_lines_without_carriage_returns(monkeypatch):
    log = io.StringIO()  # not a terminal, as a batch job's log
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(runtime, "LOG_INTERVAL", 0.0)
    bar = runtime.progress_bar(5, "training", "step")
    for i in range(5):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (i + 1):.2f}")
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.count("\n") >= 2
    assert text.splitlines()[-1].startswith("training: 100%") and "loss=0.20" in text
    # A stage shorter than the interval writes nothing.
    quiet_log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet_log)
    monkeypatch.setattr(runtime, "LOG_INTERVAL", 30.0)
    bar = runtime.progress_bar(5, "quick", "step")
    bar.update(5)
    bar.close()
    assert quiet_log.getvalue() == ""


def test_quiet_libraries_drops_others_output_but_not_pertflows(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "LOG_INTERVAL", 0.0)
    monkeypatch.delenv("PERTFLOW_VERBOSE", raising=False)
    from tqdm import tqdm

    with runtime.quiet_libraries():
        for _ in tqdm(range(3), desc="Iterating over perturbations..."):  # another library's bar
            pass
        warnings.warn("a library's warning")
        bar = runtime.progress_bar(2, "evaluating", "perturbation")
        bar.update(2)
        bar.close()
    err = capsys.readouterr().err
    assert "Iterating" not in err and "a library's warning" not in err
    assert "evaluating: 100%" in err
    with runtime.quiet_libraries(verbose=True):
        for _ in tqdm(range(3), desc="Iterating over perturbations..."):
            pass
    assert "Iterating" in capsys.readouterr().err
    with runtime.quiet_libraries(verbose=True), runtime.quiet_libraries():  # --verbose around an API call's default
        for _ in tqdm(range(3), desc="Nested bar"):
            pass
    assert "Nested bar" in capsys.readouterr().err


def test_set_threads():
    before = torch.get_num_threads()
    try:
        assert runtime.set_threads(1) == 1 and torch.get_num_threads() == 1
        n = runtime.set_threads()
        assert 1 <= n <= min(runtime.available_cores(), runtime.MAX_DEFAULT_THREADS)
        for bad in (0, runtime.available_cores() + 1):
            with pytest.raises(InputError, match="must be between 1 and the"):
                runtime.set_threads(bad)
    finally:
        torch.set_num_threads(before)
