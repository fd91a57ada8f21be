"""odenet_timm.layers: fixed-point solvers, their statistics and warning, and the conv spectral normalisation."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from odenet_timm.layers.fixed_point import (
    FixedPointConvergenceWarning, SolverConfig, SolverStats, SolverStatsLog, solve_fixed_point,
)
from odenet_timm.layers.spectral_norm import SpectralNormConv2d


def _affine_problem(rho: float, batch: int = 3, dim: int = 20):
    """``g(x) = A x + b`` per sample, ``‖A‖ = rho``, and its exact fixed point ``(I − A)⁻¹ b``."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    a = rho * q @ torch.diag(torch.linspace(-1, 1, dim, dtype=torch.float64)) @ q.T
    b = torch.randn(batch, dim, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - a, b.T).T
    return (lambda x: x @ a.T + b), exact


@pytest.mark.parametrize('memory', [1, 5])
def test_solver_reaches_the_fixed_point_within_tolerance(memory):
    g, exact = _affine_problem(rho=0.8)
    x, gx, stats = solve_fixed_point(g, torch.zeros_like(exact), tol=1e-10, max_iter=500, memory=memory)
    residual = ((g(x) - x).norm(dim=1) / g(x).norm(dim=1)).max()
    assert stats.converged and stats.residual <= 1e-10 and residual <= 1e-10
    assert torch.allclose(x, exact, rtol=1e-8, atol=1e-9)
    assert torch.equal(gx, g(x))  # the second return is one more application of the map at x
    assert 1 < stats.iterations < 500


def test_anderson_needs_fewer_iterations_than_plain_iteration():
    g, exact = _affine_problem(rho=0.95)
    plain = solve_fixed_point(g, torch.zeros_like(exact), tol=1e-8, max_iter=1000, memory=1)[2]
    anderson = solve_fixed_point(g, torch.zeros_like(exact), tol=1e-8, max_iter=1000, memory=5)[2]
    assert plain.converged and anderson.converged
    assert anderson.iterations < plain.iterations / 3


def test_extrapolation_is_exact_in_the_krylov_space_and_reports_its_true_residual():
    """Reduced-rank extrapolation of plain iterates: for ``A`` with two distinct eigenvalues the residuals of any
    three consecutive iterates are linearly dependent, so three evaluations give the fixed point exactly, where
    plain iteration has barely started (contraction 0.9). The reported residual is that of the returned iterate
    (exact for an affine map), and the second return is its image."""
    dim = 12
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([0.9] * 6 + [-0.5] * 6, dtype=torch.float64)) @ q.T
    b = torch.randn(3, dim, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - a, b.T).T

    def g(x):
        return x @ a.T + b
    x0 = torch.zeros_like(b)
    x, gx, stats = solve_fixed_point(g, x0, tol=1e-10, max_iter=3, memory=5, extrapolate=True)
    plain_x, _, plain = solve_fixed_point(g, x0, tol=1e-10, max_iter=3, memory=1)
    assert torch.allclose(x, exact, rtol=1e-9, atol=1e-9) and stats.converged and stats.iterations == 3
    assert plain.residual > 0.1 and not torch.allclose(plain_x, exact, rtol=1e-2)
    assert torch.allclose(gx, g(x), rtol=1e-12, atol=1e-12)
    true = ((g(x) - x).norm(dim=1) / g(x).norm(dim=1)).max()
    assert stats.residual == pytest.approx(float(true), rel=1e-6, abs=1e-15)
    # with memory 1 there is nothing to extrapolate from: plain iteration
    x1, _, one = solve_fixed_point(g, x0, tol=1e-10, max_iter=3, memory=1, extrapolate=True)
    assert torch.equal(x1, plain_x) and one.residual == plain.residual


@pytest.mark.parametrize('memory', [1, 5])
def test_a_map_without_fixed_point_is_reported_not_converged(memory):
    x, _, stats = solve_fixed_point(lambda x: x + 1, torch.randn(2, 4), tol=1e-6, max_iter=7, memory=memory)
    assert not stats.converged and stats.iterations == 7 and stats.residual > 1e-6
    assert torch.isfinite(x).all()


def test_each_sample_keeps_its_best_iterate():
    """A diverging sample does not drag the converged one along; its best (first) iterate is returned."""
    scale = torch.tensor([[0.5], [3.0]])  # g(x) = 1 + s (x − 1): fixed point 1, contracting for sample 0 only
    x0 = torch.full((2, 3), 2.0)
    x, _, stats = solve_fixed_point(lambda x: 1 + scale * (x - 1), x0, tol=1e-3, max_iter=20, memory=1)
    assert not stats.converged
    assert (x[0] - 1).abs().max() < 1e-3  # sample 0 converged to its fixed point
    assert torch.equal(x[1], x0[1])  # sample 1 only grew: the initial guess had the smallest residual


def test_log_summarises_the_latest_solves_and_warns_once():
    log = SolverStatsLog()
    assert log.summary() == {}
    ok = SolverStats(iterations=4, residual=1e-5, converged=True, tol=1e-4, max_iter=30)
    bad = SolverStats(iterations=30, residual=0.2, converged=False, tol=1e-4, max_iter=30)
    with pytest.warns(FixedPointConvergenceWarning):
        log.record('forward', 'a', bad)  # replaced next: the log keeps the latest solve per (kind, step)
    log.record('forward', 'a', ok)
    log.record('forward', 'b', SolverStats(6, 2e-5, True, 1e-4, 30))
    log.record('backward', 'a', ok)
    summary = log.summary()
    assert summary['forward_iterations_mean'] == 5 and summary['forward_iterations_max'] == 6
    assert summary['forward_residual_max'] == 2e-5 and summary['forward_solves'] == 2
    assert summary['backward_converged'] and summary['converged'] and 'reconstruct_solves' not in summary
    assert all(isinstance(v, (int, float, bool)) for v in summary.values())

    log = SolverStatsLog()
    with pytest.warns(FixedPointConvergenceWarning, match=r'a: the forward fixed-point solve did not converge') as caught:
        log.record('forward', 'a', bad)
        log.record('backward', 'b', bad)
    assert len(caught) == 1
    summary = log.summary()
    assert not summary['converged'] and not summary['backward_converged'] and summary['forward_residual_max'] == 0.2


@pytest.mark.parametrize('kwargs, match', [
    (dict(solver='newton'), 'solver must be one of'),
    (dict(backward_solver='newton'), 'backward_solver must be one of'),
    (dict(solver='extrapolated'), 'solver must be one of'),  # its residual is exact for affine maps only
    (dict(tol=0.0), 'tol must be a relative residual'),
    (dict(backward_tol=2.0), 'backward_tol must be'),
    (dict(max_iter=0), 'max_iter must be a positive integer'),
    (dict(backward_max_iter=2.5), 'backward_max_iter must be a positive integer'),
])
def test_solver_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SolverConfig(**kwargs)


def _conv_matrix_norm(weight: torch.Tensor, size: int) -> float:
    """Exact operator norm of the zero-padded convolution on ``size × size`` images (dense Jacobian SVD)."""
    c_in = weight.shape[1]
    jac = torch.autograd.functional.jacobian(
        lambda x: F.conv2d(x.view(1, c_in, size, size), weight, padding=1).flatten(),
        torch.zeros(c_in * size * size, dtype=weight.dtype))
    return float(torch.linalg.matrix_norm(jac, ord=2))


def test_spectral_norm_bounds_the_convolution_operator_norm():
    conv = SpectralNormConv2d(3, 4, max_norm=0.7, probe_size=6).double()
    with torch.no_grad():
        conv.weight.mul_(5)
    exact_before = _conv_matrix_norm(conv.weight.detach(), 6)
    conv.power_iterate_(1000)
    estimate = float(conv.operator_norm().detach())
    assert exact_before * (1 - 1e-4) < estimate <= exact_before * (1 + 1e-12)  # a lower bound, converged
    normalized = conv.eval().normalized_weight().detach()
    assert abs(_conv_matrix_norm(normalized, 6) - 0.7) < 1e-4 * 0.7
    # a kernel already below the bound is left alone; eval does not move the probe
    probe = conv.probe.clone()
    small = SpectralNormConv2d(3, 4, max_norm=100.0, probe_size=6).eval()
    assert torch.equal(small.normalized_weight(), small.weight) and torch.equal(conv.probe, probe)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert torch.equal(conv(x), F.conv2d(x, conv.normalized_weight(), conv.bias, padding=1))


def test_spectral_norm_updates_its_probe_only_in_training():
    conv = SpectralNormConv2d(2, 2, probe_size=4)
    before = conv.probe.clone()
    conv.eval().normalized_weight()
    assert torch.equal(conv.probe, before)
    conv.train().normalized_weight()
    assert not torch.equal(conv.probe, before)
    with pytest.raises(ValueError, match='kernel_size must be odd'):
        SpectralNormConv2d(2, 2, kernel_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        conv.train().normalized_weight().sum().backward()  # gradient reaches the raw kernel through σ
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
