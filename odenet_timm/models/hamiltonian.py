"""Reversible Hamiltonian, MidPoint and Leapfrog networks.

Chang, Meng, Haber, Ruthotto, Begert, Holtham, "Reversible Architectures for Arbitrarily Deep Residual
Neural Networks", AAAI 2018 (arXiv:1709.03698). Each is a stable, reversible discretisation of an ODE, so
a stage's activations can be reconstructed from its output instead of being stored:

* Hamiltonian (two-layer, Verlet), on the channel halves ``(Y, Z)`` of the features::

      Y_{j+1} = Y_j     + h · K_{j,1}ᵀ σ(K_{j,1} Z_j     + b_{j,1})
      Z_{j+1} = Z_j     − h · K_{j,2}ᵀ σ(K_{j,2} Y_{j+1} + b_{j,2})      (the NEW Y)

* MidPoint:  ``Y_{j+1} = Y_{j−1} + 2h · F_j(Y_j)``
* Leapfrog:  ``Y_{j+1} = 2 Y_j − Y_{j−1} − h² · F_j(Y_j)``

with ``F(Y) = Kᵀ σ(K Y + b)`` over the full width, σ = ReLU, K a 3×3 convolution (no conv bias) and Kᵀ its
TRUE adjoint sharing K's weight (``conv_transpose2d``). MidPoint and Leapfrog start every stage from
``Y_{−1} = Y_0``, as the authors' code does.

Normalisation inside a layer (``block_norm``): ``'bias'`` ``Kᵀσ(K(x + b₁) + b₂)``; ``'bn'``
``Kᵀσ(BN₂(K·BN₁(x)))`` (no ReLU after BN₁). The network's very first unit drops b₁ / BN₁ in f (the stem
ends in BN-ReLU); MidPoint and Leapfrog layers have no b₁ / BN₁.

Layout (the authors' code; it reproduces the paper's parameter counts exactly):
stem conv3x3 3→32 (no bias) + BN + ReLU; three stages of units at widths e.g. 32-64-128, where the FIRST
unit of stages 2 and 3 runs at the old width and resolution, after which each state entry (the halves Y, Z;
for MidPoint / Leapfrog the pair Y_{j−1}, Y_j) is 2×2 average-pooled and zero-padded symmetrically in
channels to the new width; head BN-ReLU-GAP-Linear. Depth: 4·units + 2 (Hamiltonian), 2·units + 2
(MidPoint / Leapfrog). A MidPoint / Leapfrog stage outputs its newest Y; the next stage restarts from it.

MidPoint / Leapfrog parameter counts: this full-width layout gives 1,801,738 parameters for the 10-10-10
networks (the paper reports 1.78M, +1.2%) and 535,258 for the 4-4-4 networks (paper 0.50M, +7%); the
paper does not say where its smaller count comes from, so we keep the natural layout.

The reversible Hamiltonian report's improvements, as kwargs and registered names: the regularized network
(``hamiltonian_reg_*``: dropout 0.4 before the classifier, ``drop_rate``; the stem already ends in BatchNorm, which
the report also adds) and the Hamiltonian-Inception layer (``layer='inception'``, ``hamiltonian_inception_*``,
:class:`InceptionLayer`), whose K is a sum of 1×1, 1×1→3×3 and 1×1→5×5 paths on channel groups, so that the
layer is still ``Kᵀσ(K·)`` and the unit reversible. The dropout acts on the pooled features, outside every
reversible stage, so nothing random is recomputed.

Memory-efficient training (``memory_efficient=True``, the default): each stage runs through
:func:`odenet_timm.layers.reversible.reversible_sequence`, which keeps only the stage's final state and the
input of its transition and reconstructs every unit's input in backward (the last stage also keeps its last
coupling's graph, which backward uses instead of a recomputation). ``smoothness_loss()`` gives the
weight smoothness decay ``Σ ½‖K_{j+1} − K_j‖²`` between consecutive units of a stage.
"""
import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from odenet_timm.layers.reversible import AdditiveCoupling, reversible_sequence
from ._common import (
    CifarStagedNet, ConvStem, check_kwarg_types, cifar_cfg, init_weights_cifar_, pool_and_pad_channels,
    weight_smoothness_loss,
)

__all__ = ['HamiltonianNet', 'SymmetricLayer', 'InceptionLayer', 'HamiltonianUnit', 'MidPointUnit', 'LeapfrogUnit']


# -- the layer F(x) = Kᵀσ(N₂(K·N₁(x))) -------------------------------------------------------------------------
class ChannelBias(nn.Module):
    """``x + b`` with one learnable bias per channel, starting at zero."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.view(1, -1, 1, 1)


_NORMS = {'bias': ChannelBias, 'bn': nn.BatchNorm2d}


class _AdjointPairLayer(nn.Module):
    """``F(x) = Kᵀ σ(N₂(K · N₁(x)))`` for a linear operator K given by :meth:`conv` and its adjoint
    :meth:`conv_transpose` sharing K's weights; σ = ReLU. ``norm='bias'``: ``N₁(x) = x + b₁``,
    ``N₂(u) = u + b₂``; ``norm='bn'``: ``N₁ = BN₁``, ``N₂ = BN₂``. ``pre_norm=False`` drops N₁."""

    def __init__(self, channels: int, norm: str = 'bias', pre_norm: bool = True):
        super().__init__()
        self.norm1 = _NORMS[norm](channels) if pre_norm else nn.Identity()
        self.norm2 = _NORMS[norm](channels)

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """``K x``."""
        raise NotImplementedError

    def conv_transpose(self, u: torch.Tensor) -> torch.Tensor:
        """``Kᵀ u``."""
        raise NotImplementedError

    def kernels(self) -> List[torch.Tensor]:
        """The weights that make up K (what the smoothness decay compares between consecutive units)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_transpose(F.relu(self.norm2(self.conv(self.norm1(x))), inplace=True))


class SymmetricLayer(_AdjointPairLayer):
    """``F(x) = Kᵀ σ(N₂(K · N₁(x)))`` (Chang et al. 2018, eq. 5): K a 3×3 convolution ``c → c`` without bias,
    Kᵀ its adjoint with the SAME weight (``conv_transpose2d``, so ``⟨Kx, y⟩ = ⟨x, Kᵀy⟩``), σ = ReLU.
    K starts N(0, sqrt(2 / (9·c))), like the CIFAR ResNet convolutions.
    """

    def __init__(self, channels: int, norm: str = 'bias', pre_norm: bool = True):
        super().__init__(channels, norm, pre_norm)
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (9 * channels)))

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, padding=1)

    def conv_transpose(self, u: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(u, self.weight, padding=1)

    def kernels(self) -> List[torch.Tensor]:
        return [self.weight]


class InceptionLayer(_AdjointPairLayer):
    """The Hamiltonian-Inception layer ``F(x) = Kᵀ σ(N₂(K · N₁(x)))`` (the reversible Hamiltonian report's
    improvement of Chang et al. 2018, arXiv:1709.03698): K splits its input into four channel groups and maps
    them by the identity, a 1×1 convolution, 1×1 then 3×3, and 1×1 then 5×5 (each group ``c/4 → c/4``,
    no bias), concatenated. K is linear, so ``Kᵀ`` (the same split, the transposed convolutions in reverse
    order, SAME weights) is its true adjoint and the unit stays ``Kᵀσ(K·)``: reversible and stable like the
    3×3 layer, with ``37·(c/4)²`` instead of ``9·c²`` weights.
    """

    def __init__(self, channels: int, norm: str = 'bias', pre_norm: bool = True):
        super().__init__(channels, norm, pre_norm)
        if channels % 4:
            raise ValueError(f'the inception layer splits its input into 4 groups: channels must be a multiple of 4, '
                             f'got {channels}')
        group = channels // 4
        self.weight_1x1 = _kernel(group, 1)
        self.weight_3x3_reduce, self.weight_3x3 = _kernel(group, 1), _kernel(group, 3)
        self.weight_5x5_reduce, self.weight_5x5 = _kernel(group, 1), _kernel(group, 5)

    def _paths(self):
        """Per group after the identity: the convolutions in the order K applies them."""
        return [
            (self.weight_1x1,), (self.weight_3x3_reduce, self.weight_3x3), (self.weight_5x5_reduce, self.weight_5x5)]

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        identity, *groups = x.chunk(4, dim=1)
        outs = [identity]
        for u, path in zip(groups, self._paths()):
            for weight in path:
                u = F.conv2d(u, weight, padding=weight.shape[-1] // 2)
            outs.append(u)
        return torch.cat(outs, dim=1)

    def conv_transpose(self, u: torch.Tensor) -> torch.Tensor:
        identity, *groups = u.chunk(4, dim=1)
        outs = [identity]
        for v, path in zip(groups, self._paths()):
            for weight in reversed(path):
                v = F.conv_transpose2d(v, weight, padding=weight.shape[-1] // 2)
            outs.append(v)
        return torch.cat(outs, dim=1)

    def kernels(self) -> List[torch.Tensor]:
        return [w for path in self._paths() for w in path]


def _kernel(channels: int, size: int) -> nn.Parameter:
    """A ``channels → channels`` convolution weight of ``size×size``, N(0, sqrt(2 / (size²·channels)))."""
    weight = nn.Parameter(torch.empty(channels, channels, size, size))
    nn.init.normal_(weight, 0.0, math.sqrt(2.0 / (size * size * channels)))
    return weight


_LAYERS = {'conv3x3': SymmetricLayer, 'inception': InceptionLayer}


# -- units: reversible steps on the state tuple ------------------------------------------------------------------
class HamiltonianUnit(nn.Sequential):
    """One two-layer Hamiltonian unit on the state ``(Y, Z)`` (Chang et al. 2018, eq. 7), Verlet order::

        f:  Y ← Y + h · K₁ᵀ σ(N(K₁ Z))
        g:  Z ← Z − h · K₂ᵀ σ(N(K₂ Y))     (with the Y just updated)

    ``channels`` is the width of one half. ``first=True`` (the network's first unit) drops f's pre-norm.
    ``layer``: ``'conv3x3'`` (:class:`SymmetricLayer`) or ``'inception'`` (:class:`InceptionLayer`).
    """

    def __init__(self, channels: int, h: float, norm: str = 'bias', first: bool = False, layer: str = 'conv3x3'):
        layer_cls = _LAYERS[layer]
        super().__init__(OrderedDict(
            f=AdditiveCoupling(layer_cls(channels, norm, pre_norm=not first), target=0, source=1, scale=h),
            g=AdditiveCoupling(layer_cls(channels, norm), target=1, source=0, scale=-h),
        ))


class MidPointUnit(AdditiveCoupling):
    """One MidPoint step ``Y_{j+1} = Y_{j−1} + 2h · Kᵀσ(N(K Y_j))`` (Chang et al. 2018, eq. 9) on the pair
    state. The pair is not swapped: step ``j`` overwrites entry ``parity = j mod 2`` (holding ``Y_{j−1}``)
    from entry ``1 − parity`` (holding ``Y_j``)."""

    def __init__(self, channels: int, h: float, norm: str = 'bias', parity: int = 0, layer: str = 'conv3x3'):
        super().__init__(
            _LAYERS[layer](channels, norm, pre_norm=False), target=parity, source=1 - parity, scale=2 * h)


class LeapfrogUnit(AdditiveCoupling):
    """One Leapfrog step ``Y_{j+1} = 2 Y_j − Y_{j−1} − h² · Kᵀσ(N(K Y_j))`` (Chang et al. 2018, eq. 10) on
    the pair state, laid out as :class:`MidPointUnit`."""

    def __init__(self, channels: int, h: float, norm: str = 'bias', parity: int = 0, layer: str = 'conv3x3'):
        super().__init__(
            _LAYERS[layer](channels, norm, pre_norm=False), target=parity, source=1 - parity,
            scale=-h * h, source_scale=2.0, negate_target=True)


_UNITS = {'hamiltonian': HamiltonianUnit, 'midpoint': MidPointUnit, 'leapfrog': LeapfrogUnit}


class ReversibleStage(nn.ModuleList):
    """``units[0]`` at the input width and resolution, then (``pad`` given) every state entry 2×2
    average-pooled and zero-padded with ``pad`` channels on each side, then ``units[1:]``.

    ``split='halves'``: the state is the two channel halves of the input and the output their
    concatenation (Hamiltonian). ``split='pair'``: the state starts as ``(x, x)`` (``Y_{−1} = Y_0``) and the
    output is the entry the last unit wrote (MidPoint / Leapfrog).

    ``keep_last_graph``: the last coupling's ``φ`` graph is kept from forward to backward instead of recomputed
    (:func:`~odenet_timm.layers.reversible.reversible_sequence`). The networks set it on their last stage only,
    whose backward follows its forward after the head alone; an earlier stage's kept graph would be held through
    every later stage, raising the step's peak memory for one recomputation saved among dozens.
    """

    def __init__(
            self,
            units: Sequence[nn.Module],
            split: str,
            pad: Optional[int] = None,
            memory_efficient: bool = True,
            keep_last_graph: bool = True,
    ):
        super().__init__(units)
        self.split = split
        self.pad = pad
        self.memory_efficient = memory_efficient
        self.keep_last_graph = keep_last_graph

    def transition(self, state: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
        """Not invertible: memory-efficient mode keeps its input."""
        return tuple(pool_and_pad_channels(x, self.pad) for x in state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = x.chunk(2, dim=1) if self.split == 'halves' else (x, x)
        units = list(self)
        steps = units if self.pad is None else [units[0], self.transition, *units[1:]]
        state = reversible_sequence(steps, state, memory_efficient=self.memory_efficient,
                                    keep_last_graph=self.keep_last_graph)
        return torch.cat(state, dim=1) if self.split == 'halves' else state[self[-1].target]


# -- the model ---------------------------------------------------------------------------------------------------
class HamiltonianNet(CifarStagedNet):
    """Reversible Hamiltonian / MidPoint / Leapfrog network (Chang et al., AAAI 2018) on the CIFAR skeleton.

    Args:
        layers: units per stage (18-18-18 for Hamiltonian-218, 10-10-10 for MidPoint / Leapfrog-62).
        widths: stage widths; the stem outputs ``widths[0]`` channels.
        block: ``'hamiltonian'``, ``'midpoint'`` or ``'leapfrog'``.
        h: step size of the discretisation.
        block_norm: ``'bias'`` or ``'bn'`` (normalisation inside every layer, see the module docstring).
        layer: K of every layer: ``'conv3x3'`` (the paper's) or ``'inception'`` (the Hamiltonian-Inception
            layer, :class:`InceptionLayer`; every layer's width a multiple of 4).
        memory_efficient: reconstruct activations in backward instead of storing them.
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (18, 18, 18),
            widths: Tuple[int, ...] = (32, 64, 128),
            block: str = 'hamiltonian',
            h: float = 0.1,
            block_norm: str = 'bias',
            layer: str = 'conv3x3',
            memory_efficient: bool = True,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
    ):
        if block not in _UNITS:
            raise ValueError(f'block must be one of {sorted(_UNITS)}, got {block!r}')
        if block_norm not in _NORMS:
            raise ValueError(f'block_norm must be one of {sorted(_NORMS)}, got {block_norm!r}')
        if layer not in _LAYERS:
            raise ValueError(f'layer must be one of {sorted(_LAYERS)}, got {layer!r}')
        check_kwarg_types(type(self).__name__, layers=(layers, 'stage_ints'), widths=(widths, 'stage_ints'),
                          h=(h, 'number'), memory_efficient=(memory_efficient, 'bool'))
        h = float(h)
        if not (math.isfinite(h) and h > 0):
            raise ValueError(f'the step size h must be a positive number, got {h}')
        layers, widths = tuple(layers), tuple(widths)
        if len(layers) != len(widths):
            raise ValueError(f'layers and widths need one entry per stage; got {layers}, {widths}')
        halves = block == 'hamiltonian'
        granularity = 4 if halves else 2  # symmetric padding of each state entry (of a half, for Hamiltonian)
        if halves and any(w % 2 for w in widths):
            raise ValueError(f'Hamiltonian units split the channels in halves: widths must be even, got {widths}')
        for old, new in zip(widths[:-1], widths[1:]):
            if new < old or (new - old) % granularity:
                raise ValueError(
                    f'stage widths must not decrease and grow by a multiple of {granularity} (symmetric zero-padding '
                    f'of each {"half" if halves else "state entry"}); got {widths}')
        layer_widths = [w // 2 if halves else w for w in widths]
        if layer == 'inception' and any(w % 4 for w in layer_widths):
            raise ValueError(
                f'inception layers split their input into 4 groups: every layer width ({"half " if halves else ""}'
                f'the stage width) must be a multiple of 4; got widths {widths}')
        unit_cls = _UNITS[block]

        stages = []
        in_width = widths[0]
        for stage_idx, (depth, width) in enumerate(zip(layers, widths)):
            units = []
            for unit_idx in range(depth):
                unit_width = in_width if unit_idx == 0 else width
                if halves:
                    first = stage_idx == 0 and unit_idx == 0
                    units.append(unit_cls(unit_width // 2, h, block_norm, first=first, layer=layer))
                else:
                    units.append(unit_cls(unit_width, h, block_norm, parity=unit_idx % 2, layer=layer))
            pad = None if stage_idx == 0 else (width - in_width) // granularity
            stages.append(ReversibleStage(
                units, split='halves' if halves else 'pair', pad=pad, memory_efficient=memory_efficient,
                keep_last_graph=stage_idx == len(layers) - 1))
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
        self.block = block
        self.h = h
        self.block_norm = block_norm
        self.layer = layer
        self.memory_efficient = memory_efficient
        init_weights_cifar_(self)

    def smoothness_loss(self) -> torch.Tensor:
        """Weight smoothness decay ``Σ ½‖K_{j+1} − K_j‖²`` over consecutive units of each stage (the
        old-width first unit of a downsampling stage has no same-shape neighbour and is left out)."""
        return weight_smoothness_loss(
            [[_kernels(unit) for unit in list(stage)[0 if stage.pad is None else 1:]] for stage in self.stages],
            like=self.stem.conv.weight)


def _kernels(unit: nn.Module) -> List[torch.Tensor]:
    return [k for m in unit.modules() if isinstance(m, _AdjointPairLayer) for k in m.kernels()]


def _create_hamiltonian(variant: str, pretrained: bool = False, **kwargs) -> HamiltonianNet:
    return build_model_with_cfg(
        HamiltonianNet, variant, pretrained,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


_PAPER = dict(paper_ids='arXiv:1709.03698',
              paper_name='Reversible Architectures for Arbitrarily Deep Residual Neural Networks')

default_cfgs = generate_default_cfgs({
    name: cifar_cfg(**_PAPER) for name in (
        'hamiltonian_74', 'hamiltonian_218', 'hamiltonian_1202',
        'hamiltonian_reg_74', 'hamiltonian_reg_218', 'hamiltonian_inception_74', 'hamiltonian_inception_218',
        'midpoint_26', 'midpoint_62', 'leapfrog_26', 'leapfrog_62',
    )
})


@register_model
def hamiltonian_74(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """Hamiltonian-74: 6-6-6 units, widths 32-64-112, 'bias' layers, 429,690 parameters."""
    model_args = dict(layers=(6, 6, 6), widths=(32, 64, 112), block='hamiltonian', block_norm='bias')
    return _create_hamiltonian('hamiltonian_74', pretrained, **dict(model_args, **kwargs))


@register_model
def hamiltonian_218(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """Hamiltonian-218: 18-18-18 units, widths 32-64-128, 'bias' layers, 1,683,034 parameters."""
    model_args = dict(layers=(18, 18, 18), widths=(32, 64, 128), block='hamiltonian', block_norm='bias')
    return _create_hamiltonian('hamiltonian_218', pretrained, **dict(model_args, **kwargs))


@register_model
def hamiltonian_1202(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """Hamiltonian-1202: 100-100-100 units, widths 32-64-128, 'bn' layers, 9,699,338 parameters."""
    model_args = dict(layers=(100, 100, 100), widths=(32, 64, 128), block='hamiltonian', block_norm='bn')
    return _create_hamiltonian('hamiltonian_1202', pretrained, **dict(model_args, **kwargs))


@register_model
def hamiltonian_reg_74(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """Regularized Hamiltonian-74 (the report's first improvement): Hamiltonian-74 with dropout 0.4 before the
    classifier (the stem already ends in BatchNorm), 429,690 parameters."""
    model_args = dict(layers=(6, 6, 6), widths=(32, 64, 112), block='hamiltonian', block_norm='bias', drop_rate=0.4)
    return _create_hamiltonian('hamiltonian_reg_74', pretrained, **dict(model_args, **kwargs))


@register_model
def hamiltonian_reg_218(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """Regularized Hamiltonian-218 (the report's first improvement): Hamiltonian-218 with dropout 0.4 before the
    classifier (the stem already ends in BatchNorm), 1,683,034 parameters."""
    model_args = dict(layers=(18, 18, 18), widths=(32, 64, 128), block='hamiltonian', block_norm='bias', drop_rate=0.4)
    return _create_hamiltonian('hamiltonian_reg_218', pretrained, **dict(model_args, **kwargs))


@register_model
def hamiltonian_inception_74(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """Hamiltonian-Inception-74 (the report's second improvement): Hamiltonian-74 with inception layers."""
    model_args = dict(layers=(6, 6, 6), widths=(32, 64, 112), block='hamiltonian', block_norm='bias', layer='inception')
    return _create_hamiltonian('hamiltonian_inception_74', pretrained, **dict(model_args, **kwargs))


@register_model
def hamiltonian_inception_218(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """Hamiltonian-Inception-218 (the report's second improvement): Hamiltonian-218 with inception layers."""
    model_args = dict(
        layers=(18, 18, 18), widths=(32, 64, 128), block='hamiltonian', block_norm='bias', layer='inception')
    return _create_hamiltonian('hamiltonian_inception_218', pretrained, **dict(model_args, **kwargs))


@register_model
def midpoint_26(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """MidPoint-26: 4-4-4 units, widths 32-64-112, ``Y_{j+1} = Y_{j−1} + 2h F(Y_j)``."""
    model_args = dict(layers=(4, 4, 4), widths=(32, 64, 112), block='midpoint')
    return _create_hamiltonian('midpoint_26', pretrained, **dict(model_args, **kwargs))


@register_model
def midpoint_62(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """MidPoint-62: 10-10-10 units, widths 32-64-128, ``Y_{j+1} = Y_{j−1} + 2h F(Y_j)``."""
    model_args = dict(layers=(10, 10, 10), widths=(32, 64, 128), block='midpoint')
    return _create_hamiltonian('midpoint_62', pretrained, **dict(model_args, **kwargs))


@register_model
def leapfrog_26(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """Leapfrog-26: 4-4-4 units, widths 32-64-112, ``Y_{j+1} = 2Y_j − Y_{j−1} − h² F(Y_j)``."""
    model_args = dict(layers=(4, 4, 4), widths=(32, 64, 112), block='leapfrog')
    return _create_hamiltonian('leapfrog_26', pretrained, **dict(model_args, **kwargs))


@register_model
def leapfrog_62(pretrained: bool = False, **kwargs) -> HamiltonianNet:
    """Leapfrog-62: 10-10-10 units, widths 32-64-128, ``Y_{j+1} = 2Y_j − Y_{j−1} − h² F(Y_j)``."""
    model_args = dict(layers=(10, 10, 10), widths=(32, 64, 128), block='leapfrog')
    return _create_hamiltonian('leapfrog_62', pretrained, **dict(model_args, **kwargs))
