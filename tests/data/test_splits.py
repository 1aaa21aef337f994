import json

import numpy as np
import pytest

from pertflow.data.dataset import PerturbationData
from pertflow.data.split_file import Split
from pertflow.data.splits import make_split
from pertflow.data.tasks import Task, find_tasks
from pertflow.errors import InputError

TASKS_DIR = __import__("pathlib").Path(__file__).resolve().parents[2] / "benchmarks" / "tasks"
TASK_FOLDS = [(name, fold) for name, task in sorted(find_tasks(TASKS_DIR).items()) for fold in task.fold_names]


@pytest.fixture(scope="module")
def data(synthetic_adata):
    return PerturbationData.from_anndata(synthetic_adata)


@pytest.mark.parametrize("name,fold", TASK_FOLDS, ids=[f"{n}-{f}" for n, f in TASK_FOLDS])
def test_tasks_reproduce_reference_splits(shared_data, name, fold):
    task = find_tasks(TASKS_DIR)[name]
    with task.open_data(shared_data) as d:
        split = task.build(d, fold)
        reference = shared_data / "splits" / f"{task.split_name(fold)}.json"
        if not reference.is_file():  # a task the data README defines without split files: its rules
            targets = task.fold_options[fold]["test_perturbations"]
            assert split.test_perturbations == targets
            held = np.isin(d.perturbations, targets)
            assert set(split.test) == set(d.adata.obs_names[held]) and not set(split.test) & (set(split.train) | set(split.val))
            assert set(d.perturbations[d.rows_of(split.train, "train")]) == set(d.perturbations) - set(targets)
            rest = len(split.train) + len(split.val)
            assert len(split.val) == int(round(0.1 * rest))
            return
    ref = Split.load(reference)
    assert split.test == ref.test
    assert split.test_perturbations == ref.test_perturbations
    assert not set(split.test) & (set(split.train) | set(split.val))
    # Beyond what is required: the whole split matches the reference.
    assert split.val == ref.val and split.train == ref.train
    assert split.genes == ref.genes
    assert split.test_controls == ref.test_controls
    assert split.context_col == ref.context_col


def test_all_tasks_of_the_readme_have_a_file():
    assert {n for n, _ in TASK_FOLDS} == {
        "norman-combo-seen2", "norman-unseen-single", "gbm-cellline-transfer", "kang-celltype-transfer", "zhao-patient-transfer",
        "tapseq-unseen-target",
    }


def test_reference_split_loads_and_fits_its_data(shared_data):
    ref = Split.load(shared_data / "splits" / "zhao-patient-transfer__PW030.json")
    assert ref.extra["hidden"] is False  # unknown keys are kept
    with PerturbationData.read(shared_data / ref.dataset, backed=True) as d:
        rows = ref.rows(d)
    assert len(rows.test) == 500 and len(rows.train) == 4050


def check_disjoint(split, data):
    rows = split.rows(data)
    assert not set(rows.test) & set(rows.train) and not set(rows.test) & set(rows.val) and not set(rows.val) & set(rows.train)
    assert not data.is_control[rows.test].any()
    assert data.is_control[rows.train].any() and len(rows.val) > 0


@pytest.mark.parametrize(
    "kind,options",
    [
        ("random", {"test_fraction": 0.25, "seed": 2}),
        ("perturbations", {"n_test": 2, "seed": 1}),
        ("combinations", {"seen": [2]}),
        ("gears", {"seed": 1}),
        ("context", {"test_context": "line_B"}),
    ],
)
def test_every_kind_round_trips_through_json(tmp_path, data, kind, options):
    split = make_split(data, kind, **options)
    check_disjoint(split, data)
    split.save(tmp_path / "s.json")
    again = Split.load(tmp_path / "s.json")
    assert again == split
    raw = json.loads((tmp_path / "s.json").read_text())
    assert {"train", "val", "test", "test_perturbations", "genes", "pert_col", "control", "context_col"} <= set(raw)
    assert make_split(data, kind, **options) == split  # seeded


def test_random_split_holds_out_cells_of_every_perturbation(data):
    split = make_split(data, "random", test_fraction=0.25)
    assert set(split.test_perturbations) == set(data.perturbation_names)
    rows = split.rows(data)
    for p in data.perturbation_names:
        in_test = (data.perturbations[rows.test] == p).sum()
        total = (data.perturbations == p).sum()
        assert in_test == pytest.approx(0.25 * total, abs=3)


def test_perturbation_split_holds_out_combinations_with_the_single(data):
    singles = [p for p in data.perturbation_names if "+" not in p]
    combos = [p for p in data.perturbation_names if "+" in p]
    target = next(s for s in singles if any(s in c.split("+") for c in combos))
    split = make_split(data, "perturbations", test_perturbations=[target])
    expected = {target} | {c for c in combos if target in c.split("+")}
    assert set(split.test_perturbations) == expected
    alone = make_split(data, "perturbations", test_perturbations=[target], include_combinations=False)
    assert alone.test_perturbations == [target]


def test_combination_split_by_seen_singles(data):
    combos = [p for p in data.perturbation_names if "+" in p]
    split = make_split(data, "combinations", seen=[2])
    assert set(split.test_perturbations) == set(combos)  # all synthetic combinations have both singles
    assert set(split.subgroups.values()) == {"combo_seen2"}
    with pytest.raises(InputError, match="no combination has seen count in \\[0\\]"):
        make_split(data, "combinations", seen=[0])


def test_gears_split_follows_gears_semantics(data):
    split = make_split(data, "gears", seed=1, train_gene_set_size=0.5, combo_seen2_train_frac=0.5)
    rows = split.rows(data)
    # GEARS draws validation perturbations out of the training ones: "seen" counts both.
    train_perts = set(data.perturbations[np.concatenate([rows.train, rows.val])]) - {"control"}
    train_genes = {g for p in train_perts for g in data.components(p)}
    for pert, group in split.subgroups.items():
        genes = data.components(pert)
        n_seen = sum(g in train_genes for g in genes)
        if group == "unseen_single":
            assert len(genes) == 1 and n_seen == 0
        else:
            assert group == f"combo_seen{n_seen}"
    val_perts = set(data.perturbations[rows.val]) - {"control"}
    assert val_perts and not val_perts & set(split.test_perturbations)  # GEARS validates on held-out perturbations
    other = make_split(data, "gears", seed=2, train_gene_set_size=0.5, combo_seen2_train_frac=0.5)
    assert other.test_perturbations != split.test_perturbations


def test_context_split_keeps_controls_visible(data):
    split = make_split(data, "context", test_context="line_C")
    rows = split.rows(data)
    assert set(data.contexts[rows.test]) == {"line_C"}
    visible = np.concatenate([rows.train, rows.val])
    assert (data.is_control[visible] & (data.contexts[visible] == "line_C")).sum() == 40
    assert split.reference_contexts == ["line_A", "line_B"]
    assert len(split.test_controls) == 40


def test_hvg_genes_are_chosen_on_training_cells_with_perturbed_genes_forced(data):
    split = make_split(data, "context", test_context="line_A", n_top_genes=20)
    targets = {g for p in data.perturbation_names for g in data.components(p)}
    assert targets <= set(split.genes)
    assert len(split.genes) >= 20
    order = [list(data.gene_names).index(g) for g in split.genes]
    assert order == sorted(order)


def test_keep_errors(data):
    with pytest.raises(InputError, match="keep: column 'tissue' is not in obs"):
        make_split(data, "random", keep={"tissue": ["x"]})
    with pytest.raises(InputError, match=r"keep: values \['line_Z'\] do not occur"):
        make_split(data, "random", keep={"cell_type": ["line_Z"]})


def test_task_file_errors(tmp_path):
    (tmp_path / "t.yaml").write_text("name: t\ndataset: x.h5ad\nkind: random\ncolour: red\n")
    with pytest.raises(InputError, match=r"unknown task keys \['colour'\]"):
        Task.load(tmp_path / "t.yaml")
    (tmp_path / "t.yaml").write_text("name: t\ndataset: x.h5ad\nkind: shuffle\n")
    with pytest.raises(InputError, match="unknown kind 'shuffle'"):
        Task.load(tmp_path / "t.yaml")
    (tmp_path / "t.yaml").write_text("name: t\ndataset: x.h5ad\nkind: perturbations\nfolds: [A, B]\n")
    with pytest.raises(InputError, match="a list of folds names test contexts"):
        Task.load(tmp_path / "t.yaml")
    (tmp_path / "t.yaml").write_text("name: t\ndataset: x.h5ad\nkind: perturbations\nfolds: {AB: {test_perturbations: [A, B]}}\n")
    assert Task.load(tmp_path / "t.yaml").fold_options == {"AB": {"test_perturbations": ["A", "B"]}}


def gears_reference(perts: list[str], seed: int, train_gene_set_size: float, combo_seen2_train_frac: float):
    """GEARS' own get_simulation_split, transcribed step by step on GEARS-format names (A+ctrl)."""

    def genes_of(perts):
        return np.unique([g for p in np.unique(perts) for g in p.split("+") if g != "ctrl"])

    def perts_from_genes(genes, candidates):
        return [p for p in candidates if any(g in p.split("+") for g in genes)]

    singles = [p for p in perts if "ctrl" in p and p != "ctrl"]
    combos = [p for p in perts if "ctrl" not in p]
    genes = genes_of(perts)
    np.random.seed(seed)
    train_genes = np.random.choice(genes, int(len(genes) * train_gene_set_size), replace=False)
    train = perts_from_genes(train_genes, singles)
    pert_combo = perts_from_genes(train_genes, combos)
    seen1 = [x for x in pert_combo if len([t for t in x.split("+") if t in train_genes]) == 1]
    pert_combo = np.setdiff1d(pert_combo, seen1)
    np.random.seed(seed)
    combo_train = np.random.choice(pert_combo, int(len(pert_combo) * combo_seen2_train_frac), replace=False)
    seen2 = np.setdiff1d(pert_combo, combo_train).tolist()
    train += list(combo_train)
    ood = np.setdiff1d(genes, train_genes)
    unseen = perts_from_genes(ood, singles)
    seen0 = [x for x in perts_from_genes(ood, combos) if len([t for t in x.split("+") if t in train_genes]) == 0]
    groups = {**{p: "combo_seen1" for p in seen1}, **{p: "combo_seen2" for p in seen2},
              **{p: "unseen_single" for p in unseen}, **{p: "combo_seen0" for p in seen0}}
    return train, groups


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_gears_split_equals_gears_on_a_gears_file(shared_data, seed):
    with PerturbationData.read(shared_data / "norman19_gears_micro.h5ad") as data:
        split = make_split(data, "gears", seed=seed)
        labels = [p for p in data.adata.obs["condition"].astype(str).unique() if p != "ctrl"]
        train, groups = gears_reference(labels, seed, 0.75, 0.75)
        _, val_groups = gears_reference(train, seed, 0.9, 0.9)
        canonical = {p: data.perturbations[np.flatnonzero(data.adata.obs["condition"].astype(str) == p)[0]] for p in labels}
        assert split.subgroups == {canonical[p]: g for p, g in groups.items()}
        rows = split.rows(data)
        assert set(data.perturbations[rows.val]) - {"ctrl"} == {canonical[p] for p in val_groups}


def test_hvg_selection_never_sees_test_cells(synthetic_adata):
    adata = synthetic_adata.copy()
    X = adata.X.toarray()
    held = ((adata.obs["cell_type"] == "line_A") & (adata.obs["perturbation"] != "control")).to_numpy()
    X[:, 59] = 1.0
    X[held, 59] = np.random.default_rng(0).poisson(50, held.sum())  # variable in test cells only
    adata.X = __import__("scipy.sparse", fromlist=["csr_matrix"]).csr_matrix(X)
    data = PerturbationData.from_anndata(adata)
    split = make_split(data, "context", test_context="line_A", n_top_genes=20)
    assert "G0059" not in split.genes
    everything = __import__("pertflow.data.preprocess", fromlist=["select_genes"]).select_genes(data, np.arange(data.n_cells), 20)
    assert "G0059" in everything  # with the test cells it would have been chosen


def test_make_split_documents_every_kind_and_its_options():
    """help(make_split) lists each kind with what it holds out and its options (issue 31, item 9)."""
    import inspect

    from pertflow.data.kinds import SPLIT_KINDS
    from pertflow.data.splits import BUILDERS

    doc = make_split.__doc__
    for kind in SPLIT_KINDS:
        assert f"``{kind}``" in doc, kind
        for name in inspect.signature(BUILDERS[kind]).parameters:
            if name not in ("data", "keep"):
                assert name in doc, (kind, name)
    assert "test_context" in doc and "val_fraction" in doc
