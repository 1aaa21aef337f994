"""``pertflow demo``: the main job on built-in synthetic data, end to end.

Makes the synthetic data, detects its spec, holds out the combinations whose singles are both
measured, trains the baselines and a small gene-space flow model (CPU-sized), predicts the
held-out cells, scores everything with the evaluation suite and writes a report with the table
and the plots. Under 2 minutes on 2 CPU cores; ``models`` adds CCFM (:data:`DEMO_CONFIGS`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pertflow.benchmark import KEY_METRICS, run_benchmark, summarize, verdict_lines
from pertflow.data.dataset import PerturbationData
from pertflow.data.synthetic import make_synthetic
from pertflow.data.tasks import Task
from pertflow.errors import InputError
from pertflow.io import check_writable, write_h5ad, write_text
from pertflow.models.registry import BASELINES, model_class

DEMO_MODELS = (*BASELINES, "cfm")
#: The flow models' CPU-sized demo configs (``configs/<model>-demo.yaml``); a model not here trains
#: with its own defaults.
#:
#: cfm: seconds of training on 2 cores. As the benchmark config, the flow starts from the controls
#: shifted by the baseline that scores best on validation (prior auto) and predicts with that
#: baseline where the trained flow does not beat it there. On the demo's split no validation
#: combination has both singles measured, so validation cannot judge the test's kind of
#: perturbation and the run predicts as its additive prior whatever it learnt (it says so in a
#: note and in model.json): 600 steps (2 minutes) ended there just as 150 do. So 150 steps, one
#: layer, two validations: enough for the loss curve to show it learning.
#:
#: ccfm (``pertflow demo --models ...,ccfm``): the same flow size with the cascade; its scGPT
#: foundation (width 16, one layer) is pretrained on the training cells for 40 steps first, in the
#: run folder, as ``pertflow train --model ccfm`` does without ``model.foundation``.
_FLOW = {"d_model": 32, "n_heads": 4, "n_layers": 1, "dropout": 0.0, "genes_per_step": 64, "source": "control",
         "source_noise": 0.1, "coupling": "ot", "center": True, "prior": "auto"}
_TRAIN = {"max_steps": 150, "batch_size": 32, "lr": 2.0e-3, "warmup_steps": 20, "min_lr_ratio": 0.05, "val_every": 75,
          "checkpoint_every": 150, "val_batches": 2, "ema_decay": 0.98, "log_every": 5, "progress": True}
_PREDICT = {"gene_chunk": 64, "ode_method": "midpoint", "ode_steps": 2}
DEMO_CONFIGS = {
    "cfm": {"model": _FLOW, "predict": _PREDICT, "train": _TRAIN},
    "ccfm": {"model": {**_FLOW, "foundation_d_model": 16, "foundation_layers": 1, "foundation_steps": 40,
                       "foundation_batch_size": 16, "bottleneck_dim": 16, "dh_depth": 1, "warmup_batches": 8},
             "predict": _PREDICT, "train": _TRAIN},
}
DEMO_CFM = DEMO_CONFIGS["cfm"]


def run_demo(out: Path, seed: int = 0, models: tuple[str, ...] | None = None, configs: dict[str, dict] | None = None,
             threads: int = 1, log=print) -> Path:
    """Run the demo into ``out``; returns the path of ``report.md`` (whose first lines after the
    title are the verdicts, one per model: see :func:`verdicts`).

    ``models``: default :data:`DEMO_MODELS`; ``configs``: per model, a config replacing its
    :data:`DEMO_CONFIGS` entry."""
    models = tuple(models or DEMO_MODELS)
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / "synthetic.h5ad"
    if not data_path.is_file():
        write_h5ad(data_path, make_synthetic(seed=seed))
    config_dir = out / "configs"
    config_dir.mkdir(exist_ok=True)
    for model, config in {**DEMO_CONFIGS, **(configs or {})}.items():
        write_text(config_dir / f"{model}-demo.yaml", yaml.safe_dump(config, sort_keys=False))
    with PerturbationData.read(data_path) as data:
        data.spec.save(out / "spec.json")
        summary = data.summary()
    task = Task(
        name="synthetic-combo-seen2",
        dataset=data_path.name,
        kind="combinations",
        question="predict a combination from its seen singles",
        options={"seen": [2]},
    )
    bench = out / "benchmark"
    results = run_benchmark(list(models), [task], out, bench, configs_dir=config_dir, config_suffix="-demo.yaml",
                            threads=threads, log=log)
    table = (bench / "summary.md").read_text()
    verdict = verdict_lines(summarize(results), tuple(BASELINES))
    plots = bench / "plots"
    figures = sorted(p.name for p in plots.glob(f"{task.name}_deltas*.png"))
    embeddings = sorted(p.name for p in plots.glob(f"{task.name}_embedding*.png"))
    training = [f"{task.name}_{m}_training.png" for m in models if (plots / f"{task.name}_{m}_training.png").is_file()]
    modes = prediction_modes(bench / "runs" / task.name, models)
    same = coinciding_baselines(summarize(results), [m for m in models if m in BASELINES])
    lines = [
        "# pertflow demo",
        "",
        f"Data: `{data_path}`: {summary['cells']} cells x {summary['genes']} genes of synthetic negative-binomial "
        f"counts, {summary['n_perturbations']} perturbations ({summary['n_combinations']} combinations) in "
        f"{len(summary['contexts'])} cell lines; the true responses are in `uns['synthetic']`.",
        f"Detected spec: `{out / 'spec.json'}` (perturbation column `{summary['spec']['pert_col']}`, control "
        f"`{summary['spec']['control']}`, contexts from `{', '.join(summary['spec']['context_cols'])}`, "
        f"{summary['expression']['kind']}).",
        "",
        "Task: hold out the combinations whose two singles are both measured; train on the rest; predict the "
        "held-out cells from control cells of the same line; score with cell-eval's metrics and pertflow's.",
        "",
        "## Verdict",
        "",
        *[f"- {line}" for line in verdict],
        "",
        *([*[f"- {line}" for line in modes], ""] if modes else []),
        "A model is only good where it beats the baselines. The *ceiling* row is half of the real cells against the "
        "other half: its Pearson deltas (corrected to full depth) are what the data's sampling noise allows; its other "
        "metrics are at half depth, so its E-distance is a noisier reference, not a bound (a baseline may score below "
        "it). Higher is better for the Pearson deltas, lower for the E-distance and MMD.",
        "",
        *([*[f"- {line}" for line in same], ""] if same else []),
        f"![summary](benchmark/plots/{task.name}_metrics.png)",
        "",
        table,
        "## Predicted vs real shift of each held-out combination",
        "",
        *[f"![deltas](benchmark/plots/{name})" for name in figures],
        "",
        "## Predicted and real cells of each held-out combination",
        "",
        "Each row: the real cells of one combination and its cell line's real controls in their own 2-D PCA; each "
        "model's predicted cells placed into that PCA (projected, not refitted).",
        "",
        *[f"![cells](benchmark/plots/{name})" for name in embeddings],
        "",
        *(["## Training", "", "The flow models' training losses (CCFM: the expression and the latent stream, and its "
           "foundation's pretraining).", "", *[f"![training](benchmark/plots/{name})" for name in training], ""]
          if training else []),
        f"Per-perturbation results: `{bench / 'results.csv'}` (the models' own `eval/agg_results.csv` in "
        f"cell-eval's layout under each run). Run folders (weights, predictions, training logs): `{bench / 'runs'}`.",
    ]
    report = out / "report.md"
    write_text(report, "\n".join(lines) + "\n")
    return report


#: why two baselines predict the same cells on this task (its test holds combinations of measured singles)
WHY_EQUAL = {
    frozenset({"context-shift", "no-change"}): "context-shift carries a perturbation's response over from the other "
    "cell lines, and no held-out combination was measured in any line, so it has nothing to carry: "
    "it predicts no change",
}


def coinciding_baselines(summary: pd.DataFrame, baselines: list[str]) -> list[str]:
    """A sentence per pair of baselines whose scores are the same on every metric of the report's
    table (:data:`~pertflow.benchmark.KEY_METRICS`; not their seconds), with the reason where it is
    known (:data:`WHY_EQUAL`), so that a reader does not take it for a fault."""
    block = summary.droplevel("task") if "task" in summary.index.names else summary
    block = block[[m for m in KEY_METRICS if m in block.columns]]
    present = [b for b in baselines if b in block.index]
    lines = []
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            x, y = block.loc[a].to_numpy(dtype=float), block.loc[b].to_numpy(dtype=float)
            if np.allclose(x, y, equal_nan=True, atol=1e-9):
                why = WHY_EQUAL.get(frozenset({a, b}), "they predict the same cells for these perturbations")
                lines.append(f"{a} and {b} score the same: {why}.")
    return lines


def prediction_modes(runs: Path, models: tuple[str, ...]) -> list[str]:
    """How each trained flow model predicts (``fit_report`` of its ``model.json``): its own cells,
    or its prior's where validation preferred the prior or could not judge the test's kind."""
    from pertflow.io import read_json
    from pertflow.models.prior import UNJUDGED_COMBINATIONS

    lines = []
    for model in models:
        path = runs / model / "model.json"
        report = read_json(path).get("fit_report", {}) if path.is_file() else {}
        mode, prior = report.get("prediction_mode"), report.get("prior")
        if mode is None:
            continue
        why = UNJUDGED_COMBINATIONS if report.get("prior_reason") == UNJUDGED_COMBINATIONS else \
            "its prior scored better on validation than its own cells"
        lines.append({
            "flow": f"{model} predicts its own cells (they beat its prior, {prior}, on validation).",
            "prior-mean": f"{model} predicts its own cells moved onto its prior's ({prior}) mean shift: {why}.",
        }.get(mode, f"{model} predicts its prior's cells ({prior}): {why}."))
    return lines


def demo(out: str | Path = "pertflow-demo", seed: int = 0, threads: int = 1, models: list[str] | None = None) -> Path:
    """The main job on built-in synthetic data; returns the path of the report.

    The Python form of ``pertflow demo``; like :func:`pertflow.benchmark.benchmark`, it continues
    in an existing ``out`` where it stopped. ``threads`` go to cell-eval's DE tests (torch's:
    :func:`set_threads`). ``models``: default the baselines and ``cfm`` (:data:`DEMO_MODELS`); add
    ``ccfm`` for the cascaded flow, with the small demo configs of :data:`DEMO_CONFIGS`.
    """
    if models is not None:
        for name in models:
            model_class(name)  # an unknown name fails before any work
        if not models:
            raise InputError("--models is empty: give comma-separated model names, e.g. additive,cfm,ccfm.")
    check_writable(out)
    return run_demo(Path(out), seed=seed, threads=threads, models=tuple(models) if models else None)
