"""Files: atomic writes (a reader never sees a half-written file, an interrupted write loses
nothing), the one check of an output path before any computing, JSON / YAML reading that
names the file, line and column of a syntax error, and one writer per folder (:func:`folder_lock`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from pertflow.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    The temporary file lives in the same directory so that ``os.replace`` is atomic. On an
    exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix last: some writers (h5ad, safetensors) look at it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600), and some writers (safetensors) recreate it so:
        # once written, give it the permissions of a normally created file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_h5ad(path: str | os.PathLike, adata: Any) -> None:
    """Write an AnnData to ``path`` atomically."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file raises an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file. Check the path.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON ({err}). Fix or regenerate the file.") from err


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """Read a YAML file; a missing file or a syntax error raises an error naming the file, line and column."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what}. Check the path.")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path}: invalid YAML {yaml_problem(err)}. Fix the syntax there.") from err


def yaml_problem(err: Exception, where: bool = True) -> str:
    """A YAML syntax error in words: ``at line L, column C: problem (while ... at line L', column C')``.

    Lines and columns count from 1, as editors do; ``where=False`` leaves the marks out.
    """
    def at(mark: Any) -> str:
        return f"at line {mark.line + 1}, column {mark.column + 1}" if where and mark is not None else ""

    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    text = f"{at(getattr(err, 'problem_mark', None))}: {problem}".lstrip(": ")
    if context:
        text += f" ({' '.join(filter(None, (context, at(getattr(err, 'context_mark', None)))))})"
    return text


# ---------------------------------------------------------------------------- outputs
def check_output(
    path: str | os.PathLike,
    what: str,
    overwrite: bool = False,
    holds: Iterable[str] | None = None,
    other_choice: str = "",
) -> list[Path]:
    """Check an output before any computing: the overwrite policy, then that it can be written.

    Every command that writes uses this one policy: an output that exists is refused unless
    ``overwrite`` is set. The folder the output goes to is created, and a temporary file is
    written and removed there, so that a path that cannot be written fails now, not after the work.

    Parameters
    ----------
    path
        The output: a file, or a folder when ``holds`` is given.
    what
        What the output is, for messages (``"prediction"``, ``"run folder"``).
    overwrite
        Replace an existing output instead of refusing it.
    holds
        For a folder output, the names of what the command writes in it: the output exists when
        one of them does (an empty or unrelated folder is fine).
    other_choice
        A further way out for the message about an existing output (``"--resume to continue it"``).

    Returns
    -------
    list[Path]
        What exists of the output now (empty for a new output); the caller replaces it.

    Raises
    ------
    InputError
        When the output exists without ``overwrite``, is a file where a folder is wanted (or the
        reverse), or cannot be written.
    """
    path = Path(path)
    if holds is None:
        if path.is_dir():
            raise InputError(f"the {what} {path} is a folder; give a file name (--out).")
        existing = [path] if path.exists() else []
        folder = path.parent
    else:
        if path.exists() and not path.is_dir():
            raise InputError(f"the {what} {path} is a file; give a folder (--out).")
        existing = [path / name for name in holds if (path / name).exists()]
        folder = path
    if existing and not overwrite:
        found = "exists" if holds is None else f"already holds {', '.join(p.name for p in existing)}"
        choices = ", ".join(c for c in ("choose another --out", other_choice) if c)
        raise InputError(f"the {what} {path} {found}. {choices[0].upper()}{choices[1:]}, or pass --overwrite to "
                         "replace it.")
    check_writable(folder)
    return existing


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` if needed and write and remove a temporary file there; an error names the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".pertflow-write-test.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise InputError(
            f"cannot write to {folder} ({err.strerror or err}). Choose another --out, or make that folder writable."
        ) from err


def remove_outputs(paths: Iterable[Path]) -> None:
    """Remove files and folders an output is made of (what :func:`check_output` found), to replace them."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def package_dir(name: str) -> Path:
    """A folder of files that ship with pertflow (``resources/<name>``: ``tasks``, ``configs``),
    found through the installed package, so that commands work from any folder."""
    from importlib.resources import files

    return Path(str(files("pertflow") / "resources" / name))


# ---------------------------------------------------------------------------- one writer per folder
LOCK_FILE = ".pertflow.lock"


def _lock_holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) and "pid" in holder else None
    except (OSError, ValueError):
        return None


def _holder_is_gone(holder: dict[str, Any] | None) -> bool:
    """Whether the process that wrote a lock no longer runs (only knowable on this host)."""
    if holder is None:
        return True  # unreadable: never fully written, its writer died at once
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it runs, as another user
    return False


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run folder", note: Any = print) -> Iterator[None]:
    """Hold ``folder`` for this process alone while the block runs (``<folder>/.pertflow.lock``,
    holding the pid and host; created atomically, removed at the end).

    A second process stops at once with an error naming the holder; a lock left by a process
    that no longer runs (on this host) is taken over with a note.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot write to {folder}: {err.strerror or err}. Choose another folder.") from None
    path = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if not _holder_is_gone(holder):
                raise InputError(
                    f"{folder} is in use: another pertflow process writes this {what} (pid {holder['pid']} on "
                    f"{holder.get('host')}, since {holder.get('since')}). Wait for it to finish, or use another "
                    f"folder; if that process is gone, remove {path}."
                ) from None
            if holder is not None:
                note(f"note: {folder} was held by pid {holder['pid']}, which no longer runs; taking it over.")
            path.unlink(missing_ok=True)  # two takers: the exclusive create decides
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        if (_lock_holder(path) or {}).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
