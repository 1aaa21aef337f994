"""Train / validation / test splits of a dataset's cells: the builder of each kind (:func:`make_split`
lists the kinds and their options). The split record and its file are
:mod:`pertflow.data.split_file`. Validation is always separate from the test set: by default 10%
of the remaining cells, drawn with ``numpy.random.default_rng(0)``.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from pertflow.data.dataset import PerturbationData
from pertflow.data.dose import dose_label
from pertflow.data.split_file import Split
from pertflow.errors import InputError


# ---------------------------------------------------------------------------- builders
def _keep_mask(data: PerturbationData, keep: Mapping[str, Sequence[str]] | None) -> np.ndarray:
    mask = np.ones(data.n_cells, dtype=bool)
    for col, values in (keep or {}).items():
        if col not in data.adata.obs.columns:
            raise InputError(f"keep: column '{col}' is not in obs. Columns: {list(data.adata.obs.columns)}.")
        values = [values] if isinstance(values, str) else list(values)
        present = set(data.adata.obs[col].astype(str))
        unknown = [v for v in values if v not in present]
        if unknown:
            raise InputError(f"keep: values {unknown} do not occur in obs['{col}']; it holds {sorted(present)[:20]}.")
        mask &= data.adata.obs[col].astype(str).isin(values).to_numpy()
    if not mask.any():
        raise InputError(f"keep={dict(keep or {})} leaves no cells. Check the column values.")
    return mask


def _finish(
    data: PerturbationData,
    kept: np.ndarray,
    test: np.ndarray,
    *,
    val: np.ndarray | None = None,
    val_fraction: float = 0.1,
    val_seed: int = 0,
    n_top_genes: int | None = None,
    **info: Any,
) -> Split:
    """Common tail of every builder: validation cells, gene set, control lists, metadata."""
    if not test.any():
        raise InputError("the split's test set is empty: nothing matched what should be held out. Check the arguments.")
    rest = np.flatnonzero(kept & ~test)
    if val is None:
        # Validation: round(val_fraction * n) of the remaining cells, file order kept.
        n_val = int(round(val_fraction * len(rest)))
        chosen = np.random.default_rng(val_seed).choice(len(rest), size=n_val, replace=False)
        val_mask = np.zeros(data.n_cells, dtype=bool)
        val_mask[rest[chosen]] = True
    else:
        val_mask = val & kept & ~test
    train_rows = np.flatnonzero(kept & ~test & ~val_mask)
    names = data.cell_names
    test_rows = np.flatnonzero(test)
    test_contexts = set(data.contexts[test_rows])
    controls = np.flatnonzero(kept & data.is_control & np.isin(data.contexts, list(test_contexts)))
    if n_top_genes:
        from pertflow.data.preprocess import select_genes

        genes = select_genes(data, train_rows, n_top_genes)
        selection = (f"top {n_top_genes} highly variable genes (scanpy seurat flavour) of the training cells, "
                     "perturbed genes forced in, in file order")
    else:
        genes = list(map(str, data.gene_names))
        selection = f"all {len(genes)} genes"
    test_perts = sorted(set(data.perturbations[test_rows]))
    return Split(
        train=list(names[train_rows]),
        val=list(names[np.flatnonzero(val_mask)]),
        test=list(names[test_rows]),
        test_perturbations=test_perts,
        dataset=data.path.name if data.path else None,
        pert_col=data.spec.pert_col,
        control=data.spec.control,
        context_col=info.pop("context_col", data.single_context_col(np.flatnonzero(kept))),
        genes=genes,
        combo_delim=data.spec.combo_delim,
        test_controls=list(names[controls]),
        x_transform=data.spec.x_transform,
        gene_selection=selection,
        **info,
    )


def random_split(
    data: PerturbationData,
    test_fraction: float = 0.2,
    seed: int = 0,
    keep: Mapping[str, Sequence[str]] | None = None,
    **options: Any,
) -> Split:
    """Hold out a random ``test_fraction`` of the cells of every perturbation (in every context)."""
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be between 0 and 1, got {test_fraction}.")
    kept = _keep_mask(data, keep)
    rng = np.random.default_rng(seed)
    test = np.zeros(data.n_cells, dtype=bool)
    perturbed = np.flatnonzero(kept & ~data.is_control)
    groups = pd.Series(perturbed).groupby([data.perturbations[perturbed], data.contexts[perturbed]], sort=True)
    for _, rows in groups:
        rows = rows.to_numpy()
        n = int(round(test_fraction * len(rows)))
        test[rng.choice(rows, size=n, replace=False)] = True
    return _finish(data, kept, test, notes=f"random {test_fraction:.0%} of the cells of each perturbation", **options)


def _combos_containing(data: PerturbationData, perts: Iterable[str], candidates: Iterable[str]) -> list[str]:
    wanted = {c for p in perts for c in data.components(p)}
    return [p for p in candidates if len(data.components(p)) > 1 and wanted & set(data.components(p))]


def perturbation_split(
    data: PerturbationData,
    test_perturbations: Sequence[str] | None = None,
    n_test: int | None = None,
    seed: int = 0,
    include_combinations: bool = True,
    keep: Mapping[str, Sequence[str]] | None = None,
    **options: Any,
) -> Split:
    """Hold out whole perturbations.

    Parameters
    ----------
    test_perturbations
        Perturbations to hold out; or ``n_test`` of the singles drawn with ``default_rng(seed)``.
    include_combinations
        Also hold out every combination that contains a held-out single.
    """
    kept = _keep_mask(data, keep)
    present = list(dict.fromkeys(data.perturbations[kept & ~data.is_control]))
    if test_perturbations is None:
        singles = [p for p in present if len(data.components(p)) == 1]
        if not n_test or n_test >= len(singles):
            raise InputError(f"give test_perturbations, or n_test between 1 and {len(singles) - 1} (there are "
                             f"{len(singles)} singles).")
        test_perturbations = sorted(np.random.default_rng(seed).choice(singles, size=n_test, replace=False))
    bases = {data.spec.split_dose(p)[0] for p in present}  # with a dose column: a perturbation names all its doses
    unknown = [p for p in test_perturbations if p not in present and p not in bases]
    if unknown:
        raise InputError(f"test perturbations {unknown} do not occur among the kept cells; perturbations: "
                         f"{present[:30]}.")
    held = [p for p in present if p in test_perturbations or data.spec.split_dose(p)[0] in test_perturbations]
    if include_combinations:
        held += [p for p in _combos_containing(data, test_perturbations, present) if p not in held]
    test = kept & np.isin(data.perturbations, held)
    notes = f"held out: {sorted(test_perturbations)}"
    notes += " and every combination containing one" if include_combinations else ""
    return _finish(data, kept, test, notes=notes, **options)


def seen_singles(data: PerturbationData, combo: str, singles: set[str]) -> int:
    """How many components of a combination are measured as singles."""
    return sum(c in singles for c in data.components(combo))


def combination_split(
    data: PerturbationData,
    seen: Sequence[int] = (2,),
    fraction: float = 1.0,
    seed: int = 0,
    keep: Mapping[str, Sequence[str]] | None = None,
    **options: Any,
) -> Split:
    """Hold out combinations by how many of their singles are measured.

    A combination is *seen-k* when k of its components are measured as single perturbations
    among the kept cells. The combinations whose k is in ``seen`` are held out (a random
    ``fraction`` of them, drawn with ``default_rng(seed)``, when below 1); singles always train.
    """
    kept = _keep_mask(data, keep)
    present = list(dict.fromkeys(data.perturbations[kept & ~data.is_control]))
    singles = {data.components(p)[0] for p in present if len(data.components(p)) == 1}
    combos = [p for p in present if len(data.components(p)) > 1]
    subgroups = {p: f"combo_seen{seen_singles(data, p, singles)}" for p in combos}
    chosen = sorted(p for p in combos if seen_singles(data, p, singles) in set(seen))
    if fraction < 1:
        n = max(1, int(round(fraction * len(chosen))))
        chosen = sorted(np.random.default_rng(seed).choice(chosen, size=n, replace=False)) if chosen else []
    if not chosen:
        counts = pd.Series(list(subgroups.values())).value_counts().to_dict()
        raise InputError(f"no combination has seen count in {list(seen)}; the combinations are {counts}. Choose other "
                         "--seen values.")
    test = kept & np.isin(data.perturbations, chosen)
    return _finish(
        data,
        kept,
        test,
        subgroups={p: subgroups[p] for p in chosen},
        notes=f"held out: combinations with {list(seen)} measured singles",
        **options,
    )


def _gears_simulation(
    perts: list[str],
    genes_of: Mapping[str, tuple[str, ...]],
    train_gene_set_size: float,
    combo_seen2_train_frac: float,
    seed: int,
) -> tuple[list[str], list[str], dict[str, str]]:
    """GEARS' ``get_simulation_split`` on canonical names, with GEARS' own random draws.

    GEARS draws the training genes with ``np.random.seed(seed); np.random.choice(...)`` and
    reseeds before drawing the seen-2 training combinations; a local ``RandomState`` gives the
    same numbers without touching NumPy's global state.
    """
    unique_genes = np.unique([g for p in perts for g in genes_of[p]])
    rng = np.random.RandomState(seed)
    train_genes = rng.choice(unique_genes, int(len(unique_genes) * train_gene_set_size), replace=False)
    train_set = set(train_genes)
    ood = set(np.setdiff1d(unique_genes, train_genes))
    singles = [p for p in perts if len(genes_of[p]) == 1]
    combos = [p for p in perts if len(genes_of[p]) > 1]
    train = [p for p in singles if genes_of[p][0] in train_set]
    combos_with_train = [p for p in combos if set(genes_of[p]) & train_set]
    seen1 = [p for p in combos_with_train if sum(g in train_set for g in genes_of[p]) == 1]
    rest = np.setdiff1d(combos_with_train, seen1)
    rng = np.random.RandomState(seed)
    combo_train = (rng.choice(rest, int(len(rest) * combo_seen2_train_frac), replace=False) if len(rest)
                   else np.array([]))
    seen2 = np.setdiff1d(rest, combo_train).tolist()
    train += list(combo_train)
    unseen_single = [p for p in singles if genes_of[p][0] in ood]
    seen0 = [p for p in combos if set(genes_of[p]) & ood and not set(genes_of[p]) & train_set]
    subgroups = {p: "combo_seen1" for p in seen1}
    subgroups.update({p: "combo_seen2" for p in seen2})
    subgroups.update({p: "unseen_single" for p in unseen_single})
    subgroups.update({p: "combo_seen0" for p in seen0})
    test = [*seen1, *seen2, *unseen_single, *seen0]
    return train, test, subgroups


def gears_split(
    data: PerturbationData,
    seed: int = 1,
    train_gene_set_size: float = 0.75,
    combo_seen2_train_frac: float = 0.75,
    keep: Mapping[str, Sequence[str]] | None = None,
    **options: Any,
) -> Split:
    """GEARS' ``simulation`` split (seeds 1-5 in the GEARS paper).

    A fraction ``train_gene_set_size`` of the perturbed genes are training genes; singles of the
    other genes are test (``unseen_single``); combinations are test when one (``combo_seen1``)
    or none (``combo_seen0``) of their genes is a training gene, and a ``1 -
    combo_seen2_train_frac`` share of those with both (``combo_seen2``). Validation
    perturbations come from the same procedure applied to the training perturbations with
    0.9 / 0.9, as GEARS does; the subgroup of each test perturbation is recorded.
    """
    kept = _keep_mask(data, keep)
    perts = list(dict.fromkeys(data.perturbations[kept & ~data.is_control]))
    genes_of = {p: data.components(p) for p in perts}
    train, test_perts, subgroups = _gears_simulation(perts, genes_of, train_gene_set_size, combo_seen2_train_frac, seed)
    _, val_perts, _ = _gears_simulation(train, genes_of, 0.9, 0.9, seed)
    test = kept & np.isin(data.perturbations, test_perts)
    val = kept & np.isin(data.perturbations, val_perts)
    return _finish(
        data,
        kept,
        test,
        val=val,
        subgroups={p: subgroups[p] for p in sorted(test_perts)},
        notes=f"GEARS simulation split, seed {seed}, train_gene_set_size {train_gene_set_size}, combo_seen2_train_frac "
              f"{combo_seen2_train_frac}",
        **options,
    )


def context_split(
    data: PerturbationData,
    test_context: str,
    context_col: str | None = None,
    perturbations: Sequence[str] | None = None,
    keep: Mapping[str, Sequence[str]] | None = None,
    **options: Any,
) -> Split:
    """Hold out the perturbed cells of one context; its control cells stay visible.

    Parameters
    ----------
    test_context
        A value of ``context_col`` (default: the spec's context column, when there is one).
    perturbations
        Hold out only these perturbations of the context (default: all).
    """
    kept = _keep_mask(data, keep)
    if context_col is None:
        if len(data.spec.context_cols) != 1:
            raise InputError(
                f"the data spec has context columns {list(data.spec.context_cols)}; name the one to hold out with "
                "context_col (CLI: --context-col)."
            )
        context_col = data.spec.context_cols[0]
    if context_col not in data.adata.obs.columns:
        raise InputError(f"context column '{context_col}' is not in obs. Columns: {list(data.adata.obs.columns)}.")
    values = data.adata.obs[context_col].astype(str).to_numpy()
    present = sorted(set(values[kept]))
    if test_context not in present:
        raise InputError(f"context '{test_context}' does not occur in obs['{context_col}'] among the kept cells; "
                         f"contexts: {present}.")
    test = kept & (values == test_context) & ~data.is_control
    if perturbations is not None:
        test &= np.isin(data.perturbations, list(perturbations))
    if not (kept & (values == test_context) & data.is_control).any():
        raise InputError(f"context '{test_context}' has no control cells, so its response cannot be predicted from "
                         "them.")
    return _finish(
        data,
        kept,
        test,
        context_col=context_col,
        test_context=test_context,
        reference_contexts=[c for c in present if c != test_context],
        notes=f"held out: the perturbed cells of {context_col}={test_context}; its controls stay visible.",
        **options,
    )


def dose_split(
    data: PerturbationData,
    held_out_doses: Sequence[float] | None = None,
    perturbations: Sequence[str] | None = None,
    keep: Mapping[str, Sequence[str]] | None = None,
    **options: Any,
) -> Split:
    """Hold out doses: the test conditions are (perturbation, held-out dose); every other dose of
    those perturbations trains.

    Parameters
    ----------
    held_out_doses
        The doses to hold out of every perturbation measured at them (each must keep another
        dose). Default: each perturbation's middle dose (the ``(n - 1) // 2``-th of its n sorted
        doses) among those measured at three doses or more, so that it lies between two trained ones.
    perturbations
        Hold out doses of these perturbations only (default: all).

    The subgroup of a test condition is ``dose_interpolation`` when trained doses of its
    perturbation lie below and above it, else ``dose_extrapolation``.
    """
    spec = data.spec
    if spec.dose_col is None:
        raise InputError(
            "split kind 'dose' needs a dose column, but the data spec has none. Name the obs column with each cell's "
            "dose with dose_col=... (CLI: --dose-col)."
        )
    kept = _keep_mask(data, keep)
    doses_of: dict[str, set[float]] = {}
    for label in dict.fromkeys(data.perturbations[kept & ~data.is_control]):
        base, dose = spec.split_dose(label)
        if dose is not None:
            doses_of.setdefault(base, set()).add(dose)
    if perturbations is not None:
        unknown = [p for p in perturbations if p not in doses_of]
        if unknown:
            raise InputError(f"perturbations {unknown} have no doses among the kept cells; perturbations with doses: "
                             f"{sorted(doses_of)[:30]}.")
        doses_of = {p: doses_of[p] for p in perturbations}
    held: dict[str, list[float]] = {}
    if held_out_doses is None:
        held = {p: [sorted(d)[(len(d) - 1) // 2]] for p, d in doses_of.items() if len(d) >= 3}
        if not held:
            raise InputError("no perturbation is measured at three doses or more, so none has a middle dose to hold "
                             "out. Name the doses with held_out_doses (CLI: --held-out-doses).")
    else:
        wanted = np.asarray(held_out_doses, dtype=float)
        for p, d in doses_of.items():
            chosen = [x for x in sorted(d) if np.isclose(wanted, x, rtol=1e-6, atol=0).any()]
            if chosen and len(chosen) == len(d):
                raise InputError(f"'{p}' is measured only at the held-out doses {chosen}, so none of its doses would "
                                 "train. Hold it out with split kind 'perturbations', or name the perturbations with "
                                 "--perturbations.")
            if chosen:
                held[p] = chosen
        if not held:
            raise InputError(f"no perturbation is measured at the doses {list(held_out_doses)}; their doses are "
                             f"{ {p: sorted(d) for p, d in list(doses_of.items())[:10]} }.")
    conditions = {dose_label(p, x): p for p, xs in held.items() for x in xs}
    test = kept & np.isin(data.perturbations, list(conditions))
    subgroups = {}
    for label, p in conditions.items():
        dose, trained = spec.split_dose(label)[1], [x for x in doses_of[p] if x not in held[p]]
        inside = min(trained) < dose < max(trained)
        subgroups[label] = "dose_interpolation" if inside else "dose_extrapolation"
    shown = ", ".join(f"{p} at {held[p]}" for p in sorted(held)[:10])
    return _finish(data, kept, test, subgroups=dict(sorted(subgroups.items())),
                   notes=f"held out: {shown}{' ...' if len(held) > 10 else ''}; their other doses train", **options)


#: the builder of each split kind (:data:`~pertflow.data.kinds.SPLIT_KINDS` names them; a test checks they agree)
BUILDERS = {
    "random": random_split,
    "perturbations": perturbation_split,
    "combinations": combination_split,
    "gears": gears_split,
    "context": context_split,
    "dose": dose_split,
}


COMMON_OPTIONS = ("keep", "n_top_genes", "val_fraction", "val_seed", "name", "task", "fold")


def make_split(data: PerturbationData, kind: str, **options: Any) -> Split:
    """Build a split of a named kind: which cells are held out for the test, which validate, which train.

    Parameters
    ----------
    data
        The perturbation data (:func:`pertflow.api.open_data`).
    kind
        One of the kinds below (:data:`~pertflow.data.kinds.SPLIT_KINDS`).
    **options
        The kind's own options (below; those without a default are required) and these, common
        to every kind: ``keep`` ({obs column: values}: only cells with these values take part),
        ``n_top_genes`` (keep the most variable genes of the training cells; None: all),
        ``val_fraction`` (0.1: the share of the remaining cells that validates), ``val_seed``,
        ``name``, ``task``, ``fold`` (recorded in the split file).

    Returns
    -------
    Split
        Cell names of each part, the genes, the test's control cells and what was held out.

    Kinds
    -----
    """
    if kind not in BUILDERS:
        raise InputError(f"unknown split kind '{kind}'; choose one of {list(BUILDERS)}.")
    params = inspect.signature(BUILDERS[kind]).parameters
    own = [n for n, p in params.items() if n != "data" and p.kind is p.POSITIONAL_OR_KEYWORD]
    unknown = sorted(set(options) - set(own) - set(COMMON_OPTIONS))
    if unknown:
        raise InputError(f"split kind '{kind}' takes no option {unknown}; its options are "
                         f"{own + list(COMMON_OPTIONS)}.")
    missing = [n for n in own if params[n].default is inspect.Parameter.empty and n not in options]
    if missing:
        raise InputError(f"split kind '{kind}' needs {missing} (CLI: {['--' + m.replace('_', '-') for m in missing]}).")
    return BUILDERS[kind](data, **options)


def _kinds_doc() -> str:
    """Each kind's first docstring paragraph and its own options, for :func:`make_split`'s docstring."""
    lines = []
    for kind, builder in BUILDERS.items():
        params = inspect.signature(builder).parameters
        own = [n if p.default is p.empty else f"{n}={p.default!r}" for n, p in params.items()
               if n not in ("data", *COMMON_OPTIONS) and p.kind is p.POSITIONAL_OR_KEYWORD]
        summary = " ".join((builder.__doc__ or "").strip().split("\n\n")[0].split())
        lines.append(f"    ``{kind}``\n        {summary} Options: {', '.join(own) or 'only the common ones'}.")
    return "\n".join(lines) + "\n"


make_split.__doc__ = (make_split.__doc__ or "").rstrip() + "\n" + _kinds_doc()

