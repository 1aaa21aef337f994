"""Shared fixtures: small synthetic data, and the real datasets of ../shared/data when present.

Tests that read ``../shared/data`` skip with a reason where that folder is absent (a user's
clone); with ``PERTFLOW_REQUIRE_SHARED_DATA=1`` (set by ``.ci/run``) they fail instead.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from pertflow.data.synthetic import make_synthetic

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test processes (pytest -n): one core each
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # cell-eval's DE tests; read when numba is imported
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import pertflow.runtime

    pertflow.runtime.MAX_DEFAULT_THREADS = 1  # what set_threads(None) (the CLI's default) picks

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PERTFLOW_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def benchmark_script():
    """Loads a script of ``benchmarks/`` as a module: ``benchmark_script("shipped")``."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real datasets and reference splits."""
    if not (SHARED_DATA / "README.md").is_file():
        reason = f"real datasets not found at {SHARED_DATA} (set PERTFLOW_DATA_DIR to the shared/data folder)"
        if os.environ.get("PERTFLOW_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"PERTFLOW_REQUIRE_SHARED_DATA=1 but {reason}")
        pytest.skip(reason)
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_adata():
    """Small synthetic counts: 3 contexts, 6 singles, 3 combinations. Do not modify; copy."""
    return make_synthetic(n_genes=60, n_singles=6, n_combos=3, cells_per_group=20, controls_per_context=40, n_effect_genes=12, seed=1)


@pytest.fixture(scope="session")
def synthetic_file(tmp_path_factory, synthetic_adata) -> Path:
    path = tmp_path_factory.mktemp("synthetic") / "synthetic.h5ad"
    synthetic_adata.write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def split_file(synthetic_file, tmp_path_factory) -> Path:
    """A combinations split (both singles measured) of the synthetic file, written by the CLI."""
    from pertflow.cli import main

    path = tmp_path_factory.mktemp("split") / "split.json"
    assert main(["split", "--data", str(synthetic_file), "--kind", "combinations", "--seen", "2", "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="session")
def tiny_cfm_run(synthetic_file, split_file, tmp_path_factory) -> Path:
    """A finished 6-step run of the tiny cfm of ``cli_helpers.TINY_CFM`` (checkpoints at steps 3 and
    6) on the synthetic file and its split, trained once for the tests that resume, extend or damage
    such a run. Do not modify; copy (``shutil.copytree``: a run folder names no path of its own)."""
    from cli_helpers import TINY_CFM, sets

    from pertflow.cli import main

    run = tmp_path_factory.mktemp("tiny_cfm") / "run"
    args = ["train", "--model", "cfm", "--data", str(synthetic_file), "--split", str(split_file), "--out", str(run)]
    assert main([*args, *sets([*TINY_CFM, "train.max_steps=6"])]) == 0
    return run
