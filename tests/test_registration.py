"""Every registration merges its defaults the timm way, ``dict(model_args, **kwargs)``, so a user can override any
kwarg a registration sets. The kwargs a registration sets are discovered from what it hands to
``build_model_with_cfg``, so models registered later are covered without editing this file."""
import inspect
import sys

import pytest
import timm
import torch
from timm.models import build_model_with_cfg

import odenet_timm

_BUILDER_OPTIONS = set(inspect.signature(build_model_with_cfg).parameters)  # feature_cfg, …: not model kwargs


def _registration_kwargs(name, monkeypatch, **overrides):
    """The model kwargs registration ``name`` hands to ``build_model_with_cfg`` when called with ``overrides``."""
    entrypoint = timm.models.model_entrypoint(name)
    module = sys.modules[entrypoint.__module__]
    calls = []
    monkeypatch.setattr(module, 'build_model_with_cfg', lambda *args, **kwargs: calls.append(kwargs))
    entrypoint(pretrained=False, **overrides)
    assert len(calls) == 1, f'{name} does not build its model through {module.__name__}.build_model_with_cfg'
    return {key: value for key, value in calls[0].items() if key not in _BUILDER_OPTIONS}


@pytest.mark.parametrize('name', odenet_timm.list_models())
def test_every_kwarg_a_registration_sets_can_be_overridden(name, monkeypatch):
    defaults = _registration_kwargs(name, monkeypatch)
    for key in defaults:
        override = object()  # no registration sets this value: only the override can put it there
        passed = _registration_kwargs(name, monkeypatch, **{key: override})
        assert passed[key] is override, f'{name}: the registration replaced {key}'
        assert {k: v for k, v in passed.items() if k != key} == {k: v for k, v in defaults.items() if k != key}


def test_the_registered_models_are_discovered():
    names = odenet_timm.list_models()
    assert {'inresnet_20', 'lambda_inresnet_164', 'hamiltonian_74', 'implicit_trapezoid_resnet'} <= set(names)


def test_overriding_the_interpolation_builds_the_plain_resnet():
    torch.manual_seed(0)
    plain = timm.create_model('inresnet_20', interpolation='none', layers=[2, 2, 2])
    resnet = timm.create_model('cifar_resnet_20', layers=[2, 2, 2])
    assert plain.interpolation == 'none' and plain.interpolation_coefficients().numel() == 0
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in resnet.named_parameters()]


def test_overriding_lambda_init_of_lambda_inresnet_164():
    model = timm.create_model('lambda_inresnet_164', lambda_init=(0.3, 0.35), layers=[2, 2, 2])
    lam = model.interpolation_coefficients()
    assert model.lambda_init == (0.3, 0.35) and lam.numel() == 3
    assert lam.min() >= 0.3 and lam.max() <= 0.35
    registered = timm.create_model('lambda_inresnet_164', layers=[2, 2, 2]).interpolation_coefficients()
    assert registered.min() >= 0.2 and registered.max() <= 0.25  # the registration's own range otherwise
