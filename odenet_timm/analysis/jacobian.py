"""Matrix-free Jacobians of a batched map: per-sample spectral norms by power iteration and leading eigenvalues by
Arnoldi.

The map ``f`` takes a batch ``(B, …)`` and treats samples independently (a network in eval mode), so its Jacobian
at ``x`` is block diagonal with one ``n × m`` block ``J_b`` per sample. Only products with it are formed:

* ``J v`` by forward mode, :func:`torch.func.jvp`, with ``f`` evaluated under ``torch.no_grad()``: a step that
  solves for its output (an implicit block) then takes its solver's no-graph path and the tangent follows the
  solver's converging iterations, which gives ``(I − ∂G/∂y)⁻¹ ∂G/∂x · v`` to the solver's tolerance;
* ``Jᵀ u`` by reverse mode, :func:`torch.func.vjp`; where ``f`` contains an ``autograd.Function`` that functorch
  cannot transform (an implicit block's implicit-function-theorem backward), ``torch.autograd.grad`` through one
  recorded evaluation, which runs that Function's own backward.

:func:`spectral_norm` is power iteration on ``J_bᵀ J_b`` for every sample at once; it stops when every sample's
relative eigen-residual ``‖J_bᵀJ_b v − σ_b² v‖ / σ_b²`` is at most ``tol`` and reports the residual reached.
:func:`leading_eigenvalues` hands ``v ↦ J_b v`` of one sample to ARPACK (``scipy.sparse.linalg.eigs`` on a
``LinearOperator``); the map must keep the state's size (``n = m``).
"""
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigs

from .errors import AnalysisInputError

__all__ = ['Linearization', 'SpectralNormEstimate', 'spectral_norm', 'EigenEstimate', 'leading_eigenvalues']

BatchMap = Callable[[torch.Tensor], torch.Tensor]


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.flatten(1) * b.flatten(1)).sum(dim=1)


def _expand(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_sample.view(-1, *([1] * (like.dim() - 1)))


class Linearization:
    """``v ↦ J v`` and ``u ↦ Jᵀ u`` of the batched map ``fn`` at ``x`` (see the module docstring for how)."""

    def __init__(self, fn: BatchMap, x: torch.Tensor):
        self.fn, self.x = fn, x.detach()
        with torch.no_grad():
            self.output = fn(self.x)
        self._pullback: Optional[Callable] = None

    def _no_grad_fn(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(x)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(self._no_grad_fn, (self.x,), (v.to(self.x.dtype),))[1]

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        if self._pullback is None:
            self._pullback = self._make_pullback()
        return self._pullback(u.to(self.output.dtype))

    def _make_pullback(self) -> Callable[[torch.Tensor], torch.Tensor]:
        try:
            _, pullback = torch.func.vjp(self.fn, self.x)
            return lambda u: pullback(u)[0]
        except RuntimeError as e:
            if 'functorch' not in str(e) and 'torch.func' not in str(e) and 'setup_context' not in str(e):
                raise
        x = self.x.clone().requires_grad_()
        with torch.enable_grad():
            y = self.fn(x)
        return lambda u: torch.autograd.grad(y, x, u, retain_graph=True)[0]


@dataclass
class SpectralNormEstimate:
    """Per-sample ``sigma`` (largest singular value of ``J_b``), the relative eigen-residual of ``J_bᵀJ_b`` reached
    (``residual``), the number of power iterations (each one JVP + one VJP) and whether all met the tolerance."""
    sigma: torch.Tensor
    residual: torch.Tensor
    iterations: int
    converged: bool
    tol: float


def spectral_norm(fn: BatchMap, x: torch.Tensor, tol: float = 1e-3, max_iter: int = 100,
                  generator: Optional[torch.Generator] = None) -> SpectralNormEstimate:
    """``‖J_b‖₂`` for every sample ``b`` of ``x`` by power iteration on ``J_bᵀ J_b`` from a random start.

    Stops when ``max_b ‖J_bᵀJ_b v_b − σ_b² v_b‖ / σ_b² ≤ tol`` (a sample with ``J_b v_b = 0`` has residual 0) or
    after ``max_iter`` iterations. The eigenvalue error of ``σ_b²`` is of the order of the residual squared over the
    relative gap to the next singular value, so ``tol = 1e-3`` usually gives σ to far better than 0.1%."""
    if not 0 < tol < 1 or max_iter < 1:
        raise AnalysisInputError(f'power iteration needs a tolerance in (0, 1) and max_iter >= 1, got {tol}, {max_iter}')
    lin = Linearization(fn, x)
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device='cpu').to(x.device)
    v = v / _expand(_per_sample_norm(v), v)
    sigma2 = residual = None
    for iteration in range(1, max_iter + 1):
        w = lin.vjp(lin.jvp(v))
        sigma2 = _per_sample_dot(v, w).clamp_min(0)
        gap = _per_sample_norm(w - _expand(sigma2, w) * v)
        residual = torch.where(gap == 0, torch.zeros_like(gap), gap / sigma2)
        if residual.max() <= tol:
            break
        w_norm = _per_sample_norm(w)
        v = torch.where(_expand(w_norm > 0, w), w / _expand(w_norm.clamp_min(torch.finfo(w.dtype).tiny), w), v)
    residual = torch.nan_to_num(residual, nan=float('inf'))
    return SpectralNormEstimate(sigma2.sqrt().detach(), residual.detach(), iteration, bool(residual.max() <= tol), tol)


@dataclass
class EigenEstimate:
    """Eigenvalues of one sample's Jacobian (complex, sorted by the requested criterion, best first), how they were
    found (``'arnoldi'`` or ``'dense'`` for operators too small for ARPACK) and how many JVPs it took."""
    values: np.ndarray
    which: str
    method: str
    matvecs: int
    converged: bool


_ORDER = {'LR': lambda z: -z.real, 'LM': lambda z: -np.abs(z)}


def leading_eigenvalues(fn: BatchMap, x: torch.Tensor, k: int = 6, which: str = 'LR', tol: float = 1e-6,
                        max_iter: Optional[int] = None, ncv: int = 40) -> EigenEstimate:
    """The ``k`` eigenvalues of largest real part (``which='LR'``) or modulus (``'LM'``) of the Jacobian of ``fn`` at
    the single sample ``x`` (shape ``(1, …)``), by implicitly restarted Arnoldi on ``v ↦ J v``.

    Operators of dimension ``n ≤ k + 1`` are below what ARPACK accepts; their matrix is assembled from ``n`` JVPs
    (columns ``J e_i``) and all ``n`` eigenvalues are returned. ``ncv`` is the Krylov basis size (more converges in
    fewer restarts where the spectrum is clustered, e.g. near the unit circle). If ARPACK stops before all ``k`` converge, the
    converged ones are returned with ``converged=False``."""
    if which not in _ORDER:
        raise AnalysisInputError(f"which must be 'LR' (largest real part) or 'LM' (largest modulus), got {which!r}")
    if x.shape[0] != 1:
        raise AnalysisInputError(f'eigenvalues are taken at one data point: pass a batch of 1, got {x.shape[0]}')
    lin = Linearization(fn, x)
    if lin.output.shape != x.shape:
        raise AnalysisInputError(
            f'the map changes the state shape {tuple(x.shape)} -> {tuple(lin.output.shape)}: its Jacobian is not '
            f'square and has no eigenvalues')
    n = x.numel()
    count = [0]

    def matvec(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        t = torch.as_tensor(np.ascontiguousarray(v.real), dtype=x.dtype, device=x.device).view_as(x)
        return lin.jvp(t).detach().cpu().double().numpy().reshape(-1)

    if n <= k + 1:
        dense = np.stack([matvec(e) for e in np.eye(n)], axis=1)
        values = np.linalg.eigvals(dense).astype(complex)
        return EigenEstimate(values[np.argsort(_ORDER[which](values), kind='stable')], which, 'dense', count[0], True)
    operator = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(n)
    try:
        values = eigs(operator, k=k, which=which, tol=tol, maxiter=max_iter, v0=v0, ncv=min(n, max(2 * k + 1, ncv)),
                      return_eigenvectors=False)
        converged = True
    except ArpackNoConvergence as e:
        values, converged = e.eigenvalues, False
    values = np.asarray(values, dtype=complex)
    return EigenEstimate(values[np.argsort(_ORDER[which](values), kind='stable')], which, 'arnoldi', count[0], converged)
