import json
from pathlib import Path

import pytest

from pertflow.cli import main
from pertflow.data.split_file import Split


def test_inspect_prints_what_detection_found(synthetic_file, capsys):
    assert main(["inspect", str(synthetic_file)]) == 0
    out = capsys.readouterr().out
    assert "perturbation col perturbation" in out
    assert "control label    control: 120 cells" in out
    assert "of which 3 combinations" in out
    assert "line_A" in out and "counts" in out


def test_inspect_json_and_save_spec(synthetic_file, tmp_path, capsys):
    assert main(["inspect", str(synthetic_file), "--json", "--backed", "--save-spec", str(tmp_path / "spec.json")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["spec"]["pert_col"] == "perturbation"
    assert summary["expression"]["storage"] == "sparse on disk"
    assert json.loads((tmp_path / "spec.json").read_text())["control"] == "control"


def test_bad_input_gives_a_message_not_a_traceback(synthetic_file, capsys):
    assert main(["inspect", str(synthetic_file), "--control", "NTC", "--pert-col", "perturbation"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pertflow inspect: error: control label 'NTC'") and "Traceback" not in err


@pytest.mark.parametrize(
    "flags",
    [
        ["--kind", "random", "--test-fraction", "0.3"],
        ["--kind", "perturbations", "--n-test", "2", "--seed", "4"],
        ["--kind", "combinations", "--seen", "2"],
        ["--kind", "gears", "--seed", "1"],
        ["--kind", "context", "--test-context", "line_A", "--n-top-genes", "30"],
    ],
)
def test_split_kinds(synthetic_file, tmp_path, capsys, flags):
    out = tmp_path / "split.json"
    assert main(["split", "--data", str(synthetic_file), "--out", str(out), *flags]) == 0
    split = Split.load(out)
    assert split.test and split.train and split.val
    assert "wrote" in capsys.readouterr().out


def test_split_flag_of_another_kind_is_refused(synthetic_file, tmp_path, capsys):
    assert main(["split", "--data", str(synthetic_file), "--out", str(tmp_path / "s.json"), "--kind", "random", "--seen", "2"]) == 2
    assert "--seen does not apply to --kind random" in capsys.readouterr().err


def test_split_of_a_task(shared_data, tmp_path):
    out = tmp_path / "kang.json"
    assert main(["split", "--task", "kang-celltype-transfer", "--fold", "NK", "--data-dir", str(shared_data), "--out", str(out)]) == 0
    ref = Split.load(shared_data / "splits" / "kang-celltype-transfer__NK.json")
    assert Split.load(out).test == ref.test


def test_demo_end_to_end_with_a_tiny_flow_model(tmp_path, monkeypatch, capsys):
    import functools

    import pandas as pd

    import pertflow.demo
    from pertflow.demo import DEMO_CONFIGS, run_demo

    def tiny(model: str) -> dict:
        config = DEMO_CONFIGS[model]
        return {"model": {**config["model"], "d_model": 16}, "predict": config["predict"],
                "train": {**config["train"], "max_steps": 4, "val_every": 2, "checkpoint_every": 2, "log_every": 1}}

    # ccfm runs through the same benchmark code; its demo config is checked in test_benchmark_configs
    monkeypatch.setattr(pertflow.demo, "run_demo", functools.partial(run_demo, configs={"cfm": tiny("cfm")}))
    # first interrupted in cfm's prediction: the rerun predicts again and keeps the training's seconds
    import pertflow.benchmark

    class Interrupted(Exception):
        pass

    real_predict = pertflow.benchmark.predict

    def interrupted(run_dir, *args, **kwargs):
        if Path(run_dir).name == "cfm":
            raise Interrupted
        return real_predict(run_dir, *args, **kwargs)

    monkeypatch.setattr(pertflow.benchmark, "predict", interrupted)
    with pytest.raises(Interrupted):
        main(["demo", "--out", str(tmp_path / "demo"), "--threads", "1", "--models", "no-change,additive,cfm"])
    timing = tmp_path / "demo" / "benchmark" / "runs" / "synthetic-combo-seen2" / "cfm" / "timing.csv"
    trained = pd.read_csv(timing).iloc[0].to_dict()
    assert trained["train_seconds"] > 0 and "predict_seconds" not in trained
    monkeypatch.setattr(pertflow.benchmark, "predict", real_predict)
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "demo"), "--threads", "1", "--models", "no-change,additive,cfm"]) == 0
    rerun = pd.read_csv(timing).iloc[0]
    assert rerun["train_seconds"] == pytest.approx(trained["train_seconds"]) and rerun["predict_seconds"] > 0
    printed = capsys.readouterr()
    lines = (printed.out + printed.err).splitlines()
    # Quiet: pertflow's own lines only (no cell-eval bars), ending with what was written where.
    assert len(lines) < 100 and not any("Iterating over perturbations" in line for line in lines), lines
    assert printed.out.splitlines()[-1].startswith("wrote ") and "report.md" in printed.out.splitlines()[-1]
    assert any(": cfm " in line and "strongest baseline, additive" in line for line in lines)
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "# pertflow demo" in report and "| cfm |" in report and "| additive |" in report
    assert "| *ceiling* |" in report and "synthetic-combo-seen2_metrics.png" in report
    # validation holds no combination of measured singles: the flow says it predicts as its additive prior
    assert "- cfm predicts its prior's cells (additive): the split predicts combinations" in report
    bench = tmp_path / "demo" / "benchmark"
    results = pd.read_csv(bench / "results.csv")
    assert set(results["model"]) == {"no-change", "additive", "cfm", "ceiling"}
    assert len(set(results["perturbation"])) == 5
    figures = ["synthetic-combo-seen2_deltas.png", "synthetic-combo-seen2_metrics.png", "synthetic-combo-seen2_embedding.png",
               "synthetic-combo-seen2_cfm_training.png"]
    for name in figures:
        assert (bench / "plots" / name).is_file(), name
        if "metrics" not in name:
            assert f"(benchmark/plots/{name})" in report, name  # shown in the report
    assert not (bench / "plots" / "synthetic-combo-seen2_additive_training.png").exists()  # a baseline does not train
    manifest = json.loads((bench / "manifest.json").read_text())  # what made the results folder
    assert manifest["models"] == ["no-change", "additive", "cfm"] and manifest["seconds"] > 0
    assert {"commit", "command", "configs", "machine"} <= set(manifest) and manifest["machine"]["threads"] == 1
    assert (bench / "runs" / "synthetic-combo-seen2" / "cfm" / "pred.h5ad").is_file()


def test_demo_refuses_an_unknown_model_before_any_work(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--models", "additive,nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_command_is_wired(monkeypatch, tmp_path, capsys):
    import pertflow.demo

    def fake(out, seed=0, threads=1, models=None):
        (out / "report.md").parent.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(f"# pertflow demo {seed}\n\n## Verdict\n\n- threads {threads}\n- models {models}\n")
        return out / "report.md"

    monkeypatch.setattr(pertflow.demo, "run_demo", fake)
    assert main(["demo", "--out", str(tmp_path), "--seed", "3", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "- threads 2" in out and "- models None" in out and f"wrote {tmp_path / 'report.md'}" in out
    assert main(["demo", "--out", str(tmp_path), "--models", "additive,ccfm"]) == 0
    assert "- models ('additive', 'ccfm')" in capsys.readouterr().out

def test_the_demo_says_why_two_baselines_score_the_same():
    """context-shift equal to no-change on the demo's task is explained, not left to look like a
    fault; baselines that differ are not mentioned (issue 31, item 8)."""
    import pandas as pd

    from pertflow.demo import coinciding_baselines

    summary = pd.DataFrame({"pearson_delta": [0.0, 0.5, 0.0, 0.7], "edistance_pca": [2.0, 1.0, 2.0, 0.9],
                            "train_seconds": [0.01, 0.02, 0.03, 0.04]},  # timings differ, scores do not
                           index=pd.MultiIndex.from_product([["task"], ["no-change", "mean", "context-shift", "additive"]],
                                                            names=["task", "model"]))
    lines = coinciding_baselines(summary, ["no-change", "mean", "context-shift", "additive"])
    assert len(lines) == 1 and lines[0].startswith("no-change and context-shift score the same")
    assert "nothing to carry" in lines[0]
