"""Continuous-depth ODE-Net: true input and parameter gradients (finite differences, adjoint vs backprop), the
counted function evaluations, solver settings, the time-conditioned convolution and parameter counts."""
import pytest
import timm
import torch
import torch.nn.functional as F

import odenet_timm  # noqa: F401  (registers the models)
from odenet_timm.layers.ode import CountedDynamics, ODESolverConfig, integrate
from odenet_timm.models.odenet import ConcatConv2d, ODEFunc, ODENet
from odenet_timm.robust.entries import reset_solver_stats_of, solver_stats_of

TIGHT = dict(rtol=1e-9, atol=1e-9)


def _tiny(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model('odenet_small', **dict(dict(widths=(4, 4, 4), num_classes=3), **kwargs))
    with torch.no_grad():  # nonzero biases: a generic point, away from the ReLU kinks of zero-padded inputs
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


def _input_gradient_and_loss(model, x, labels):
    inp = x.clone().requires_grad_()
    grad, = torch.autograd.grad(F.cross_entropy(model(inp), labels), inp)
    return grad, lambda z: F.cross_entropy(model(z), labels)


def _directional_differences(loss, x, eps=1e-6, directions=3):
    """``[(v, (loss(x + εv) − loss(x − εv)) / 2ε)]`` along seeded random directions v."""
    generator = torch.Generator().manual_seed(1)
    out = []
    with torch.no_grad():
        for _ in range(directions):
            v = torch.randn(x.shape, dtype=torch.float64, generator=generator)
            out.append((v, (loss(x + eps * v) - loss(x - eps * v)) / (2 * eps)))
    return out


X = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([2])


def test_input_gradients_of_a_fixed_step_solve_match_finite_differences():
    """Backprop through rk4 gives the exact gradient of the discrete solve: central differences agree to 1e-6."""
    grad, loss = _input_gradient_and_loss(_tiny(method='rk4', step_size=0.25), X, LABELS)
    for v, numeric in _directional_differences(loss, X):
        assert torch.allclose((grad * v).sum(), numeric, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize('adjoint', [False, True], ids=['backprop', 'adjoint'])
def test_input_gradients_of_the_adaptive_solve_are_those_of_the_flow(adjoint):
    """What an attack needs: ∇ₓ loss through dopri5 (by backprop, or by the adjoint method) at tight tolerances is
    the gradient of the ODE flow, measured by central differences of a fine rk4 solve (unlike an adaptive solve, a
    continuous function of x: its step sequence does not change with x). The dynamics have ReLU kinks, across
    which every solver converges at low order, so the two agree to 0.3%, not to the solver tolerance; a detached,
    masked or wrongly signed gradient is off by 100%."""
    grad, _ = _input_gradient_and_loss(_tiny(adjoint=adjoint, rtol=1e-8, atol=1e-8), X, LABELS)
    _, fine_loss = _input_gradient_and_loss(_tiny(method='rk4', step_size=1 / 32), X, LABELS)
    for v, numeric in _directional_differences(fine_loss, X):
        assert torch.allclose((grad * v).sum(), numeric, rtol=3e-3, atol=1e-6)


def test_adjoint_parameter_gradients_agree_with_backprop_through_the_solver():
    """On the same rk4 grid the adjoint method's gradients differ from backprop's only by the discretisation of the
    adjoint ODE (low order across the ReLU kinks of the dynamics)."""
    grads = []
    for adjoint in (False, True):
        model = _tiny(adjoint=adjoint, method='rk4', step_size=0.05)
        inp = X.clone().requires_grad_()
        model(inp).square().sum().backward()
        grads.append([inp.grad] + [p.grad for p in model.parameters()])
    for backprop, adjoint in zip(*grads):
        assert (backprop - adjoint).norm() <= 1e-3 * backprop.norm()


@pytest.mark.parametrize('method, step_size, steps', [('rk4', 0.25, 4), ('euler', 0.1, 10), ('midpoint', 0.5, 2)])
def test_solver_stats_count_the_evaluations_of_fixed_step_methods(method, step_size, steps):
    """rk4 evaluates f 4 times per step, midpoint 2, Euler 1; the adjoint solve runs the same grid backwards."""
    per_step = {'rk4': 4, 'euler': 1, 'midpoint': 2}[method]
    model = _tiny(method=method, step_size=step_size, adjoint=True)
    assert model.solver_stats() == {}
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model(x).sum().backward()
    assert model.solver_stats() == {'forward_nfe': steps * per_step, 'backward_nfe': steps * per_step}
    with torch.no_grad():  # a forward without backward: the latest backward's count stays
        model(x)
    assert model.solver_stats() == {'forward_nfe': steps * per_step, 'backward_nfe': steps * per_step}
    model.reset_solver_stats()
    assert model.solver_stats() == {}


def test_solver_stats_of_adaptive_solves_and_through_the_leaderboards_reader():
    model = _tiny(ode_blocks=(1, 0, 1))  # two ODE blocks: their counts add up
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    model(x).sum().backward()
    blocks = [m for m in model.modules() if isinstance(m, CountedDynamics)]
    assert len(blocks) == 2 and all(b.forward_nfe >= 8 and (b.forward_nfe - 2) % 6 == 0 for b in blocks)  # dopri5
    stats = solver_stats_of(model)
    assert stats == {'forward_nfe': sum(b.forward_nfe for b in blocks), 'backward_nfe': 0}  # backprop: no solve
    reset_solver_stats_of(model)
    assert solver_stats_of(model) == {}
    tight = _tiny(**TIGHT)
    with torch.no_grad():
        tight(x)
    assert tight.solver_stats()['forward_nfe'] > stats['forward_nfe'] // 2  # one block at 1e-10 vs two at 1e-3


def test_fixed_step_and_adaptive_solutions_agree():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        reference = _tiny(**TIGHT)(x)
        assert torch.allclose(_tiny(method='rk4', step_size=0.05)(x), reference, atol=1e-5)
        assert not torch.allclose(_tiny(method='euler', step_size=0.5)(x), reference, atol=1e-3)


def test_integrate_solves_a_known_linear_ode():
    """dy/dt = −2y + t has the solution y(t) = (y₀ + ¼) e^{−2t} + t/2 − ¼, so y(1) = (y₀ + ¼) e^{−2} + ¼."""
    dynamics = CountedDynamics(lambda t, y: -2 * y + t)
    y0 = torch.tensor([1.0, -3.0], dtype=torch.float64)
    y1 = integrate(dynamics, y0, 0.0, 1.0, ODESolverConfig(**TIGHT))
    exact = (y0 + 0.25) * torch.exp(torch.tensor(-2.0, dtype=torch.float64)) + 0.25
    assert torch.allclose(y1, exact, rtol=1e-9) and dynamics.solves == 1


def test_time_conditioned_convolution_sees_t_as_a_channel():
    conv = ConcatConv2d(2, 3).double()
    y = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    t = torch.tensor(0.7, dtype=torch.float64)
    expected = F.conv2d(torch.cat([torch.full((2, 1, 5, 5), 0.7, dtype=torch.float64), y], 1),
                        conv.conv.weight, conv.conv.bias, padding=1)
    assert torch.allclose(conv(t, y), expected, atol=1e-12)
    assert not torch.allclose(conv(torch.tensor(0.1, dtype=torch.float64), y), expected)


def test_parameter_counts():
    """The ODE function is the authors' (GN, ConcatConv 3×3, GN, ConcatConv 3×3, GN): 75,392 parameters at 64
    channels, as in their MNIST ODE-Net; the models' totals are those of the documented layouts."""
    assert sum(p.numel() for p in ODEFunc(64).parameters()) == 75_392
    assert sum(p.numel() for p in timm.create_model('odenet_small').parameters()) == 151_882
    assert sum(p.numel() for p in timm.create_model('odenet_cifar').parameters()) == 487_658


def test_checkpointing_is_refused_with_the_alternative():
    with pytest.raises(NotImplementedError, match='adjoint=True'):
        timm.create_model('odenet_small').set_grad_checkpointing()


@pytest.mark.parametrize('kwargs, message', [
    (dict(method='rk45'), r"method must be one of the adaptive methods \('dopri5'.* got 'rk45'"),
    (dict(method='rk4'), r"the fixed-step method 'rk4' needs step_size"),
    (dict(step_size=0.1), r"step_size is for the fixed-step methods .* the adaptive method 'dopri5' chooses"),
    (dict(rtol=0), 'rtol must be a positive number, got 0'),
    (dict(method='euler', step_size=-1.0), 'step_size must be a positive number, got -1.0'),
    (dict(ode_blocks=(0, 0, 0)), 'at least one ODE block'),
    (dict(widths=(8, 8)), r'one entry per stage, got \(8, 8\), \(0, 0, 1\)'),
])
def test_bad_kwargs_get_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ODENet(**kwargs)
