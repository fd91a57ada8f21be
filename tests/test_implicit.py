"""Implicit θ-ResNets: IFT gradients against gradcheck and an unrolled solve, the explicit limit θ = 0, residuals,
non-convergence reporting, the reversible (memory-efficient) trapezoidal chain, input gradients, determinism."""
import copy
import warnings
import weakref

import pytest
import timm
import torch
from torch.func import functional_call

from odenet_timm.layers.fixed_point import (
    FixedPointConvergenceWarning, SolverConfig, SolverStatsLog, reconstruct_input,
)
from odenet_timm.models._common import init_weights_cifar_
from odenet_timm.models.implicit import ImplicitBlock, ImplicitResNet

_PARAM_NAMES = ['residual.conv1.weight', 'residual.conv1.bias', 'residual.conv2.weight', 'residual.conv2.bias']
_TINY = dict(steps=(2, 1, 1), widths=(4, 6, 8))


def _block(theta=0.5, scheme='linear', h=1.0, channels=2, tol=1e-12, dtype=torch.float64):
    config = SolverConfig(tol=tol, max_iter=200, backward_tol=tol, backward_max_iter=200)
    block = ImplicitBlock(channels, theta, h, scheme, probe_size=5, lipschitz=1.0, config=config,
                          solver_log=SolverStatsLog(), name='block').to(dtype)
    init_weights_cifar_(block)
    for conv in (block.residual.conv1, block.residual.conv2):
        torch.nn.init.uniform_(conv.bias, -0.5, 0.5)
        conv.power_iterate_(200)
    return block.eval()  # eval: the spectral-norm probe stays fixed, so the block is a fixed function


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _tiny_model(name='implicit_trapezoid_resnet', dtype=torch.float64, **kwargs):
    if dtype == torch.float64:
        kwargs = dict(dict(solver_tol=1e-12, backward_tol=1e-12, solver_max_iter=200, backward_max_iter=200), **kwargs)
    return timm.create_model(name, **dict(_TINY, **kwargs)).to(dtype)


# -- gradients --------------------------------------------------------------------------------------------------
# full Jacobians for the paper's trapezoidal block; random projections vᵀJu (fast_mode) for the other variants
@pytest.mark.parametrize('theta, scheme, h, fast_mode', [
    (0.5, 'linear', 1.0, False), (1.0, 'linear', 0.5, True), (0.5, 'one_leg', 1.0, True),
])
def test_gradcheck_input_and_parameters(theta, scheme, h, fast_mode):
    block = _block(theta, scheme, h=h)
    params = [block.get_parameter(n).detach().clone().requires_grad_() for n in _PARAM_NAMES]
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *p):
        return functional_call(block, dict(zip(_PARAM_NAMES, p)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), atol=1e-6, rtol=1e-5, fast_mode=fast_mode)


@pytest.mark.parametrize('theta, scheme, h', [(0.5, 'linear', 1.5), (1.0, 'linear', 0.9), (0.5, 'one_leg', 1.5)])
def test_ift_gradients_equal_the_unrolled_converged_solve(theta, scheme, h):
    block = _block(theta, scheme, h=h, channels=3)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    inputs = [x] + list(block.parameters())

    ift = torch.autograd.grad((block(x) * weight).sum(), inputs)

    params = block.residual.normalized_params()
    g, y = block.forward_map(x, *params)
    y_naive = g(block(x).detach())  # one application with the solution held constant: no IFT correction
    naive = torch.autograd.grad((y_naive * weight).sum(), inputs, retain_graph=True)
    for _ in range(150):  # contraction ≤ hθ·Lip(F) ≤ 0.9: converged far below float64 precision
        y = g(y)
    unrolled = torch.autograd.grad((y * weight).sum(), inputs)

    for a, b, c in zip(ift, unrolled, naive):
        assert _rel(a, b) < 1e-6
    assert _rel(naive[0], unrolled[0]) > 1e-2  # the comparison is sensitive to the implicit correction


@pytest.mark.parametrize('theta, h', [(0.5, 1.0), (1.0, 0.9), (0.3, 1.5)])
def test_hand_written_linearisation_equals_autograds(theta, h):
    """The linear θ-map's own vector-Jacobian products (``LinearThetaMap.linearize``) against autograd's through
    one application of the same map recorded with a graph, at a point that is not a fixed point, in float64."""
    from odenet_timm.layers.fixed_point import GraphLinearization
    block = _block(theta, h=h, channels=3)
    inputs = [t.detach().requires_grad_() for t in (torch.randn(2, 3, 5, 5, dtype=torch.float64),
                                                     *block.residual.normalized_params())]
    g, _ = block.forward_map(*inputs)
    y, v = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    own, own_saved = g.linearize(y)
    reference, reference_saved = GraphLinearization.record(g, y, inputs)
    assert _rel(own.state_vjp(own_saved, v), reference.state_vjp(reference_saved, v)) < 1e-13
    for needed in ([True] * 5, [False, True, False, True, False]):
        found, expected = own.input_vjp(own_saved, v, needed), reference.input_vjp(reference_saved, v, needed)
        for need, a, b in zip(needed, found, expected):
            assert (a is None and b is None) if not need else _rel(a, b) < 1e-13


def test_default_tolerance_gradients_are_accurate_to_about_1e_5():
    """The backward linearises at the output the forward returns: in float32 at the default tolerances (1e-4) the
    gradients are within ~1e-5 of the float64 unrolled solve (linearising at the solver's previous iterate, whose
    residual is ~10x larger, gave 2e-5 here and ~2e-3 on the parameters of a 16-channel 32×32 block)."""
    reference = _block(channels=8)
    block = copy.deepcopy(reference).float()
    block.config = SolverConfig()
    x = torch.randn(4, 8, 12, 12, dtype=torch.float64)
    weight = torch.randn_like(x)

    x32 = x.float().requires_grad_()
    found = torch.autograd.grad((block(x32) * weight.float()).sum(), [x32, *block.parameters()])

    x64 = x.clone().requires_grad_()
    g, y = reference.forward_map(x64, *reference.residual.normalized_params())
    for _ in range(100):  # contraction ≤ ½: converged far below float64 precision
        y = g(y)
    unrolled = torch.autograd.grad((y * weight).sum(), [x64, *reference.parameters()])
    errors = [_rel(a.double(), b) for a, b in zip(found, unrolled)]
    assert max(errors) < 1e-5, errors  # the previous iterate: 2.2e-5 here
    stats = block.solver_log.summary()
    assert stats['forward_residual_max'] <= 1e-4 and stats['backward_converged']


def test_network_gradients_at_default_tolerance_follow_the_polished_outputs():
    """Through a network the gradient error is a large multiple of the blocks' output error (ReLU kinks): the
    returned output is polished by one plain application, and the float32 gradients at the default tolerances stay
    within 1e-4 of the float64 converged ones."""
    model = timm.create_model('implicit_trapezoid_resnet').eval()
    reference = copy.deepcopy(model).double()
    for block in reference.modules():
        if isinstance(block, ImplicitBlock):
            block.config = SolverConfig(tol=1e-12, max_iter=200, backward_tol=1e-12, backward_max_iter=200)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    target = torch.arange(4)

    def grads(net, inp):
        inp = inp.clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy(net(inp), target)
        return [g.double() for g in torch.autograd.grad(loss, [inp, *net.parameters()])]
    errors = [_rel(a, b) for a, b in zip(grads(model, x.float()), grads(reference, x))]
    assert max(errors) < 1e-4, max(errors)  # 1.4e-5; unpolished: 5e-3


def test_theta_zero_is_exactly_the_explicit_resnet_step():
    block = _block(theta=0.0, h=0.7, dtype=torch.float32)
    x = torch.randn(2, 2, 6, 6)
    assert torch.equal(block(x), x + 0.7 * block.residual(x))  # eval: the same normalised kernels both times
    assert block.solver_log.summary() == {}  # no solver ran

    model = timm.create_model('implicit_trapezoid_resnet', theta=0, **_TINY).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.solver_stats() == {}


# -- the forward solve ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name, kwargs', [
    ('implicit_trapezoid_resnet', {}), ('implicit_euler_resnet', {}),
    ('implicit_trapezoid_resnet', dict(scheme='one_leg', solver='fixed_point')),
])
def test_forward_residual_at_the_returned_solution_is_below_tolerance(name, kwargs):
    model = timm.create_model(name, **kwargs).eval()
    captured = []
    for block in model.modules():
        if isinstance(block, ImplicitBlock):
            block.register_forward_hook(lambda m, args, out: captured.append((m, args[0], out)))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        assert len(captured) == 9
        for block, x, y in captured:
            gy = block.forward_map(x, *block.residual.normalized_params())[0](y)
            residual = ((gy - y).flatten(1).norm(dim=1) / gy.flatten(1).norm(dim=1)).max()
            assert residual <= model.solver_config.tol
    stats = model.solver_stats()
    assert stats['forward_converged'] and stats['forward_residual_max'] <= 1e-4 and stats['forward_solves'] == 9
    assert stats['forward_iterations_max'] <= 15


def test_non_contractive_configuration_warns_once_and_reports_non_convergence():
    def non_contractive():  # h·θ·Lip(F) up to 60: the fixed-point map expands
        return timm.create_model('implicit_euler_resnet', h=15.0, lipschitz=4.0, solver='fixed_point',
                                 solver_max_iter=6, backward_max_iter=6, **_TINY).train()

    model = non_contractive()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        out = model(x)
        out.sum().backward()
        model(x)
    relevant = [w for w in caught if issubclass(w.category, FixedPointConvergenceWarning)]
    assert len(relevant) == 1 and 'did not converge' in str(relevant[0].message)
    stats = model.solver_stats()
    assert not stats['converged'] and not stats['forward_converged'] and stats['forward_iterations_max'] == 6
    assert stats['forward_residual_max'] > 1e-4
    assert stats['backward_solves'] == stats['forward_solves'] > 0
    model.reset_solver_stats()  # what an evaluation phase does first: only the solves after it are reported
    assert model.solver_stats() == {}
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # and the warning stays once per model
        model(x)
    assert 'backward_solves' not in model.solver_stats()
    assert model.solver_stats()['forward_solves'] == stats['forward_solves']
    assert torch.isfinite(out).all()  # the best iterate, flagged, rather than whatever the last iterate was
    with pytest.warns(FixedPointConvergenceWarning):  # once per model: another model warns again
        non_contractive()(x)


# -- reversible trapezoidal training ----------------------------------------------------------------------------
@pytest.mark.parametrize('scheme', ['linear', 'one_leg'])
@pytest.mark.parametrize('dtype, tol, bound', [(torch.float64, 1e-12, 1e-10), (torch.float32, 1e-4, 1e-4)])
def test_reversed_trapezoidal_step_reconstructs_the_input(scheme, dtype, tol, bound):
    block = _block(0.5, scheme, h=1.5, channels=3, tol=tol, dtype=dtype)
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    params = block.residual.normalized_params()
    with torch.no_grad():
        y = block(x)
        x_rec = reconstruct_input(block, y, params, block.config, block.solver_log)
    assert _rel(x_rec, x) < bound
    stats = block.solver_log.summary()
    assert stats['reconstruct_converged'] and stats['reconstruct_residual_max'] <= tol


def _grads(model, x, weight):
    x = x.clone().requires_grad_()
    loss = (model(x) * weight).sum()
    return torch.autograd.grad(loss, [x] + list(model.parameters()))


# float32 at tolerance 1e-4: reconstructed inputs differ by ~1e-5, enough to flip a few ReLUs whose gradient
# contributions then differ; float64 at 1e-12 is the exact comparison.
@pytest.mark.parametrize('dtype, bound', [(torch.float64, 1e-8), (torch.float32, 1e-3)])
def test_memory_efficient_gradients_match_the_plain_ones(dtype, bound):
    plain = _tiny_model(dtype=dtype, scheme='linear').eval()
    efficient = _tiny_model(dtype=dtype, scheme='linear', memory_efficient=True).eval()
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 32, 32, dtype=dtype)
    weight = torch.randn(3, 10, dtype=dtype)
    for a, b in zip(_grads(efficient, x, weight), _grads(plain, x, weight)):
        assert _rel(a, b) < bound
    stats = efficient.solver_stats()
    assert stats['reconstruct_solves'] == 4 and stats['reconstruct_converged'] and stats['converged']


def _retained_saved_bytes(model):
    """Bytes of the distinct storages autograd still holds for backward after a training forward. The hook packs
    a detached alias (and watches it): returning the tensor itself would make each saved output hold its own
    node, a reference cycle that keeps graphs alive which autograd frees otherwise."""
    refs = []

    def pack(t):
        alias = t.detach()
        refs.append(weakref.ref(alias))
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(torch.randn(8, 3, 32, 32))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in refs) if t is not None}
    del out
    return sum(storages.values())


def test_memory_efficient_training_stores_less():
    plain = _retained_saved_bytes(timm.create_model('implicit_trapezoid_resnet').train())
    efficient = _retained_saved_bytes(timm.create_model('implicit_trapezoid_resnet', memory_efficient=True).train())
    explicit = _retained_saved_bytes(timm.create_model('implicit_trapezoid_resnet', theta=0).train())
    # memory-efficient keeps one tensor per stage plus the transitions' inputs (0.41× plain, 0.51× explicit)
    assert efficient < 0.45 * plain and efficient < 0.55 * explicit
    # per block, explicit keeps x and ReLU(K₁x + b₁); plain keeps x, its output y (the next block's x),
    # h(1 − θ) ReLU(K₁x + b₁) and hθ ReLU(K₁y + b₁) (what the hand-written linearisation needs): one feature map
    # more than explicit (batch 8, 3 blocks per stage at 16/32/64 channels, 32/16/8 pixels). Recording G(x, y)
    # with a graph for autograd's linearisation kept three (its output, the mixed hidden activation, two biases).
    widths_and_sizes = ((16, 32), (32, 16), (64, 8))
    feature_maps = sum(3 * 8 * c * s * s for c, s in widths_and_sizes)
    assert plain - explicit == 4 * feature_maps
    with pytest.raises(ValueError, match='memory_efficient=True needs theta=0.5'):
        timm.create_model('implicit_euler_resnet', memory_efficient=True)


# -- what attacks and evaluation rely on ------------------------------------------------------------------------
@pytest.mark.parametrize('memory_efficient', [False, True])
def test_input_gradient_matches_finite_differences(memory_efficient):
    model = _tiny_model(memory_efficient=memory_efficient).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 7])
    loss_fn = lambda inp: torch.nn.functional.cross_entropy(model(inp), target)  # noqa: E731
    (grad,) = torch.autograd.grad(loss_fn(x), x)
    direction = torch.randn_like(x)
    eps = 1e-6  # small enough that the difference crosses (almost) no ReLU kink; the solves are exact to 1e-12
    with torch.no_grad():
        numeric = (loss_fn(x + eps * direction) - loss_fn(x - eps * direction)) / (2 * eps)
    assert abs(float((grad * direction).sum()) - float(numeric)) < 1e-6 * abs(float(numeric)) + 1e-9


@pytest.mark.parametrize('memory_efficient', [False, True])
def test_second_derivatives_are_refused_not_wrong(memory_efficient):
    model = timm.create_model('implicit_trapezoid_resnet', memory_efficient=memory_efficient, **_TINY).eval()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable'):
        grad.sum().backward()


def test_evaluation_is_deterministic_with_and_without_grad():
    model = timm.create_model('implicit_trapezoid_resnet').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first, second = model(x), model(x)
    with_grad = model(x.clone().requires_grad_())
    assert torch.equal(first, second)
    assert torch.equal(with_grad, first)  # the attack path (graph recorded) computes exactly the same network


# -- configuration -----------------------------------------------------------------------------------------------
def test_registered_models_and_their_settings():
    trapezoid = timm.create_model('implicit_trapezoid_resnet')
    euler = timm.create_model('implicit_euler_resnet', h=0.5, scheme='one_leg', steps=(2, 2, 2))
    assert isinstance(trapezoid, ImplicitResNet) and trapezoid.theta == 0.5 and euler.theta == 1.0
    assert trapezoid.pretrained_cfg['paper_ids'] == 'arXiv:1905.10479'
    assert sum(isinstance(m, ImplicitBlock) for m in trapezoid.modules()) == 9
    assert sum(isinstance(m, ImplicitBlock) for m in euler.modules()) == 6
    assert euler.h == 0.5 and euler.scheme == 'one_leg'
    # forward: fixed-point iteration (the map contracts by ≤ ½); backward: fixed-point iteration extrapolated from
    # its last 5 iterates (gradients as accurate as Anderson's, without its per-iteration mixing)
    assert trapezoid.solver_config == SolverConfig('fixed_point', 1e-4, 30, 1e-4, 30, backward_solver='extrapolated')
    assert trapezoid.solver_config.forward_method == dict(memory=1, extrapolate=False)
    assert trapezoid.solver_config.backward_method == dict(memory=5, extrapolate=True)
    assert euler.solver_config.solver == 'anderson'  # at its default h = 1 the map contracts by ≤ 1 only
    assert timm.create_model('implicit_trapezoid_resnet', theta=0.25).theta == 0.25


def test_backward_solver_is_the_adjoints_own():
    """``backward_solver`` changes the adjoint solve only: the same weights give the same forward solves and
    outputs, and different backward solves (Anderson's mixed iterates are not fixed-point iteration's, nor its
    extrapolation)."""
    stats, outputs = {}, {}
    for backward_solver in ('anderson', 'fixed_point', 'extrapolated'):
        torch.manual_seed(0)
        model = timm.create_model('implicit_trapezoid_resnet', backward_solver=backward_solver, **_TINY).eval()
        x = torch.randn(2, 3, 32, 32, requires_grad=True)
        outputs[backward_solver] = model(x)
        outputs[backward_solver].sum().backward()
        stats[backward_solver] = model.solver_stats()
        assert model.solver_config.solver == 'fixed_point'
    assert torch.equal(outputs['anderson'], outputs['fixed_point']) and torch.equal(outputs['anderson'],
                                                                                     outputs['extrapolated'])
    forward = [{k: v for k, v in s.items() if k.startswith('forward')} for s in stats.values()]
    assert forward[0] == forward[1] == forward[2]
    residuals = {name: s['backward_residual_max'] for name, s in stats.items()}
    assert len(set(residuals.values())) == 3
    # the extrapolation is the combination of the plain iterates with the smallest residual: never worse
    assert residuals['extrapolated'] < residuals['fixed_point']


@pytest.mark.parametrize('kwargs, match', [
    (dict(theta=1.5), 'theta must be a number in'),
    (dict(h=0), 'h must be a positive step size'),
    (dict(scheme='midpoint'), 'scheme must be one of'),
    (dict(solver='newton'), 'solver must be one of'),
    (dict(backward_solver='broyden'), 'backward_solver must be one of'),
    (dict(solver_tol=0), 'tol must be a relative residual'),
    (dict(backward_max_iter=0), 'backward_max_iter must be a positive integer'),
    (dict(steps=(3, 3)), 'one entry per stage'),
    (dict(steps=(3, 0, 3)), 'positive integers'),
    (dict(lipschitz=0), 'lipschitz must be positive'),
])
def test_bad_arguments_get_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('implicit_trapezoid_resnet', **kwargs)


def test_grad_checkpointing_is_refused_honestly():
    model = timm.create_model('implicit_trapezoid_resnet', **_TINY)
    model.set_grad_checkpointing(False)
    with pytest.raises(NotImplementedError, match='does not support gradient checkpointing'):
        model.set_grad_checkpointing(True)
    assert not model.grad_checkpointing


def test_a_trapezoidal_train_step_costs_the_counted_convolutions_per_block():
    """Per block and train step (linear scheme, θ = ½), in 3×3 convolutions (FLOPs counted by torch): forward K₁x
    and K₂ for the Euler predictor, two per solver iteration and two for the polish, and K₁ at the returned output
    for the linearisation (its ReLU mask and hidden activation; the hand-written linearisation needs no K₂ there,
    recording G(x, y) with a graph for autograd cost one more); backward two per adjoint iteration (K₂ᵀ, K₁ᵀ) and
    the push: one K₂ weight gradient and one K₂ᵀ serving F(x) and F(y) together (K₂ is applied once, to the mixed
    hidden activations), two K₁ weight gradients and K₁ᵀ to the input. The explicit step (θ = 0) costs 2 + 4.
    README's implicit benchmark paragraph quotes these counts."""
    from torch.utils.flop_counter import FlopCounterMode
    from odenet_timm.layers.fixed_point import implicit_step
    block = _block(channels=4, tol=1e-4, dtype=torch.float32)
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    params = [p.detach().requires_grad_() for p in block.residual.normalized_params()]
    conv = 2 * 3 * 4 * 4 * 9 * 8 * 8  # FLOPs of one 3×3 convolution (or one of its gradients) here

    def convolutions(run):
        with FlopCounterMode(display=False) as counter:
            result = run()
        counts = counter.get_flop_counts()['Global']
        return result, sum(v for k, v in counts.items() if 'convolution' in str(k)) / conv
    out, forward = convolutions(lambda: implicit_step(block, x, params, block.config, block.solver_log))
    _, backward = convolutions(lambda: out.pow(2).sum().backward())
    stats = block.solver_log.records
    forward_iterations, backward_iterations = stats['forward']['block'].iterations, stats['backward']['block'].iterations
    assert forward_iterations >= 2 and backward_iterations >= 2  # a real solve, not the initial guess
    assert forward == 2 + 2 * forward_iterations + 2 + 1
    assert backward == 2 * backward_iterations + 5


def test_jacobian_free_backward_pushes_the_output_gradient_through_one_step_and_solves_nothing():
    """``backward_solver='jacobian_free'`` (opt-in): the adjoint solution is replaced by the output gradient ``g``
    itself, so the gradients are ``(∂G/∂(x, p))ᵀ g`` at the returned ``y*``, what autograd gives through one
    application of the step with ``y*`` held constant; no adjoint product is made (the push's 5 convolutions are
    the whole backward) and no backward solve is recorded. The exact gradient differs: it is not a default."""
    import dataclasses
    from torch.utils.flop_counter import FlopCounterMode
    from odenet_timm.layers.fixed_point import implicit_step
    block = _block(channels=3, tol=1e-10)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    params = [p.detach().requires_grad_() for p in block.residual.normalized_params()]

    def gradients(config):
        block.solver_log.clear()
        y = implicit_step(block, x, params, config, block.solver_log)
        with FlopCounterMode(display=False) as counter:
            found = torch.autograd.grad((y * weight).sum(), [x, *params])
        convs = sum(v for k, v in counter.get_flop_counts()['Global'].items() if 'convolution' in str(k))
        return y, found, convs / (2 * 2 * 3 * 3 * 9 * 6 * 6)

    y, jacobian_free, convs = gradients(dataclasses.replace(block.config, backward_solver='jacobian_free'))
    assert convs == 5 and 'block' not in block.solver_log.records['backward']
    # autograd through the step's formula G(x, y) = x + h[(1 − θ) F(x) + θ F(y)] with y = y* held constant
    out = x + block.h * ((1 - block.theta) * block.residual.evaluate(x, params)
                         + block.theta * block.residual.evaluate(y.detach(), params))
    expected = torch.autograd.grad((out * weight).sum(), [x, *params])
    for found, want in zip(jacobian_free, expected):
        assert _rel(found, want) < 1e-12
    _, exact, _ = gradients(block.config)
    assert _rel(jacobian_free[0], exact[0]) > 1e-3  # not the gradient of the fixed point
