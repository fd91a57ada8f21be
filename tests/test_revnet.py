"""RevNet: parameter counts against the paper, the coupling formulas, exact inversion, memory-efficient gradients
equal to plain autograd, BatchNorm statistics, stored activations and grad checkpointing."""
import pytest
import timm
import torch
import torch.nn.functional as F

from odenet_timm.layers.reversible import invert_sequence
from odenet_timm.models.revnet import RevNetDownsampleUnit, RevNetUnit
from model_checks import (
    assert_gradients_equal_plain_autograd, assert_unit_inverts_in_float64, memory_efficient_and_plain, num_params,
    saved_bytes, stage_reconstruction_error)

SMALL = dict(layers=(2, 3, 2), widths=(8, 16, 24))


def _expected_params(layers, widths, num_classes=10):
    """A pre-activation basic function ``c_in → c_out`` is BN(c_in) + 9·c_in·c_out + BN(c_out) + 9·c_out²; a unit is
    F and G on the halves, the first unit of stages 2, 3 with F from the old half width; the network's first F
    has no BN(c_in); stem 3·w₀·9 + BN(w₀); head BN(C) + Linear(C → classes)."""
    def residual(c_in, c_out):
        return 2 * c_in + 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out

    total = 3 * widths[0] * 9 + 2 * widths[0] - widths[0]
    in_half = widths[0] // 2
    for depth, width in zip(layers, widths):
        half = width // 2
        total += residual(in_half, half) + residual(half, half) + (depth - 1) * 2 * residual(half, half)
        in_half = half
    return total + 2 * widths[-1] + widths[-1] * num_classes + num_classes


def test_parameter_counts_match_the_paper():
    assert timm.list_models('revnet*') == ['revnet_38', 'revnet_110'] and 'cifar_resnet_1202' in timm.list_models()
    revnet_38, revnet_110 = num_params(timm.create_model('revnet_38')), num_params(timm.create_model('revnet_110'))
    assert revnet_38 == 464_890 and abs(revnet_38 - 0.46e6) / 0.46e6 < 0.02
    assert revnet_110 == 1_729_194 and abs(revnet_110 - 1.73e6) / 1.73e6 < 0.02
    assert revnet_38 == _expected_params((3, 3, 3), (32, 64, 112))
    assert revnet_110 == _expected_params((9, 9, 9), (32, 64, 128))
    model = timm.create_model('revnet_110', layers=(1, 4, 2), widths=(12, 20, 28), num_classes=3)
    assert num_params(model) == _expected_params((1, 4, 2), (12, 20, 28), 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match='widths must be even'):
        timm.create_model('revnet_38', widths=(32, 64, 111))
    with pytest.raises(ValueError, match='multiple of 4'):
        timm.create_model('revnet_38', widths=(32, 66, 114))
    with pytest.raises(ValueError, match='one entry per stage'):
        timm.create_model('revnet_38', layers=(3, 3))


def test_unit_formulas_and_downsampling_unit():
    torch.manual_seed(1)
    x1, x2 = (torch.randn(2, 4, 6, 6, dtype=torch.float64) for _ in range(2))
    unit = RevNetUnit(4).double().eval()
    f, g = unit.f.fn, unit.g.fn
    with torch.no_grad():
        y1 = x1 + f(x2)
        y2 = x2 + g(y1)  # G reads the NEW y₁
        out = unit((x1, x2))
        torch.testing.assert_close(out[0], y1, rtol=0, atol=1e-14)
        torch.testing.assert_close(out[1], y2, rtol=0, atol=1e-14)
        for bn in (f.bn1, f.bn2):  # non-trivial statistics and affine parameters
            for t in (bn.running_mean, bn.weight, bn.bias):
                t.normal_()
            bn.running_var.uniform_(0.5, 2)

        def bn_relu(bn, x):
            return F.relu(F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))

        # pre-activation basic function: BN-ReLU-conv3x3-BN-ReLU-conv3x3, no conv bias
        expected_f = F.conv2d(bn_relu(f.bn2, F.conv2d(bn_relu(f.bn1, x2), f.conv1.weight, padding=1)),
                              f.conv2.weight, padding=1)
        torch.testing.assert_close(f(x2), expected_f, rtol=1e-12, atol=1e-12)
    assert f.conv1.bias is None and f.conv2.bias is None

    down = RevNetDownsampleUnit(4, 8).double().eval()
    with torch.no_grad():
        z1, z2 = down((x1, x2))
        pooled = F.avg_pool2d(x1, 2)
        assert z1.shape == (2, 8, 3, 3)
        torch.testing.assert_close(z1 - down.f(x2), F.pad(pooled, (0, 0, 0, 0, 2, 2)), rtol=0, atol=1e-14)
        torch.testing.assert_close(z2, F.pad(F.avg_pool2d(x2, 2), (0, 0, 0, 0, 2, 2)) + down.g(z1), rtol=0, atol=1e-14)
    assert down.f.conv1.stride == (2, 2) and down.f.conv1.in_channels == 4 and down.f.conv1.out_channels == 8


def test_units_invert_and_a_full_stage_reconstructs_in_float32():
    assert_unit_inverts_in_float64(RevNetUnit(4))
    model = timm.create_model('revnet_110')  # stage 1: 9 reversible units, 18 couplings
    assert stage_reconstruction_error(model, torch.float64) < 1e-10
    # float32: unit steps (no h) let a fresh network's activations grow ~30× over the stage, and the rounding
    # of the large outputs lands on the small input: 4e-4 to 2e-3 relative (Hamiltonian, h = 0.1: ~1e-7)
    assert stage_reconstruction_error(model, torch.float32) < 5e-3
    with pytest.raises(ValueError, match='cannot be inverted'):
        invert_sequence(list(model.stages[1]), (torch.zeros(1, 32, 16, 16),) * 2)  # the downsampling unit


@pytest.mark.parametrize('model_name', ['revnet_38', 'revnet_110'])
def test_memory_efficient_gradients_equal_plain_autograd(model_name):
    rev, plain = memory_efficient_and_plain(model_name, **SMALL)
    assert_gradients_equal_plain_autograd(rev, plain, torch.randn(3, 3, 8, 8, dtype=torch.float64))


def test_input_gradient_in_eval_mode_and_batchnorm_statistics_after_a_step():
    rev, plain = memory_efficient_and_plain('revnet_110', **SMALL)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    grads = []
    for model in (plain, rev):  # an attack: gradients w.r.t. the input only
        inp = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(F.cross_entropy(model.eval()(inp), torch.arange(4)), inp)[0])
    assert (grads[1] - grads[0]).norm() <= 1e-8 * grads[0].norm()

    y = torch.randint(0, 10, (4,))
    for model in (rev, plain):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        F.cross_entropy(model.train()(x), y).backward()
        optimizer.step()
    rev_state, plain_state = rev.state_dict(), plain.state_dict()
    assert all(rev_state[k].item() == 1 for k in rev_state if k.endswith('num_batches_tracked'))
    for key in plain_state:
        torch.testing.assert_close(rev_state[key], plain_state[key], rtol=1e-10, atol=1e-12)


def test_stored_activations_do_not_grow_with_depth():
    x = torch.randn(2, 3, 16, 16)
    shallow = timm.create_model('revnet_110', layers=(2, 2, 2), widths=(8, 16, 24)).train()
    deep = timm.create_model('revnet_110', layers=(6, 6, 6), widths=(8, 16, 24)).train()
    assert saved_bytes(deep, x) == saved_bytes(shallow, x)
    plain = timm.create_model('revnet_110', layers=(2, 2, 2), widths=(8, 16, 24), memory_efficient=False).train()
    assert saved_bytes(plain, x) > 2 * saved_bytes(shallow, x)


@pytest.mark.parametrize('memory_efficient', [True, False])
def test_grad_checkpointing_gives_the_same_gradients_and_statistics(memory_efficient):
    model = timm.create_model('revnet_38', memory_efficient=memory_efficient, **SMALL).double().train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grads, buffers = [], []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        buffers.append({k: v - before[k] for k, v in model.state_dict().items() if 'running' in k or 'tracked' in k})
        model.load_state_dict(before)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for key, change in buffers[0].items():  # BatchNorm statistics updated once per step, not twice
        torch.testing.assert_close(buffers[1][key], change, rtol=1e-10, atol=1e-14)
