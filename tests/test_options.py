"""One parser for model kwargs on every command line (YAML-typed values), models that refuse wrongly typed kwargs
with the kwarg, the value and the expected type named, and models that refuse input of the wrong dtype."""
import importlib.util
from pathlib import Path

import pytest
import timm
import torch

from odenet_timm.robust.cli import build_parser as eval_parser
from odenet_timm.train.config import build_parser as train_parser

_BENCH = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_models.py'
_spec = importlib.util.spec_from_file_location('bench_models', _BENCH)
bench_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_models)

PAIRS = ['memory_efficient=false', 'h=1e-4', 'layers=[1,1,1]', 'lambda_init=[0.3, 0.35]', 'solver=anderson']
TYPED = {'memory_efficient': False, 'h': 1e-4, 'layers': [1, 1, 1], 'lambda_init': [0.3, 0.35], 'solver': 'anderson'}


def test_every_command_parses_model_kwargs_the_same_yaml_way():
    train = train_parser().parse_args(['--output', 'x', '--model-kwargs', *PAIRS]).model_kwargs
    evaluate = eval_parser().parse_args(['--model-kwargs', *PAIRS]).model_kwargs
    _, bench = bench_models.parse_spec('implicit_trapezoid_resnet:' + ','.join(PAIRS))
    assert train == evaluate == bench == TYPED
    assert evaluate['memory_efficient'] is False  # not the (truthy) string 'false'


@pytest.mark.parametrize('parser', [train_parser, eval_parser])
def test_a_malformed_pair_is_refused_by_every_parser(parser, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(['--output', 'x', '--model-kwargs', 'layers'])
    assert exit_info.value.code == 2
    assert "--model-kwargs: expected KEY=VALUE, got 'layers'" in capsys.readouterr().err


@pytest.mark.parametrize('model, kwargs, message', [
    ('implicit_trapezoid_resnet', dict(memory_efficient='false'),
     "ImplicitResNet: memory_efficient must be a bool (true or false), got 'false' (str)"),
    ('hamiltonian_74', dict(memory_efficient=1),
     'HamiltonianNet: memory_efficient must be a bool (true or false), got 1 (int)'),
    ('implicit_euler_resnet', dict(h='0.5'), "ImplicitResNet: h must be a number, got '0.5' (str)"),
    ('hamiltonian_74', dict(h=True), 'HamiltonianNet: h must be a number, got True (bool)'),
    ('cifar_resnet_20', dict(layers=[1.5, 1, 1]),
     'CifarResNet: layers must be a sequence of positive integers (one per stage), got [1.5, 1, 1] (list)'),
    ('midpoint_26', dict(widths='32,64,112'),
     "HamiltonianNet: widths must be a sequence of positive integers (one per stage), got '32,64,112' (str)"),
    ('implicit_trapezoid_resnet', dict(steps=[1, 0, 1]),
     'ImplicitResNet: steps must be a sequence of positive integers (one per stage), got [1, 0, 1] (list)'),
    ('inresnet_20', dict(lambda_init=0.3), 'CifarResNet: lambda_init must be a (low, high) pair of numbers, got 0.3'),
    ('inresnet_20', dict(stem_width=16.0), 'CifarResNet: stem_width must be an integer, got 16.0 (float)'),
    ('implicit_trapezoid_resnet', dict(theta=[0.5]), 'ImplicitResNet: theta must be a number, got [0.5] (list)'),
    ('cifar_resnet_20', dict(drop_rate='0.1'), "CifarResNet: drop_rate must be a number, got '0.1' (str)"),
])
def test_wrongly_typed_kwargs_are_refused_naming_kwarg_value_and_type(model, kwargs, message):
    with pytest.raises(TypeError) as error:
        timm.create_model(model, **kwargs)
    assert message in str(error.value)


def test_yaml_typed_kwargs_build_the_model_asked_for():
    kwargs = eval_parser().parse_args(['--model-kwargs', 'memory_efficient=false', 'steps=[1,1,1]']).model_kwargs
    model = timm.create_model('implicit_trapezoid_resnet', **kwargs)
    assert model.memory_efficient is False and not any(s.memory_efficient for s in model.stages)


@pytest.mark.parametrize('model', ['cifar_resnet_20', 'hamiltonian_74', 'implicit_trapezoid_resnet'])
@pytest.mark.parametrize('dtype', [torch.uint8, torch.float64, torch.int64])
def test_input_of_another_dtype_is_refused_with_the_expected_one_named(model, dtype):
    net = timm.create_model(model, layers=[1, 1, 1]) if model != 'implicit_trapezoid_resnet' else timm.create_model(
        model, steps=[1, 1, 1])
    x = torch.zeros(1, 3, 32, 32, dtype=dtype)
    with pytest.raises(TypeError) as error:
        net.eval()(x)
    assert str(error.value).startswith(f'{model} expects NORMALIZED floating-point input of dtype float32 (the dtype '
                                       f'of its weights; float16 or bfloat16 under autocast); got {dtype}')
    assert net(x.float()).shape == (1, 10)  # the same images as float32 go through
    assert net.double()(x.double()).dtype == torch.float64  # a float64 model takes float64 input


def test_half_precision_input_is_taken_under_autocast():
    net = timm.create_model('cifar_resnet_20', layers=[1, 1, 1]).eval()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert net(torch.zeros(1, 3, 32, 32, dtype=torch.bfloat16)).shape == (1, 10)
