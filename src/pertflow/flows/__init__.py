"""Flow parts without weights: the probability path, couplings, time samplers, sources, the ODE solver.

Each is a small callable a model is given (CellFlow's ``match_fn`` / ``time_sampler``, Meta's
``flow_matching`` solvers), never a string switch inside a network.
"""

from pertflow.flows.coupling import COUPLINGS, Coupling, independent_coupling, ot_coupling, ot_permutation
from pertflow.flows.matching import FlowMatching
from pertflow.flows.path import CondOTPath, PathSample
from pertflow.flows.solver import EVALUATIONS_PER_STEP, SOLVERS, FiniteVelocity, ODESolver, VelocityField, solve_ode
from pertflow.flows.source import AnchoredSource, GaussianSource
from pertflow.flows.time import TIME_SAMPLERS, TimeSampler, logit_normal_time, uniform_time

__all__ = [
    "COUPLINGS",
    "EVALUATIONS_PER_STEP",
    "SOLVERS",
    "TIME_SAMPLERS",
    "AnchoredSource",
    "CondOTPath",
    "FiniteVelocity",
    "FlowMatching",
    "Coupling",
    "GaussianSource",
    "ODESolver",
    "PathSample",
    "TimeSampler",
    "VelocityField",
    "independent_coupling",
    "logit_normal_time",
    "ot_coupling",
    "ot_permutation",
    "solve_ode",
    "uniform_time",
]
