"""Integration of ``dy/dt = f(t, y)`` over an interval with torchdiffeq, counting function evaluations.

The solves use torchdiffeq (``odeint``, or ``odeint_adjoint`` for the adjoint method of Chen et al., "Neural
Ordinary Differential Equations", arXiv:1806.07366). This module adds what a network of ODE blocks needs around
it: a validated solver configuration (:class:`ODESolverConfig`) and :class:`CountedDynamics`, which counts the
evaluations of f made by the latest forward solve and by the latest backward pass (the adjoint solve; zero when
gradients backpropagate through the forward solver's operations instead).
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
from torchdiffeq import odeint, odeint_adjoint

__all__ = ['ADAPTIVE_METHODS', 'FIXED_STEP_METHODS', 'ODESolverConfig', 'CountedDynamics', 'integrate']

# torchdiffeq's explicit solvers: error-controlled step sizes, or a fixed grid of ``step_size``.
ADAPTIVE_METHODS = ('dopri5', 'dopri8', 'bosh3', 'fehlberg2', 'adaptive_heun')
FIXED_STEP_METHODS = ('euler', 'midpoint', 'heun2', 'heun3', 'rk4', 'explicit_adams', 'implicit_adams')


@dataclass(frozen=True)
class ODESolverConfig:
    """How to integrate: ``method`` (adaptive: relative / absolute tolerances ``rtol`` / ``atol``; fixed-step:
    ``step_size``), and ``adjoint`` (gradients by solving the adjoint ODE backwards in time, O(1) activation
    memory in the number of steps, instead of backpropagating through the solver's operations)."""
    method: str = 'dopri5'
    rtol: float = 1e-3
    atol: float = 1e-3
    step_size: Optional[float] = None
    adjoint: bool = False

    def __post_init__(self):
        if self.method not in ADAPTIVE_METHODS + FIXED_STEP_METHODS:
            raise ValueError(f'method must be one of the adaptive methods {ADAPTIVE_METHODS} or the fixed-step '
                             f'methods {FIXED_STEP_METHODS}, got {self.method!r}')
        for name in ('rtol', 'atol'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f'{name} must be a positive number, got {value!r}')
        if self.method in FIXED_STEP_METHODS:
            if self.step_size is None:
                raise ValueError(f"the fixed-step method {self.method!r} needs step_size (e.g. step_size=0.1)")
            if not (math.isfinite(self.step_size) and self.step_size > 0):
                raise ValueError(f'step_size must be a positive number, got {self.step_size!r}')
        elif self.step_size is not None:
            raise ValueError(f'step_size is for the fixed-step methods {FIXED_STEP_METHODS}; the adaptive method '
                             f'{self.method!r} chooses its steps from rtol and atol')

    def solver_kwargs(self) -> Dict:
        """Keyword arguments of ``torchdiffeq.odeint`` / ``odeint_adjoint``."""
        options = {'step_size': self.step_size} if self.method in FIXED_STEP_METHODS else None
        return dict(rtol=self.rtol, atol=self.atol, method=self.method, options=options)


class CountedDynamics(nn.Module):
    """``f(t, y)`` that counts its evaluations: ``forward_nfe`` those of the latest forward solve, ``backward_nfe``
    those of the latest backward pass through a solve (made after the solve returned: the adjoint method's)."""

    def __init__(self, func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.func = func
        self.reset_counts()

    def reset_counts(self) -> None:
        """Forget every count: ``solves`` (forward solves since the reset) and both evaluation counts go to 0."""
        self.solves = 0
        self.forward_nfe = 0
        self.backward_nfe = 0
        self._phase = 'idle'  # 'forward' inside a solve; 'solved' after it, until a backward evaluation arrives

    def start_solve(self) -> None:
        self.solves += 1
        self.forward_nfe = 0
        self._phase = 'forward'

    def end_solve(self) -> None:
        self._phase = 'solved'

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._phase == 'forward':
            self.forward_nfe += 1
        else:
            if self._phase == 'solved':  # the first evaluation of a new backward pass
                self.backward_nfe = 0
                self._phase = 'backward'
            self.backward_nfe += 1
        return self.func(t, y)


def integrate(dynamics: CountedDynamics, y0: torch.Tensor, t0: float, t1: float,
              config: ODESolverConfig) -> torch.Tensor:
    """``y(t1)`` of ``dy/dt = dynamics(t, y)``, ``y(t0) = y0``, counting the evaluations made."""
    times = torch.tensor([t0, t1], dtype=y0.dtype, device=y0.device)
    solve = odeint_adjoint if config.adjoint else odeint
    dynamics.start_solve()
    try:
        return solve(dynamics, y0, times, **config.solver_kwargs())[-1]
    finally:
        dynamics.end_solve()
