"""``pertflow <verb>``: the command line. It only calls the public API (:mod:`pertflow.api`);
a test checks that it imports nothing else of pertflow."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from pertflow.adapt.config import InitName, TransportName
from pertflow.errors import InputError, TrainingInterrupted, cli_terms

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> Callable:
    """Register a sub-command: ``add_arguments`` declares its flags, the decorated function runs it."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable:
        COMMANDS[name] = (add_arguments, run, help)
        return run

    return register


# ---------------------------------------------------------------------------- shared flags
def add_spec_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data spec (detected when not given)")
    g.add_argument("--pert-col", help="obs column with the perturbation of each cell")
    g.add_argument("--control", help="label of control cells in the perturbation column")
    g.add_argument("--context-col", action="append", dest="context_cols",
                   help="obs column(s) defining a cell's context")
    g.add_argument("--batch-col", help="obs column with the batch of each cell")
    g.add_argument("--dose-col",
                   help="numeric obs column with each cell's dose (a condition is then perturbation@dose)")
    g.add_argument("--layer", help="read expression from this layer instead of X")
    kind = g.add_mutually_exclusive_group()
    kind.add_argument("--counts", dest="is_counts", action="store_const", const=True,
                      help="expression holds raw counts")
    kind.add_argument("--log", dest="is_counts", action="store_const", const=False, help="expression is log-normalised")
    g.add_argument("--combo-delim", help="separator of combinations (default '+')")
    g.add_argument("--min-cells", type=int, help="minimum cells per perturbation and context")
    g.add_argument("--spec", help="a data spec JSON saved by pertflow (instead of detection)")
    g.add_argument("--backed", action="store_true", help="keep expression on disk, read rows on demand")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--config",
                   help="a YAML file with 'model' and 'train' sections, or 'cpu': the CPU size shipped with "
                                    "pertflow (<model>-cpu.yaml; without --config: the model's GPU-sized defaults)")
    g.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one config key, e.g. train.max_steps=100")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def add_overwrite_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output if it exists (by default it is refused)")


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int,
                   help="threads for torch (default: the cores this process may use, at most 8); give fewer when other "
                        "jobs share the machine")


def spec_keys(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("pert_col", "control", "context_cols", "batch_col", "dose_col", "layer", "is_counts", "combo_delim",
            "min_cells")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def read_args(args: argparse.Namespace) -> dict[str, Any]:
    """The spec flags given, as the API's read arguments (``backed``, ``spec``, spec keys)."""
    given = {"backed": args.backed or None, "spec": args.spec}
    return {**{k: v for k, v in given.items() if v is not None}, **spec_keys(args)}


# ---------------------------------------------------------------------------- inspect
def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="an .h5ad file")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument("--save-spec", help="write the detected data spec to this JSON file")
    add_overwrite_flag(p)
    add_spec_flags(p)


def format_summary(s: dict[str, Any], top: int = 40) -> str:
    spec, ev = s["spec"], s["evidence"]
    lines = [f"{s['file']}: {s['cells']} cells x {s['genes']} genes"]
    lines.append(f"  expression       {s['expression']['source']}, {s['expression']['kind']}, "
                 f"{s['expression']['storage']}  ({ev.get('is_counts', '')})")
    lines.append(f"  perturbation col {spec['pert_col']}  ({ev.get('pert_col', '')})")
    lines.append(f"  control label    {spec['control']}: {s['control_cells']} cells")
    contexts = spec["context_cols"] or ["(none)"]
    lines.append(f"  context columns  {', '.join(contexts)}  ({ev.get('context_cols', '')})")
    for key in ("batch_col", "dose_col", "gene_symbol_col"):
        lines.append(f"  {key:<16} {spec[key]}  ({ev.get(key, '')})")
    lines.append(f"  genetic          {spec['genetic']}  ({ev.get('genetic', '')})")
    lines.append(f"  contexts ({len(s['contexts'])}):")
    for ctx, n in s["contexts"].items():
        lines.append(f"    {ctx:<24} {n:>7} cells, {s['control_cells_by_context'].get(ctx, 0):>6} controls")
    perts = s["perturbations"]
    lines.append(f"  perturbations ({s['n_perturbations']}, of which {s['n_combinations']} combinations), cells:")
    for name, n in list(perts.items())[:top]:
        lines.append(f"    {name:<32} {n:>7}")
    if len(perts) > top:
        lines.append(f"    ... {len(perts) - top} more (--json lists all)")
    return "\n".join(lines)


@command("inspect", "describe a file: the detected spec, controls, perturbations, contexts", _inspect_arguments)
def cmd_inspect(args: argparse.Namespace) -> int:
    from pertflow import api

    summary = api.inspect(args.file, save_spec=args.save_spec, overwrite=args.overwrite, progress=True,
                          **read_args(args))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


# ---------------------------------------------------------------------------- split
SPLIT_FLAGS = {
    "random": ("test_fraction", "seed"),
    "perturbations": ("test_perturbations", "n_test", "seed", "include_combinations"),
    "combinations": ("seen", "fraction", "seed"),
    "gears": ("seed", "train_gene_set_size", "combo_seen2_train_frac"),
    "context": ("test_context", "perturbations"),
    "dose": ("held_out_doses", "perturbations"),
}
COMMON_SPLIT_FLAGS = ("keep", "n_top_genes", "val_fraction", "val_seed")


def _split_arguments(p: argparse.ArgumentParser) -> None:
    from pertflow.data.kinds import SPLIT_KINDS

    p.add_argument("--out", required=True, help="the split JSON to write")
    add_overwrite_flag(p)
    src = p.add_argument_group("what to split: a task file, or a data file and a kind")
    src.add_argument("--task", help="a task YAML file, or a task name looked up in --tasks-dir")
    src.add_argument("--fold", help="the task's fold (for context tasks: the held-out context)")
    src.add_argument("--tasks-dir", help="folder of task files (default: the benchmark's, shipped with pertflow)")
    src.add_argument("--data-dir", help="folder of the task's data (default: $PERTFLOW_DATA_DIR)")
    src.add_argument("--data", help="an .h5ad file")
    src.add_argument("--kind", choices=SPLIT_KINDS, help="how to split")
    k = p.add_argument_group("split options (each kind takes its own)")
    k.add_argument("--keep", action="append", metavar="COL=V1,V2", help="keep only cells with these obs values")
    k.add_argument("--test-fraction", type=float, help="random: share of each perturbation's cells held out")
    k.add_argument("--test-perturbations", help="perturbations: comma-separated list to hold out")
    k.add_argument("--n-test", type=int, help="perturbations: hold out this many random singles")
    k.add_argument("--no-combinations", dest="include_combinations", action="store_const", const=False,
                   help="perturbations: do not also hold out combinations containing a held-out single")
    k.add_argument("--seen", type=int, action="append",
                   help="combinations: hold out combinations with this many measured singles (repeatable)")
    k.add_argument("--fraction", type=float, help="combinations: hold out only this share of them")
    k.add_argument("--train-gene-set-size", type=float, help="gears: share of genes used for training (0.75)")
    k.add_argument("--combo-seen2-train-frac", type=float,
                   help="gears: share of seen-2 combinations kept for training (0.75)")
    k.add_argument("--test-context", help="context: the context whose perturbed cells are held out")
    k.add_argument("--perturbations", help="context, dose: hold out only these perturbations (comma-separated)")
    k.add_argument("--held-out-doses",
                   help="dose: doses to hold out (comma-separated; default: each drug's middle dose)")
    k.add_argument("--seed", type=int, help="seed of the split's random draws")
    k.add_argument("--n-top-genes", type=int, help="keep the top N highly variable genes of the training cells")
    k.add_argument("--val-fraction", type=float, help="share of the remaining cells used for validation (0.1)")
    k.add_argument("--val-seed", type=int, help="seed of the validation draw (0)")
    add_spec_flags(p)


def _split_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name in COMMON_SPLIT_FLAGS + tuple({f for flags in SPLIT_FLAGS.values() for f in flags}):
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in COMMON_SPLIT_FLAGS and name not in SPLIT_FLAGS[args.kind]:
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} does not apply to --kind {args.kind}; it takes "
                             f"{['--' + f.replace('_', '-') for f in SPLIT_FLAGS[args.kind]]}.")
        if name in ("test_perturbations", "perturbations"):
            value = [v for v in value.split(",") if v]
        if name == "held_out_doses":
            try:
                value = [float(v) for v in value.split(",") if v]
            except ValueError:
                raise InputError(f"--held-out-doses {value}: give numbers separated by commas, e.g. 1,10.") from None
        if name == "keep":
            value = _parse_keep(value)
        options[name] = value
    return options


def _parse_keep(items: list[str]) -> dict[str, list[str]]:
    keep: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--keep {item}: write COLUMN=VALUE1,VALUE2.")
        col, values = item.split("=", 1)
        keep.setdefault(col, []).extend(v for v in values.split(",") if v)
    return keep


@command("split", "write a train/val/test split file (a task's fold, or any split kind)", _split_arguments)
def cmd_split(args: argparse.Namespace) -> int:
    from pertflow import api

    options = _split_options(args) if args.kind else None
    split = api.split(args.out, task=args.task, fold=args.fold, tasks_dir=args.tasks_dir, data_dir=args.data_dir,
                      data=args.data, kind=args.kind, options=options, overwrite=args.overwrite, **read_args(args))
    ctx = f", test context {split.test_context}" if split.test_context else ""
    print(
        f"wrote {args.out}: {len(split.train)} train, {len(split.val)} val, {len(split.test)} test cells; "
        f"{len(split.test_perturbations)} test perturbations{ctx}; {len(split.genes or [])} genes"
    )
    return 0


# ---------------------------------------------------------------------------- train / predict
def _train_arguments(p: argparse.ArgumentParser) -> None:
    from pertflow.models.registry import model_names

    p.add_argument("--model",
                   help=f"which model to train, one of {', '.join(model_names())} (with --resume: the run's)")
    p.add_argument("--data", help="an .h5ad file (with --resume: the run's)")
    p.add_argument("--split", help="a split JSON, pertflow split's or another tool's (with --resume: the run's)")
    p.add_argument("--out", required=True, help="the run folder to write")
    p.add_argument("--genes", metavar="FILE",
                   help="train on these of the split's genes only (a text file, one gene per line), e.g. the genes "
                        "another dataset shares, so that the model can predict there")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="train in N processes on this machine (DDP: gloo on CPU, NCCL on GPUs, one GPU each); "
                        "under accelerate launch or torchrun leave it out")
    add_config_flags(p)
    add_overwrite_flag(p)
    add_threads_flag(p)
    add_spec_flags(p)


@command("train", "train a model on a split's training cells", _train_arguments)
def cmd_train(args: argparse.Namespace) -> int:
    from pertflow.api import fit_summary, train

    model = train(args.model, args.data, args.split, args.out, config=args.config, sets=args.set, resume=args.resume,
                  genes=args.genes, overwrite=args.overwrite, processes=args.processes, **read_args(args))
    print("\n".join(fit_summary(model)))
    trained = (Path(args.out) / "history.csv").is_file()
    kept = "; the training history and checkpoints" if trained else " (no network: nothing to checkpoint)"
    print(f"wrote the run folder {args.out} (model.json, model.safetensors, run.json{kept}); the full record is "
          f"fit_report in model.json. Predict with: pertflow predict --run {args.out} ...")
    return 0


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a run folder written by pertflow train")
    p.add_argument("--data", required=True, help="an .h5ad file")
    p.add_argument("--split", required=True, help="the split whose test cells to predict")
    p.add_argument("--out", required=True, help="the prediction .h5ad to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the control draw and the noise")
    p.add_argument("--set", action="append", metavar="predict.KEY=VALUE",
                   help="change a prediction setting, e.g. predict.ode_steps=10")
    p.add_argument("--adapter", metavar="DIR",
                   help="an adapter folder (pertflow adapt): map the control cells the model reads with its transport")
    p.add_argument("--shift-back", action="store_true",
                   help="with --adapter: carry the predicted cells back onto the data's own scale (each control cell "
                        "unmapped plus the change the model predicted from the mapped one, read on the data's scale "
                        "through the transport run backwards)")
    p.add_argument("--map-labels", action="append", default=[], metavar="MODEL_LABEL=FILE_LABEL",
                   help="a perturbation or context label that this file names differently from the model's training "
                        "file, e.g. stim=stimulated (repeatable)")
    add_overwrite_flag(p)
    add_threads_flag(p)
    add_spec_flags(p)


def label_pairs(items: list[str]) -> dict[str, str]:
    """``["stim=stimulated", ...]`` -> {model label: file label}."""
    pairs = {}
    for item in items:
        mine, sep, theirs = item.partition("=")
        if not sep or not mine.strip() or not theirs.strip():
            raise InputError(f"--map-labels takes MODEL_LABEL=FILE_LABEL (e.g. stim=stimulated); got '{item}'.")
        pairs[mine.strip()] = theirs.strip()
    return pairs


@command("predict", "predict a split's test cells with a trained model (cell-eval-ready .h5ad)", _predict_arguments)
def cmd_predict(args: argparse.Namespace) -> int:
    from pertflow.api import means_path, predict, unread_note

    pred = predict(args.run, args.data, args.split, args.out, seed=args.seed, sets=args.set, adapter=args.adapter,
                   shift_back=args.shift_back, overwrite=args.overwrite, progress=True,
                   map_labels=label_pairs(args.map_labels), **read_args(args))
    n_pred = int((pred.obs["source"] == "predicted").sum())
    means = means_path(args.out)
    print(f"wrote {args.out}: {n_pred} predicted cells and {pred.n_obs - n_pred} control cells x {pred.n_vars} genes; "
          f"mean per perturbation in {means}")
    note = unread_note(pred)
    if note:
        print(f"note: {note}")
    return 0


#: The adapter's settings as flags: field of AdapterConfig -> (type, help); the defaults are the dataclass's.
ADAPT_FLAGS = {
    "transport": (str, "the map of the new data's controls: shift (a per-gene offset), affine (a per-gene scale and "
                       "offset: a depth or scale change), "
                       "quantile (a per-gene quantile map: a depth and dropout change)"),
    "steps": (int, "Adam steps at most (shift, affine)"),
    "lr": (float, "learning rate (halved where the held-out MMD rises)"),
    "init": (str, "start from the per-gene moment match (moments) or from the identity (zero)"),
    "seed": (int, "seed of the cells and genes drawn: the same seed repeats a run exactly"),
    "batch_size": (int, "control cells of each dataset per step"),
    "genes_per_step": (int, "genes whose MMD is taken per step"),
    "l2": (float, "weight of the penalty on the squared shift of each gene"),
    "min_bandwidth": (float, "lower bound of the RBF kernel's squared bandwidth"),
    "max_cells": (int, "control cells read per dataset at most"),
    "holdout": (float, "fraction of each dataset's control cells held out to score the transport (never stepped on)"),
    "eval_cells": (int, "held-out control cells per dataset at most"),
    "eval_every": (int, "steps between two scores on the held-out cells (the best state is kept)"),
    "patience": (int, "rises of the held-out MMD in a row after which the fit stops"),
    "n_quantiles": (int, "points of each gene's quantile grid (quantile)"),
    "min_context_cells": (int, "control cells a context needs on each side for a transport of its own (--per-context)"),
}
#: Flags with a fixed set of values.
ADAPT_CHOICES = {"transport": typing.get_args(TransportName), "init": typing.get_args(InitName)}


def _adapt_arguments(p: argparse.ArgumentParser) -> None:
    from pertflow.adapt.config import AdapterConfig

    p.add_argument("--run", required=True, help="a run folder written by pertflow train (the model to carry over)")
    p.add_argument("--source-data", required=True, nargs="+", metavar="S.h5ad",
                   help="the .h5ad file(s) the model was trained on, listed one by one "
                        "(only their control cells are read)")
    p.add_argument("--source-spec",
                   help="a data spec JSON for --source-data (default: the spec the model was trained with)")
    p.add_argument("--source-context", action="append", dest="source_contexts", metavar="CONTEXT",
                   help="read only the source's control cells of this context (repeatable; default all)")
    p.add_argument("--data", required=True,
                   help="the new .h5ad (only its control cells are read; its spec flags below)")
    p.add_argument("--context", action="append", dest="contexts", metavar="CONTEXT",
                   help="read only the new data's control cells of this context (repeatable; default all)")
    p.add_argument("--out", required=True,
                   help="the adapter folder to write (the transport's table, adapter.json, mmd.csv, mmd.png)")
    g = p.add_argument_group("adapter settings")
    defaults = AdapterConfig()
    for name, (kind, text) in ADAPT_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=kind, choices=ADAPT_CHOICES.get(name),
                       help=f"{text} (default {getattr(defaults, name)})")
    g.add_argument("--per-context", action="store_true", default=None,
                   help="fit one transport per context (cell type) that both files name, on its own control cells, "
                        "beside the pooled one for the other contexts: where contexts differ in expression or in "
                        "their mix between the files")
    add_overwrite_flag(p)
    add_spec_flags(p)


@command("adapt", "learn the per-gene transport that carries a trained model to new data (MMD domain adapter)",
         _adapt_arguments)
def cmd_adapt(args: argparse.Namespace) -> int:
    from pertflow.api import adapt

    settings = {k: getattr(args, k) for k in (*ADAPT_FLAGS, "per_context") if getattr(args, k) is not None}
    adapter = adapt(args.run, args.source_data, args.data, args.out, source_spec=args.source_spec,
                    source_contexts=args.source_contexts, contexts=args.contexts, settings=settings, progress=True,
                    overwrite=args.overwrite, **read_args(args))
    print(f"wrote {args.out}: {adapter.config.transport} transport of {len(adapter.genes)} genes from "
          f"{adapter.info['target_cells']} target and {adapter.info['source_cells']} source control cells; held-out "
          f"MMD {adapter.mmd_before:.4f} -> {adapter.mmd_after:.4f}; kept {adapter.kept}")
    for context, (before, after) in sorted(adapter.context_mmd.items()):
        print(f"  context {context}: its own transport, held-out MMD {before:.4f} -> {after:.4f}")
    if adapter.info.get("pooled_contexts"):
        print(f"  pooled transport for contexts {adapter.info['pooled_contexts']}")
    if adapter.support is not None:
        print(f"target controls outside the source's: {adapter.support.outside_before:.0%} before, "
              f"{adapter.support.outside_after:.0%} after (controls.png)")
    return 0


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="the .h5ad file the split was made on")
    p.add_argument("--split", required=True, help="the split JSON")
    p.add_argument("--pred", required=True, help="a prediction .h5ad (pertflow predict, or another tool's)")
    p.add_argument("--out", required=True, help="folder for results.csv and agg_results.csv")
    p.add_argument("--de-cache", help="folder caching the real data's DE tables across models")
    p.add_argument("--threads", type=int, default=1, help="threads for cell-eval's DE tests")
    p.add_argument("--run", help="a trained model with a latent space (latent-shift): adds knn_purity_latent, KNN "
                                 "purity in its embedding")
    p.add_argument("--no-baselines", action="store_true",
                   help="score the prediction alone (default: also the five baselines and the noise ceiling on the "
                        "same cells, for a yardstick; cached in --de-cache per split)")
    p.add_argument("--skip-metric", action="append", default=[], metavar="NAME",
                   help="a cell-eval metric not to compute (repeatable), e.g. clustering_agreement")
    add_overwrite_flag(p)
    add_spec_flags(p)


@command("evaluate", "score a prediction file against the real test cells (cell-eval + pertflow metrics)",
         _evaluate_arguments)
def cmd_evaluate(args: argparse.Namespace) -> int:
    from pertflow.api import EvalConfig, evaluate_split

    result = evaluate_split(args.data, args.split, args.pred, out=args.out, de_cache=args.de_cache,
                            config=EvalConfig(num_threads=args.threads, skip_cell_eval_metrics=tuple(args.skip_metric)),
                            overwrite=args.overwrite, progress=True, run=args.run,
                            baselines=not args.no_baselines, verbose=args.verbose, **read_args(args))
    keys = [k for k in ("pearson_delta", "pearson_delta_top20_de", "mse_top20_de_rel_nochange", "edistance_pca",
                        "overlap_at_N", "knn_purity_pca", "knn_purity_latent") if k in result.aggregate.columns]
    shown = result.aggregate.loc[["mean", "50%", "count"], keys].T.rename(columns={"50%": "median"})
    print(shown.to_string(float_format=lambda v: f"{v:.4f}"))
    if result.yardstick is not None:
        from pertflow.api import table_with_directions

        print("\nbeside the baselines and the noise ceiling, on the same cells (means over the test perturbations; "
              "the ceiling is half of the real cells against the other half: at half depth its E-distance is noisier, "
              "a reference rather than a bound):")
        print(table_with_directions(result.aggregate.loc["mean"], result.yardstick, "prediction").to_string(
            float_format=lambda v: f"{v:.3f}"))
        print("verdict:\n" + "\n".join(f"- {line}" for line in result.verdict))
    for note in result.notes:
        print(f"note: {note}")
    extra = (f", {Path(args.out) / 'yardstick.csv'} (the baselines and the ceiling)" if result.yardstick is not None
             else "")
    print(f"wrote {Path(args.out) / 'results.csv'} (per perturbation) and {Path(args.out) / 'agg_results.csv'} "
          f"(cell-eval's layout){extra}")
    return 0


def _benchmark_arguments(p: argparse.ArgumentParser) -> None:
    from pertflow.models.registry import BASELINES

    p.add_argument("--models", default=",".join(BASELINES),
                   help=f"comma-separated models (default: the baselines {','.join(BASELINES)})")
    p.add_argument("--tasks", default="all", help="comma-separated task names, or 'all'")
    p.add_argument("--folds", help="comma-separated folds to run (default: all folds of each task)")
    p.add_argument("--tasks-dir", help="folder of task files (default: the benchmark's, shipped with pertflow)")
    p.add_argument("--data-dir", help="folder of the datasets (default: $PERTFLOW_DATA_DIR)")
    p.add_argument("--splits-dir", help="folder of reference split files (default: <data-dir>/splits when it exists)")
    p.add_argument("--configs-dir",
                   help="folder of <model><suffix> configs (default: the CPU configs shipped with pertflow)")
    p.add_argument("--config-suffix", default="-cpu.yaml", help="config file suffix (default -cpu.yaml)")
    p.add_argument("--out", required=True,
                   help="output folder; an existing one is continued where it stopped (not refused)")
    add_threads_flag(p)


@command("benchmark", "run models on the benchmark tasks: results table, summary, plots", _benchmark_arguments)
def cmd_benchmark(args: argparse.Namespace) -> int:
    from pertflow.benchmark import benchmark

    tasks = "all" if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
    folds = [f for f in args.folds.split(",") if f] if args.folds else None
    summary = benchmark([m for m in args.models.split(",") if m], tasks, args.out, folds=folds,
                        tasks_dir=args.tasks_dir, data_dir=args.data_dir, splits_dir=args.splits_dir,
                        configs_dir=args.configs_dir, config_suffix=args.config_suffix, threads=args.threads)
    print(summary.read_text())
    out = Path(args.out)
    print(f"wrote {out / 'results.csv'} (per perturbation), {summary} (the table above), {out / 'summary.csv'}, "
          f"plots in {out / 'plots'}, runs in {out / 'runs'}")
    return 0


def _pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="an .h5ad file (any: perturbation columns are not needed)")
    p.add_argument("--out", required=True,
                   help="folder for the public-layout model (args.json, vocab.json, best_model.pt)")
    add_config_flags(p)
    add_overwrite_flag(p)
    add_spec_flags(p)


@command("pretrain", "pretrain a small scGPT-compatible foundation model (MLM) on an .h5ad file", _pretrain_arguments)
def cmd_pretrain(args: argparse.Namespace) -> int:
    from pertflow.api import pretrain

    pretrain(args.data, args.out, config=args.config, sets=args.set, resume=args.resume, overwrite=args.overwrite,
             **read_args(args))
    print(f"pretrained into {args.out} (load it with pertflow.foundation.scgpt.load_pretrained)")
    return 0


# ---------------------------------------------------------------------------- demo
def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="pertflow-demo",
                   help="output folder (default ./pertflow-demo); an existing one is continued")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--models", help="comma-separated models (default: the five baselines and cfm; add ccfm for the "
                                    "cascaded flow: no-change,mean,additive,linear,context-shift,cfm,ccfm)")
    add_threads_flag(p)


@command("demo", "the main job on built-in synthetic data: make it, split it, and report", _demo_arguments)
def cmd_demo(args: argparse.Namespace) -> int:
    from pertflow.demo import demo

    models = None if args.models is None else [m for m in args.models.split(",") if m]
    report = demo(args.out, seed=args.seed, threads=args.threads, models=models)
    lines = report.read_text().splitlines()
    start = lines.index("## Verdict") if "## Verdict" in lines else 0
    verdict = [line for line in lines[start + 1:] if line.startswith("- ")]
    print("\n".join(["verdict:", *verdict]))
    print(f"wrote {report} (the table, the noise ceiling and the figures), the data, splits and run folders in "
          f"{args.out}")
    return 0


# ---------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    from pertflow import __version__

    parser = argparse.ArgumentParser(prog="pertflow",
                                     description="Predict single-cell perturbation responses and measure them.")
    parser.add_argument("--version", action="version", version=f"pertflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add, _, help) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help, description=help)
        add(command_parser)
        command_parser.add_argument("--verbose", action="store_true",
                                    help="also show other libraries' progress bars, warnings and log messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    with cli_terms():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """A parsed command, its bad input reported in one line (see :func:`main`)."""
    try:
        from pertflow import api

        with api.quiet_libraries(args.verbose):
            if args.command in THREADED:
                args.threads = api.set_threads(args.threads)
            elif getattr(args, "threads", None) is not None:  # evaluate's go to cell-eval: the same bounds
                api.check_threads(args.threads)
            return COMMANDS[args.command][1](args)
    except InputError as err:
        return fail(args.command, str(err))
    except OSError as err:  # a file-system error: a full disk, a folder that went away, permissions
        where = f"{err.filename}: " if err.filename else ""
        return fail(args.command, f"{where}{err.strerror or err}. Check the path, its permissions and the free space.")
    except yaml.YAMLError as err:  # a YAML file read outside pertflow.io.read_yaml
        return fail(args.command, f"invalid YAML: {str(err).splitlines()[0]}.")
    except TrainingInterrupted as stop:
        print(f"pertflow {args.command}: interrupted at step {stop.step}; checkpoint written to {stop.checkpoints}; "
              f"continue with: {resume_hint(args)}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        hint = f"; continue with: {resume_hint(args)}" if args.command == "train" else ""
        print(f"pertflow {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


#: Commands whose --threads sets torch's threads (evaluate's goes to cell-eval's DE tests only).
THREADED = ("train", "predict", "benchmark", "demo")


def fail(command: str, message: str) -> int:
    """Print one error line for a command; the exit status of bad input."""
    print(f"pertflow {command}: error: {message}", file=sys.stderr)
    return 2


def resume_hint(args: argparse.Namespace) -> str:
    """How to continue an interrupted command."""
    if args.command == "train":
        return f"pertflow train --resume --out {args.out}"
    if args.command == "pretrain":
        return "the same pertflow pretrain command with --resume"
    return f"the same pertflow {args.command} command (it continues where it stopped)"


if __name__ == "__main__":
    raise SystemExit(main())
