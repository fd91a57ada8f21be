"""Reversible residual networks (RevNet).

Gomez, Ren, Urtasun, Grosse, "The Reversible Residual Network: Backpropagation Without Storing Activations",
NeurIPS 2017 (arXiv:1707.04585). The features are split into two channel halves ``(x₁, x₂)`` and a unit is
the additive coupling::

    y₁ = x₁ + F(x₂)
    y₂ = x₂ + G(y₁)

inverted exactly by ``x₂ = y₂ − G(y₁)``, ``x₁ = y₁ − F(x₂)``. F and G are pre-activation basic residual
functions on half the channels, ``BN-ReLU-conv3x3-BN-ReLU-conv3x3`` (no conv bias).

Layout (the paper's Table 1 and the authors' code): stem conv3x3 3→``widths[0]`` + BN + ReLU (so the
network's first F starts at its convolution); three stages of units at ``widths`` (RevNet-38: 3-3-3 units at
32-64-112; RevNet-110: 9-9-9 at 32-64-128); head BN-ReLU-GAP-Linear. The FIRST unit of stages 2 and 3 changes
width and resolution and is not reversible::

    y₁ = P(x₁) + F(x₂),    y₂ = P(x₂) + G(y₁)

where F's first convolution has stride 2 and maps the old half width to the new one, and P is a 2×2 average
pool followed by symmetric zero-padding of the channels. Counted this way, RevNet-38 has 464,890 parameters
(paper 0.46M, +1.1%) and RevNet-110 1,729,194 (paper 1.73M). (The authors' code also stores the input of the
first unit of stage 1, although that unit keeps the shape; here it is reversible like the others.)

Memory-efficient training (``memory_efficient=True``, the default): each stage runs through
:func:`odenet_timm.layers.reversible.reversible_sequence`, which keeps only the stage's output and the input
of its downsampling unit and reconstructs every other unit's input in backward (the last stage also keeps its
last coupling's graph, which backward uses instead of a recomputation); BatchNorm statistics are
updated once per step. ``memory_efficient=False`` is plain autograd.
"""
from typing import Tuple

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..layers.reversible import AdditiveCoupling
from ._common import CifarStagedNet, ConvStem, check_kwarg_types, cifar_cfg, init_weights_cifar_, pool_and_pad_channels
from .hamiltonian import ReversibleStage
from .inresnet import BasicResidual

__all__ = ['RevNet', 'RevNetUnit', 'RevNetDownsampleUnit']


class RevNetUnit(nn.Sequential):
    """One reversible RevNet unit on the state ``(x₁, x₂)``: ``y₁ = x₁ + F(x₂)``, then ``y₂ = x₂ + G(y₁)``
    (Gomez et al. 2017, eq. 1), F and G pre-activation basic residual functions on ``channels`` (one half).
    ``first=True`` (the network's first unit, right after the stem's BN-ReLU) drops F's first BN-ReLU."""

    def __init__(self, channels: int, first: bool = False):
        super().__init__()
        self.f = AdditiveCoupling(BasicResidual(channels, channels, pre_act=not first), target=0, source=1)
        self.g = AdditiveCoupling(BasicResidual(channels, channels), target=1, source=0)


class RevNetDownsampleUnit(nn.Module):
    """The first unit of a downsampling stage, not reversible: ``y₁ = P(x₁) + F(x₂)``, ``y₂ = P(x₂) + G(y₁)``,
    F with a stride-2 first convolution from ``in_channels`` to ``out_channels`` (per half), P a 2×2 average
    pool and symmetric zero-padding to ``out_channels``. Memory-efficient mode keeps its input."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.pad = (out_channels - in_channels) // 2
        self.f = BasicResidual(in_channels, out_channels, stride=2)
        self.g = BasicResidual(out_channels, out_channels)

    def forward(self, state: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = state
        y1 = pool_and_pad_channels(x1, self.pad) + self.f(x2)
        y2 = pool_and_pad_channels(x2, self.pad) + self.g(y1)
        return y1, y2


class RevNet(CifarStagedNet):
    """Reversible residual network (Gomez et al. 2017) on the CIFAR skeleton (see the module docstring).

    Args:
        layers: units per stage (3-3-3 for RevNet-38, 9-9-9 for RevNet-110).
        widths: stage widths (two halves each); the stem outputs ``widths[0]`` channels.
        memory_efficient: reconstruct activations in backward instead of storing them.
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (9, 9, 9),
            widths: Tuple[int, ...] = (32, 64, 128),
            memory_efficient: bool = True,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
    ):
        check_kwarg_types(type(self).__name__, layers=(layers, 'stage_ints'), widths=(widths, 'stage_ints'),
                          memory_efficient=(memory_efficient, 'bool'))
        layers, widths = tuple(layers), tuple(widths)
        if not layers or len(layers) != len(widths) or min(layers) < 1:
            raise ValueError(f'layers and widths need one entry per stage and >= 1 unit each; got {layers}, {widths}')
        if any(w % 2 for w in widths):
            raise ValueError(f'RevNet units split the channels in halves: widths must be even, got {widths}')
        for old, new in zip(widths[:-1], widths[1:]):
            if new < old or (new - old) % 4:
                raise ValueError(
                    f'stage widths must not decrease and grow by a multiple of 4 (symmetric zero-padding of each '
                    f'half); got {widths}')

        stages = []
        for stage_idx, (depth, width) in enumerate(zip(layers, widths)):
            half = width // 2
            units = [RevNetUnit(half, first=stage_idx == unit_idx == 0) for unit_idx in range(depth)]
            if stage_idx > 0:
                units[0] = RevNetDownsampleUnit(widths[stage_idx - 1] // 2, half)
            stages.append(ReversibleStage(units, split='halves', memory_efficient=memory_efficient,
                                          keep_last_graph=stage_idx == len(layers) - 1))

        super().__init__(
            stem=ConvStem(in_chans, widths[0], norm=True),
            stages=stages,
            stage_channels=widths,
            num_classes=num_classes,
            in_chans=in_chans,
            global_pool=global_pool,
            drop_rate=drop_rate,
        )
        self.memory_efficient = memory_efficient
        init_weights_cifar_(self)


def _create_revnet(variant: str, pretrained: bool = False, **kwargs) -> RevNet:
    return build_model_with_cfg(
        RevNet, variant, pretrained,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


_PAPER = dict(paper_ids='arXiv:1707.04585',
              paper_name='The Reversible Residual Network: Backpropagation Without Storing Activations')

default_cfgs = generate_default_cfgs({
    'revnet_38': cifar_cfg(**_PAPER),
    'revnet_110': cifar_cfg(**_PAPER),
})


@register_model
def revnet_38(pretrained: bool = False, **kwargs) -> RevNet:
    """RevNet-38: 3-3-3 units, widths 32-64-112, 464,890 parameters (paper 0.46M)."""
    model_args = dict(layers=(3, 3, 3), widths=(32, 64, 112))
    return _create_revnet('revnet_38', pretrained, **dict(model_args, **kwargs))


@register_model
def revnet_110(pretrained: bool = False, **kwargs) -> RevNet:
    """RevNet-110: 9-9-9 units, widths 32-64-128, 1,729,194 parameters (paper 1.73M)."""
    model_args = dict(layers=(9, 9, 9), widths=(32, 64, 128))
    return _create_revnet('revnet_110', pretrained, **dict(model_args, **kwargs))
