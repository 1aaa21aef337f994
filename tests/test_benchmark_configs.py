"""The committed CPU benchmark configurations build into their model's and the engine's configs."""

from pathlib import Path

import pytest

from pertflow.configs import build, load_sections, to_dict
from pertflow.models.config import PredictConfig
from pertflow.models.registry import model_class
from pertflow.train import TrainConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# The configurations, and the ablation configurations kept beside their results.
CONFIGS = sorted((BENCHMARKS / "configs").glob("*-cpu.yaml")) + sorted((BENCHMARKS / "results").glob("*/*/*-cpu.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(BENCHMARKS)))
def test_benchmark_config_builds(path):
    sections = load_sections(path)
    model = model_class(path.name.removesuffix("-cpu.yaml").split("@")[0], sections["model"])  # family@variant
    config = build(model.config_class, sections["model"], "model")
    train = build(TrainConfig, sections["train"], "train")
    predict = build(PredictConfig, {**to_dict(model.default_predict_config), **sections["predict"]}, "predict")
    assert train.max_steps > 0 and config is not None and predict.ode_steps > 0


def test_there_are_benchmark_configs():
    assert {p.name for p in CONFIGS} >= {"cfm-cpu.yaml", "scgpt-generator-cpu.yaml"}


@pytest.mark.parametrize("name", ["cfm", "ccfm"])
def test_demo_configs_build(name):
    from pertflow.demo import DEMO_CONFIGS

    sections = DEMO_CONFIGS[name]
    model = model_class(name)
    config = build(model.config_class, sections["model"], "model")
    train = build(TrainConfig, sections["train"], "train")
    predict = build(PredictConfig, {**to_dict(model.default_predict_config), **sections["predict"]}, "predict")
    assert config.d_model == 32 and train.max_steps == 150 and predict.ode_steps == 2
    if name == "ccfm":  # its foundation is pretrained in the run, small and short
        assert config.foundation is None and config.foundation_steps <= 50
