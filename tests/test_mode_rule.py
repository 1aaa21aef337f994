"""benchmarks/mode_rule.py: the two rules of mode_rule, replayed on a fit report's per-split scores."""


def _scores(flow, prior_mean, prior):
    return {"flow": {"score": flow}, "prior-mean": {"score": prior_mean}, "prior": {"score": prior}}


def test_every_split_drops_a_mode_that_loses_to_the_prior_on_one_split(benchmark_script):
    script = benchmark_script("mode_rule")
    report = {"validation_first_split": _scores(0.9, 0.3, 0.2),
              "validation_rotations": [{"validation": _scores(0.1, 0.25, 0.2)}]}
    by_mean, every, splits = script.picks(report)
    assert (by_mean, every, len(splits)) == ("flow", "prior-mean", 2)
    report["validation_rotations"][0]["validation"]["prior-mean"]["score"] = 0.1
    assert script.picks(report)[:2] == ("flow", "prior")
    report["validation_rotations"][0]["validation"]["flow"]["score"] = 0.2  # a tie with the prior counts as at least
    assert script.picks(report)[:2] == ("flow", "flow")
