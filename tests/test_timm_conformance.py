"""What timm's own model test suite checks, run against every model this package registers.

Registered models (full size, except those of :data:`TINY_KWARGS`, built smaller so that the suite stays fast),
batch 1-2, 32×32, as in pytorch-image-models' tests/test_models.py:
forward, backward (every parameter gets a gradient), default cfg (pool size, classifier and first conv
names), reset_classifier / global_pool='', features_only, forward_intermediates, group_matcher, and the
weight round trips through save_for_hf / local-dir / pretrained_cfg_overlay / checkpoint_path.
"""
import re

import pytest
import timm
import torch
from timm.models import group_parameters, save_for_hf

import odenet_timm

MODELS = odenet_timm.list_models()
# Model kwargs that make a registered model fast, or able to pass an untrained eval-mode check, while keeping every
# kind of layer it has. ResNet-1202: 600 residual blocks whose BatchNorms still hold their initial running statistics
# (mean 0, variance 1) each grow the activations by about 1.25×, which overflows float32 at full depth (training mode
# normalises with batch statistics and is fine).
TINY_KWARGS = {
    'cifar_resnet_1202': dict(layers=(2, 2, 2)),
    **{name: dict(layers=(2, 2, 2)) for name in odenet_timm.list_models('antisymmetric_resnet_*')},
    **{name: dict(layers=(2, 2, 2)) for name in odenet_timm.list_models('parabolic_resnet_*')},
    **{name: dict(widths=(8, 8, 8)) for name in odenet_timm.list_models('odenet_*')},
}


def create(model_name, **kwargs):
    """``timm.create_model(model_name, ...)`` with the model's :data:`TINY_KWARGS` (overridable by ``kwargs``)."""
    return timm.create_model(model_name, **dict(TINY_KWARGS.get(model_name, {}), **kwargs))


def _input(model, batch_size=1):
    return torch.randn(batch_size, *model.pretrained_cfg['input_size'])


def test_models_are_listed_by_timm():
    assert {'cifar_resnet_110', 'inresnet_110', 'inresnet_164', 'lambda_inresnet_110'} <= set(MODELS)
    assert {'antisymmetric_resnet_20', 'antisymmetric_resnet_56', 'parabolic_resnet_20', 'parabolic_resnet_56',
            'odenet_small', 'odenet_cifar'} <= set(MODELS)
    assert set(TINY_KWARGS) <= set(MODELS)
    assert set(timm.list_models('inresnet*')) <= set(MODELS)


@pytest.mark.parametrize('model_name', MODELS)
def test_default_cfg(model_name):
    model = create(model_name).eval()
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 32, 32) and cfg['crop_pct'] == 1.0 and cfg['num_classes'] == 10
    assert cfg['mean'] == odenet_timm.models._common.CIFAR10_MEAN
    assert cfg['std'] == odenet_timm.models._common.CIFAR10_STD
    assert cfg['paper_ids'] and cfg['license']
    state_dict = model.state_dict()
    assert cfg['classifier'] + '.weight' in state_dict
    assert cfg['first_conv'] + '.weight' in state_dict
    x = _input(model)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[-2:] == cfg['pool_size']
        assert features.shape[1] == model.num_features
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
        model.reset_classifier(0, '')
        assert model(x).shape == (1, model.num_features, *cfg['pool_size'])
        model.reset_classifier(100, 'avg')
        assert model(x).shape == (1, 100)
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == 'fc'


@pytest.mark.parametrize('model_name', MODELS)
def test_backward_reaches_every_parameter(model_name):
    model = create(model_name, num_classes=42).train()
    out = model(_input(model, batch_size=2))
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f'no gradient for {name}'
        assert torch.isfinite(p.grad).all(), f'non-finite gradient for {name}'


@pytest.mark.parametrize('model_name', MODELS)
def test_features_only_and_intermediates(model_name):
    model = create(model_name, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 4
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        outs = model(x)
    assert [o.shape[1] for o in outs] == channels
    assert [32 // o.shape[-1] for o in outs] == reductions

    full = create(model_name).eval()
    with torch.no_grad():
        final, intermediates = full.forward_intermediates(x)
        assert torch.equal(final, full.forward_features(x))
        assert [i.shape[1] for i in intermediates] == channels
        last_only = full.forward_intermediates(x, indices=1, intermediates_only=True)
        assert len(last_only) == 1 and torch.equal(last_only[0], intermediates[-1])
        normed = full.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
        assert torch.equal(normed, final)


@pytest.mark.parametrize('model_name', MODELS)
def test_group_matcher_covers_every_parameter(model_name):
    model = create(model_name)
    for coarse in (False, True):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        grouped = {name for names in groups.values() for name in names}
        assert grouped == {name for name, _ in model.named_parameters()}
        assert any(re.match(r'^stem', n) for n in groups[min(groups)])


@pytest.mark.parametrize('model_name', MODELS)
def test_weights_round_trip_through_timm(model_name, tmp_path):
    model = create(model_name).eval()
    x = _input(model, batch_size=2)
    with torch.no_grad():
        expected = model(x)
    save_for_hf(model, tmp_path, safe_serialization=True, model_args=TINY_KWARGS.get(model_name))
    weights = tmp_path / 'model.safetensors'
    loaded = [
        timm.create_model(f'local-dir:{tmp_path}', pretrained=True),
        create(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights))),
        create(model_name, checkpoint_path=str(weights)),
    ]
    for other in loaded:
        with torch.no_grad():
            assert torch.equal(other.eval()(x), expected)


@pytest.mark.parametrize('model_name', MODELS)
def test_bad_input_gets_a_clear_error(model_name):
    model = create(model_name).eval()
    with pytest.raises(ValueError, match=r'3 input channels.*\(batch, 3, H, W\)'):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r'4-D input'):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r'spatial size of at least 4x4'):
        model(torch.randn(1, 3, 2, 2))
    with torch.no_grad():  # the smallest size the stages accept goes through
        assert model(torch.randn(1, 3, 4, 4)).shape == (1, 10)
