"""The public API: the workflow verbs, over files or objects. The CLI calls only this module.

``train`` fits a registered model on a split and writes a run folder; ``predict`` writes a
cell-eval-ready prediction of a split's test cells; ``adapt`` learns the shift that carries a
trained model to new data (``predict(..., adapter=)`` uses it); ``evaluate_split`` scores any prediction;
``benchmark``, ``pretrain`` and ``demo`` run the bigger jobs. Each takes paths (what another tool
scripts against) or the objects underneath: a :class:`~pertflow.data.dataset.PerturbationData`,
a :class:`~pertflow.data.split_file.Split`, or a :class:`~pertflow.data.view.SplitView` built once
and shared by all three verbs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import anndata as ad
import numpy as np
import pandas as pd

from pertflow.adapt import ADAPTER_FILES, Adapter, AdapterConfig, context_folders, learn_adapter
from pertflow.configs import build, load_sections, to_dict
from pertflow.data.dataset import PerturbationData
from pertflow.data.kinds import SPLIT_KINDS
from pertflow.data.split_file import Split
from pertflow.data.splits import make_split
from pertflow.data.view import SplitView, read_gene_list
from pertflow.errors import InputError
from pertflow.eval.config import EvalConfig
from pertflow.io import atomic_path, check_output, folder_lock, remove_outputs, write_h5ad
from pertflow.models.base import PerturbationModel
from pertflow.models.capabilities import GeneratesWithoutControls
from pertflow.models.config import PredictConfig
from pertflow.models.predict import interval_table, prediction_means, predict_split, unread_note
from pertflow.models.registry import BASELINES, model_class, model_names
from pertflow.runs import RUN_FILES  # noqa: F401  (benchmark reads RUN_FILES here)
from pertflow.runs import DataArg, SplitArg, TrainRun, fit_summary, shipped_config, split_of, start_run
from pertflow.runtime import check_threads, quiet_libraries, set_threads
from pertflow.train.config import TrainConfig
from pertflow.train.launch import is_main_process, run_processes

__all__ = [
    "BASELINES",
    "RUN_FILES",
    "Adapter",
    "AdapterConfig",
    "SPLIT_KINDS",
    "EvalConfig",
    "EvaluationInputs",
    "adapt",
    "evaluate_split",
    "generate_expression",
    "evaluation_inputs",
    "inspect",
    "means_path",
    "model_names",
    "open_data",
    "predict",
    "pretrain",
    "quiet_libraries",
    "check_threads",
    "fit_summary",
    "set_threads",
    "split",
    "split_view",
    "train",
    "unread_note",
]



# ---------------------------------------------------------------------------- data
def open_data(path: str | Path, *, backed: bool = False, spec: Any = None, unlabelled_ok: bool = False,
              progress: bool = False, **spec_keys: Any) -> PerturbationData:
    """Open an ``.h5ad`` file with its data spec (detected, given, or overridden by ``spec_keys``).

    ``unlabelled_ok``: a file without perturbation labels is read with every cell as a control
    (for pretraining).
    """
    if (unlabelled_ok and "pert_col" not in spec_keys and spec is None
            and not PerturbationData.has_perturbation_labels(path)):
        return PerturbationData.read_unlabelled(path, backed=backed, **spec_keys)
    return PerturbationData.read(path, backed=backed, spec=spec, progress=progress, **spec_keys)


@contextlib.contextmanager
def _dataset(data: str | Path | PerturbationData, **read_args: Any) -> Iterator[PerturbationData]:
    """The dataset itself, or the file opened (and closed at the end)."""
    if isinstance(data, PerturbationData):
        yield data
        return
    dataset = open_data(data, **read_args)
    try:
        yield dataset
    finally:
        dataset.close()


def split_view(data: PerturbationData, split: str | Path | Split, genes: list[str] | None = None) -> SplitView:
    """The dataset seen through a split, checked once (see :class:`~pertflow.data.view.SplitView`);
    ``genes``: only these of the split's genes."""
    return SplitView(data, split if isinstance(split, Split) else Split.load(split), genes=genes)


@contextlib.contextmanager
def _view(data: DataArg, split: SplitArg, genes: list[str] | None = None, **read_args: Any) -> Iterator[SplitView]:
    if isinstance(data, SplitView):
        if split is not None and split is not data.split:
            raise InputError("give a split view, or a dataset and a split, not a view and another split.")
        if genes is not None and set(genes) != set(data.genes):
            raise InputError("the split view has other genes than those asked for: build it with them "
                             "(split_view(data, split, genes)).")
        yield data
        return
    split = split_of(data, split)
    with _dataset(data, **recorded_spec(split, read_args)) as dataset:
        yield split_view(dataset, split, genes)


def recorded_spec(split: Split, read_args: dict[str, Any]) -> dict[str, Any]:
    """The read arguments, with the perturbation column and control label the split file records
    where none were given: the split is the source of truth for them, so a later command on the
    same file needs no ``--control`` again."""
    if read_args.get("spec") is not None:
        return read_args
    recorded = {"pert_col": split.pert_col, "control": split.control}
    return {**{k: v for k, v in recorded.items() if v is not None},
            **{k: v for k, v in read_args.items() if v is not None}}


def inspect(path: str | Path, save_spec: str | Path | None = None, overwrite: bool = False,
            **read_args: Any) -> dict[str, Any]:
    """What pertflow detects in a file: spec, evidence and counts (``pertflow inspect``).

    ``save_spec``: write the spec there (an existing file is refused unless ``overwrite``).
    """
    if save_spec:
        check_output(save_spec, "spec file", overwrite)
    with _dataset(path, unlabelled_ok=False, **read_args) as data:
        if save_spec:
            data.spec.save(save_spec)
        return data.summary()


def split(out: str | Path | None = None, *, task: str | None = None, fold: str | None = None,
          tasks_dir: str | Path | None = None, data_dir: str | Path | None = None,
          data: str | Path | PerturbationData | None = None, kind: str | None = None,
          options: dict[str, Any] | None = None, overwrite: bool = False, **read_args: Any) -> Split:
    """A split: a benchmark task's fold, or any split kind of a data file; written to ``out`` if given
    (an existing file is refused unless ``overwrite``)."""
    from pertflow.data.tasks import resolve_task

    if out is not None:
        check_output(out, "split file", overwrite)
    if task:
        if data is not None or kind:
            raise InputError("give either --task (with --fold, --data-dir) or --data with --kind, not both.")
        chosen = resolve_task(task, tasks_dir)
        with chosen.open_data(data_dir, backed=read_args.get("backed", False)) as dataset:
            result = chosen.build(dataset, fold)
    else:
        if data is None or not kind:
            raise InputError("give --data FILE and --kind KIND (or --task NAME).")
        with _dataset(data, **read_args) as dataset:
            result = make_split(dataset, kind, **(options or {}))
    if out is not None:
        result.save(out)
    return result


# ---------------------------------------------------------------------------- train / predict
def train(
    model: str | None,
    data: DataArg | None,
    split: SplitArg,
    out: str | Path,
    config: str | Path | None = None,
    sets: list[str] | None = None,
    resume: bool = False,
    genes: str | Path | list[str] | None = None,
    overwrite: bool = False,
    processes: int = 1,
    **read_args: Any,
) -> PerturbationModel:
    """Train ``model`` on the training cells of ``split`` and save it into the run folder ``out``.

    ``config`` is a YAML file with ``model``, ``train`` and ``predict`` sections, or the name of
    one that ships with pertflow: ``"cpu"`` (``<model>-cpu.yaml``: a size that trains in minutes
    on a laptop CPU); without it the model's defaults (the SPEC's size, for a GPU). ``sets``
    override single keys (``["train.max_steps=100"]``). The run folder records what the run was
    started with (``run.json``: the model, the three resolved config sections, the data and
    split, the genes, the read arguments).

    Parameters
    ----------
    genes
        Train on these of the split's genes only (names, or a text file with one per line), in the
        split's order: e.g. the genes another dataset shares, so that the model can be used there
        (:func:`predict` matches genes by name). A name the split lacks is an error.
    resume
        Continue the run in ``out`` from its last checkpoint (after an interruption: Ctrl-C
        writes a checkpoint). ``model``, ``data``, ``split``, ``genes``, ``config`` and the read
        arguments may be left out: ``run.json`` has them. Given again, they must agree: the same
        model, the same cells and genes in the split, the same settings but for
        ``train.max_steps`` (and ``train.progress``); the data may have moved (the training engine
        checks its genes and spec). ``sets=["train.max_steps=N"]`` extends even a finished run; the
        cosine learning rate schedule is then recomputed for the new length.
    overwrite
        Replace a run folder that already holds a run; without it (and without ``resume``)
        such a folder is refused.
    processes
        Train in this many processes on this machine (DDP through accelerate: gloo on CPU, NCCL
        on GPUs, one GPU each); each draws its own share of the batches, gradients are averaged,
        process 0 writes checkpoints. A run resumes with any number of processes. Under
        ``accelerate launch`` or ``torchrun`` leave it at 1: every launched process calls
        ``train`` and process 0 alone checks and writes the run folder.
    """
    if model is not None:
        model_class(model)  # a misspelled name fails first, with what was meant
    if isinstance(genes, (str, Path)):
        genes = read_gene_list(genes)
    config = shipped_config(model, config)
    out = Path(out)
    # one writer per run folder: a second train (or resume) of it stops at once, naming the holder
    with folder_lock(out) if is_main_process() and not out.is_file() else contextlib.nullcontext():
        run = start_run(model, data, split, out, config, sets, resume, genes, overwrite, read_args,
                        write=is_main_process())
        if processes > 1:
            if not isinstance(run.data, (str, Path)):
                raise InputError("training in several processes opens the data in each: "
                                 "give it as a file path, not an object.")
            run_processes(processes, fit_run, run)
            return PerturbationModel.load(run.out)
        return fit_run(run)


def fit_run(run: TrainRun) -> PerturbationModel:
    """Train a started run in this process (one of several in a distributed run: process 0 saves)."""
    with _view(run.data, run.split, run.genes, **run.read_args) as view:
        model_cls = model_class(run.model, to_dict(run.model_config))
        instance = model_cls.from_view(view, run.model_config, run.predict_config)
        instance.fit(view, run.train_config, run.out, resume=run.resume)
        if is_main_process():
            instance.save(run.out)
    return instance


def means_path(out: str | Path) -> Path:
    """Where :func:`predict` writes the mean predictions beside ``out``: ``<out stem>_means.csv``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_means.csv")


def intervals_path(out: str | Path) -> Path:
    """Where :func:`predict` writes the intervals of the mean shifts (``predict.interval``) beside
    ``out``: ``<out stem>_intervals.csv``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_intervals.csv")


def predict(
    run: str | Path | PerturbationModel,
    data: DataArg,
    split: SplitArg,
    out: str | Path | None = None,
    seed: int = 0,
    sets: list[str] | None = None,
    adapter: str | Path | Adapter | None = None,
    shift_back: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    map_labels: dict[str, str] | None = None,
    **read_args: Any,
) -> ad.AnnData:
    """Predict the test cells of ``split`` with a trained model; write them to ``out`` if given,
    with ``<out stem>_means.csv``, the mean predicted cell of each perturbation (and context,
    when the test cells span several), and with ``predict.interval`` set
    (``sets=["predict.interval=0.9", "predict.n_seeds=3"]``) ``<out stem>_intervals.csv``: per
    perturbation, context and gene the predicted mean shift vs control and its interval (also in
    ``uns["pertflow_interval"]``). Existing outputs are refused unless ``overwrite``, before any
    computing.

    Genes are matched by name: the data's genes the model lacks are left out, and genes the
    model needs but the data lacks are an error naming them. ``sets`` change prediction settings
    only (``["predict.ode_steps=4"]``): the ``model`` section is fixed by the trained weights.
    ``adapter`` (a folder of :func:`adapt`, any transport) maps the control cells the model reads
    (the real control cells in the file stay as they are); ``shift_back`` carries the predicted
    change back onto the data's own cells, read on their scale through the transport run backwards
    (see :func:`~pertflow.models.predict.predict_split`).

    Another file than the model's: where it lacks the model's perturbation or context column, its
    own spec is read (recorded by its split file, else detected; a batch column the model never
    used is not needed) and its labels are matched to the model's by value; ``map_labels``
    ({model label: file label}, e.g. ``{"stim": "stimulated"}``) names those that differ.
    """
    if out is not None:
        check_output(out, "prediction", overwrite)
        check_output(means_path(out), "table of mean predictions", overwrite)
        check_output(intervals_path(out), "table of intervals", overwrite)
    model = run if isinstance(run, PerturbationModel) else PerturbationModel.load(run)
    map_labels = {file: mine for mine, file in (map_labels or {}).items()}  # file label -> the model's
    changes = load_sections(None, sets)
    if changes["model"] or changes["train"]:
        raise InputError(
            "prediction takes only predict.* settings (e.g. predict.ode_steps=10); model.* and train.* are fixed "
            "by the trained weights."
        )
    settings = build(PredictConfig, {**to_dict(model.predict_config), **changes["predict"]}, "predict")
    if adapter is not None and not isinstance(adapter, Adapter):
        adapter = Adapter.load(adapter)
    if adapter is not None:
        adapter.check_genes(model)
    elif shift_back:
        raise InputError("--shift-back undoes an adapter's shift: give the adapter (--adapter DIR).")
    if read_args.get("spec") is None and not _spec_keys_given(read_args) and _has_columns_of(data, model.spec):
        read_args["spec"] = model.spec  # the file the model was trained on, or one labelled like it
    with _view(data, split, list(model.genes), **read_args) as view:
        if adapter is not None and adapter.by_context:
            pooled = [c for c in view.test_contexts if c not in adapter.by_context]
            if pooled:
                warnings.warn(f"the adapter has no transport of its own for test context(s) {pooled[:5]} (it has "
                              f"{sorted(adapter.by_context)[:5]}): their controls go through the pooled one. Check "
                              "that the file labels its contexts as the adapter's target did, or that they have enough "
                              "control cells (min_context_cells).", stacklevel=2)
        pred = predict_split(model, view, seed=seed, settings=settings, shift_back=shift_back, progress=progress,
                             control_map=None if adapter is None else adapter.apply,
                             control_unmap=None if adapter is None else adapter.invert, label_map=map_labels)
        context_col, pert_col = view.context_col, view.data.spec.pert_col  # the file's names
    if out is not None:
        out = Path(out)
        write_h5ad(out, pred)
        with atomic_path(means_path(out)) as tmp:
            prediction_means(pred, pert_col, context_col if context_col in pred.obs else None).to_csv(tmp)
        table = interval_table(pred)
        if table is not None:
            with atomic_path(intervals_path(out)) as tmp:
                table.to_csv(tmp, index=False)
    return pred


def generate_expression(run: str | Path | PerturbationModel, perturbation: str, *, cell_type: str | None = None,
                        batch: str | None = None, spatial: Any = None, n_cells: int = 100, n_steps: int | None = None,
                        use_mean: bool | None = None, seed: int = 0) -> ad.AnnData:
    """``n_cells`` cells of ``perturbation`` in a cell type (and batch, at spatial coordinates) from
    a model that generates without control cells (``cfmvc``, SPEC 2.4): log1p ``X`` on its genes."""
    import pandas as pd

    model = run if isinstance(run, PerturbationModel) else PerturbationModel.load(run)
    if not isinstance(model, GeneratesWithoutControls):
        raise InputError(f"model '{model.name}' generates cells from control cells only (pertflow predict); "
                         "generate_expression needs a model with a latent control distribution, e.g. cfmvc.")
    X = model.generate_expression(perturbation, batch=batch, cell_type=cell_type, spatial=spatial, n_steps=n_steps,
                                  use_mean=use_mean, n_cells=n_cells, seed=seed)
    obs = pd.DataFrame({model.spec.pert_col: perturbation, "context": cell_type or ""},
                       index=[f"gen_{i}" for i in range(len(X))])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(model.genes)))


def adapt(
    run: str | Path | PerturbationModel,
    source_data: str | Path | PerturbationData | list[str | Path | PerturbationData],
    data: str | Path | PerturbationData,
    out: str | Path | None = None,
    *,
    source_spec: Any = None,
    source_contexts: list[str] | None = None,
    contexts: list[str] | None = None,
    settings: AdapterConfig | dict[str, Any] | None = None,
    transport: str | None = None,
    progress: bool = False,
    overwrite: bool = False,
    **read_args: Any,
) -> Adapter:
    """Learn an MMD domain adapter (SPEC 2.6) that carries a trained model to new data; write the
    adapter folder to ``out`` if given (``pertflow adapt``).

    Only control cells are read: those of ``source_data`` (S, the data the model was trained on,
    one file or an explicit list of files whose controls are pooled; read with ``source_spec``,
    else the model's own spec) and of ``data`` (T; its spec detected
    or given by ``read_args``), of the given contexts (all when None). The files are opened
    backed and read in row chunks. ``transport`` maps T's controls: ``shift`` (a per-gene offset,
    the default), ``affine`` (a per-gene scale and offset), both learnt by MMD through the model's
    control embedding, or ``quantile`` (a per-gene quantile map); it overrides ``settings``'s.
    ``settings``: :class:`~pertflow.adapt.AdapterConfig` or its fields (steps, lr, seed, ...).
    The transport is scored on held-out control cells; the best state is kept, never worse than
    the identity (``Adapter.mmd_after <= Adapter.mmd_before``, ``Adapter.kept_step``). A folder
    ``out`` that already holds an adapter is refused unless ``overwrite``, before any computing.
    """
    from pertflow.adapt.transports import transport_class

    existing = [] if out is None else check_output(out, "adapter folder", overwrite, holds=ADAPTER_FILES)
    existing += [] if out is None else context_folders(out)  # an overwritten adapter's per-context tables
    model = run if isinstance(run, PerturbationModel) else PerturbationModel.load(run)
    fields = to_dict(settings) if isinstance(settings, AdapterConfig) else dict(settings or {})
    if transport is not None:
        fields["transport"] = transport
    transport_class(fields.get("transport", "shift"))  # an unknown one is named with the choices
    config = build(AdapterConfig, fields, "adapter")
    read_args = {**read_args, "backed": True}
    sources = list(source_data) if isinstance(source_data, (list, tuple)) else [source_data]
    with contextlib.ExitStack() as stack:
        if out is not None:  # one writer per adapter folder
            stack.enter_context(folder_lock(out, "adapter folder"))
        source = [stack.enter_context(_dataset(s, backed=True, spec=source_spec or model.spec)) for s in sources]
        target = stack.enter_context(_dataset(data, **read_args))
        adapter = learn_adapter(model, source, target, config, source_contexts, contexts, progress=progress)
        adapter.info["run"] = None if isinstance(run, PerturbationModel) else str(run)
        if out is not None:
            remove_outputs(existing)
            adapter.save(out)
    return adapter


# ---------------------------------------------------------------------------- evaluate
@dataclass
class EvaluationInputs:
    """The real side of an evaluation of a split: what every prediction of it is scored against.

    Attributes
    ----------
    split
        The split.
    real
        The real test cells plus the test contexts' visible control cells (dense log1p).
    train
        The real training cells (CSR log1p), for the PCA and the Systema reference.
    context_col
        The context column to evaluate by (see :attr:`SplitView.context_col`).
    pert_col, control
        The data spec's perturbation column and control label.
    dose_col
        The data spec's dose column: each (perturbation, dose) is scored as its own group.
    """

    split: Split
    real: ad.AnnData
    train: ad.AnnData
    context_col: str | None
    pert_col: str
    control: str
    dose_col: str | None = None


def evaluation_inputs(data: DataArg, split: SplitArg = None, **read_args: Any) -> EvaluationInputs:
    """Build the real cells a prediction of a split is scored against (shared across models)."""
    with _view(data, split, **read_args) as view:
        return EvaluationInputs(
            view.split, view.real_test_anndata(), view.train_anndata(), view.context_col,
            view.data.spec.pert_col, view.data.spec.control, view.data.spec.dose_col,
        )


def table_with_directions(scores: Any, table: Any, model: str = "model") -> Any:
    """A model's mean scores over the baselines' and the ceiling's, the columns named with their
    direction (:func:`pertflow.yardstick.table_with_directions`)."""
    from pertflow.yardstick import table_with_directions as with_directions

    return with_directions(scores, table, model)


def evaluate_split(
    data: DataArg | None,
    split: SplitArg,
    pred: str | Path | ad.AnnData,
    out: str | Path | None = None,
    de_cache: str | Path | None = None,
    config: EvalConfig | None = None,
    inputs: EvaluationInputs | None = None,
    overwrite: bool = False,
    run: str | Path | PerturbationModel | None = None,
    progress: bool = False,
    baselines: bool = True,
    verbose: bool = False,
    **read_args: Any,
):
    """Score a prediction file of a split's test cells (pertflow's or another tool's).

    Returns the :class:`~pertflow.eval.evaluator.EvalResult`; with ``out``, writes
    ``results.csv`` (one row per perturbation and context) and ``agg_results.csv`` there (a
    folder that holds them is refused unless ``overwrite``). ``inputs`` (from
    :func:`evaluation_inputs`) skips rebuilding the real side. ``run``: a trained model with a
    latent space (``latent-shift``); adds ``knn_purity_latent``, KNN purity in its embedding.
    ``baselines`` (given ``data`` and ``split``): also score the five baselines and the noise
    ceiling on the same cells (:mod:`pertflow.yardstick`; ``result.yardstick``, ``result.verdict``,
    and ``yardstick.csv`` in ``out``), cached in ``de_cache`` per split. Other libraries'
    progress bars, warnings and log records (cell-eval's) are dropped unless ``verbose``.
    """
    with quiet_libraries(verbose):
        return _evaluate_split(data, split, pred, out, de_cache, config, inputs, overwrite, run, progress, baselines,
                               **read_args)


def _evaluate_split(data, split, pred, out, de_cache, config, inputs, overwrite, run, progress, baselines, **read_args):
    from pertflow.eval.evaluator import evaluate

    if out is not None:
        check_output(out, "evaluation folder", overwrite, holds=EVALUATION_FILES)
    # with baselines the data is opened once, for the real side and the baselines both
    with _view(data, split, **read_args) if baselines and data is not None else contextlib.nullcontext() as view:
        if inputs is None:
            inputs = evaluation_inputs(view) if view is not None else evaluation_inputs(data, split, **read_args)
        embed = None if run is None else latent_space(run, list(map(str, inputs.real.var_names)))
        if not isinstance(pred, ad.AnnData):
            from pertflow.eval.checks import read_anndata

            pred = read_anndata(pred, "pred")
        config = config or EvalConfig()
        result = evaluate(
            inputs.real, pred, pert_col=inputs.pert_col, control=inputs.control, context_col=inputs.context_col,
            dose_col=inputs.dose_col, train=inputs.train, outdir=out, de_cache=de_cache, config=config, embed=embed,
            progress=progress,
        )
        if view is None:
            return result
        from pertflow.yardstick import table_with_directions, verdict, yardstick

        table = yardstick(view, inputs, config, de_cache=de_cache, progress=progress)
    scores = result.aggregate.loc["mean"]
    if out is not None:
        with atomic_path(Path(out) / "yardstick.csv") as tmp:
            table_with_directions(scores, table, "prediction").to_csv(tmp)
    return dataclasses.replace(result, yardstick=table, verdict=tuple(verdict("the prediction", scores, table)))


SPEC_KEYS = ("pert_col", "control", "context_cols", "batch_col", "dose_col", "combo_delim")


def _spec_keys_given(read_args: dict[str, Any]) -> bool:
    return any(read_args.get(k) is not None for k in SPEC_KEYS)


def _has_columns_of(data: DataArg, spec: Any) -> bool:
    """Whether ``data`` (a file, a dataset or a view) has the perturbation and context columns of ``spec``."""
    if isinstance(data, (PerturbationData, SplitView)):
        return True  # already read with its own spec
    backed = ad.read_h5ad(data, backed="r")
    try:
        columns = set(backed.obs.columns)
    finally:
        backed.file.close()
    return spec.pert_col in columns and all(c in columns for c in spec.context_cols)


def latent_space(run: str | Path | PerturbationModel, genes: list[str]) -> Callable[[np.ndarray], np.ndarray]:
    """The embedding of a trained model with a latent space (``embed``), reading cells on ``genes``."""
    model = run if isinstance(run, PerturbationModel) else PerturbationModel.load(run)
    if not callable(getattr(model, "embed", None)):
        raise InputError(f"model '{model.name}' has no latent space to measure KNN purity in; give a run of a model "
                         "that has one (latent-shift), or evaluate without --run.")
    missing = [g for g in model.genes if g not in set(genes)]
    if missing:
        raise InputError(f"the evaluated genes lack {len(missing)} of the model's genes (e.g. {missing[:5]}); "
                         "evaluate on the split the model was trained on.")
    columns = pd.Index(genes).get_indexer(model.genes)
    return lambda x: model.embed(np.asarray(x)[:, columns])


EVALUATION_FILES = ("results.csv", "agg_results.csv", "yardstick.csv")


# ---------------------------------------------------------------------------- bigger jobs
def pretrain(data: str | Path, out: str | Path, config: str | Path | None = None, sets: list[str] | None = None,
             resume: bool = False, overwrite: bool = False, **read_args: Any):
    """Pretrain a small scGPT-compatible model (MLM) on any ``.h5ad`` file; write a public scGPT folder.

    ``resume`` continues the run in ``out`` from its last checkpoint (give the same data and
    settings; ``train.max_steps`` may grow); ``overwrite`` replaces what ``out`` holds, which is
    otherwise refused.
    """
    from pertflow.foundation.scgpt.pretrain import PRETRAIN_FILES, PretrainConfig
    from pertflow.foundation.scgpt.pretrain import pretrain as run_pretrain

    if resume and overwrite:
        raise InputError("give --resume (continue the run in --out) or --overwrite (start it again), not both.")
    existing = check_output(out, "pretraining folder", overwrite or resume, holds=PRETRAIN_FILES,
                            other_choice="--resume to continue it")
    sections = load_sections(config, sets)
    if sections["predict"]:
        raise InputError("pretraining takes model.* and train.* settings, not predict.*.")
    model_config = build(PretrainConfig, sections["model"], "model")
    train_config = build(TrainConfig, sections["train"], "train")
    with folder_lock(out, "pretraining folder"):  # one writer per folder
        if overwrite:
            remove_outputs(existing)
        with _dataset(data, unlabelled_ok=True, **read_args) as dataset:
            return run_pretrain(dataset, out, model_config, train_config, resume=resume)
