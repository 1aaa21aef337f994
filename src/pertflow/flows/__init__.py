"""Probability paths, ODE solvers and the velocity-field contract (no weights)."""

from pertflow.flows.coupling import COUPLINGS, couple, ot_permutation
from pertflow.flows.path import CondOTPath, PathSample
from pertflow.flows.solver import SOLVERS, VelocityField, solve_ode
