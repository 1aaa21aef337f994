"""Helpers of the tests that drive the command line (imported by them; not a test module)."""

from __future__ import annotations


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
