"""Each list of names a config accepts (a Literal) agrees with the runtime table that gives them meaning."""

from __future__ import annotations

import dataclasses
import typing

from pertflow.flows import COUPLINGS, SOLVERS, TIME_SAMPLERS
from pertflow.models.config import PredictConfig, PriorName, ValidationKind
from pertflow.models.config import CouplingName, TimeSamplerName
from pertflow.models.inner_split import KINDS
from pertflow.models.prior import PREDICTION_MODES, PRIOR_BASELINES


def literal(field_type) -> set[str]:
    return set(typing.get_args(field_type))


def test_config_literals_match_the_runtime_tables():
    from pertflow.adapt.config import InitName, TransportName
    from pertflow.adapt.transports import INITS, TRANSPORTS

    assert literal(TransportName) == set(TRANSPORTS) and literal(InitName) == set(INITS)
    from pertflow.data.kinds import SPLIT_KINDS
    from pertflow.data.splits import BUILDERS

    assert tuple(BUILDERS) == SPLIT_KINDS
    assert literal(CouplingName) == set(COUPLINGS)
    assert literal(TimeSamplerName) == set(TIME_SAMPLERS)
    assert literal(PriorName) == set(PRIOR_BASELINES) | {"auto"}
    assert literal(ValidationKind) == set(KINDS) | {"auto"}
    hints = typing.get_type_hints(PredictConfig)
    fields = {f.name for f in dataclasses.fields(PredictConfig)}
    assert {"ode_method", "mode"} <= fields
    assert literal(hints["ode_method"]) == set(SOLVERS)
    assert literal(hints["mode"]) == set(PREDICTION_MODES) | {"auto"}


def test_a_stage_keeps_the_runs_engine_settings():
    from pertflow.models.latent_shift.config import LatentShiftConfig
    from pertflow.models.latent_shift.embeddings import decoder_train_config
    from pertflow.train.config import ENGINE_FIELDS, TrainConfig, stage_config

    run = TrainConfig(grad_clip=0.25, nonfinite="stop", accumulate=2, seed=7, max_steps=99, lr=0.5, ema_decay=0.9)
    stage = stage_config(run, max_steps=10, lr=1e-3)
    assert all(getattr(stage, f) == getattr(run, f) for f in ENGINE_FIELDS)
    assert (stage.max_steps, stage.lr, stage.ema_decay) == (10, 1e-3, 0.0)  # the schedule is the stage's own
    decoder = decoder_train_config(LatentShiftConfig(decoder_steps=40, decoder_lr=2e-3), run)
    assert (decoder.grad_clip, decoder.nonfinite, decoder.accumulate, decoder.max_steps, decoder.lr) == (0.25, "stop", 2, 40, 2e-3)
