
import pytest
import torch

from pertflow.errors import InputError
from pertflow.flows import CondOTPath, solve_ode


def test_path_endpoints_and_velocity():
    path = CondOTPath()
    noise, target = torch.randn(4, 3), torch.randn(4, 3)
    at0 = path.sample(torch.zeros(4), noise, target)
    at1 = path.sample(torch.ones(4), noise, target)
    torch.testing.assert_close(at0.x_t, noise)
    torch.testing.assert_close(at1.x_t, target)
    t = torch.tensor([0.1, 0.4, 0.7, 0.9])
    mid = path.sample(t, noise, target)
    torch.testing.assert_close(mid.x_t, (1 - t[:, None]) * noise + t[:, None] * target)
    torch.testing.assert_close(mid.dx_t, target - noise)
    # the one-step estimate with the true velocity lands exactly on the target
    torch.testing.assert_close(path.target_estimate(mid.x_t, mid.dx_t, t), target)


def test_path_broadcasts_over_trailing_dims():
    s = CondOTPath().sample(torch.tensor([0.25, 0.5]), torch.zeros(2, 3, 5), torch.ones(2, 3, 5))
    assert torch.allclose(s.x_t[0], torch.full((3, 5), 0.25)) and torch.allclose(s.x_t[1], torch.full((3, 5), 0.5))


@pytest.mark.parametrize("steps", [1, 3, 20])
def test_rk4_is_exact_for_cubic_time_fields(steps):
    # dx/dt = 1 + 2t + 3t^2 + 4t^3  ->  x(1) = x0 + 1 + 1 + 1 + 1
    def field(t, x):
        t = t[:, None]
        return (1 + 2 * t + 3 * t**2 + 4 * t**3).expand_as(x)

    x0 = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(solve_ode(field, x0, "rk4", steps), x0 + 4.0, rtol=0, atol=1e-12)


def test_linear_field_matches_matrix_exponential():
    A = torch.tensor([[0.0, 1.0], [-1.0, -0.2]], dtype=torch.float64)
    x0 = torch.tensor([[1.0, 0.0], [0.5, -0.3]], dtype=torch.float64)
    exact = x0 @ torch.linalg.matrix_exp(A).T
    field = lambda t, x: x @ A.T  # noqa: E731
    assert (solve_ode(field, x0, "rk4", 20) - exact).abs().max() < 1e-7
    assert (solve_ode(field, x0, "dopri5", rtol=1e-10, atol=1e-10) - exact).abs().max() < 1e-8
    euler = [(solve_ode(field, x0, "euler", n) - exact).abs().max().item() for n in (50, 100)]
    assert euler[1] < euler[0] * 0.6  # first order: halving the step about halves the error
    mid = [(solve_ode(field, x0, "midpoint", n) - exact).abs().max().item() for n in (20, 40)]
    assert mid[1] < mid[0] * 0.3  # second order


def test_field_receives_batch_times():
    seen = []

    def field(t, x):
        seen.append(t.shape)
        return torch.zeros_like(x)

    solve_ode(field, torch.zeros(7, 3), "euler", 2)
    assert seen == [torch.Size([7])] * 2


def test_unknown_solver():
    with pytest.raises(InputError, match="unknown ODE solver 'rk45'"):
        solve_ode(lambda t, x: x, torch.zeros(1, 1), "rk45")


def test_ot_coupling_finds_the_cheapest_pairing():
    from pertflow.flows import independent_coupling, ot_coupling, ot_permutation

    x0 = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x1 = torch.tensor([[0.1, 10.0], [0.2, 0.1], [9.9, 0.3]])
    perm = ot_permutation(x0, x1)
    assert perm.tolist() == [1, 2, 0]
    torch.testing.assert_close(ot_coupling(x0, x1), perm)
    assert torch.equal(independent_coupling(x0, x1), torch.arange(len(x1)))
    # no pairing has a lower total cost than the OT one
    import itertools

    best = min(sum(((x0[i] - x1[p[i]]) ** 2).sum() for i in range(3)) for p in itertools.permutations(range(3)))
    assert torch.isclose(((x0 - x1[perm]) ** 2).sum(), best)
