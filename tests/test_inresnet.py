"""In-ResNet family: parameter counts against the paper, the interpolation formulas, λ placement and init,
and checkpoint safety."""
import pytest
import timm
import torch
import torch.nn.functional as F

import odenet_timm
from odenet_timm.models.inresnet import InterpolatedBlock, ResidualSum
from model_checks import saved_bytes


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, InterpolatedBlock)]


# -- parameter counts (paper: ResNet-110 1.73M, ResNet-164 1.70M; In-ResNet adds one scalar per λ-block) ----
def test_parameter_counts_match_the_paper():
    resnet_110 = _num_params(timm.create_model('cifar_resnet_110'))
    inresnet_110 = _num_params(timm.create_model('inresnet_110'))
    resnet_164 = _num_params(timm.create_model('cifar_resnet_164'))
    assert abs(resnet_110 - 1.73e6) / 1.73e6 < 0.005
    assert abs(inresnet_110 - 1.73e6) / 1.73e6 < 0.005
    assert abs(resnet_164 - 1.70e6) / 1.70e6 < 0.01
    assert inresnet_110 - resnet_110 == 51
    assert _num_params(timm.create_model('inresnet_164')) - resnet_164 == 51
    assert _num_params(timm.create_model('lambda_inresnet_110')) - resnet_110 == 51
    assert _num_params(timm.create_model('inresnet_sig_110')) - resnet_110 == 51
    # gates: W_d (64/32/16 inputs) + b_d per λ-block, 17 blocks per stage
    assert _num_params(timm.create_model('inresnet_gating_110')) - resnet_110 == 17 * (17 + 33 + 65)
    assert _num_params(timm.create_model('cifar_resnet_20')) == 272378
    resnet_1202 = _num_params(timm.create_model('cifar_resnet_1202'))  # He et al. arXiv:1512.03385: 19.4M
    assert resnet_1202 == 19_423_930 and abs(resnet_1202 - 19.4e6) / 19.4e6 < 0.01


@pytest.mark.parametrize('model_name', ['inresnet_110', 'inresnet_164', 'lambda_inresnet_110'])
def test_no_interpolation_in_first_and_transition_blocks(model_name):
    model = timm.create_model(model_name)
    for stage in model.stages:
        assert isinstance(stage[0].interpolation, ResidualSum)
        assert all(not isinstance(b.interpolation, ResidualSum) for b in stage[1:])
    assert len(model.interpolation_coefficients()) == 51


# -- λ initialisation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('model_name, low, high', [
    ('inresnet_110', 0.2, 0.25), ('inresnet_20', 0.2, 0.25), ('inresnet_164', 0.1, 0.2),
    ('lambda_inresnet_110', 0.2, 0.25), ('lambda_inresnet_164', 0.2, 0.25), ('inresnet_sig_110', 0.2, 0.25),
])
def test_lambda_init_falls_in_the_documented_range(model_name, low, high):
    lam = timm.create_model(model_name).interpolation_coefficients()
    assert lam.min() >= low - 1e-6 and lam.max() <= high + 1e-6
    assert lam.std() > 0  # sampled per block, not one constant


def test_lambda_init_is_a_kwarg():
    lam = timm.create_model('inresnet_20', lambda_init=(0.3, 0.4)).interpolation_coefficients()
    assert lam.min() >= 0.3 - 1e-6 and lam.max() <= 0.4 + 1e-6
    with pytest.raises(ValueError, match='lambda_init'):
        timm.create_model('inresnet_20', lambda_init=(0.4, 0.3))
    with pytest.raises(ValueError, match='interpolation must be one of'):
        timm.create_model('cifar_resnet_20', interpolation='bogus')


def test_gated_coefficients_need_an_input_and_do_not_touch_bn_statistics():
    model = timm.create_model('inresnet_gating_110', layers=(2, 2, 2)).train()
    with pytest.raises(ValueError, match='pass a batch'):
        model.interpolation_coefficients()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lam = model.interpolation_coefficients(torch.randn(4, 3, 32, 32))
    assert lam.shape == (3,) and lam.min() >= 0.2 - 1e-6 and lam.max() <= 0.25 + 1e-6  # W_d = 0 at init
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- the formulas ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('inresnet, k_for_zero_lambda', [('inresnet_20', 1.0), ('lambda_inresnet_110', 0.0)])
def test_lambda_zero_is_bit_identical_to_the_resnet(inresnet, k_for_zero_lambda):
    kwargs = dict(layers=(3, 3, 3))
    resnet = timm.create_model('cifar_resnet_20', **kwargs).eval()
    model = timm.create_model(inresnet, **kwargs).eval()
    missing, unexpected = model.load_state_dict(resnet.state_dict(), strict=False)
    assert unexpected == [] and all(k.endswith('interpolation.k') for k in missing) and len(missing) == 6
    with torch.no_grad():
        for block in _blocks(model):
            if hasattr(block.interpolation, 'k'):
                block.interpolation.k.fill_(k_for_zero_lambda)
        assert torch.all(model.interpolation_coefficients() == 0)
        x = torch.randn(4, 3, 32, 32)
        assert torch.equal(model(x), resnet(x))
        assert not torch.equal(model(x), timm.create_model(inresnet, **kwargs).eval()(x))


def _interpolated_block(model_name):
    model = timm.create_model(model_name, layers=(2, 2, 2)).eval()
    return model.stages[1][1]


def test_lambda_one_drops_the_identity_path():
    block = _interpolated_block('inresnet_20')
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        block.interpolation.k.fill_(0.0)  # λ = ReLU(1 - 0) = 1
        assert torch.equal(block(x), block.residual(x))
        block.interpolation.k.fill_(-0.5)  # λ = 1.5: no upper clamp, the identity path is subtracted
        torch.testing.assert_close(block(x), block.residual(x) - 0.5 * x)


def test_inresnet_formula():
    block = _interpolated_block('inresnet_20')
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        block.interpolation.k.fill_(0.7)
        torch.testing.assert_close(block(x), block.residual(x) + (1 - 0.3) * x)
        block.interpolation.k.fill_(1.5)  # λ = ReLU(-0.5) = 0
        torch.testing.assert_close(block(x), block.residual(x) + x)


def test_lambda_inresnet_follows_its_own_formula():
    block = _interpolated_block('lambda_inresnet_110')
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        block.interpolation.k.fill_(0.3)
        torch.testing.assert_close(block(x), 1.3 * block.residual(x) + 0.7 * x)
        block.interpolation.k.fill_(-0.2)  # λ = ReLU(-0.2) = 0
        torch.testing.assert_close(block(x), block.residual(x) + x)


def test_sigmoid_and_gated_variants_follow_their_formulas():
    x = torch.randn(3, 32, 16, 16)
    with torch.no_grad():
        block = _interpolated_block('inresnet_sig_110')
        block.interpolation.d.fill_(0.4)
        torch.testing.assert_close(block(x), block.residual(x) + (1 - torch.sigmoid(torch.tensor(0.4))) * x)
        for model_name, act in (('inresnet_gating_110', F.relu), ('inresnet_gating_sig_110', torch.sigmoid)):
            block = _interpolated_block(model_name)
            torch.nn.init.normal_(block.interpolation.gate.weight)
            lam = act(block.interpolation.gate(x.mean(dim=(2, 3))))[:, :, None, None]
            assert lam.flatten().unique().numel() == 3  # one λ per sample
            torch.testing.assert_close(block(x), block.residual(x) + (1 - lam) * x)


def test_lambda_gradient_matches_finite_differences():
    torch.manual_seed(1)
    model = timm.create_model('inresnet_20', layers=(1, 2, 1), widths=(4, 8, 8), stem_width=4).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    k = model.stages[1][1].interpolation.k
    model(x).square().sum().backward()
    eps = 1e-6
    with torch.no_grad():
        k += eps
        plus = model(x).square().sum()
        k -= 2 * eps
        minus = model(x).square().sum()
        k += eps
    torch.testing.assert_close(k.grad, ((plus - minus) / (2 * eps)).reshape(1), rtol=1e-6, atol=1e-8)


# -- checkpoints ---------------------------------------------------------------------------------------------
def test_safetensors_round_trip_and_foreign_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file
    model = timm.create_model('inresnet_20').eval()
    path = tmp_path / 'w.safetensors'
    save_file(model.state_dict(), path)
    other = timm.create_model('inresnet_20').eval()
    other.load_state_dict(load_file(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))

    resnet = timm.create_model('cifar_resnet_20').eval()
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    with pytest.raises(odenet_timm.CheckpointMismatchError, match=r'6 unexpected key\(s\): stages\.0\.1\.interpolation\.k'):
        resnet.load_state_dict(load_file(path))
    with pytest.raises(odenet_timm.CheckpointMismatchError, match=r'checkpoint does not fit cifar_resnet_20'):
        timm.create_model('cifar_resnet_20', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    # nothing was copied into the model before the error
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())
    with pytest.raises(odenet_timm.CheckpointMismatchError, match=r'missing key.*stages\.0\.3'):
        timm.create_model('inresnet_32').load_state_dict(load_file(path))
    with pytest.raises(odenet_timm.CheckpointMismatchError, match=r'fc\.weight: checkpoint \(10, 64\) vs model \(100, 64\)'):
        timm.create_model('inresnet_20', num_classes=100).load_state_dict(load_file(path))


def test_num_classes_100_and_grad_checkpointing():
    model = timm.create_model('inresnet_20', num_classes=100).train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    plain = model(x)
    plain.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    checkpointed = model(x)
    checkpointed.sum().backward()
    assert plain.shape == (2, 100)
    torch.testing.assert_close(checkpointed, plain)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


# -- gradient checkpointing (what makes cifar_resnet_1202 trainable in little memory) -----------------------------
@pytest.mark.parametrize('model_name, kwargs', [
    ('cifar_resnet_1202', dict(layers=(2, 2, 2))),
    ('cifar_resnet_164', dict(layers=(1, 2, 1))),
    ('inresnet_110', dict(layers=(2, 3, 2))),
    ('lambda_inresnet_110', dict(layers=(2, 2, 2))),
    ('inresnet_gating_sig_110', dict(layers=(1, 3, 2))),
])
def test_grad_checkpointing_keeps_gradients_and_statistics_and_stores_less(model_name, kwargs):
    model = timm.create_model(model_name, **kwargs).double().train()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        inp = x.clone().requires_grad_()
        model(inp).square().sum().backward()
        statistics = {k: v - before[k] for k, v in model.state_dict().items() if 'running' in k or 'tracked' in k}
        results.append(([inp.grad] + [p.grad.clone() for p in model.parameters()], statistics))
        model.load_state_dict(before)
    (plain_grads, plain_stats), (ckpt_grads, ckpt_stats) = results
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    for key, change in plain_stats.items():  # BatchNorm statistics updated once per step, not twice
        torch.testing.assert_close(ckpt_stats[key], change, rtol=1e-10, atol=1e-14)
    model.set_grad_checkpointing(False)
    plain_bytes = saved_bytes(model, x)
    model.set_grad_checkpointing(True)
    assert saved_bytes(model, x) < 0.2 * plain_bytes  # measured 0.11-0.14: a checkpointed block keeps its input
