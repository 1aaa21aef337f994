"""benchmarks/draw_noise.py: the bar judged per control draw and on the draws' means."""

import pandas as pd


def _draws(rows):
    return pd.DataFrame([{"task": "t", "fold": "f", "model": m, "seed": s, "top20": t, "edist": e}
                         for m, s, t, e in rows])


def test_each_draw_is_judged_against_the_best_baseline_of_the_same_draw(benchmark_script):
    script = benchmark_script("draw_noise")
    rows = []
    for seed, (mean_top20, model_top20) in enumerate([(0.30, 0.29), (0.10, 0.25)]):
        rows += [("no-change", seed, 0.0, 1.0), ("mean", seed, mean_top20, 2.0), ("additive", seed, 0.0, 3.0),
                 ("linear", seed, 0.0, 3.0), ("context-shift", seed, 0.0, 3.0), ("m", seed, model_top20, 1.05)]
    bar = script.bar_table(_draws(rows), ["m"]).set_index("model")
    # draw 0: top-20 0.01 below the mean's 0.30, E-distance 5% above no change's 1.0: within, not a win
    assert bool(bar.loc["m", "within_seed0"])
    assert bar.loc["m", "within_share"] == 1.0 and bar.loc["m", "wins_share"] == 0.0
    assert abs(bar.loc["m", "top20_mean"] - 0.27) < 1e-9
    # the means: top-20 0.27 against the mean's 0.20, E-distance 1.05 against 1.0: within, still no win
    assert bool(bar.loc["m", "within_on_means"]) and not bool(bar.loc["m", "wins_on_means"])
    assert bar.loc["mean", "within_share"] == 0.0  # the best top-20 on each draw, but twice no change's E-distance


def test_a_model_that_trails_on_every_draw_is_below_the_bar(benchmark_script):
    script = benchmark_script("draw_noise")
    rows = []
    for seed in range(3):
        rows += [(b, seed, 0.5, 1.0) for b in ("no-change", "mean", "additive", "linear", "context-shift")]
        rows.append(("m", seed, 0.45, 1.0))
    bar = script.bar_table(_draws(rows), ["m"]).set_index("model")
    assert bar.loc["m", "within_share"] == 0.0 and not bool(bar.loc["m", "within_on_means"])
