"""Tiny CCFM vs no change on synthetic data, with and without latent augmentation (issue 14).

The setting of tests/models/test_ccfm.py (200 steps, d 32); prints the mean squared error of the
generated vs the real test means, and no change's:

    python benchmarks/ccfm_latent_augment.py 0.0   # then 0.3 (the latent_augment value), optional steps
"""
import sys, tempfile, pathlib
import numpy as np
from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.synthetic import make_synthetic
from pertflow.data.view import SplitView
from pertflow.models.ccfm.config import CCFMConfig
from pertflow.models.ccfm.model import CCFM
from pertflow.models.config import PredictConfig
from pertflow.train import TrainConfig

TINY = dict(d_model=32, n_heads=4, n_layers=1, dropout=0.0, genes_per_step=60, source="control", source_noise=0.1,
            center=True, coupling="ot", reference_cell="other", foundation_d_model=16, foundation_layers=1,
            foundation_steps=30, foundation_batch_size=16, bottleneck_dim=16, dh_depth=1, warmup_batches=4)
aug = float(sys.argv[1]); steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
adata = make_synthetic(n_genes=60, n_singles=6, n_combos=3, cells_per_group=20, controls_per_context=40, n_effect_genes=12, seed=1)
data = PerturbationData.from_anndata(adata)
view = SplitView(data, make_split(data, "random", test_fraction=0.25))
model = CCFM.from_view(view, CCFMConfig(**TINY, latent_augment=aug), PredictConfig(ode_method="midpoint", ode_steps=2))
run = pathlib.Path(tempfile.mkdtemp())
model.fit(view, TrainConfig(max_steps=steps, batch_size=32, lr=2e-3, val_every=100, checkpoint_every=100, log_every=5, progress=False, seed=1), run)
model.prediction_mode = "flow"
rng = np.random.default_rng(0)
err_model, err_none = [], []
for (pert, ctx), rows in view.test_groups().items():
    controls = view.expression.get(view.control_rows(ctx))
    real = np.asarray(view.data.to_anndata(rows, view.gene_idx).X).mean(0)
    cells = model.generate(controls, pert, ctx, rng)
    err_model.append(((cells.mean(0) - real) ** 2).mean()); err_none.append(((controls.mean(0) - real) ** 2).mean())
print(f"aug={aug} steps={steps} model={np.mean(err_model):.3f} no-change={np.mean(err_none):.3f}")
