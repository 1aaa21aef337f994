"""The adapter recovers a known shift of real control cells through a trained model, with the
settings a user gets.

The model is the shipped CPU config of the gene-space flow (``cfm-cpu.yaml``: latent backbone,
d_model 64, 2 layers) with ``model.center=false`` (a centred model cannot be adapted), trained
briefly on Kang with CD4T held out, on a panel of the genes most often detected in CD4T controls
(the size of the model, not its settings, is what keeps the test short). Source: one random half
of the CD4T control cells; target: the other half with +0.8 added to 40 of the panel's genes. The
adapter runs with its defaults (``pertflow adapt`` without settings).
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertflow import api
from pertflow.data import PerturbationData

N_PANEL, N_SHIFTED, SHIFT = 100, 40, 0.8


@pytest.fixture(scope="module")
def cd4t_halves(shared_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cd4t_halves")
    split = shared_data / "splits" / "kang-celltype-transfer__CD4T.json"
    if not split.is_file():
        pytest.skip(f"{split} not found")
    kang = PerturbationData.read(shared_data / "kang18_pbmc_ifnb.h5ad", backed=True)
    controls = np.flatnonzero(kang.is_control & (np.asarray(kang.contexts) == "CD4T"))
    x = kang.log_expression_csr(controls)
    detected = np.asarray((x > 0).mean(0)).ravel()
    detected[~np.isin(kang.gene_names, json.loads(split.read_text())["genes"])] = -1  # the split's genes only
    panel_idx = np.sort(np.argsort(-detected, kind="stable")[:N_PANEL])
    panel = [str(g) for g in kang.gene_names[panel_idx]]
    api.train("cfm", kang, split, folder / "run", config="cpu", genes=panel,
              sets=["model.center=false", "model.prior=none", "train.max_steps=60", "train.val_every=60", "train.checkpoint_every=60",
                    "train.progress=false"])
    rng = np.random.default_rng(0)
    order = rng.permutation(len(controls))
    half_s, half_t = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])
    delta = np.zeros(N_PANEL, np.float32)
    delta[rng.choice(N_PANEL, N_SHIFTED, replace=False)] = SHIFT
    values = x[:, panel_idx].toarray()
    obs = kang.adata.obs.iloc[controls][["condition", "cell_type"]]
    for name, rows, add in (("source", half_s, 0.0), ("target", half_t, delta)):
        ad.AnnData(sp.csr_matrix(values[rows] + add), obs=obs.iloc[rows], var=pd.DataFrame(index=panel)).write_h5ad(
            folder / f"{name}.h5ad")
    return {"folder": folder, "delta": delta}


def test_the_default_adapter_recovers_a_known_shift_of_real_control_cells(cd4t_halves):
    f, delta = cd4t_halves["folder"], cd4t_halves["delta"]
    adapter = api.adapt(f / "run", f / "source.h5ad", f / "target.h5ad")
    s, on = adapter.shift, delta != 0
    correlation, size = np.corrcoef(s, -delta)[0, 1], -s[on].mean() / SHIFT
    print(f"correlation {correlation:.3f}, size {size:.3f}, held-out MMD {adapter.mmd_before:.5f} -> "
          f"{adapter.mmd_after:.5f}, kept {adapter.kept}")
    assert correlation > 0.9
    assert 0.75 < size < 1.25
    assert adapter.mmd_after < adapter.mmd_before and adapter.kept_step is not None
