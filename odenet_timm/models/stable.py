"""Stable residual networks of Haber & Ruthotto: antisymmetric and parabolic (forward-stable) ResNets.

Haber, Ruthotto, "Stable Architectures for Deep Neural Networks", Inverse Problems 2017 (arXiv:1705.03341). A
residual network is the forward Euler discretisation of ``dY/dt = F(Y)``; its forward propagation is stable when
the Jacobian of F has eigenvalues with non-positive real parts, and neither explodes nor collapses when they are
(close to) zero. Two layers make that hold by construction, for every value of the weights:

* antisymmetric::

      Y_{j+1} = Y_j + h · σ(½(K_j − K_jᵀ) Y_j − γ Y_j + b_j)

  ``½(K − Kᵀ)`` is antisymmetric, so its eigenvalues are purely imaginary (the dynamics rotate rather than
  expand or contract); the damping ``γ ≥ 0`` shifts them to ``−γ`` (the paper's remedy for forward Euler,
  whose stability region excludes the imaginary axis);
* parabolic::

      Y_{j+1} = Y_j − h · K_jᵀ σ(K_j Y_j + b_j)

  whose Jacobian ``−Kᵀ diag(σ') K`` is symmetric negative semi-definite for a monotone σ (a diffusion: the
  network smooths its features, which is what makes it forward stable).

σ = ReLU. K_j is a 3×3 convolution ``c → c`` without bias and Kᵀ its TRUE adjoint with the same weight
(``conv_transpose2d``, so ``⟨Kx, y⟩ = ⟨x, Kᵀy⟩``): the layers are
:class:`~odenet_timm.models.hamiltonian.SymmetricLayer` ``Kᵀσ(K·+b)`` (parabolic) and its antisymmetric
sibling :class:`AntisymmetricLayer`.

Layout (the Hamiltonian networks' conventions, so that the families compare at equal size): stem conv3x3 3→32
(no bias) + BN + ReLU; three stages of blocks at widths 32-64-128, where the FIRST block of stages 2 and 3 runs at
the old width and resolution and is followed by a 2×2 average pooling and a symmetric zero-padding of the
channels to the new width; head BN-ReLU-GAP-Linear. Depth counts K and Kᵀ as two layers, as the Hamiltonian
networks do: ``2·blocks + 2``. One full-width block has about the parameters of two half-width Hamiltonian units:

* ``*_resnet_20``: 3-3-3 blocks, 445,418 parameters (Hamiltonian-74: 429,690; +3.7%);
* ``*_resnet_56``: 9-9-9 blocks, 1,607,978 parameters (Hamiltonian-218: 1,683,034; −4.5%).

``smoothness_loss()`` gives the weight smoothness decay ``Σ ½‖K_{j+1} − K_j‖²`` between consecutive blocks of a
stage (the paper's regularisation of K in time, as in the Hamiltonian networks).
"""
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._common import (
    CifarStagedNet, ConvStem, PoolPadTransition, check_kwarg_types, cifar_cfg, init_weights_cifar_,
    weight_smoothness_loss,
)
from .hamiltonian import SymmetricLayer

__all__ = ['StableResNet', 'AntisymmetricLayer', 'StableStep', 'BLOCKS']

BLOCKS = ('antisymmetric', 'parabolic')


class AntisymmetricLayer(SymmetricLayer):
    """``σ(½(K − Kᵀ) x − γ x + b)`` (Haber & Ruthotto, arXiv:1705.03341, with damping): K a 3×3
    convolution without bias, Kᵀ its adjoint with the same weight, b one bias per channel, γ ≥ 0 fixed."""

    def __init__(self, channels: int, gamma: float):
        super().__init__(channels, norm='bias', pre_norm=False)
        self.gamma = gamma

    def operator(self, x: torch.Tensor) -> torch.Tensor:
        """The linear part ``½(K − Kᵀ) x − γ x`` (its Jacobian is ``½(K − Kᵀ) − γI``)."""
        return 0.5 * (self.conv(x) - self.conv_transpose(x)) - self.gamma * x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm2(self.operator(x)))


class StableStep(nn.Module):
    """One forward Euler step ``Y + scale · layer(Y)``: ``scale = h`` with :class:`AntisymmetricLayer`, ``scale = −h``
    with the parabolic layer ``Kᵀσ(KY + b)``."""

    def __init__(self, layer: SymmetricLayer, scale: float):
        super().__init__()
        self.layer = layer
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.layer(x)


def _stable_step(block: str, channels: int, h: float, gamma: float) -> StableStep:
    if block == 'antisymmetric':
        return StableStep(AntisymmetricLayer(channels, gamma), h)
    return StableStep(SymmetricLayer(channels, norm='bias', pre_norm=False), -h)


class StableResNet(CifarStagedNet):
    """Antisymmetric or parabolic ResNet (Haber & Ruthotto, arXiv:1705.03341) on the CIFAR skeleton.

    Args:
        layers: blocks per stage (3-3-3 for ``*_resnet_20``, 9-9-9 for ``*_resnet_56``).
        widths: stage widths; the stem outputs ``widths[0]`` channels.
        block: ``'antisymmetric'`` ``Y + hσ(½(K − Kᵀ)Y − γY + b)`` or ``'parabolic'`` ``Y − hKᵀσ(KY + b)``.
        h: step size (> 0).
        gamma: damping γ ≥ 0 of the antisymmetric block (not used by the parabolic one).
    """

    def __init__(
            self,
            layers: Sequence[int] = (3, 3, 3),
            widths: Sequence[int] = (32, 64, 128),
            block: str = 'antisymmetric',
            h: float = 0.1,
            gamma: float = 0.0,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
    ):
        if block not in BLOCKS:
            raise ValueError(f'block must be one of {BLOCKS}, got {block!r}')
        check_kwarg_types(type(self).__name__, layers=(layers, 'stage_ints'), widths=(widths, 'stage_ints'),
                          h=(h, 'number'), gamma=(gamma, 'number'))
        h, gamma = float(h), float(gamma)
        if not (math.isfinite(h) and h > 0):
            raise ValueError(f'the step size h must be a positive number, got {h}')
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f'the damping gamma must be a number >= 0, got {gamma}')
        layers, widths = tuple(layers), tuple(widths)
        if not layers or len(layers) != len(widths) or min(layers) < 1 or min(widths) < 1:
            raise ValueError(f'layers and widths need one positive entry per stage; got {layers}, {widths}')
        if any(new < old or (new - old) % 2 for old, new in zip(widths[:-1], widths[1:])):
            raise ValueError(
                f'stage widths must not decrease and grow by an even number (symmetric zero-padding); got {widths}')

        stages = []
        in_width = widths[0]
        for stage_idx, (depth, width) in enumerate(zip(layers, widths)):
            steps = [_stable_step(block, in_width if i == 0 else width, h, gamma) for i in range(depth)]
            if stage_idx > 0:
                steps.insert(1, PoolPadTransition((width - in_width) // 2))
            stages.append(nn.Sequential(*steps))
            in_width = width

        super().__init__(
            stem=ConvStem(in_chans, widths[0], norm=True),
            stages=stages,
            stage_channels=widths,
            num_classes=num_classes,
            in_chans=in_chans,
            global_pool=global_pool,
            drop_rate=drop_rate,
        )
        self.block, self.h, self.gamma = block, h, gamma
        init_weights_cifar_(self)

    def smoothness_loss(self) -> torch.Tensor:
        """Weight smoothness decay ``Σ ½‖K_{j+1} − K_j‖²`` over consecutive blocks of each stage (the old-width
        first block of a downsampling stage has no same-shape neighbour and is left out)."""
        return weight_smoothness_loss(
            [[[step.layer.weight] for step in stage if isinstance(step, StableStep)][0 if i == 0 else 1:]
             for i, stage in enumerate(self.stages)],
            like=self.stem.conv.weight)


def _create_stable(variant: str, pretrained: bool = False, **kwargs) -> StableResNet:
    return build_model_with_cfg(
        StableResNet, variant, pretrained,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


_PAPER = dict(paper_ids='arXiv:1705.03341', paper_name='Stable Architectures for Deep Neural Networks')

default_cfgs = generate_default_cfgs({
    name: cifar_cfg(**_PAPER) for name in (
        'antisymmetric_resnet_20', 'antisymmetric_resnet_56', 'parabolic_resnet_20', 'parabolic_resnet_56',
    )
})


@register_model
def antisymmetric_resnet_20(pretrained: bool = False, **kwargs) -> StableResNet:
    """Antisymmetric ResNet-20: 3-3-3 blocks, widths 32-64-128, 445,418 parameters (Hamiltonian-74's budget)."""
    model_args = dict(layers=(3, 3, 3), widths=(32, 64, 128), block='antisymmetric')
    return _create_stable('antisymmetric_resnet_20', pretrained, **dict(model_args, **kwargs))


@register_model
def antisymmetric_resnet_56(pretrained: bool = False, **kwargs) -> StableResNet:
    """Antisymmetric ResNet-56: 9-9-9 blocks, widths 32-64-128, 1,607,978 parameters (Hamiltonian-218's budget)."""
    model_args = dict(layers=(9, 9, 9), widths=(32, 64, 128), block='antisymmetric')
    return _create_stable('antisymmetric_resnet_56', pretrained, **dict(model_args, **kwargs))


@register_model
def parabolic_resnet_20(pretrained: bool = False, **kwargs) -> StableResNet:
    """Parabolic ResNet-20: 3-3-3 blocks, widths 32-64-128, 445,418 parameters (Hamiltonian-74's budget)."""
    model_args = dict(layers=(3, 3, 3), widths=(32, 64, 128), block='parabolic')
    return _create_stable('parabolic_resnet_20', pretrained, **dict(model_args, **kwargs))


@register_model
def parabolic_resnet_56(pretrained: bool = False, **kwargs) -> StableResNet:
    """Parabolic ResNet-56: 9-9-9 blocks, widths 32-64-128, 1,607,978 parameters (Hamiltonian-218's budget)."""
    model_args = dict(layers=(9, 9, 9), widths=(32, 64, 128), block='parabolic')
    return _create_stable('parabolic_resnet_56', pretrained, **dict(model_args, **kwargs))
