"""benchmarks/response_elsewhere.py: a target's centred response against the other perturbations'."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest


def _screen(rng):
    """Two contexts; T acts like A (plus noise), B and C act otherwise; all share one common shift."""
    genes, per = 40, 30
    effects = {name: rng.normal(0, 1, genes) for name in ("A", "B", "C")}
    effects["T"] = effects["A"] + rng.normal(0, 0.2, genes)
    rows, obs = [], []
    for context, base in (("x", 1.0), ("y", 2.0)):
        for name in ("control", "A", "B", "C", "T"):
            shift = 0.0 if name == "control" else effects[name] + 0.5
            rows.append(base + shift + rng.normal(0, 0.1, (per, genes)))
            obs += [(name, context)] * per
    return ad.AnnData(np.vstack(rows).astype(np.float32),
                      obs=pd.DataFrame(obs, columns=["condition", "cell_type"]).astype(str))


def test_the_target_correlates_with_the_perturbation_it_acts_like(benchmark_script):
    script = benchmark_script("response_elsewhere")
    responses = script.mean_responses(_screen(np.random.default_rng(0)), "condition", "control", "cell_type",
                                      ["x", "y"])
    assert sorted(responses.index) == ["A", "B", "C", "T"]
    correlations = script.centred_correlations(responses, "T")
    assert correlations.idxmax() == "A"
    assert correlations["A"] > 0.9 and correlations.drop("A").max() < 0.5
    with pytest.raises(SystemExit, match="not measured"):
        script.centred_correlations(responses, "MAP2K6")
