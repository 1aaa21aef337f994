"""benchmarks/strength_margin.py: a model config's validation settings, and the noise of the scores
that choose a prior's strength."""

from pertflow.io import package_dir


def test_the_anchored_fields_of_a_shipped_config(benchmark_script):
    script = benchmark_script("strength_margin")
    config = script.anchored_config(package_dir("configs") / "ccfm-cpu.yaml")
    assert config.prior == "auto" and config.strength_margin == 0.02 and config.validation_rotations == 3
    assert config.prior_strengths == (1.0, 0.75, 0.5, 0.25)


def test_neighbouring_strengths_differ_by_a_measured_noise(benchmark_script):
    from tests.models.test_prior import _partly_transferring
    from pertflow.models.inner_split import inner_split

    script = benchmark_script("strength_margin")
    inner = inner_split(_partly_transferring(0.9), "auto", 0, 0)
    noise = script.neighbour_noise(inner.view, (1.0, 0.75, 0.5, 0.25), redraws=3, seed0=0)
    assert set(noise) == {"1 vs 0.75", "0.75 vs 0.5", "0.5 vs 0.25", "0.25 vs none"}
    assert all(0 < sd < 0.5 for sd in noise.values())
    assert script.neighbour_noise(inner.view, (1.0, 0.5), redraws=1, seed0=0) == {}  # one draw: no spread
