"""Implicit θ-ResNets: residual blocks whose output is the fixed point of an implicit ODE step.

Reshniak & Webster, "Robust learning with implicit residual networks", arXiv:1905.10479. A block discretises ``dx/dt = F(x)`` with the θ-method

* ``scheme='linear'`` (the paper's eq. 7, default): ``x_{n+1} = x_n + h[(1 − θ) F(x_n) + θ F(x_{n+1})]``
* ``scheme='one_leg'`` (the authors' later code): ``x_{n+1} = x_n + h F((1 − θ) x_n + θ x_{n+1})``

θ = 0 is the explicit ResNet step ``x + h F(x)`` (evaluated directly, no solver), θ = 1 backward Euler and θ = ½
the trapezoidal rule (linear) or implicit midpoint rule (one-leg), both symmetric, hence reversible, and second
order. The output is solved for by Anderson acceleration or fixed-point iteration from the explicit Euler
predictor ``x_n + h F(x_n)`` and differentiated by the implicit function theorem, not through the iterations: one
linear solve ``(I − hθ J_F)ᵀ v = g`` per block in backward, with the step linearised by hand at its output
(``LinearThetaMap``; ``odenet_timm.layers.fixed_point``).

``F(y) = K₂ ReLU(K₁ y + b₁) + b₂`` with 3×3 convolutions and no batch norm (batch statistics would change between
solver iterations). Each convolution is spectrally normalised on its operator norm to ``√lipschitz``, so
``Lip(F) ≤ lipschitz`` and the forward map ``y ↦ x + hθ F(y) + …`` contracts by at most ``hθ·lipschitz``
(½ for the trapezoidal defaults h = 1, lipschitz = 1). The normalised kernels are computed once per block call,
so they stay fixed during that call's solves (and its backward).

Macro layout: CIFAR stem conv3x3 3→16 (no BN/ReLU), three stages of ``steps`` implicit blocks at widths
16/32/64; stages 2 and 3 open with an explicit strided transition BN-ReLU-conv3x3(stride 2); head
BN-ReLU-GAP-Linear (``CifarStagedNet``). With ``memory_efficient=True`` (θ = ½ only) a stage stores only its
output in training and reconstructs each block's input in backward by solving the reversed step
``x_n = x_{n+1} − h[½ F(x_n) + ½ F(x_{n+1})]`` (the paper's "Complexity" paragraph).
"""
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..layers.fixed_point import (
    SolverConfig, SolverStatsLog, implicit_step, reversible_implicit_chain,
)
from ..layers.spectral_norm import SpectralNormConv2d
from ._common import CifarStagedNet, ConvStem, ConvTransition, check_kwarg_types, cifar_cfg, init_weights_cifar_

__all__ = ['ImplicitResNet', 'ImplicitBlock', 'SCHEMES']

SCHEMES = ('linear', 'one_leg')

Params = Tuple[torch.Tensor, ...]


class LipschitzResidual(nn.Module):
    """``F(y) = K₂ ReLU(K₁ y + b₁) + b₂``, each 3×3 convolution's operator norm at most ``√lipschitz``."""

    def __init__(self, channels: int, probe_size: int, lipschitz: float):
        super().__init__()
        max_norm = math.sqrt(lipschitz)
        self.conv1 = SpectralNormConv2d(channels, channels, 3, max_norm=max_norm, probe_size=probe_size)
        self.conv2 = SpectralNormConv2d(channels, channels, 3, max_norm=max_norm, probe_size=probe_size)

    def normalized_params(self) -> Params:
        """``(K₁, b₁, K₂, b₂)`` with the normalised kernels (one power iteration each in training mode)."""
        return self.conv1.normalized_weight(), self.conv1.bias, self.conv2.normalized_weight(), self.conv2.bias

    @staticmethod
    def evaluate(y: torch.Tensor, params: Params) -> torch.Tensor:
        """``F(y) = K₂ ReLU(K₁ y + b₁) + b₂``."""
        w1, b1, w2, b2 = params
        return F.conv2d(F.relu(F.conv2d(y, w1, b1, padding=1)), w2, b2, padding=1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.evaluate(y, self.normalized_params())


class LinearThetaMap:
    """The linear θ-step's map ``y ↦ G(x, y) = x + h[(1 − θ) F(x) + θ F(y)]``, 0 < θ ≤ 1, evaluated as

    ``G(x, y) = x + K₂ m(y) + h b₂``,  ``m(y) = h(1 − θ) a(x) + hθ a(y)``,  ``a = ReLU(K₁ · + b₁)``

    (``K₂`` is linear: one ``K₂`` weight gradient and ``K₂ᵀ`` serve ``F(x)`` and ``F(y)`` together); the part
    without ``y``, ``x + K₂ h(1 − θ) a(x) + h b₂``, is computed once per call (its ``K₂`` also gives the Euler
    predictor), so an evaluation is ``hθ a(y) = ReLU(hθ K₁ y + hθ b₁)`` with the scaled kernel, one ``K₂`` and an
    in-place addition. Implements :class:`odenet_timm.layers.fixed_point.LinearizableMap` with the products by hand (the
    linearisation needs ``a(y)`` but not ``K₂ m(y)``: one convolution fewer than recording ``G`` with a graph):

    ``(∂G/∂y)ᵀ v = hθ K₁ᵀ[a'(y) ⊙ K₂ᵀ v]``,  ``(∂G/∂x)ᵀ v = v + h(1 − θ) K₁ᵀ[a'(x) ⊙ K₂ᵀ v]``, and the kernels'
    and biases' gradients from ``δ_y = hθ a'(y) ⊙ K₂ᵀ v`` and ``δ_x = h(1 − θ) a'(x) ⊙ K₂ᵀ v``.
    """

    def __init__(self, x: torch.Tensor, params: Params, h: float, theta: float):
        w1, b1, w2, b2 = params
        self.x, self.h, self.theta = x, h, theta
        self.w1, self.w2 = w1, w2
        self.scaled_w1, self.scaled_b1 = w1 * (h * theta), b1 * (h * theta)
        if theta == 1:  # backward Euler: no explicit part; G(x, x) is the explicit Euler predictor
            self.explicit_hidden, self.initial_guess = None, x
            self.constant = x + (b2 * h)[:, None, None]
            return
        self.explicit_hidden = F.relu(F.conv2d(x, w1 * (h * (1 - theta)), b1 * (h * (1 - theta)), padding=1))
        explicit_image = F.conv2d(self.explicit_hidden, w2, padding=1)  # K₂ h(1 − θ) a(x)
        self.constant = (x + explicit_image).add_((b2 * h)[:, None, None])  # the part of G(x, y) without y
        with torch.no_grad():  # x + h F(x) = x + K₂ h a(x) + h b₂
            self.initial_guess = torch.add(self.constant, explicit_image, alpha=theta / (1 - theta))

    def _implicit_hidden(self, y: torch.Tensor) -> torch.Tensor:
        """``hθ a(y)``."""
        return F.conv2d(y, self.scaled_w1, self.scaled_b1, padding=1).relu_()

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """``G(x, y) = [x + K₂ h(1 − θ) a(x) + h b₂] + K₂ hθ a(y)``: two convolutions and two in-place passes."""
        return F.conv2d(self._implicit_hidden(y), self.w2, padding=1).add_(self.constant)

    def linearize(self, y: torch.Tensor) -> Tuple['LinearThetaLinearization', Tuple[torch.Tensor, ...]]:
        """Saved: ``x``, ``y``, ``h(1 − θ) a(x)`` (θ < 1), ``hθ a(y)`` and the kernels ``K₁``, ``K₂``."""
        with torch.no_grad():
            implicit_hidden = self._implicit_hidden(y)
        explicit = () if self.explicit_hidden is None else (self.explicit_hidden.detach(),)
        saved = (self.x.detach(), y, implicit_hidden, self.w1.detach(), self.w2.detach()) + explicit
        return LinearThetaLinearization(self.h, self.theta), saved


class LinearThetaLinearization:
    """The products of :class:`LinearThetaMap`'s linearisation (``odenet_timm.layers.fixed_point.Linearization``)."""

    def __init__(self, h: float, theta: float):
        self.h, self.theta = h, theta

    def state_vjp(self, saved: Sequence[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        """``hθ K₁ᵀ[a'(y) ⊙ K₂ᵀ v]``."""
        _, y, implicit_hidden, w1, w2 = saved[:5]
        u = conv2d_input(v.shape, w2, v, padding=1)  # K₂ᵀ v, masked in place by ReLU's derivative at y
        masked = torch.ops.aten.threshold_backward.grad_input(u, implicit_hidden, 0, grad_input=u)
        return conv2d_input(y.shape, w1 * (self.h * self.theta), masked, padding=1)

    def input_vjp(self, saved: Sequence[torch.Tensor], v: torch.Tensor,
                  needed: Sequence[bool]) -> List[Optional[torch.Tensor]]:
        """Gradients for ``(x, K₁, b₁, K₂, b₂)``."""
        x, y, implicit_hidden, w1, w2 = saved[:5]
        explicit_hidden = saved[5] if len(saved) > 5 else None
        need_x, need_w1, need_b1, need_w2, need_b2 = needed
        h, theta = self.h, self.theta
        u = conv2d_input(v.shape, w2, v, padding=1)  # K₂ᵀ v
        deltas = [(y, torch.ops.aten.threshold_backward(u, implicit_hidden, 0).mul_(h * theta))]
        if explicit_hidden is not None:
            deltas.append((x, torch.ops.aten.threshold_backward(u, explicit_hidden, 0).mul_(h * (1 - theta))))
        grad_x = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        if need_x:
            grad_x = v if explicit_hidden is None else v + conv2d_input(x.shape, w1, deltas[1][1], padding=1)
        if need_w1:
            grad_w1 = sum(conv2d_weight(at, w1.shape, delta, padding=1) for at, delta in deltas)
        if need_b1:
            grad_b1 = sum(delta.sum((0, 2, 3)) for _, delta in deltas)
        if need_w2:
            mixed = implicit_hidden if explicit_hidden is None else explicit_hidden + implicit_hidden
            grad_w2 = conv2d_weight(mixed, w2.shape, v, padding=1)
        if need_b2:
            grad_b2 = v.sum((0, 2, 3)) * h
        return [grad_x, grad_w1, grad_b1, grad_w2, grad_b2]


class ImplicitBlock(nn.Module):
    """One θ-method step ``x_{n+1} = x_n + h[(1 − θ) F(x_n) + θ F(x_{n+1})]`` (``scheme='linear'``) or
    ``x_{n+1} = x_n + h F((1 − θ) x_n + θ x_{n+1})`` (``'one_leg'``); explicit ``x + h F(x)`` at θ = 0.

    Implements :class:`odenet_timm.layers.fixed_point.ImplicitMap`; ``solver_log`` is shared by the network.
    """

    def __init__(self, channels: int, theta: float, h: float, scheme: str, probe_size: int, lipschitz: float,
                 config: SolverConfig, solver_log: SolverStatsLog, name: str):
        super().__init__()
        self.theta, self.h, self.scheme = theta, h, scheme
        self.config, self.solver_log, self.name = config, solver_log, name
        self.residual = LipschitzResidual(channels, probe_size, lipschitz)

    def forward_map(self, x: torch.Tensor, *params: torch.Tensor) -> Tuple[Callable, torch.Tensor]:
        """``(y ↦ G(x, y), explicit Euler predictor)``; the one-leg map and θ = 1 start at ``x``, whose first image
        is that predictor."""
        if self.scheme == 'linear':
            g = LinearThetaMap(x, params, self.h, self.theta)
            return g, g.initial_guess
        Fn, h, theta = self.residual.evaluate, self.h, self.theta
        x_part = (1 - theta) * x
        return (lambda y: torch.add(x, Fn(torch.add(x_part, y, alpha=theta), params), alpha=h)), x

    def inverse_map(self, y: torch.Tensor, *params: torch.Tensor) -> Tuple[Callable, torch.Tensor]:
        """``(x ↦ x', y)`` whose fixed point is the input ``x`` of output ``y``: ``x = y − h[(1 − θ) F(x) + θ F(y)]``
        or ``x = y − h F((1 − θ) x + θ y)``; the first image of ``y`` is the reversed Euler predictor."""
        Fn, h, theta = self.residual.evaluate, self.h, self.theta
        if self.scheme == 'one_leg':
            y_part = theta * y
            return (lambda x: torch.add(y, Fn(torch.add(y_part, x, alpha=1 - theta), params), alpha=-h)), y
        implicit_part = torch.add(y, Fn(y, params), alpha=-h * theta)
        return (lambda x: torch.add(implicit_part, Fn(x, params), alpha=-h * (1 - theta))), y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self.residual.normalized_params()
        if self.theta == 0:
            return x + self.h * self.residual.evaluate(x, params)
        return implicit_step(self, x, params, self.config, self.solver_log)


class ImplicitStage(nn.Sequential):
    """An optional :class:`ConvTransition` followed by implicit blocks. With ``memory_efficient`` and grad enabled,
    the blocks run as one reversible chain that stores only the stage output."""

    def __init__(self, transition: Optional[ConvTransition], blocks: Sequence[ImplicitBlock], memory_efficient: bool):
        super().__init__(*([transition] if transition is not None else []), *blocks)
        self.has_transition = transition is not None
        self.memory_efficient = memory_efficient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.memory_efficient and torch.is_grad_enabled()):
            return super().forward(x)
        modules = list(self)
        if self.has_transition:
            x = modules.pop(0)(x)
        params = [block.residual.normalized_params() for block in modules]
        return reversible_implicit_chain(modules, x, params, modules[0].config, modules[0].solver_log)


class ImplicitResNet(CifarStagedNet):
    """CIFAR network of implicit θ-method residual blocks (Reshniak & Webster, arXiv:1905.10479).

    Args:
        theta: implicitness θ ∈ [0, 1] (0 explicit ResNet, ½ trapezoidal, 1 backward Euler).
        h: step size (> 0).
        scheme: ``'linear'`` ``x + h[(1 − θ) F(x) + θ F(y)]`` (paper) or ``'one_leg'`` ``x + h F((1 − θ) x + θ y)``.
        steps: implicit blocks per stage (default 3-3-3, ResNet-20's block count: a 32×32 train step at batch 128
            stays affordable on a CPU, see README).
        widths: stage widths; the stem outputs ``widths[0]`` channels.
        solver: ``'anderson'`` or ``'fixed_point'``; ``solver_tol`` / ``solver_max_iter`` for the forward solves
            (and input reconstruction), ``backward_tol`` / ``backward_max_iter`` for the backward linear solves.
            Tolerances are per-sample relative residuals. ``backward_solver``: the backward's, if not ``solver``:
            also ``'extrapolated'``, fixed-point iteration whose answer is the reduced-rank extrapolation of its
            last iterates (the adjoint system is affine, so the extrapolation's residual is exact), or
            ``'jacobian_free'`` (opt-in, not the gradient: the output gradient pushed through one step, no solve).
        memory_efficient: store one tensor per stage in training and reconstruct block inputs in backward
            (θ = ½ only: the symmetric step is the reversible one).
        lipschitz: bound on Lip(F); the forward map contracts by at most ``h·θ·lipschitz``.
    """

    def __init__(
            self,
            theta: float = 0.5,
            h: float = 1.0,
            scheme: str = 'linear',
            steps: Sequence[int] = (3, 3, 3),
            widths: Sequence[int] = (16, 32, 64),
            solver: str = 'anderson',
            solver_tol: float = 1e-4,
            solver_max_iter: int = 30,
            backward_tol: float = 1e-4,
            backward_max_iter: int = 30,
            backward_solver: Optional[str] = None,
            memory_efficient: bool = False,
            lipschitz: float = 1.0,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
    ):
        check_kwarg_types(type(self).__name__, theta=(theta, 'number'), h=(h, 'number'),
                          steps=(steps, 'stage_ints'), widths=(widths, 'stage_ints'),
                          memory_efficient=(memory_efficient, 'bool'), lipschitz=(lipschitz, 'number'))
        if not 0 <= theta <= 1:
            raise ValueError(f'theta must be a number in [0, 1], got {theta!r}')
        if not h > 0:
            raise ValueError(f'h must be a positive step size, got {h!r}')
        if scheme not in SCHEMES:
            raise ValueError(f'scheme must be one of {SCHEMES}, got {scheme!r}')
        steps, widths = tuple(steps), tuple(widths)
        if len(steps) != len(widths):
            raise ValueError(f'steps and widths need one entry per stage, got steps={steps}, widths={widths}')
        if memory_efficient and theta != 0.5:
            raise ValueError(
                f'memory_efficient=True needs theta=0.5 (the symmetric, reversible step), got theta={theta}')
        if not lipschitz > 0:
            raise ValueError(f'lipschitz must be positive, got {lipschitz!r}')
        config = SolverConfig(solver=solver, tol=solver_tol, max_iter=solver_max_iter, backward_tol=backward_tol,
                              backward_max_iter=backward_max_iter, backward_solver=backward_solver)
        solver_log = SolverStatsLog()

        stages, stage_reductions = [], []
        in_chs, reduction = widths[0], 1
        for stage_idx, (depth, width) in enumerate(zip(steps, widths)):
            transition = None
            if stage_idx > 0:
                transition = ConvTransition(in_chs, width)
                reduction *= 2
            probe_size = max(32 // reduction, 1)  # the stage's feature-map size at the 32×32 default input
            blocks = [
                ImplicitBlock(width, float(theta), float(h), scheme, probe_size, lipschitz, config, solver_log,
                              name=f'stages.{stage_idx}.{int(transition is not None) + block_idx}')
                for block_idx in range(depth)
            ]
            stages.append(ImplicitStage(transition, blocks, memory_efficient))
            stage_reductions.append(reduction)
            in_chs = width

        super().__init__(
            stem=ConvStem(in_chans, widths[0], norm=False),
            stages=stages,
            stem_channels=widths[0],
            stage_channels=widths,
            stage_reductions=stage_reductions,
            num_classes=num_classes,
            in_chans=in_chans,
            global_pool=global_pool,
            drop_rate=drop_rate,
        )
        self.theta, self.h, self.scheme = float(theta), float(h), scheme
        self.memory_efficient = memory_efficient
        self.solver_config = config
        self.solver_log = solver_log
        init_weights_cifar_(self)
        for m in self.modules():
            if isinstance(m, SpectralNormConv2d):
                m.power_iterate_(30)  # norm estimates of the initial kernels within ~1%; training refines them

    def solver_stats(self) -> dict:
        """Flat statistics of the latest solve of each kind and block: ``forward_*`` (the blocks' fixed points),
        ``backward_*`` (the adjoint linear systems), ``reconstruct_*`` (memory-efficient mode), each with
        ``_iterations_mean``, ``_iterations_max``, ``_residual_max``, ``_converged``, ``_solves``, and
        ``converged`` over all of them. Empty for θ = 0 (no solves)."""
        return self.solver_log.summary()

    @torch.jit.ignore
    def reset_solver_stats(self) -> None:
        """Forget the recorded solves: the next ``solver_stats()`` describes only the solves made after this call."""
        self.solver_log.clear()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Not supported: recomputing a block in backward would re-run its solve and the spectral-norm power
        iteration (changing the kernels being differentiated). Use ``memory_efficient=True`` instead."""
        if enable:
            raise NotImplementedError(
                f'{self._name()} does not support gradient checkpointing: recomputing a block would re-run its '
                f'fixed-point solve and its spectral-norm power iteration. Implicit blocks already store only one '
                f'application of their step; memory_efficient=True (theta=0.5) stores one tensor per stage.')
        self.grad_checkpointing = False


def _create_implicit_resnet(variant: str, pretrained: bool = False, **kwargs) -> ImplicitResNet:
    return build_model_with_cfg(
        ImplicitResNet, variant, pretrained,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


_IMPLICIT_PAPER = dict(paper_ids='arXiv:1905.10479', paper_name='Robust learning with implicit residual networks')

default_cfgs = generate_default_cfgs({
    'implicit_trapezoid_resnet': cifar_cfg(**_IMPLICIT_PAPER),
    'implicit_euler_resnet': cifar_cfg(**_IMPLICIT_PAPER),
})


@register_model
def implicit_trapezoid_resnet(pretrained: bool = False, **kwargs) -> ImplicitResNet:
    """Implicit trapezoidal ResNet (θ = ½): ``x_{n+1} = x_n + h/2 [F(x_n) + F(x_{n+1})]``, 3-3-3 blocks, 16-32-64.
    Forward by plain fixed-point iteration (its map contracts by at most ½; Anderson acceleration made as many
    iterations, at the cost of its bookkeeping), backward by fixed-point iteration extrapolated once from its
    last iterates (``'extrapolated'``: gradients as accurate as Anderson's and torchdeq's, without Anderson's
    per-iteration mixing; README)."""
    model_args = dict(theta=0.5, solver='fixed_point', backward_solver='extrapolated')
    return _create_implicit_resnet('implicit_trapezoid_resnet', pretrained, **dict(model_args, **kwargs))


@register_model
def implicit_euler_resnet(pretrained: bool = False, **kwargs) -> ImplicitResNet:
    """Implicit (backward) Euler ResNet (θ = 1): ``x_{n+1} = x_n + h F(x_{n+1})``, 3-3-3 blocks, 16-32-64."""
    model_args = dict(theta=1.0)
    return _create_implicit_resnet('implicit_euler_resnet', pretrained, **dict(model_args, **kwargs))
