"""odenet_timm: ODE-inspired, robustness-oriented CIFAR classifiers as first-class timm models.

``import odenet_timm`` registers every model with timm (timm has no plugin entry points), after which
``timm.create_model("inresnet_110")`` works like for any native timm model.
"""
from typing import List

import timm

__version__ = '0.1.0'

from . import models  # noqa: E402  (registers the models with timm)
from .models._common import CheckpointMismatchError  # noqa: E402


def list_models(filter: str = '') -> List[str]:
    """Names of the models this package registers with timm (optionally matching a wildcard filter)."""
    return [
        name for name in timm.list_models(filter)
        if timm.models.model_entrypoint(name).__module__.startswith(__name__ + '.')
    ]
