"""ODE integration of a velocity field through ``torchdiffeq``.

The velocity-field contract: a callable ``field(t, x_t) -> v`` where ``t`` is a (B,) tensor of
times (every sample at the same time during integration) and ``x_t`` a (B, ...) tensor; it
returns a velocity of the shape of ``x_t``. Every flow model of pertflow implements it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torchdiffeq import odeint

from pertflow.errors import InputError

#: Solver names: fixed-step ``euler``, ``midpoint``, ``rk4`` (classical 4th order) and the
#: adaptive Dormand-Prince ``dopri5``.
SOLVERS = ("euler", "midpoint", "rk4", "dopri5")


class VelocityField(Protocol):
    def __call__(self, t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor: ...


def solve_ode(
    field: VelocityField,
    x0: torch.Tensor,
    method: str = "rk4",
    steps: int = 20,
    t0: float = 0.0,
    t1: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> torch.Tensor:
    """Integrate ``dx/dt = field(t, x)`` from ``x0`` at ``t0`` to ``t1``; returns ``x(t1)``.

    Parameters
    ----------
    field
        The velocity field (see the module docstring).
    x0
        (B, ...) start point (noise for a flow from t = 0).
    method
        One of :data:`SOLVERS`.
    steps
        Number of equal steps for the fixed-step methods (RK4: 4 field calls per step).
    rtol, atol
        Tolerances of the adaptive ``dopri5``.
    """
    if method not in SOLVERS:
        raise InputError(f"unknown ODE solver '{method}'; choose one of {list(SOLVERS)}.")
    if steps < 1:
        raise InputError(f"the ODE solver needs at least one step, got {steps}.")
    batch = x0.shape[0]

    def rhs(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return field(t.to(x.dtype).expand(batch), x)

    times = torch.tensor([t0, t1], dtype=torch.float64 if x0.dtype == torch.float64 else torch.float32, device=x0.device)
    if method == "dopri5":
        out = odeint(rhs, x0, times, method=method, rtol=rtol, atol=atol)
    else:
        # torchdiffeq's "rk4" is Kutta's 3/8 rule: fourth order like the classical RK4, four field
        # calls per step, exact for velocities polynomial in t up to degree 3.
        out = odeint(rhs, x0, times, method=method, options={"step_size": (t1 - t0) / steps})
    return out[-1]
