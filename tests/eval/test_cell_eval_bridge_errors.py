"""A metric cell-eval cannot compute is reported as what happened and how to skip it (issue 31, item 6)."""

from pertflow.cli import build_parser
from pertflow.eval.cell_eval_bridge import explain_cell_eval_error


def test_a_failed_metric_is_explained_with_its_fix():
    text = explain_cell_eval_error("Error computing metric 'clustering_agreement': Maximum allowed size exceeded")
    assert "could not compute 'clustering_agreement'" in text and "Maximum allowed size exceeded" in text
    assert "column is left out" in text and "--skip-metric clustering_agreement" in text
    assert "skip_cell_eval_metrics=('clustering_agreement',)" in text
    assert explain_cell_eval_error("something else") == "something else"


def test_evaluate_takes_metrics_to_skip():
    args = build_parser().parse_args(["evaluate", "--data", "d.h5ad", "--split", "s.json", "--pred", "p.h5ad", "--out", "o",
                                      "--skip-metric", "clustering_agreement", "--skip-metric", "pearson_edistance"])
    assert args.skip_metric == ["clustering_agreement", "pearson_edistance"]
