"""FlowMatching: the one loss and sampler of every flow (pertflow.flows.matching)."""

from __future__ import annotations

import pytest
import torch

from pertflow.flows import AnchoredSource, FlowMatching, GaussianSource, independent_coupling, ot_coupling, uniform_time
from pertflow.ops.kernels import mmd2_rbf


def _flow(coupling=independent_coupling, source=None) -> FlowMatching:
    return FlowMatching(coupling, uniform_time, source or AnchoredSource(0.0))


def test_the_objective_is_the_velocity_mse_plus_the_mmd_of_the_one_step_estimates():
    torch.manual_seed(0)
    flow = _flow()
    x_0, x_1 = torch.randn(16, 5), torch.randn(16, 5) + 2
    path = flow.interpolate(x_0, x_1)
    v = torch.randn(16, 5)
    loss, metrics = flow.objective(v, path)
    torch.testing.assert_close(loss, ((v - (x_1 - x_0)) ** 2).mean())
    assert set(metrics) == {"mse"}
    with_mmd, metrics = flow.objective(v, path, mmd_weight=0.5)
    estimate = path.x_t + (1 - path.t[:, None]) * v
    torch.testing.assert_close(with_mmd, loss + 0.5 * mmd2_rbf(estimate, x_1))
    assert metrics["mmd"] > 0
    # the true velocity has no loss at all, and its one-step estimates are the targets
    exact, _ = flow.objective(x_1 - x_0, path, mmd_weight=1.0)
    assert float(exact) < 1e-10


def test_a_mask_keeps_only_its_rows_and_an_empty_one_gives_zero_still_attached():
    flow = _flow()
    x_0, x_1 = torch.zeros(4, 3), torch.ones(4, 3)
    path = flow.interpolate(x_0, x_1)
    v = torch.zeros(4, 3, requires_grad=True)
    mask = torch.tensor([True, False, True, False])
    loss, metrics = flow.objective(v, path, mask=mask, name="mse_expr")
    assert float(loss.detach()) == pytest.approx(1.0) and metrics == {"mse_expr": pytest.approx(1.0)}
    none, metrics = flow.objective(v, path, mask=torch.zeros(4, dtype=torch.bool), name="mse_latent")
    assert float(none.detach()) == 0.0 and metrics == {"mse_latent": 0.0}
    none.backward()  # a loss of zero, still part of the graph
    assert v.grad is not None


def test_coupling_within_groups_never_pairs_across_them():
    flow = _flow(ot_coupling)
    # two groups far apart; the targets of each group listed in the other group's order
    anchor = torch.cat([torch.zeros(4, 2), torch.full((4, 2), 100.0)])
    target = torch.cat([torch.full((4, 2), 100.0), torch.zeros(4, 2)]) + torch.arange(8.0)[:, None] * 0.01
    _, across = flow.couple(anchor, target)  # one group: OT pairs each source with its near targets
    assert set(across[:4].tolist()) == {4, 5, 6, 7}
    _, within = flow.couple(anchor, target, groups=2)
    assert set(within[:4].tolist()) == {0, 1, 2, 3} and set(within[4:].tolist()) == {4, 5, 6, 7}
    with pytest.raises(ValueError, match="equal groups"):
        flow.couple(anchor, target, groups=3)


def test_solve_replaces_and_counts_non_finite_velocities():
    flow = _flow(source=GaussianSource())

    def field(t, x):
        v = torch.ones_like(x)
        v[0, 0] = float("nan")
        return v

    with pytest.warns(RuntimeWarning, match="non-finite velocity"):
        x_1 = flow.solve(field, torch.zeros(3, 2), "euler", 4, "a test flow")
    assert torch.isfinite(x_1).all() and flow.nonfinite == 4
    torch.testing.assert_close(x_1[1:], torch.ones(2, 2))
    assert float(x_1[0, 0]) == 0.0


def test_a_source_seeded_by_a_generator_starts_the_same_twice():
    flow = _flow(source=AnchoredSource(0.5))
    anchor = torch.zeros(5, 3)
    a = flow.start(anchor, torch.Generator().manual_seed(1))
    b = flow.start(anchor, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert a.abs().sum() > 0
