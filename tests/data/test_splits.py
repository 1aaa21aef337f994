import json

import numpy as np
import pytest

from pertflow.data.dataset import PerturbationData
from pertflow.data.splits import Split, make_split
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
    ref = Split.load(shared_data / "splits" / f"{task.split_name(fold)}.json")
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
