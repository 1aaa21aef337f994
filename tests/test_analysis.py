"""pertflow.analysis and benchmarks/selection.py on a tiny finished benchmark of a synthetic task:
the selection table has a row per anchored run with each mode scored, a second pass redoes
nothing, and arguments that name no benchmark are refused."""

import sys

import pandas as pd
import pytest

from pertflow.analysis import analysis_inputs, analysis_parser
from pertflow.benchmark import benchmark
from pertflow.errors import InputError

TINY_LATENT_SHIFT = """
model:
  embedding: pca
  n_components: 8
  hidden: 32
  decoder_hidden: 32
  decoder_steps: 40
  prior: auto
train:
  max_steps: 40
  batch_size: 16
  val_every: 20
  checkpoint_every: 20
  progress: false
"""


@pytest.fixture(scope="module")
def finished(synthetic_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    data_dir, tasks, configs = root / "data", root / "tasks", root / "configs"
    for folder in (data_dir, tasks, configs):
        folder.mkdir()
    (data_dir / "synthetic.h5ad").symlink_to(synthetic_file)
    (tasks / "tiny-combo.yaml").write_text("name: tiny-combo\ndataset: synthetic.h5ad\nkind: combinations\n"
                                           "options: {seen: [2]}\n")
    (configs / "latent-shift-cpu.yaml").write_text(TINY_LATENT_SHIFT)
    bench = root / "bench"
    benchmark(["no-change", "latent-shift"], ["tiny-combo"], bench, tasks_dir=tasks, data_dir=data_dir,
              configs_dir=configs)
    return bench, data_dir, tasks


def run_script(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    module.main()


def test_selection_table_scores_every_mode_and_continues(finished, tmp_path, monkeypatch, benchmark_script):
    bench, data_dir, tasks = finished
    out = tmp_path / "selection.csv"
    argv = [str(bench), "--models", "latent-shift", "--data-dir", str(data_dir), "--tasks-dir", str(tasks),
            "--out", str(out)]
    run_script(benchmark_script("selection"), argv, monkeypatch)
    table = pd.read_csv(out)
    assert list(table[["split", "model"]].itertuples(index=False, name=None)) == [("tiny-combo", "latent-shift")]
    row = table.iloc[0]
    assert row["chosen"] in ("flow", "prior-mean", "prior") and row["best_on_test"] in ("flow", "prior-mean", "prior")
    for mode in ("flow", "prior_mean", "prior"):
        assert -1 <= row[f"top20_{mode}"] <= 1 and row[f"edist_{mode}"] >= 0
    assert row["test_loss_of_choice"] >= 0 and bool(row["right"]) == (row["test_loss_of_choice"] == 0)

    written = out.read_bytes()
    run_script(benchmark_script("selection"), argv, monkeypatch)  # every row is there: nothing is redone or rewritten
    assert out.read_bytes() == written


def test_arguments_that_name_no_benchmark_are_refused(finished, tmp_path):
    bench, data_dir, tasks = finished
    parser = analysis_parser("an analysis", "models")
    common = ["--data-dir", str(data_dir), "--tasks-dir", str(tasks), "--out", str(tmp_path / "x.csv")]
    with pytest.raises(InputError, match="holds no runs/ folder"):
        analysis_inputs(parser.parse_args([str(tmp_path), "--models", "latent-shift", *common]))
    with pytest.raises(InputError, match="names no model"):
        analysis_inputs(parser.parse_args([str(bench), "--models", ",", *common]))
    inputs = analysis_inputs(parser.parse_args([str(bench), "--models", "latent-shift,cfm", *common]))
    assert inputs.models == ["latent-shift", "cfm"] and set(inputs.tasks) == {"tiny-combo"}
