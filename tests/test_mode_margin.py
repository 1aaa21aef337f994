"""benchmarks/mode_margin.py: a margin sends a mode that leads its prior by less on validation to the prior."""

import pandas as pd


def test_a_margin_keeps_the_prior_unless_a_mode_leads_it_by_as_much(benchmark_script):
    script = benchmark_script("mode_margin")
    row = pd.Series({"val_score_flow": -0.50, "val_score_prior_mean": -0.52, "val_score_prior": -0.55,
                     "top20_flow": 0.80, "edist_flow": 1.0, "top20_prior_mean": 0.85, "edist_prior_mean": 2.0,
                     "top20_prior": 0.70, "edist_prior": 3.0, "best_on_test": "flow",
                     "best_top20": 0.79, "best_edist": 1.2})
    assert script.pick(row, 0.0) == "flow"
    assert script.pick(row, 0.04) == "flow"  # leads the prior by 0.05
    assert script.pick(row, 0.06) == "prior"
    assert script.outcome(row, "flow") == {"within": True, "wins": True, "right": True}
    assert script.outcome(row, "prior") == {"within": False, "wins": False, "right": False}
    tie = row.copy()
    tie["val_score_prior_mean"] = tie["val_score_flow"]
    assert script.pick(tie, 0.0) == "flow"  # a tie goes to the first mode, as the model's own choice does
