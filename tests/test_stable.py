"""Haber–Ruthotto stable networks: the adjoint, the spectra that make the blocks stable, parameter budgets,
gradients, the weight smoothness decay and the kwargs."""
import pytest
import timm
import torch
from torch.autograd.functional import jacobian

import odenet_timm  # noqa: F401  (registers the models)
from odenet_timm.models.hamiltonian import SymmetricLayer
from odenet_timm.models.stable import AntisymmetricLayer, StableResNet, StableStep

# (registered model, its parameters, the Hamiltonian budget it matches)
BUDGETS = [
    ('antisymmetric_resnet_20', 445_418, 429_690),
    ('parabolic_resnet_20', 445_418, 429_690),
    ('antisymmetric_resnet_56', 1_607_978, 1_683_034),
    ('parabolic_resnet_56', 1_607_978, 1_683_034),
]


def _layer(block, channels=3, gamma=0.0, seed=0):
    torch.manual_seed(seed)
    layer = AntisymmetricLayer(channels, gamma) if block == 'antisymmetric' else SymmetricLayer(channels, 'bias', False)
    layer = layer.double()
    with torch.no_grad():
        layer.norm2.bias.normal_()
    return layer


def _dense_jacobian(fn, x):
    return jacobian(fn, x).reshape(x.numel(), x.numel())


@pytest.mark.parametrize('block', ['antisymmetric', 'parabolic'])
def test_transpose_is_the_true_adjoint(block):
    layer = _layer(block, channels=4)
    x, y = torch.randn(2, 4, 5, 6, dtype=torch.float64), torch.randn(2, 4, 5, 6, dtype=torch.float64)
    assert torch.allclose((layer.conv(x) * y).sum(), (x * layer.conv_transpose(y)).sum(), rtol=1e-12, atol=1e-12)


def test_antisymmetric_operator_has_purely_imaginary_eigenvalues():
    """σ = identity: the Jacobian ½(K − Kᵀ) is antisymmetric; its eigenvalues have zero real part (and are not all
    zero); the damping γ moves them to real part −γ."""
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    jac = _dense_jacobian(_layer('antisymmetric').operator, x)
    assert torch.allclose(jac, -jac.T, atol=1e-12)
    eig = torch.linalg.eigvals(jac)
    assert eig.real.abs().max() < 1e-10 and eig.imag.abs().max() > 0.1
    damped = torch.linalg.eigvals(_dense_jacobian(_layer('antisymmetric', gamma=0.25).operator, x))
    assert torch.allclose(damped.real, torch.full_like(damped.real, -0.25), atol=1e-10)


def test_antisymmetric_layer_linearised_at_a_point_keeps_zero_real_parts():
    """With σ' folded in, the Jacobian diag(σ') ½(K − Kᵀ) still has eigenvalues with zero real part."""
    layer = _layer('antisymmetric')
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    slopes = (layer.norm2(layer.operator(x)) > 0).double()
    assert 0 < slopes.mean() < 1  # the point is one where ReLU clips some entries and passes others
    eig = torch.linalg.eigvals(_dense_jacobian(layer, x))
    assert eig.real.abs().max() < 1e-10 and eig.imag.abs().max() > 0.1


@pytest.mark.parametrize('linearised', [False, True], ids=['sigma_identity', 'at_a_point'])
def test_parabolic_layer_has_non_positive_eigenvalues(linearised):
    """The parabolic step's Jacobian −Kᵀ diag(σ') K (−KᵀK for σ = identity) is symmetric negative semi-definite."""
    layer = _layer('parabolic')
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)

    def minus_f(y):  # the right-hand side of the parabolic step, −Kᵀσ(Ky + b)
        return -(layer(y) if linearised else layer.conv_transpose(layer.conv(y)))

    jac = _dense_jacobian(minus_f, x)
    assert torch.allclose(jac, jac.T, atol=1e-12)
    eig = torch.linalg.eigvals(jac)
    assert eig.imag.abs().max() < 1e-10
    assert eig.real.max() < 1e-10 and eig.real.min() < -0.1


@pytest.mark.parametrize('model_name, params, budget', BUDGETS)
def test_parameter_counts_match_the_hamiltonian_budgets(model_name, params, budget):
    model = timm.create_model(model_name)
    count = sum(p.numel() for p in model.parameters())
    assert count == params
    assert abs(count / budget - 1) <= 0.05
    hamiltonian = {429_690: 'hamiltonian_74', 1_683_034: 'hamiltonian_218'}[budget]
    assert sum(p.numel() for p in timm.create_model(hamiltonian).parameters()) == budget


def _tiny(block, **kwargs):
    return timm.create_model(f'{block}_resnet_20', **dict(dict(layers=(1, 2, 1), widths=(2, 4, 6)), **kwargs))


@pytest.mark.parametrize('block', ['antisymmetric', 'parabolic'])
def test_gradients_match_finite_differences(block):
    torch.manual_seed(0)
    model = _tiny(block, num_classes=3, gamma=0.1, h=0.5).double().eval()
    with torch.no_grad():  # move the zero-initialised biases off the ReLU kinks (zero-padded channels sit on them)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    params = tuple(p for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def logits(inp, *weights):
        return torch.func.functional_call(model, dict(zip(names, weights)), (inp,))

    assert torch.autograd.gradcheck(logits, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize('block', ['antisymmetric', 'parabolic'])
def test_blocks_compute_their_equations(block):
    model = _tiny(block, h=0.3, gamma=0.2).double()
    step = model.stages[1][2]
    assert isinstance(step, StableStep)
    layer = step.layer
    y = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    b = layer.norm2.bias.view(1, -1, 1, 1)
    k = lambda v: torch.nn.functional.conv2d(v, layer.weight, padding=1)  # noqa: E731
    # Kᵀ as the convolution with in/out channels swapped and the kernel flipped: independent of conv_transpose2d
    kt = lambda v: torch.nn.functional.conv2d(v, layer.weight.transpose(0, 1).flip(-1, -2), padding=1)  # noqa: E731
    if block == 'antisymmetric':
        expected = y + 0.3 * torch.relu(0.5 * (k(y) - kt(y)) - 0.2 * y + b)
    else:
        expected = y - 0.3 * kt(torch.relu(k(y) + b))
    assert torch.allclose(step(y), expected, atol=1e-12)


def test_layout_transitions_and_kwargs_override_the_registration():
    model = timm.create_model('parabolic_resnet_56', layers=(2, 3, 1), h=0.05)
    assert model.block == 'parabolic' and model.h == 0.05
    steps = [[type(m).__name__ for m in stage] for stage in model.stages]
    assert steps == [['StableStep'] * 2, ['StableStep', 'PoolPadTransition', 'StableStep', 'StableStep'],
                     ['StableStep', 'PoolPadTransition']]
    assert all(s.scale == -0.05 for s in model.modules() if isinstance(s, StableStep))
    assert model.stages[1][0].layer.weight.shape[0] == 32 and model.stages[1][2].layer.weight.shape[0] == 64
    anti = timm.create_model('antisymmetric_resnet_20', gamma=0.1)
    assert all(s.scale == 0.1 and s.layer.gamma == 0.1 for s in anti.modules() if isinstance(s, StableStep))


def test_smoothness_loss_sums_consecutive_blocks_of_a_stage():
    """Stage 1: blocks 0-1-2; stage 2: the old-width first block is left out, blocks 1-2; stage 3: one block left."""
    model = _tiny('antisymmetric', layers=(3, 3, 2)).double()
    kernels = [[s.layer.weight for s in stage if isinstance(s, StableStep)] for stage in model.stages]
    expected = sum(0.5 * (b - a).square().sum() for ks in (kernels[0], kernels[1][1:]) for a, b in zip(ks[:-1], ks[1:]))
    loss = model.smoothness_loss()
    assert torch.allclose(loss, expected, rtol=1e-12)
    loss.backward()
    middle = kernels[0][1]
    assert torch.allclose(middle.grad, 2 * middle - kernels[0][0] - kernels[0][2], rtol=1e-12)
    assert kernels[1][0].grad is None and kernels[2][1].grad is None  # transition block; a stage's single block
    assert _tiny('parabolic', layers=(1, 1, 1)).smoothness_loss().item() == 0.0


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = _tiny('parabolic').double().train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(*grads))


@pytest.mark.parametrize('kwargs, message', [
    (dict(block='hyperbolic'), r"block must be one of \('antisymmetric', 'parabolic'\), got 'hyperbolic'"),
    (dict(h=0), 'the step size h must be a positive number, got 0.0'),
    (dict(gamma=-0.1), 'the damping gamma must be a number >= 0, got -0.1'),
    (dict(widths=(32, 63, 128)), r'stage widths must not decrease and grow by an even number.*\(32, 63, 128\)'),
    (dict(layers=(3, 0, 3)), r'layers must be a sequence of positive integers \(one per stage\), got \(3, 0, 3\)'),
])
def test_bad_kwargs_get_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StableResNet(**kwargs)
