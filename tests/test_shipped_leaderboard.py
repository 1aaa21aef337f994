"""benchmarks/shipped.py: the shipped configs' leaderboard, on two tiny hand-made result folders.
A later run overrides an earlier one on its folds, a fold below the strongest baseline is listed,
a setting that differs from the shipped config is shown, and a config that is not the one the
run's manifest recorded is refused."""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml

TOP20, EDIST = "pearson_delta_top20_de", "edistance_pca"


def _folder(root: Path, name: str, rows: list[tuple], config: str | None = None, label: str = "",
            sha: str | None = None) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    lines = ["task,fold,model,perturbation," + TOP20 + "," + EDIST]
    lines += [f"t,{fold},{model},p,{top20},{edist}" for fold, model, top20, edist in rows]
    (folder / "results.csv").write_text("\n".join(lines) + "\n")
    if config is not None:
        (folder / "run.yaml").write_text(config)
        digest = sha or hashlib.sha256(config.encode()).hexdigest()[:16]
        (folder / "manifest.json").write_text(json.dumps({"configs": {label: {"sha256": digest}}}))


def test_shipped_rows_override_by_run_and_report_what_differs(benchmark_script, tmp_path, monkeypatch):
    shipped = benchmark_script("shipped")
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "latent-shift-cpu.yaml").write_text("model:\n  hidden: 256\ntrain:\n  max_steps: 1500\n")
    monkeypatch.setattr(shipped, "SHIPPED", configs)
    results = tmp_path / "results"
    _folder(results, "base", [("A", "mean", 0.5, 2.0), ("A", "no-change", 0.0, 3.0),
                              ("B", "mean", 0.5, 2.0), ("B", "no-change", 0.0, 3.0),
                              ("C", "mean", 0.5, 2.0), ("C", "no-change", 0.0, 3.0)])
    _folder(results, "old", [("A", "latent-shift", 0.1, 9.0), ("B", "latent-shift", 0.9, 1.0)],
            "model:\n  hidden: 128\ntrain:\n  max_steps: 1500\n", "latent-shift")
    _folder(results, "new", [("A", "latent-shift@v", 0.6, 1.5)],
            "model:\n  hidden: 256\ntrain:\n  max_steps: 1500\n", "latent-shift@v")
    spec = {"baselines": ["base"], "models": {"latent-shift": [
        {"folder": "old", "label": "latent-shift", "config": "run.yaml", "why": "width"},
        {"folder": "new", "label": "latent-shift@v", "config": "run.yaml"}]}}
    (results / "shipped.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "shipped.md"
    monkeypatch.setattr(sys, "argv", ["shipped.py", str(results / "shipped.yaml"), "--out", str(out),
                                      "--csv", str(tmp_path / "shipped.csv")])
    shipped.main()
    text = out.read_text()
    assert "| latent-shift | 0.750 | 1.250 | 2/2 | 2/2 | C |" in text  # A from 'new', B from 'old', no run of C
    assert "model.hidden: 128 -> 256" in text and "width" in text
    assert "## Folds below the bar" in text and "| t | A |" not in text

    spec["baselines"] = []  # a fold without a baseline has no bar: refused
    (results / "shipped.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit, match="no baseline run"):
        shipped.main()
    spec["baselines"] = ["base"]

    _folder(results, "wrong", [("A", "latent-shift", 0.1, 9.0)], "model:\n  hidden: 256\n", "latent-shift",
            sha="0000000000000000")
    spec["models"]["latent-shift"].append({"folder": "wrong", "label": "latent-shift", "config": "run.yaml"})
    (results / "shipped.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit, match="not the one its manifest recorded"):
        shipped.main()
    spec["models"]["latent-shift"][-1]["unchecked"] = "its comments were rewritten"
    (results / "shipped.yaml").write_text(yaml.safe_dump(spec))
    shipped.main()
    text = out.read_text()
    assert "| t | A | latent-shift | 0.100 | 9.000 | 0.500 / 2.000 | mean |" in text  # the last run's fold, now below
    assert "its comments were rewritten" in text

    # a run that stands for the config on one of its tasks: 'tasks' keeps that one
    with (results / "wrong" / "results.csv").open("a") as rows:
        rows.write("u,A,latent-shift,p,0.9,0.5\nu,A,mean,p,0.5,2.0\n")
    with (results / "base" / "results.csv").open("a") as rows:
        rows.write("u,A,mean,p,0.5,2.0\nu,A,no-change,p,0.0,3.0\n")
    _folder(results, "u-old", [("A", "latent-shift", 0.2, 2.5)], "model:\n  hidden: 256\ntrain:\n  max_steps: 1500\n",
            "latent-shift")
    (results / "u-old" / "results.csv").write_text((results / "u-old" / "results.csv").read_text().replace("t,A", "u,A"))
    spec["models"]["latent-shift"].insert(0, {"folder": "u-old", "label": "latent-shift", "config": "run.yaml"})
    for bad in (["v"], [], "u"):  # a task the run does not hold, none, not a list: refused
        spec["models"]["latent-shift"][-1]["tasks"] = bad
        (results / "shipped.yaml").write_text(yaml.safe_dump(spec))
        with pytest.raises(SystemExit, match="'tasks' must be a list"):
            shipped.main()
    spec["models"]["latent-shift"][-1]["tasks"] = ["t"]
    (results / "shipped.yaml").write_text(yaml.safe_dump(spec))
    shipped.main()
    text = out.read_text()
    assert "| t | A | latent-shift | 0.100 | 9.000 |" in text  # task t from the last run
    assert "| u | A | latent-shift | 0.200 | 2.500 |" in text  # task u still from the earlier run, below the bar


def test_a_bar_no_single_baseline_meets_is_named(benchmark_script):
    """The bar takes each metric's best baseline: where those are two baselines and neither is
    within the other's, the below-the-bar table says no baseline meets it."""
    import pandas as pd

    leaderboard = benchmark_script("leaderboard")
    shipped = benchmark_script("shipped")
    rows = [("t", "A", "no-change", 0.0, 4.7), ("t", "A", "mean", -0.09, 4.1),  # PW040's shape
            ("t", "B", "no-change", 0.0, 3.0), ("t", "B", "mean", 0.5, 2.0)]
    folds = pd.DataFrame(rows, columns=["task", "fold", "model", TOP20, EDIST]).assign(source="x")
    board = leaderboard.leaderboard(folds.set_index(["task", "fold", "model"]))
    assert shipped.baselines_within(board) == {("t", "B"): ["mean"]}


def test_a_prediction_that_repeats_a_baseline_ties_it(benchmark_script):
    """A model predicting its prior's cells repeats a baseline's figures up to float32 rounding:
    a tie, never a win; a real lead on both metrics still wins."""
    leaderboard = benchmark_script("leaderboard")
    best_top20, best_edist = 0.8178915465321418, 0.9532520367105556
    assert not leaderboard.wins(0.8178915597980307, 0.9532520335961115, best_top20, best_edist)  # zhao PW036
    assert leaderboard.wins(0.8188, 0.95, best_top20, best_edist)
    assert not leaderboard.wins(0.8188, 0.96, best_top20, best_edist)
