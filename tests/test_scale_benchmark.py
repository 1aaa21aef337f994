"""benchmarks/scale.py at a tiny size: the dataset it writes, and the report of both trainings."""

import json

import anndata as ad
import numpy as np


def test_written_dataset_is_a_sparse_h5ad(benchmark_script, tmp_path):
    scale = benchmark_script("scale")
    path = tmp_path / "d.h5ad"
    scale.write_dataset(path, 2500, 300, 40, chunk=700)  # chunks that do not divide the cells
    adata = ad.read_h5ad(path)
    assert adata.shape == (2500, 300) and adata.X.format == "csr"
    assert 0.85 < 1 - adata.X.nnz / (2500 * 300) < 0.97  # about 90% zeros
    assert np.allclose(adata.X.data, np.round(adata.X.data)) and adata.X.data.min() > 0
    assert adata.obs["perturbation"].nunique() == 41 and (adata.obs["perturbation"] == "control").mean() > 0.05


def test_tiny_run_writes_the_report(benchmark_script, tmp_path):
    scale = benchmark_script("scale")
    out = tmp_path / "scale.json"
    # the cfm CPU config at a tiny width, without the prior's selection; one Euler step (a network
    # call, not RK4's 4) for the cells validation generates, most of such a run's time
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {d_model: 16, n_heads: 2, n_layers: 1, genes_per_step: 32, source: control, prior: none}\n"
                      "train: {batch_size: 16}\npredict: {ode_steps: 1, ode_method: euler}\n")
    assert scale.main(["--cells", "2500", "--genes", "100", "--steps", "5", "--perturbations", "20",
                       "--in-memory-cells", "1000", "--workdir", str(tmp_path / "work"), "--config", str(config),
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cells"] == 2500 and result["genes"] == 100 and result["file_gib"] > 0
    for mode in ("backed", "in_memory"):
        assert result[mode]["peak_rss_gib"] > 0.1 and result[mode]["steps_per_s"] > 0
    assert result["in_memory"]["cells"] == 1000
    assert not (tmp_path / "work").exists()  # the data is removed unless --keep
