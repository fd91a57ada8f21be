"""The one-step scheme a block discretises, as the stability function ``R`` of its linear test problem.

Applied to ``dx/dt = μ x`` with step ``h`` (``w = hμ``), one step multiplies the state by ``R(w)``; the scheme's
stability region is ``{w : |R(w)| ≤ 1}``. For a block whose Jacobian is ``R(hJ)`` (exactly for a linear right-hand
side, to first order otherwise), an eigenvalue ``z`` of the block's Jacobian corresponds to ``w = R⁻¹(z)``, an
eigenvalue of ``hJ``, and the step is stable when ``w`` lies in the region (equivalently ``|z| ≤ 1``):

* forward Euler (ResNet, ``x + h f(x)``): ``R(w) = 1 + w`` — the disc of radius 1 about −1;
* In-ResNet (``f(x) + (1 − λ) x``; λ-In-ResNet ``(1 + λ) f(x) + (1 − λ) x``): ``R(w) = 1 − λ + (1 + βλ) w`` with
  β = 0 (1) — the disc shifted by λ (Yang et al., "Interpolation between Residual and Non-Residual Networks",
  arXiv:2006.05749);
* the θ-method (implicit θ-ResNets, Reshniak & Webster, arXiv:1905.10479): ``R(w) = (1 + (1 − θ) w) / (1 − θ w)``
  — the left half-plane for the trapezoidal rule (θ = ½), the outside of the disc of radius 1 about +1 for
  backward Euler (θ = 1);
* any other block (Hamiltonian / MidPoint / Leapfrog units, transitions): ``R(w) = w``, i.e. the block's own
  eigenvalues against the unit disc (a stable symplectic step keeps them on the unit circle).

The scheme is read off the block by duck typing: ``theta`` and ``h`` attributes (θ-method), an ``interpolation``
with ``has_coefficient`` (In-ResNet) or without (ResNet). Nothing else about the model is assumed.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

__all__ = ['Scheme', 'scheme_of', 'forward_euler', 'theta_method', 'interpolated_euler', 'AMPLIFICATION']


@dataclass(frozen=True)
class Scheme:
    """``R(w) = (a + b w) / (c + d w)`` (a Möbius map: every scheme above is one), with a ``label`` for plots."""
    label: str
    a: float
    b: float
    c: float = 1.0
    d: float = 0.0

    def amplification(self, w: np.ndarray) -> np.ndarray:
        """``R(w)``."""
        return (self.a + self.b * w) / (self.c + self.d * w)

    def step_eigenvalue(self, z: np.ndarray) -> np.ndarray:
        """``w = R⁻¹(z) = (c z − a) / (b − d z)``: the eigenvalue of ``hJ`` behind the block eigenvalue ``z``."""
        return (self.c * z - self.a) / (self.b - self.d * z)

    def is_stable(self, w: np.ndarray) -> np.ndarray:
        return np.abs(self.amplification(np.asarray(w, dtype=complex))) <= 1 + 1e-12


def forward_euler() -> Scheme:
    return Scheme('forward Euler: |1 + w| ≤ 1', 1.0, 1.0)


def interpolated_euler(lam: float, beta: float = 0.0) -> Scheme:
    return Scheme(f'In-ResNet λ={lam:.3g}: |1 − λ + {"(1 + λ)" if beta else ""}w| ≤ 1', 1.0 - lam, 1.0 + beta * lam)


def theta_method(theta: float) -> Scheme:
    name = {0.0: 'forward Euler', 0.5: 'trapezoidal', 1.0: 'backward Euler'}.get(theta, f'θ-method θ={theta:g}')
    return Scheme(f'{name}: |R(w)| ≤ 1', 1.0, 1.0 - theta, 1.0, -theta)


AMPLIFICATION = Scheme('amplification factor: |z| ≤ 1', 0.0, 1.0)


def scheme_of(block: nn.Module, state: Optional[torch.Tensor] = None) -> Scheme:
    """The scheme ``block`` discretises (see the module docstring); ``state`` is its input, for gated λ."""
    theta, h = getattr(block, 'theta', None), getattr(block, 'h', None)
    if isinstance(theta, float) and isinstance(h, float):
        return theta_method(theta)
    interpolation = getattr(block, 'interpolation', None)
    if isinstance(interpolation, nn.Module) and isinstance(getattr(block, 'shortcut', None), nn.Identity):
        if not getattr(interpolation, 'has_coefficient', False):
            return forward_euler()
        with torch.no_grad():
            lam = float(interpolation.coefficient(state).mean())
        return interpolated_euler(lam, 1.0 if getattr(interpolation, 'scales_residual_function', False) else 0.0)
    return AMPLIFICATION
