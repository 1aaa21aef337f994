"""``pertflow demo``: the main job on built-in synthetic data, end to end."""

from __future__ import annotations

from pathlib import Path

from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import make_split
from pertflow.data.synthetic import make_synthetic
from pertflow.io import write_h5ad, write_text


def run_demo(out: Path, seed: int = 0) -> Path:
    """Make synthetic data, split it, and write ``out/report.md``; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    adata = make_synthetic(seed=seed)
    data_path = out / "synthetic.h5ad"
    write_h5ad(data_path, adata)
    with PerturbationData.read(data_path) as data:
        data.spec.save(out / "spec.json")
        split = make_split(data, "combinations", seen=[2])
        split.name = "synthetic-combo-seen2"
        split.save(out / "split.json")
        summary = data.summary()
    lines = [
        "# pertflow demo",
        "",
        f"Data: `{data_path}`: {summary['cells']} cells x {summary['genes']} genes, "
        f"{summary['n_perturbations']} perturbations ({summary['n_combinations']} combinations), "
        f"{len(summary['contexts'])} contexts, {summary['expression']['kind']}.",
        f"Detected spec: `{out / 'spec.json'}` (perturbation column `{data.spec.pert_col}`, control "
        f"`{data.spec.control}`, contexts from `{', '.join(data.spec.context_cols)}`).",
        "",
        f"Split: `{out / 'split.json'}`: held-out combinations whose singles are both measured: "
        f"{', '.join(split.test_perturbations)}; {len(split.train)} train, {len(split.val)} val, "
        f"{len(split.test)} test cells.",
    ]
    report = out / "report.md"
    write_text(report, "\n".join(lines) + "\n")
    return report
