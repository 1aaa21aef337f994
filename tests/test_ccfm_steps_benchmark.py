"""benchmarks/ccfm_steps.py on a tiny CCFM run of a synthetic task: the steps table, the plot and
the cost report (with both probes, each in its own process)."""

import json

import pandas as pd
import pytest

from pertflow.api import train

TINY = dict(d_model=32, n_heads=4, n_layers=1, dropout=0.0, genes_per_step=60, source="control", source_noise=0.1,
            center=True, coupling="ot", foundation_d_model=16, foundation_layers=1, foundation_steps=10,
            foundation_batch_size=16, bottleneck_dim=16, dh_depth=1, warmup_batches=4, prior="mean")


def test_steps_table_and_cost_report(benchmark_script, synthetic_file, tmp_path):
    data_dir, tasks = tmp_path / "data", tmp_path / "tasks"
    data_dir.mkdir()
    tasks.mkdir()
    (data_dir / "synthetic.h5ad").symlink_to(synthetic_file)
    (tasks / "tiny-combo.yaml").write_text("name: tiny-combo\ndataset: synthetic.h5ad\nkind: combinations\noptions: {seen: [2]}\n")
    run = tmp_path / "bench" / "runs" / "tiny-combo" / "ccfm"
    sets = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY.items()] + [
        "train.batch_size=16", "train.max_steps=6", "train.checkpoint_every=6", "train.val_every=6", "train.val_batches=2",
        "train.progress=false", "predict.ode_method=euler", "predict.ode_steps=1", "predict.gene_chunk=32"]
    from pertflow.api import (
        split as make_task_split,  # the task's split, as the benchmark builds it
    )

    split = make_task_split(task=str(tasks / "tiny-combo.yaml"), data_dir=data_dir)
    train("ccfm", data_dir / "synthetic.h5ad", split, run, sets=sets)

    out = tmp_path / "out"
    script = benchmark_script("ccfm_steps")
    assert script.main([str(run), "--data-dir", str(data_dir), "--tasks-dir", str(tasks), "--out", str(out),
                        "--steps", "1", "--probe-steps", "2"]) == 0
    table = pd.read_csv(out / "steps.csv")
    assert table.set_index(["method", "steps"])["nfe"].to_dict() == {("euler", 1): 1, ("midpoint", 1): 2, ("rk4", 1): 4}
    assert table["pearson_delta_top20_de"].notna().all() and (table["edistance_pca"] >= 0).all()
    assert (table["cells_per_s"] > 0).all() and (table["predicted_cells"] > 0).all()
    assert (out / "steps.png").stat().st_size > 1000

    cost = json.loads((out / "cost.json").read_text())
    record, memory = cost["run_record"], cost["latent_memory"]
    assert record["steps"] == 6 and record["steps_per_s"] > 0 and record["foundation_seconds"] > 0
    cache = record["feature_cache"]
    assert cache["width"] == 16 and cache["genes"] == 60
    assert cache["bytes"] >= cache["cells"] * 60 * 16 * 2  # float16 features (+ the mask)
    assert memory["per_cell_on_disk_kib"] == pytest.approx(60 * 16 * 2 / 1024, abs=0.05) and memory["cache_cells"] == cache["cells"]
    train_probe, predict_probe = cost["probes"]["train"], cost["probes"]["predict"]
    assert train_probe["steps"] == 2 and train_probe["steps_per_s"] > 0 and train_probe["peak_rss_gib"] > 0.1
    assert train_probe["feature_cache"]["bytes"] == cache["bytes"]  # the run's foundation, the same cells
    assert predict_probe["cells"] == table["predicted_cells"].iloc[0] and predict_probe["cells_per_s"] > 0
