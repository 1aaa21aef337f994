"""Helpers of the tests that drive the command line (imported by them; not a test module)."""

from __future__ import annotations

#: A tiny cfm's ``--set`` items, without ``train.max_steps``: a checkpoint and a validation every 3
#: steps; validation generates its cells in 2 Euler steps (2 network calls, RK4's 8), the most of
#: such a run's time. The ``tiny_cfm_run`` fixture (conftest.py) is its 6-step run.
TINY_CFM = [
    "model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.genes_per_step=20", "predict.ode_steps=2",
    "predict.ode_method=euler", "train.batch_size=8", "train.checkpoint_every=3", "train.val_every=3", "train.val_batches=2",
    "train.progress=false",
]


def sets(items: list[str]) -> list[str]:
    """``--set`` flags for each ``section.key=value``."""
    return [arg for item in items for arg in ("--set", item)]


def one_error_line(capsys, command: str) -> str:
    """The one ``pertflow <command>: ...`` line a command printed to stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"pertflow {command}:")]
    assert len(lines) == 1, err
    return lines[0]
