"""CIFAR pre-activation ResNets and Interpolated ResNets (In-ResNet).

In-ResNet adds a damping term to the ODE behind a residual network, ``dx/dt = -λ x + f(x, t)``, and
discretises it with one explicit step (Yang, Liu, Bao, Shi, "Interpolation between Residual and
Non-Residual Networks", ICML 2020, arXiv:2006.05749; the variants are from the authors' slides of the paper):

* In-ResNet:          ``x_{n+1} = f_n(x_n) + (1 - λ_n) x_n``,                 ``λ_n = ReLU(1 - k_n)``
* λ-In-ResNet:        ``x_{n+1} = (1 + λ_n) f_n(x_n) + (1 - λ_n) x_n``,       ``λ_n = ReLU(k_n)``
* slide variants:     ``x_{n+1} = f_n(x_n) + (1 - act(d(x_n))) x_n`` with ``act`` ∈ {ReLU, sigmoid} and
  ``d`` either a learnable scalar or a gate ``W_d · GAP(x_n) + b_d`` (one scalar per sample).

λ = 0 recovers the ResNet (``x + f(x)``), λ = 1 a plain feed-forward network (``f(x)``). One learnable
scalar per block; the first block and the two stride-2 transition blocks keep the plain ``f(x) + s(x)``
(projection shortcut ``s`` where the shape changes), exactly as in the authors' code.

ResNet-1202 (He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385, 19.4M parameters) is
built here as a pre-activation network of the same backbone (200-200-200 basic blocks, 19,423,930 parameters).

Backbone (authors' code, He et al. 2016 pre-activation): stem conv3x3 3→16 without BN/ReLU; three stages
of widths 16/32/64, strides 1/2/2; basic block BN-ReLU-conv3x3-BN-ReLU-conv3x3 (depth 6n+2) or bottleneck
BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1 to 4× width (depth 9n+2); projection shortcut
BN-ReLU-conv1x1; head BN-ReLU-GAP-Linear. Conv init N(0, sqrt(2/(k·k·out))).
"""
import math
from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._common import CifarStagedNet, ConvStem, check_kwarg_types, cifar_cfg, init_weights_cifar_

__all__ = ['CifarResNet', 'INTERPOLATIONS']


# -- residual functions f_n ---------------------------------------------------------------------------------
class BasicResidual(nn.Module):
    """``f(x) = conv3x3(ReLU(BN(conv3x3_stride(ReLU(BN(x))))))`` (pre-activation basic branch);
    ``pre_act=False`` drops the first BN-ReLU (for an input that has just been through one)."""
    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, pre_act: bool = True):
        super().__init__()
        self.bn1 = BatchNormAct2d(in_chs) if pre_act else nn.Identity()
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.bn2(self.conv1(self.bn1(x))))


class BottleneckResidual(nn.Module):
    """``f(x) = conv1x1(BN-ReLU(conv3x3_stride(BN-ReLU(conv1x1(BN-ReLU(x))))))`` to ``4·planes`` channels."""
    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = BatchNormAct2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn2 = BatchNormAct2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = BatchNormAct2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.bn3(self.conv2(self.bn2(self.conv1(self.bn1(x))))))


class ProjectionShortcut(nn.Sequential):
    """``s(x) = conv1x1_stride(ReLU(BN(x)))``, used where a block changes width or resolution."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.bn = BatchNormAct2d(in_chs)
        self.conv = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)


# -- how f(x) and the shortcut are combined -----------------------------------------------------------------
class ResidualSum(nn.Module):
    """``x_{n+1} = f(x_n) + s(x_n)``: the plain residual connection (no interpolation coefficient)."""
    has_coefficient = False

    def forward(self, fx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return fx + x


class _Interpolation(nn.Module):
    """``x_{n+1} = (1 + β·λ) f(x_n) + (1 - λ) x_n`` with ``λ = self.coefficient(x_n)``; β = 1 for
    λ-In-ResNet, 0 otherwise. ``coefficient`` returns a scalar or a ``(B, 1, 1, 1)`` per-sample gate."""
    has_coefficient = True
    scales_residual_function = False

    def coefficient(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, fx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        lam = self.coefficient(x)
        if self.scales_residual_function:
            fx = (1 + lam) * fx
        return fx + (1 - lam) * x


def _uniform_parameter(low: float, high: float) -> nn.Parameter:
    return nn.Parameter(torch.empty(1).uniform_(low, high))


class InResNetInterpolation(_Interpolation):
    """In-ResNet: ``λ = ReLU(1 - k)``, k learnable, initialised so that λ ~ U[lambda_init]."""

    def __init__(self, channels: int, lambda_init: Tuple[float, float]):
        super().__init__()
        self.k = _uniform_parameter(1 - lambda_init[1], 1 - lambda_init[0])

    def coefficient(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(1 - self.k)


class LambdaInResNetInterpolation(_Interpolation):
    """λ-In-ResNet: ``λ = ReLU(k)``, k ~ U[lambda_init]; the residual function is scaled by ``1 + λ``."""
    scales_residual_function = True

    def __init__(self, channels: int, lambda_init: Tuple[float, float]):
        super().__init__()
        self.k = _uniform_parameter(*lambda_init)

    def coefficient(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.k)


class SigmoidInterpolation(_Interpolation):
    """In-ResNet-sig (slides; our reading): ``λ = sigmoid(d)``, scalar d initialised at
    ``logit(U[lambda_init])`` so that λ starts in the same range as In-ResNet's."""

    def __init__(self, channels: int, lambda_init: Tuple[float, float]):
        super().__init__()
        self.d = _uniform_parameter(*(math.log(v / (1 - v)) for v in lambda_init))

    def coefficient(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.d)


class GatedInterpolation(_Interpolation):
    """In-ResNet-gating(-sig) (slides; our reading): ``λ(x) = act(W_d · GAP(x) + b_d)``, one scalar per
    sample, from the globally average-pooled block input. ``W_d`` starts at zero and ``b_d`` such that λ
    starts in ``lambda_init`` (``b_d`` itself for ReLU, its logit for sigmoid)."""

    def __init__(self, channels: int, lambda_init: Tuple[float, float], act: str = 'relu'):
        super().__init__()
        self.act = act
        self.gate = nn.Linear(channels, 1)
        nn.init.zeros_(self.gate.weight)
        low, high = lambda_init if act == 'relu' else (math.log(v / (1 - v)) for v in lambda_init)
        nn.init.uniform_(self.gate.bias, low, high)
        self.last_mean_coefficient: Optional[torch.Tensor] = None

    def coefficient(self, x: torch.Tensor) -> torch.Tensor:
        d = self.gate(x.mean(dim=(2, 3)))
        lam = F.relu(d) if self.act == 'relu' else torch.sigmoid(d)
        self.last_mean_coefficient = lam.detach().mean()
        return lam[:, :, None, None]


INTERPOLATIONS = {
    'none': None,
    'inresnet': InResNetInterpolation,
    'lambda_inresnet': LambdaInResNetInterpolation,
    'sig': SigmoidInterpolation,
    'gating': partial(GatedInterpolation, act='relu'),
    'gating_sig': partial(GatedInterpolation, act='sigmoid'),
}


class InterpolatedBlock(nn.Module):
    """One block: ``x_{n+1} = combine(f(x_n), s(x_n))`` with ``s`` the identity or a projection and
    ``combine`` a :class:`ResidualSum` or one of the In-ResNet interpolations."""

    def __init__(self, residual: nn.Module, shortcut: nn.Module, interpolation: nn.Module):
        super().__init__()
        self.residual = residual
        self.shortcut = shortcut
        self.interpolation = interpolation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.interpolation(self.residual(x), self.shortcut(x))


# -- the model ------------------------------------------------------------------------------------------------
class CifarResNet(CifarStagedNet):
    """Pre-activation CIFAR ResNet with an optional In-ResNet interpolation on every non-transition block.

    Args:
        layers: blocks per stage (18-18-18 for depth 110 basic / 164 bottleneck).
        block: ``'basic'`` or ``'bottleneck'``.
        interpolation: ``'none'`` (ResNet), ``'inresnet'``, ``'lambda_inresnet'``, ``'sig'``, ``'gating'``
            or ``'gating_sig'``.
        lambda_init: ``(low, high)``: the interpolation coefficient λ starts uniform in this range
            (authors: (0.2, 0.25) for basic blocks, (0.1, 0.2) for bottleneck In-ResNet-164).
        widths: stage widths (before bottleneck expansion); ``stem_width`` the stem's output channels.
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (18, 18, 18),
            block: str = 'basic',
            interpolation: str = 'none',
            lambda_init: Optional[Tuple[float, float]] = None,
            widths: Tuple[int, ...] = (16, 32, 64),
            stem_width: int = 16,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
    ):
        residual_cls = {'basic': BasicResidual, 'bottleneck': BottleneckResidual}.get(block)
        if residual_cls is None:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f'interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}')
        if lambda_init is None:
            lambda_init = (0.1, 0.2) if block == 'bottleneck' else (0.2, 0.25)
        check_kwarg_types(type(self).__name__, layers=(layers, 'stage_ints'), widths=(widths, 'stage_ints'),
                          stem_width=(stem_width, 'int'), lambda_init=(lambda_init, 'range'))
        lambda_init = tuple(float(v) for v in lambda_init)
        if not lambda_init[0] <= lambda_init[1]:
            raise ValueError(f'lambda_init must be a (low, high) range, got {lambda_init}')
        if interpolation in ('sig', 'gating_sig') and not 0 < lambda_init[0] <= lambda_init[1] < 1:
            raise ValueError(f'a sigmoid interpolation needs lambda_init inside (0, 1), got {lambda_init}')
        make_interpolation = INTERPOLATIONS[interpolation]

        stages, stage_channels, stage_reductions = [], [], []
        in_chs, reduction = stem_width, 1
        for stage_idx, (depth, planes) in enumerate(zip(layers, widths)):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            out_chs = planes * residual_cls.expansion
            blocks = []
            for block_idx in range(depth):
                block_stride = stride if block_idx == 0 else 1
                needs_projection = block_stride != 1 or in_chs != out_chs
                shortcut = ProjectionShortcut(in_chs, out_chs, block_stride) if needs_projection else nn.Identity()
                # The first block of the network and the two transitions keep the plain residual sum.
                plain = block_idx == 0 or make_interpolation is None
                combine = ResidualSum() if plain else make_interpolation(out_chs, lambda_init)
                blocks.append(InterpolatedBlock(residual_cls(in_chs, planes, block_stride), shortcut, combine))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            stage_channels.append(out_chs)
            stage_reductions.append(reduction)

        super().__init__(
            stem=ConvStem(in_chans, stem_width, norm=False),
            stages=stages,
            stem_channels=stem_width,
            stage_channels=stage_channels,
            stage_reductions=stage_reductions,
            num_classes=num_classes,
            in_chans=in_chans,
            global_pool=global_pool,
            drop_rate=drop_rate,
        )
        self.interpolation = interpolation
        self.lambda_init = lambda_init
        init_weights_cifar_(self)

    def _interpolations(self):
        return [m for m in self.modules() if isinstance(m, _Interpolation)]

    @torch.no_grad()
    def interpolation_coefficients(self, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The current λ of every interpolated block, in network order (empty for a plain ResNet).

        Gated variants compute λ from the input, so they need a (normalized) batch ``x`` and return the
        batch-mean λ of each block for it; the scalar variants ignore ``x``.
        """
        interpolations = self._interpolations()
        if not interpolations:
            return torch.zeros(0)
        if isinstance(interpolations[0], GatedInterpolation):
            if x is None:
                raise ValueError(f'{self._name()} gates λ on its input: pass a batch x to interpolation_coefficients')
            was_training = self.training
            self.eval()  # no BatchNorm statistics update from a diagnostic pass
            try:
                self.forward_features(x)
            finally:
                self.train(was_training)
            return torch.stack([m.last_mean_coefficient for m in interpolations]).cpu()
        return torch.cat([m.coefficient(None).detach().reshape(1) for m in interpolations]).cpu()


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet, variant, pretrained,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


_RESNET_PAPER = dict(paper_ids='arXiv:1603.05027', paper_name='Identity Mappings in Deep Residual Networks')
_RESNET_1202_PAPER = dict(paper_ids='arXiv:1512.03385', paper_name='Deep Residual Learning for Image Recognition')
_INRESNET_PAPER = dict(paper_ids='arXiv:2006.05749',
                       paper_name='Interpolation between Residual and Non-Residual Networks')

default_cfgs = generate_default_cfgs({
    **{f'cifar_resnet_{d}': cifar_cfg(**_RESNET_PAPER) for d in (20, 32, 44, 56, 110, 164)},
    'cifar_resnet_1202': cifar_cfg(**_RESNET_1202_PAPER),
    **{f'inresnet_{d}': cifar_cfg(**_INRESNET_PAPER) for d in (20, 32, 44, 56, 110, 164)},
    'lambda_inresnet_110': cifar_cfg(**_INRESNET_PAPER),
    'lambda_inresnet_164': cifar_cfg(**_INRESNET_PAPER),
    'inresnet_sig_110': cifar_cfg(**_INRESNET_PAPER),
    'inresnet_gating_110': cifar_cfg(**_INRESNET_PAPER),
    'inresnet_gating_sig_110': cifar_cfg(**_INRESNET_PAPER),
})


def _basic(depth: int) -> dict:
    n = (depth - 2) // 6
    return dict(layers=(n, n, n), block='basic')


_BOTTLENECK_164 = dict(layers=(18, 18, 18), block='bottleneck')


@register_model
def cifar_resnet_20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Pre-activation CIFAR ResNet-20 (3-3-3 basic blocks)."""
    model_args = _basic(20)
    return _create_cifar_resnet('cifar_resnet_20', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet_32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Pre-activation CIFAR ResNet-32 (5-5-5 basic blocks)."""
    model_args = _basic(32)
    return _create_cifar_resnet('cifar_resnet_32', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet_44(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Pre-activation CIFAR ResNet-44 (7-7-7 basic blocks)."""
    model_args = _basic(44)
    return _create_cifar_resnet('cifar_resnet_44', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet_56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Pre-activation CIFAR ResNet-56 (9-9-9 basic blocks)."""
    model_args = _basic(56)
    return _create_cifar_resnet('cifar_resnet_56', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet_110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Pre-activation CIFAR ResNet-110 (18-18-18 basic blocks), ≈1.73M parameters."""
    model_args = _basic(110)
    return _create_cifar_resnet('cifar_resnet_110', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet_1202(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Pre-activation CIFAR ResNet-1202 (200-200-200 basic blocks, He et al. arXiv:1512.03385), ≈19.4M parameters;
    ``set_grad_checkpointing()`` trains it storing one tensor per block."""
    model_args = _basic(1202)
    return _create_cifar_resnet('cifar_resnet_1202', pretrained, **dict(model_args, **kwargs))


@register_model
def cifar_resnet_164(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Pre-activation CIFAR ResNet-164 (18-18-18 bottleneck blocks), ≈1.70M parameters."""
    model_args = dict(_BOTTLENECK_164)
    return _create_cifar_resnet('cifar_resnet_164', pretrained, **dict(model_args, **kwargs))


@register_model
def inresnet_20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """In-ResNet-20: ``x_{n+1} = f_n(x_n) + (1 - ReLU(1 - k_n)) x_n``, λ ~ U[0.2, 0.25] at init."""
    model_args = dict(_basic(20), interpolation='inresnet')
    return _create_cifar_resnet('inresnet_20', pretrained, **dict(model_args, **kwargs))


@register_model
def inresnet_32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """In-ResNet-32: ``x_{n+1} = f_n(x_n) + (1 - ReLU(1 - k_n)) x_n``, λ ~ U[0.2, 0.25] at init."""
    model_args = dict(_basic(32), interpolation='inresnet')
    return _create_cifar_resnet('inresnet_32', pretrained, **dict(model_args, **kwargs))


@register_model
def inresnet_44(pretrained: bool = False, **kwargs) -> CifarResNet:
    """In-ResNet-44: ``x_{n+1} = f_n(x_n) + (1 - ReLU(1 - k_n)) x_n``, λ ~ U[0.2, 0.25] at init."""
    model_args = dict(_basic(44), interpolation='inresnet')
    return _create_cifar_resnet('inresnet_44', pretrained, **dict(model_args, **kwargs))


@register_model
def inresnet_56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """In-ResNet-56: ``x_{n+1} = f_n(x_n) + (1 - ReLU(1 - k_n)) x_n``, λ ~ U[0.2, 0.25] at init."""
    model_args = dict(_basic(56), interpolation='inresnet')
    return _create_cifar_resnet('inresnet_56', pretrained, **dict(model_args, **kwargs))


@register_model
def inresnet_110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """In-ResNet-110 (Yang et al. 2020): ResNet-110 plus 51 learnable λ, λ ~ U[0.2, 0.25] at init."""
    model_args = dict(_basic(110), interpolation='inresnet')
    return _create_cifar_resnet('inresnet_110', pretrained, **dict(model_args, **kwargs))


@register_model
def inresnet_164(pretrained: bool = False, **kwargs) -> CifarResNet:
    """In-ResNet-164 (Yang et al. 2020): bottleneck ResNet-164 plus 51 λ, λ ~ U[0.1, 0.2] at init."""
    model_args = dict(_BOTTLENECK_164, interpolation='inresnet')
    return _create_cifar_resnet('inresnet_164', pretrained, **dict(model_args, **kwargs))


@register_model
def lambda_inresnet_110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """λ-In-ResNet-110: ``x_{n+1} = (1 + λ_n) f_n(x_n) + (1 - λ_n) x_n``, ``λ_n = ReLU(k_n)``, k ~ U[0.2, 0.25]."""
    model_args = dict(_basic(110), interpolation='lambda_inresnet')
    return _create_cifar_resnet('lambda_inresnet_110', pretrained, **dict(model_args, **kwargs))


@register_model
def lambda_inresnet_164(pretrained: bool = False, **kwargs) -> CifarResNet:
    """λ-In-ResNet-164: bottleneck λ-In-ResNet, k ~ U[0.2, 0.25] at init (authors' λ-In-ResNet range)."""
    model_args = dict(_BOTTLENECK_164, interpolation='lambda_inresnet', lambda_init=(0.2, 0.25))
    return _create_cifar_resnet('lambda_inresnet_164', pretrained, **dict(model_args, **kwargs))


@register_model
def inresnet_sig_110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """In-ResNet-sig-110 (slides, our reading): ``x_{n+1} = (1 - sigmoid(d_n)) x_n + f_n(x_n)``, scalar d_n."""
    model_args = dict(_basic(110), interpolation='sig')
    return _create_cifar_resnet('inresnet_sig_110', pretrained, **dict(model_args, **kwargs))


@register_model
def inresnet_gating_110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """In-ResNet-gating-110 (slides, our reading): ``λ(x) = ReLU(W_d · GAP(x) + b_d)`` per sample and block."""
    model_args = dict(_basic(110), interpolation='gating')
    return _create_cifar_resnet('inresnet_gating_110', pretrained, **dict(model_args, **kwargs))


@register_model
def inresnet_gating_sig_110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """In-ResNet-gating-sig-110 (slides, our reading): ``λ(x) = sigmoid(W_d · GAP(x) + b_d)`` per sample."""
    model_args = dict(_basic(110), interpolation='gating_sig')
    return _create_cifar_resnet('inresnet_gating_sig_110', pretrained, **dict(model_args, **kwargs))
