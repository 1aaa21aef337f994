"""ODE integration of a velocity field through ``torchdiffeq``.

The velocity-field contract: a callable ``field(t, x_t) -> v`` where ``t`` is a (B,) tensor of
times (every sample at the same time during integration) and ``x_t`` a (B, ...) tensor; it
returns a velocity of the shape of ``x_t``. Every flow model of pertflow implements it.

As Meta's ``flow_matching`` ``ODESolver(model).sample(x_init, step_size, method)``: the solver is
given the field, and how to integrate is an argument of the call, not a setting of the model.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torchdiffeq import odeint

from pertflow.errors import InputError

#: Solver names: fixed-step ``euler``, ``midpoint``, ``rk4`` (4th order, Kutta's 3/8 rule) and
#: the adaptive Dormand-Prince ``dopri5``.
SOLVERS = ("euler", "midpoint", "rk4", "dopri5")
#: Field evaluations per step of each fixed-step method.
EVALUATIONS_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}


class VelocityField(Protocol):
    def __call__(self, t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor: ...


class ODESolver:
    """Integrates ``dx/dt = field(t, x)``.

    Parameters
    ----------
    field
        The velocity field (see the module docstring).
    """

    def __init__(self, field: VelocityField):
        self.field = field

    def sample(
        self,
        x_init: torch.Tensor,
        method: str = "rk4",
        steps: int = 20,
        t0: float = 0.0,
        t1: float = 1.0,
        rtol: float = 1e-5,
        atol: float = 1e-5,
    ) -> torch.Tensor:
        """``x(t1)`` from ``x(t0) = x_init``.

        Parameters
        ----------
        x_init
            (B, ...) start point (the source for a flow from t = 0).
        method
            One of :data:`SOLVERS`.
        steps
            Number of equal steps of the fixed-step methods (RK4: 4 field calls per step).
        rtol, atol
            Tolerances of the adaptive ``dopri5``.
        """
        if method not in SOLVERS:
            raise InputError(f"unknown ODE solver '{method}'; choose one of {list(SOLVERS)}.")
        if steps < 1:
            raise InputError(f"the ODE solver needs at least one step, got {steps}.")
        batch = x_init.shape[0]
        field = self.field

        def rhs(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return field(t.to(x.dtype).expand(batch), x)

        dtype = torch.float64 if x_init.dtype == torch.float64 else torch.float32
        times = torch.tensor([t0, t1], dtype=dtype, device=x_init.device)
        if method == "dopri5":
            out = odeint(rhs, x_init, times, method=method, rtol=rtol, atol=atol)
        else:
            # torchdiffeq's "rk4" is Kutta's 3/8 rule: fourth order like the classical RK4, four field
            # calls per step, exact for velocities polynomial in t up to degree 3.
            out = odeint(rhs, x_init, times, method=method, options={"step_size": (t1 - t0) / steps})
        return out[-1]


class FiniteVelocity:
    """A velocity field whose non-finite values are replaced by 0 and counted, so that a NaN or
    Inf velocity never passes silently into the state being integrated: after a solve,
    ``replaced`` says how many values were replaced and ``first_time`` at which time they first
    appeared (None: none were), for the caller to report."""

    def __init__(self, field: VelocityField):
        self.field = field
        self.replaced = 0
        self.first_time: float | None = None

    def __call__(self, t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        v = self.field(t, x_t)
        bad = ~torch.isfinite(v)
        if bad.any():
            self.replaced += int(bad.sum())
            if self.first_time is None:
                self.first_time = float(t.reshape(-1)[0])
            v = torch.where(bad, torch.zeros_like(v), v)
        return v


def solve_ode(field: VelocityField, x_init: torch.Tensor, method: str = "rk4", steps: int = 20,
              **kwargs) -> torch.Tensor:
    """Shorthand for ``ODESolver(field).sample(x_init, method, steps, ...)``."""
    return ODESolver(field).sample(x_init, method, steps, **kwargs)
