"""The layers of the package import only downward (as scanpy's test_package_structure checks its own).

data knows AnnData and nothing above it; nn, flows and ops know only tensors; train knows no
model, dataset or metric; eval knows no model; the foundation libraries (scGPT) sit below the models
and know no model family; models know no workflow; the adapter sits on the models and nothing below
imports it; the CLI calls only the public API. Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pertflow"
TOP_LEVEL = ("api", "cli", "benchmark", "analysis", "demo", "runs", "yardstick")

ANNDATA = {"!anndata", "!scanpy"}  # outside packages are written "!name"
# layer -> what it may not import
FORBIDDEN = {
    "data": {"models", "foundation", "train", "eval", "nn", "flows", "ops", "adapt", *TOP_LEVEL},
    "nn": {"data", "models", "foundation", "train", "eval", "adapt", *TOP_LEVEL, *ANNDATA},
    "flows": {"data", "models", "foundation", "train", "eval", "nn", "adapt", *TOP_LEVEL, *ANNDATA},
    "ops": {"data", "models", "foundation", "train", "eval", "nn", "flows", "adapt", *TOP_LEVEL, *ANNDATA},
    "train": {"data", "models", "foundation", "eval", "adapt", *TOP_LEVEL},
    "eval": {"models", "foundation", "train", "adapt", *TOP_LEVEL},
    # the foundation libraries (foundation/scgpt): below models, which build on them (as do the API's
    # `pretrain` verb); their networks use nn's shared layers, pretraining reads cells through data
    # (never AnnData itself) and trains with train's engine. They need no flow, kernel, metric,
    # model family, adapter or workflow.
    "foundation": {"models", "eval", "eval.metrics", "flows", "ops", "adapt", *TOP_LEVEL, *ANNDATA},
    "models": {"eval", "adapt", *TOP_LEVEL},  # eval.metrics (pure functions) is allowed
    "adapt": {"eval", "eval.metrics", *TOP_LEVEL},  # the adapter: data, models, ops, train below it
    "api": {"benchmark", "analysis", "demo", "cli"},  # the bigger jobs use the API, never the reverse
}
#: modules of names and settings that import nothing heavy: what the command line's parser lists
#: (models, split kinds, the adapter's settings), so that `pertflow --help` imports no torch
LIGHT_MODULES = {"models.registry", "data.kinds", "adapt.config"}
CLI_MAY_IMPORT = {"api", "benchmark", "demo", "errors", "__version__", *LIGHT_MODULES}
MAX_LINES = 600
MAX_LINE_LENGTH = 120


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def layer_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported(path: Path) -> set[str]:
    """What a file imports: the pertflow layer after ``pertflow.`` (``eval.metrics`` for the pure
    metrics, which a model may use to score itself), or the outside package's top-level name
    prefixed with ``!``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == "pertflow" or name.startswith("pertflow."):
                parts = name.removeprefix("pertflow").lstrip(".").split(".")
                two = ".".join(parts[:2])
                found.add(two if two == "eval.metrics" or two in LIGHT_MODULES else parts[0])
            else:
                found.add("!" + name.split(".")[0])
    return found


def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from pertflow.models.base import X\n    import anndata as ad\n")
    assert imported(f) == {"models", "!anndata"}
    f.write_text("from pertflow.eval import metrics as M\nfrom pertflow.eval.metrics import edistance\n")
    assert imported(f) == {"eval.metrics"}


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_import_only_downward(path):
    layer = layer_of(path)
    used = imported(path)
    if layer == "cli":
        wrong = {u for u in used if not u.startswith("!") and u not in CLI_MAY_IMPORT}
        assert not wrong, f"the CLI reaches past the API into {sorted(wrong)}"
        return
    used = {u.split(".")[0] if u in LIGHT_MODULES else u for u in used}  # below the CLI a light module is its layer
    wrong = used & FORBIDDEN.get(layer, set())
    assert not wrong, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(wrong)}"


def test_no_source_file_is_too_long_to_read():
    long = {str(p.relative_to(PACKAGE)): n for p in sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_no_source_line_is_too_wide_to_read():
    wide = [f"{p.relative_to(PACKAGE.parents[1])}:{n} ({len(line)})" for p in sources()
            for n, line in enumerate(p.read_text().splitlines(), 1) if len(line) > MAX_LINE_LENGTH]
    assert not wide, f"{len(wide)} lines over {MAX_LINE_LENGTH} characters: " + ", ".join(wide)


#: what only the flow-matching object (flows/) may write: the velocity target, the one-step
#: estimate, the ODE solver and its guard
FLOW_MATCHING_ONLY = ("ODESolver(", "solve_ode(", "odeint(", "FiniteVelocity(", "target_estimate(", ".dx_t", "CondOTPath(")


@pytest.mark.parametrize("path", [p for p in sources() if layer_of(p) != "flows"], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_flow_matching_lives_only_in_flows(path):
    text = path.read_text()
    found = [s for s in FLOW_MATCHING_ONLY if s in text]
    assert not found, f"{path.relative_to(PACKAGE)} writes flow matching itself ({found}): use pertflow.flows.FlowMatching"
