"""benchmarks/top_de_spread.py: the real shift's spread over a group's top-20 DE genes."""

import numpy as np


def test_a_uniform_shift_has_a_small_spread_and_one_sign(benchmark_script):
    script = benchmark_script("top_de_spread")
    rng = np.random.default_rng(0)
    ctrl = rng.normal(2.0, 0.3, (200, 60))
    shift = np.zeros(60)
    shift[:20] = 1.0 + rng.uniform(-0.1, 0.1, 20)  # every changed gene up by about one unit
    row = script.spread(ctrl[:100] + shift, ctrl[100:])
    assert row["same_sign"] == 20 and 0.8 < row["mean"] < 1.2 and row["cv"] < 0.2


def test_a_shift_of_both_signs_has_a_large_spread(benchmark_script):
    script = benchmark_script("top_de_spread")
    rng = np.random.default_rng(1)
    ctrl = rng.normal(2.0, 0.3, (200, 60))
    shift = np.zeros(60)
    shift[:10], shift[10:20] = 1.0, -1.2
    row = script.spread(ctrl[:100] + shift, ctrl[100:])
    assert row["same_sign"] == 10 and row["cv"] > 3
