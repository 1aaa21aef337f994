"""Evaluation: metrics as pure functions (:mod:`~pertflow.eval.metrics`) and the evaluator."""

from pertflow.eval.evaluator import EvalConfig, EvalResult, evaluate, metric_direction

__all__ = ["EvalConfig", "EvalResult", "evaluate", "metric_direction"]
