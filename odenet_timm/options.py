"""Options shared by every command (``train.py``, ``eval_robust.py``, ``benchmarks/``): model kwargs written as
``KEY=VALUE`` with YAML-typed values, so ``memory_efficient=false`` is the bool ``False``, ``h=1e-4`` a float and
``layers=[1,1,1]`` a list wherever a model is named on a command line."""
import argparse
import re
from typing import Any, Tuple

import yaml

__all__ = ['load_yaml', 'parse_kwarg', 'ParseYamlKwargs']


class _Yaml12Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` as a float (YAML 1.2; YAML 1.1 wants ``1.0e-4``)."""


_Yaml12Loader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$'),
    list('-+0123456789'),
)


def load_yaml(text: str) -> Any:
    """Parse YAML safely (plain data only), reading exponent notation such as ``1e-4`` as floats."""
    return yaml.load(text, Loader=_Yaml12Loader)


def parse_kwarg(item: str) -> Tuple[str, Any]:
    """``'memory_efficient=false'`` → ``('memory_efficient', False)``: the value parsed as YAML.

    Raises ``ValueError`` naming the item when it is not ``KEY=VALUE`` or the value is not valid YAML."""
    key, sep, text = item.partition('=')
    key = key.strip()
    if not sep or not key:
        raise ValueError(f'expected KEY=VALUE, got {item!r}')
    try:
        return key, load_yaml(text)
    except yaml.YAMLError as e:
        raise ValueError(f'the value of {key} is not valid YAML: {text!r} ({e})') from None


class ParseYamlKwargs(argparse.Action):
    """``KEY=VALUE ...`` into a dict, each VALUE parsed as YAML (``layers=[1,1,1]``, ``memory_efficient=false``,
    ``h=0.1``). The pairs are merged over the dict already there, so the command line overrides single keys of a
    config file's ``model_kwargs``."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = dict(getattr(namespace, self.dest) or {})
        for item in values:
            try:
                key, value = parse_kwarg(item)
            except ValueError as e:
                parser.error(f'{option_string}: {e}')
            kwargs[key] = value
        setattr(namespace, self.dest, kwargs)
