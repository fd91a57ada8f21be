"""Continuous-depth ODE-Net.

Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential Equations", NeurIPS 2018 (arXiv:1806.07366).
A residual stage ``y ← y + f(y)`` repeated is the Euler discretisation of ``dy/dt = f(y, t)``; an ODE block
replaces the stage by the solution of that ODE::

    y(1) = y(0) + ∫₀¹ f(y(t), t) dt,      y(0) = the block's input

computed by an adaptive solver (``dopri5`` by default; ``rtol`` / ``atol``), or a fixed-step method for
comparison (``method='rk4'``, ``step_size=...``). Gradients backpropagate through the solver's operations (the
exact gradients of the solve the forward pass made), or, with ``adjoint=True``, come from solving the adjoint ODE
backwards in time (the paper's O(1)-memory method; the flow's gradients up to the accuracy of that backward solve).
Input gradients included: attacks see the true gradients.

f is the paper's ODE function (the authors' code): ``GN → ReLU → ConcatConv3x3 → GN → ReLU → ConcatConv3x3 → GN``
with GroupNorm (32 groups at the authors' width 64; no batch statistics inside the solve) and time-conditioned convolutions that see
``t`` as an extra input channel (:class:`ConcatConv2d`).

Layout: stem conv3x3 3→c (no bias); three stages at strides 1/2/2, each an optional downsampling transition
BN-ReLU-conv3x3(stride 2) followed by ``ode_blocks[i]`` ODE blocks; head BN-ReLU-GAP-Linear. ``odenet_small`` is
the paper's MNIST ODE-Net (downsampling to a quarter of the resolution at 64 channels, then one ODE block; the
paper downsamples with 4×4 convolutions, we use the transitions of the other families here);
``odenet_cifar`` has one ODE block per resolution at 32-64-128 channels, the continuous analogue of the
three-stage CIFAR ResNets.

``solver_stats()`` reports the number of function evaluations (NFE) of the latest forward pass and of the latest
backward pass (summed over the ODE blocks; the backward count is that of the adjoint solves, 0 without the adjoint
method); ``reset_solver_stats()`` clears them.
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..layers.ode import CountedDynamics, ODESolverConfig, integrate
from ._common import CifarStagedNet, ConvStem, ConvTransition, check_kwarg_types, cifar_cfg, init_weights_cifar_

__all__ = ['ODENet', 'ODEBlock', 'ODEFunc', 'ConcatConv2d']


class ConcatConv2d(nn.Module):
    """Time-conditioned 3×3 convolution ``conv([t; y])``: ``t`` enters as a constant extra input channel."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs + 1, out_chs, 3, padding=1)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        time_channel = t.to(y).expand(y.shape[0], 1, *y.shape[2:])
        return self.conv(torch.cat([time_channel, y], dim=1))


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(32, c/2) groups: the authors' 32 groups at their width 64; at least two channels per
    group otherwise, so that a 1×1 feature map (a 4×4 input) still has two values to normalise."""
    return nn.GroupNorm(min(32, max(1, channels // 2)), channels)


class ODEFunc(nn.Module):
    """``f(y, t) = GN(conv₂(t, ReLU(GN(conv₁(t, ReLU(GN(y)))))))`` (Chen et al., arXiv:1806.07366, authors' code)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = _group_norm(channels)
        self.conv1 = ConcatConv2d(channels, channels)
        self.norm2 = _group_norm(channels)
        self.conv2 = ConcatConv2d(channels, channels)
        self.norm3 = _group_norm(channels)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = self.conv1(t, torch.relu(self.norm1(y)))
        y = self.conv2(t, torch.relu(self.norm2(y)))
        return self.norm3(y)


class ODEBlock(nn.Module):
    """``y(1)`` of ``dy/dt = f(y, t)``, ``y(0) = x``, with :class:`ODEFunc` f, integrated as ``config`` says."""

    def __init__(self, channels: int, config: ODESolverConfig):
        super().__init__()
        self.config = config
        self.dynamics = CountedDynamics(ODEFunc(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return integrate(self.dynamics, x, 0.0, 1.0, self.config)


class ODENet(CifarStagedNet):
    """Continuous-depth ODE-Net (Chen et al., arXiv:1806.07366) on the CIFAR skeleton.

    Args:
        widths: stage widths; the stem outputs ``widths[0]`` channels, stages 2 and 3 open with a stride-2 transition.
        ode_blocks: ODE blocks per stage (0 leaves a stage with its transition only).
        method: torchdiffeq solver, adaptive (``'dopri5'``, ``'bosh3'``, …) or fixed-step (``'rk4'``, ``'euler'``, …).
        rtol, atol: tolerances of the adaptive methods (and of the adjoint solve).
        step_size: step of the fixed-step methods (required by them, refused by the adaptive ones).
        adjoint: gradients by the adjoint method instead of backpropagation through the solver.
    """

    def __init__(
            self,
            widths: Sequence[int] = (64, 64, 64),
            ode_blocks: Sequence[int] = (0, 0, 1),
            method: str = 'dopri5',
            rtol: float = 1e-3,
            atol: float = 1e-3,
            step_size: Optional[float] = None,
            adjoint: bool = False,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
    ):
        check_kwarg_types(type(self).__name__, widths=(widths, 'stage_ints'), method=(method, 'str'),
                          rtol=(rtol, 'number'), atol=(atol, 'number'), adjoint=(adjoint, 'bool'))
        widths, ode_blocks = tuple(widths), tuple(ode_blocks)
        if not widths or len(widths) != len(ode_blocks):
            raise ValueError(f'widths and ode_blocks need one entry per stage, got {widths}, {ode_blocks}')
        if any(isinstance(v, bool) or not isinstance(v, int) for v in widths + ode_blocks) or min(widths) < 1 \
                or min(ode_blocks) < 0 or sum(ode_blocks) < 1:
            raise ValueError(f'widths must be positive integers and ode_blocks integers >= 0 with at least one ODE '
                             f'block; got widths={widths}, ode_blocks={ode_blocks}')
        config = ODESolverConfig(method=method, rtol=rtol, atol=atol, step_size=step_size, adjoint=adjoint)

        stages, in_chs = [], widths[0]
        for stage_idx, (depth, width) in enumerate(zip(ode_blocks, widths)):
            transition = [ConvTransition(in_chs, width)] if stage_idx > 0 else []
            stages.append(nn.Sequential(*transition, *(ODEBlock(width, config) for _ in range(depth))))
            in_chs = width

        super().__init__(
            stem=ConvStem(in_chans, widths[0], norm=False),
            stages=stages,
            stage_channels=widths,
            num_classes=num_classes,
            in_chans=in_chans,
            global_pool=global_pool,
            drop_rate=drop_rate,
        )
        self.solver_config = config
        init_weights_cifar_(self)

    def _dynamics(self):
        return [m for m in self.modules() if isinstance(m, CountedDynamics)]

    def solver_stats(self) -> dict:
        """``forward_nfe`` / ``backward_nfe``: function evaluations of the latest forward / backward pass, summed
        over the ODE blocks (backward: the adjoint solves; 0 when backpropagating through the solver). Empty
        when nothing was solved since the last :meth:`reset_solver_stats`."""
        dynamics = self._dynamics()
        if not any(d.solves for d in dynamics):
            return {}
        return {'forward_nfe': sum(d.forward_nfe for d in dynamics),
                'backward_nfe': sum(d.backward_nfe for d in dynamics)}

    @torch.jit.ignore
    def reset_solver_stats(self) -> None:
        """Forget the recorded evaluations: the next ``solver_stats()`` describes only the solves made after this."""
        for d in self._dynamics():
            d.reset_counts()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Not supported: recomputing an ODE block would re-run its solve. ``adjoint=True`` is the memory-saving
        option (activation memory independent of the number of solver steps)."""
        if enable:
            raise NotImplementedError(
                f'{self._name()} does not support gradient checkpointing: recomputing an ODE block would re-run its '
                f'solve. Use adjoint=True for activation memory independent of the number of solver steps.')
        self.grad_checkpointing = False


def _create_odenet(variant: str, pretrained: bool = False, **kwargs) -> ODENet:
    return build_model_with_cfg(
        ODENet, variant, pretrained,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


_PAPER = dict(paper_ids='arXiv:1806.07366', paper_name='Neural Ordinary Differential Equations')

default_cfgs = generate_default_cfgs({
    'odenet_small': cifar_cfg(**_PAPER),
    'odenet_cifar': cifar_cfg(**_PAPER),
})


@register_model
def odenet_small(pretrained: bool = False, **kwargs) -> ODENet:
    """ODE-Net as in the paper's MNIST experiment: 64 channels, downsampled twice, then one ODE block (dopri5)."""
    model_args = dict(widths=(64, 64, 64), ode_blocks=(0, 0, 1))
    return _create_odenet('odenet_small', pretrained, **dict(model_args, **kwargs))


@register_model
def odenet_cifar(pretrained: bool = False, **kwargs) -> ODENet:
    """ODE-Net with one ODE block per resolution, widths 32-64-128 (dopri5)."""
    model_args = dict(widths=(32, 64, 128), ode_blocks=(1, 1, 1))
    return _create_odenet('odenet_cifar', pretrained, **dict(model_args, **kwargs))
