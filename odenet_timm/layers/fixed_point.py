"""Fixed-point solves with implicit-function-theorem gradients, and their reversible (memory-efficient) chain.

An implicit step defines its output ``y`` as the fixed point of a map ``y = G(x, y)`` (for example the implicit
θ-method ``G(x, y) = x + h[(1 − θ) F(x) + θ F(y)]``, Reshniak & Webster, "Robust learning with implicit residual
networks", arXiv:1905.10479). This module knows nothing about what ``G`` is; it provides

* :func:`solve_fixed_point`: fixed-point iteration or Anderson acceleration, with no graph linking the
  iterations, to a per-sample relative residual ``‖G(y) − y‖ / ‖G(y)‖ ≤ tol`` or ``max_iter`` evaluations of ``G``;
  or, for affine maps (the backward's adjoint system), fixed-point iteration whose answer is the reduced-rank
  extrapolation of its last iterates;
* :func:`implicit_step`: the forward solve plus an implicit-function-theorem backward. The step returns the
  solver's ``y*`` and keeps ``G`` linearised at that same ``y*`` (:class:`Linearization`): the backward
  linearises at the output it returned. The gradient ``g`` arriving at the output is replaced by the solution
  ``v`` of ``(I − ∂G/∂y)ᵀ v = g`` (solved matrix-free with vector-Jacobian products, ``v = g + (∂G/∂y)ᵀ v``, by
  the same solvers), which is then pushed through ``G`` once to the inputs and parameters. No backpropagation
  through the solver iterations; for ``G = x + h[(1 − θ) F(x) + θ F(y)]`` the system is
  ``(I − hθ J_F(y*))ᵀ v = g``;
* :func:`reversible_implicit_chain`: the same steps chained without storing any intermediate state: backward
  reconstructs each step's input ``x`` from its output ``y`` by solving ``G(x, y) = y`` for ``x`` (for the
  trapezoidal rule, θ = ½, this is the reversed trapezoidal step) and recomputes the step from there;
* :class:`SolverStatsLog`: the statistics (iterations, final residual, converged flag) of the latest solves of
  a network, and a warning the first time one of them does not converge.

A step is described by an object with ``name`` and two methods (see :class:`ImplicitMap`): ``forward_map(x,
*params)`` returning the map ``y ↦ G(x, y)`` and an initial guess for ``y``, and ``inverse_map(y, *params)``
returning a map whose fixed point is the ``x`` with ``G(x, y) = y`` and an initial guess for ``x`` (only the
reversible chain needs it). The backward's two vector-Jacobian products come from autograd through one recorded
application of ``G`` (:class:`GraphLinearization`), unless the map returned by ``forward_map`` has a
``linearize(y)`` method of its own (:class:`LinearizableMap`), which a step uses to write them by hand.
"""
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    'SOLVERS', 'BACKWARD_SOLVERS', 'SolverConfig', 'SolverStats', 'SolverStatsLog', 'FixedPointConvergenceWarning',
    'ImplicitMap', 'Linearization', 'LinearizableMap', 'GraphLinearization', 'linearize', 'solve_fixed_point', 'implicit_step',
    'reconstruct_input', 'reversible_implicit_chain',
]

SOLVERS = ('anderson', 'fixed_point')
# extrapolation's residual is exact for affine maps only; 'jacobian_free' skips the adjoint solve (not exact)
BACKWARD_SOLVERS = SOLVERS + ('extrapolated', 'jacobian_free')

TensorMap = Callable[[torch.Tensor], torch.Tensor]


class FixedPointConvergenceWarning(RuntimeWarning):
    """A fixed-point solve stopped at its iteration limit above its tolerance."""


@dataclass(frozen=True)
class SolverConfig:
    """Settings of the forward solve (``solver``, ``tol``, ``max_iter``; also used to reconstruct inputs) and of
    the backward linear solve (``backward_tol``, ``backward_max_iter``, ``backward_solver``: ``None`` for the
    forward's, ``'extrapolated'`` (see :func:`solve_fixed_point`) or ``'jacobian_free'`` (see
    :func:`implicit_step`)). Tolerances are per-sample relative residuals ``‖G(y) − y‖ / ‖G(y)‖``;
    ``anderson_memory`` is the number of past iterates Anderson mixes (or extrapolation combines)."""
    solver: str = 'anderson'
    tol: float = 1e-4
    max_iter: int = 30
    backward_tol: float = 1e-4
    backward_max_iter: int = 30
    anderson_memory: int = 5
    backward_solver: Optional[str] = None

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f'solver must be one of {SOLVERS}, got {self.solver!r}')
        if self.backward_solver is not None and self.backward_solver not in BACKWARD_SOLVERS:
            raise ValueError(
                f'backward_solver must be one of {BACKWARD_SOLVERS} or None, got {self.backward_solver!r}')
        for key in ('tol', 'backward_tol'):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and 0 < value < 1):
                raise ValueError(f'{key} must be a relative residual in (0, 1), got {value!r}')
        for key in ('max_iter', 'backward_max_iter', 'anderson_memory'):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'{key} must be a positive integer, got {value!r}')

    @property
    def forward_method(self) -> Dict[str, object]:
        """:func:`solve_fixed_point`'s ``memory`` and ``extrapolate`` for the forward solves."""
        return self._method(self.solver)

    @property
    def backward_method(self) -> Dict[str, object]:
        """:func:`solve_fixed_point`'s ``memory`` and ``extrapolate`` for the backward solves."""
        return self._method(self.backward_solver or self.solver)

    def _method(self, solver: str) -> Dict[str, object]:
        return dict(memory=1 if solver == 'fixed_point' else self.anderson_memory,
                    extrapolate=solver == 'extrapolated')


@dataclass(frozen=True)
class SolverStats:
    """One solve: ``iterations`` evaluations of the map, the largest per-sample relative ``residual`` at the
    returned iterate, and whether it is within ``tol``."""
    iterations: int
    residual: float
    converged: bool
    tol: float
    max_iter: int


def _relative_residual(r: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
    """Per-sample ``‖r‖ / ‖G(x)‖`` for ``r = G(x) − x`` (0 where both vanish; +inf where not finite)."""
    num = r.flatten(1).norm(dim=1)
    den = gx.flatten(1).norm(dim=1)
    res = torch.where(num == 0, torch.zeros_like(num), num / den)
    return torch.nan_to_num(res, nan=math.inf)


def _anderson_weights(gram: torch.Tensor) -> torch.Tensor:
    """Per-sample weights α summing to 1 that minimise ``‖Σ_i α_i r_i‖``, given the ``(B, n, n)`` Gram matrix
    ``A_ij = ⟨r_i, r_j⟩`` of the residual history: ``α ∝ A⁻¹1``, solved in float64 after Jacobi scaling
    ``Â = D^{-1/2} A D^{-1/2}`` (unit diagonal) with a small ridge for nearly collinear residuals."""
    ridge = 100 * torch.finfo(gram.dtype).eps
    a = gram.double()
    d = a.diagonal(dim1=1, dim2=2).clamp_min(torch.finfo(torch.float64).tiny ** 0.5).rsqrt()
    a_hat = a * d[:, :, None] * d[:, None, :]
    a_hat = a_hat + ridge * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    w = d * torch.linalg.solve(a_hat, d)
    return (w / w.sum(dim=1, keepdim=True)).to(gram.dtype)


@torch.no_grad()
def solve_fixed_point(
        g: TensorMap, x0: torch.Tensor, tol: float, max_iter: int, memory: int = 5, extrapolate: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, SolverStats]:
    """Solve ``x = g(x)`` for a batch (dim 0 indexes samples); nothing is differentiated through the iterations.

    ``memory == 1`` is fixed-point iteration ``x ← g(x)``; ``memory > 1`` is Anderson acceleration: the next
    iterate is ``Σ α_i g(x_i)`` over the last ``memory`` iterates, α minimising ``‖Σ α_i (g(x_i) − x_i)‖`` with
    ``Σ α_i = 1``. With ``extrapolate`` (and ``memory > 1``) the iteration is plain and those weights are computed
    once, at the end (reduced-rank extrapolation, for affine maps such as the backward's adjoint system): the
    extrapolated iterate ``Σ α_i x_i`` has the residual ``Σ α_i r_i`` (exact when ``g`` is affine, an estimate
    otherwise) and the image ``Σ α_i g(x_i)``; it spans the Krylov space Anderson explores without its
    per-iteration mixing. Every evaluation ``g(x)`` measures the residual at ``x``; each sample keeps the iterate
    (or the extrapolation) with its smallest residual. Stops when every sample is within ``tol`` or after
    ``max_iter`` evaluations.

    Returns ``(x, g(x), stats)`` for those best iterates; ``g(x)`` is one more application of the map (a better
    solution when ``g`` is a contraction) and costs nothing extra.
    """
    batch, dim = x0.shape[0], x0[0].numel()
    mask_shape = (-1,) + (1,) * (x0.dim() - 1)
    mixing = memory > 1 and not extrapolate
    slots = min(memory, max_iter)
    if slots > 1:  # the residuals r_i = g(x_i) − x_i of the last `slots` evaluations
        residuals = x0.new_empty(batch, slots, dim)
    if mixing:  # Anderson: the images g(x_i) too, and the residuals' Gram matrix
        images = x0.new_empty(batch, slots, dim)
        gram = x0.new_zeros(batch, slots, slots)
    kept_images: List[Optional[torch.Tensor]] = [None] * slots  # extrapolation: the images themselves
    x = x0
    best_x = best_gx = best_res = None

    def keep_better(x, gx, res):
        nonlocal best_x, best_gx, best_res
        better = None if best_res is None else res < best_res
        if better is None or bool(better.all()):
            best_x, best_gx, best_res = x, gx, res
        else:
            best_x = torch.where(better.view(mask_shape), x, best_x)
            best_gx = torch.where(better.view(mask_shape), gx, best_gx)
            best_res = torch.where(better, res, best_res)

    iterations = 0
    for iterations in range(1, max_iter + 1):
        gx = g(x)
        slot, n = (iterations - 1) % slots, min(iterations, slots)
        r = gx - x  # not computed into the buffer with out=: forward-mode AD (Jacobian analysis) refuses out=
        keep_better(x, gx, _relative_residual(r, gx))
        if slots > 1:
            residuals[:, slot] = r.flatten(1)
        if extrapolate:
            kept_images[slot] = gx
        if best_res.max() <= tol:
            break
        if not mixing:
            x = gx
            continue
        images[:, slot] = gx.flatten(1)
        # (1 × dim)·(dim × n): a matrix product; the (n × dim)·(dim × 1) orientation is ~10× slower on CPU
        dots = torch.bmm(residuals[:, slot, None, :], residuals[:, :n].transpose(1, 2)).squeeze(1)
        gram[:, slot, :n] = dots
        gram[:, :n, slot] = dots
        if n == 1:  # a single iterate mixes to itself
            x = gx
            continue
        alpha = _anderson_weights(gram[:, :n, :n])
        x = torch.bmm(alpha[:, None, :], images[:, :n]).view_as(x0)
    if extrapolate and n > 1:
        keep_better(*_extrapolation(kept_images[:n], residuals[:, :n]))
    worst = float(best_res.max())
    return best_x, best_gx, SolverStats(iterations, worst, worst <= tol, tol, max_iter)


def _extrapolation(images: Sequence[torch.Tensor], residuals: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Σ α_i x_i, Σ α_i g(x_i), relative residual of Σ α_i r_i)`` for the images ``g(x_i)`` and the
    ``(batch, n, dim)`` residuals ``r_i``, with the weights α minimising ``‖Σ α_i r_i‖``, ``Σ α_i = 1``."""
    alpha = _anderson_weights(torch.bmm(residuals, residuals.transpose(1, 2)))
    weight_shape = (-1,) + (1,) * (images[0].dim() - 1)
    image = images[0] * alpha[:, 0].view(weight_shape)
    for i in range(1, len(images)):
        image.addcmul_(images[i], alpha[:, i].view(weight_shape))
    residual = torch.bmm(alpha[:, None, :], residuals).view_as(image)
    return image - residual, image, _relative_residual(residual, image)


class SolverStatsLog:
    """Latest statistics of each (kind, step) solve of one network, and a once-only non-convergence warning.

    Kinds: ``'forward'`` (the step's fixed point), ``'backward'`` (the adjoint linear system) and
    ``'reconstruct'`` (an input recovered from an output by the reversible chain). A record replaces the
    previous one of the same kind and step, so the log always describes the latest forward/backward.
    """
    KINDS = ('forward', 'backward', 'reconstruct')

    def __init__(self):
        self.clear()
        self.warned = False

    def clear(self) -> None:
        """Forget every record (the once-only warning stays given)."""
        self.records: Dict[str, Dict[str, SolverStats]] = {kind: {} for kind in self.KINDS}

    def record(self, kind: str, name: str, stats: SolverStats) -> None:
        self.records[kind][name] = stats
        if not stats.converged and not self.warned:
            self.warned = True
            warnings.warn(
                f'{name}: the {kind} fixed-point solve did not converge (relative residual {stats.residual:.2e} > '
                f'tol {stats.tol:.1e} after {stats.iterations} iterations, max_iter {stats.max_iter}); its map may '
                f'not be a contraction (try a smaller step h or θ·h, or a larger iteration limit). Reported once per '
                f'model; solver_stats() shows every solve.',
                FixedPointConvergenceWarning, stacklevel=3)

    def summary(self) -> Dict[str, float]:
        """Flat numbers per kind: ``{kind}_iterations_mean/_max``, ``{kind}_residual_max``, ``{kind}_converged``,
        ``{kind}_solves``; ``converged`` over every solve. Empty when nothing has been solved."""
        out, every = {}, []
        for kind, records in self.records.items():
            stats = list(records.values())
            if not stats:
                continue
            every += stats
            iters = [s.iterations for s in stats]
            out[f'{kind}_iterations_mean'] = sum(iters) / len(iters)
            out[f'{kind}_iterations_max'] = max(iters)
            out[f'{kind}_residual_max'] = max(s.residual for s in stats)
            out[f'{kind}_converged'] = all(s.converged for s in stats)
            out[f'{kind}_solves'] = len(stats)
        if every:
            out['converged'] = all(s.converged for s in every)
        return out


class ImplicitMap(Protocol):
    """What the solvers need to know about an implicit step ``y = G(x, y)`` with parameters ``params``."""
    name: str

    def forward_map(self, x: torch.Tensor, *params: torch.Tensor) -> Tuple[TensorMap, torch.Tensor]:
        """``(y ↦ G(x, y), initial guess for y)``; differentiable in ``x`` and ``params``. The map may be a
        :class:`LinearizableMap`."""

    def inverse_map(self, y: torch.Tensor, *params: torch.Tensor) -> Tuple[TensorMap, torch.Tensor]:
        """``(a map whose fixed point is the x with G(x, y) = y, initial guess for x)``."""


class Linearization(Protocol):
    """``G(x, y)`` linearised at one ``y``: the two vector-Jacobian products of its implicit-function-theorem
    backward. It holds no tensors: those it needs (``saved``, returned with it by :func:`linearize`) are stored by
    autograd, so they are freed once the backward has run."""

    def state_vjp(self, saved: Sequence[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        """``(∂G/∂y)ᵀ v``."""

    def input_vjp(self, saved: Sequence[torch.Tensor], v: torch.Tensor,
                  needed: Sequence[bool]) -> List[Optional[torch.Tensor]]:
        """``(∂G/∂x)ᵀ v`` and ``(∂G/∂p)ᵀ v`` for each parameter, in ``forward_map``'s order; ``None`` where
        ``needed`` is false."""


class LinearizableMap(Protocol):
    """A map ``y ↦ G(x, y)`` that writes its own linearisation (instead of autograd's, :class:`GraphLinearization`)."""

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """``G(x, y)``."""

    def linearize(self, y: torch.Tensor) -> Tuple[Linearization, Tuple[torch.Tensor, ...]]:
        """``G`` linearised at ``y`` and the tensors its products need."""


class GraphLinearization:
    """The autograd :class:`Linearization`: ``G(x, y)`` applied once more, with a graph, at ``y`` (a leaf);
    saved are that output, ``y`` and the leaves of ``x`` and the parameters the map was built from."""

    @staticmethod
    def record(g: TensorMap, y: torch.Tensor,
               inputs: Sequence[torch.Tensor]) -> Tuple['GraphLinearization', Tuple[torch.Tensor, ...]]:
        y_leaf = y.detach().requires_grad_()
        with torch.enable_grad():
            out = g(y_leaf)
        return GraphLinearization(), (out, y_leaf, *inputs)

    @staticmethod
    def state_vjp(saved: Sequence[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        out, y_leaf = saved[:2]
        with torch.enable_grad():
            return torch.autograd.grad(out, y_leaf, v, retain_graph=True)[0]

    @staticmethod
    def input_vjp(saved: Sequence[torch.Tensor], v: torch.Tensor,
                  needed: Sequence[bool]) -> List[Optional[torch.Tensor]]:
        out, _, *inputs = saved
        wanted = [t for t, need in zip(inputs, needed) if need]
        with torch.enable_grad():
            found = iter(torch.autograd.grad(out, wanted, v, retain_graph=True, allow_unused=True) if wanted else ())
        return [next(found) if need else None for need in needed]


def linearize(g: TensorMap, y: torch.Tensor,
              inputs: Sequence[torch.Tensor]) -> Tuple[Linearization, Tuple[torch.Tensor, ...]]:
    """``g`` linearised at ``y``: its own :meth:`LinearizableMap.linearize` if it has one, else autograd's through
    one more application recorded with a graph (``g`` must then have been built with a graph from ``inputs``)."""
    own = getattr(g, 'linearize', None)
    return own(y) if own is not None else GraphLinearization.record(g, y, inputs)


def _solve(kind: str, name: str, g: TensorMap, x0: torch.Tensor, tol: float, max_iter: int,
           method: Dict[str, object], log: SolverStatsLog) -> Tuple[torch.Tensor, torch.Tensor]:
    x, gx, stats = solve_fixed_point(g, x0.detach(), tol, max_iter, **method)
    log.record(kind, name, stats)
    return x, gx


def _implicit_vjp(linearization: Linearization, saved: Sequence[torch.Tensor], grad: torch.Tensor,
                  needed: Sequence[bool], name: str, config: SolverConfig,
                  log: SolverStatsLog) -> List[Optional[torch.Tensor]]:
    """Gradients w.r.t. the inputs (``x``, then the parameters) of the fixed point ``y = G(x, y)`` given ``grad``
    w.r.t. ``y``: the adjoint solve ``v = grad + (∂G/∂y)ᵀ v``, i.e. ``(I − ∂G/∂y)ᵀ v = grad``, then one push of
    ``v`` through ``G`` (w.r.t. the inputs only, nothing more back to ``y``). With ``backward_solver=
    'jacobian_free'`` there is no solve: ``v = grad``, and nothing is recorded."""
    if config.backward_solver == 'jacobian_free':
        return linearization.input_vjp(saved, grad, needed)

    def adjoint_map(v):
        return grad + linearization.state_vjp(saved, v)

    _, v = _solve('backward', name, adjoint_map, grad, config.backward_tol, config.backward_max_iter,
                  config.backward_method, log)
    return linearization.input_vjp(saved, v, needed)


@torch.no_grad()
def _solve_polished(g: TensorMap, y0: torch.Tensor, config: SolverConfig) -> Tuple[torch.Tensor, SolverStats]:
    """The forward solve, then one plain application of ``g`` to the solver's image: the output an implicit step
    returns and its backward linearises at, a contraction factor more accurate than the solver's own check. The
    statistics report the residual ``‖g(y_s) − y_s‖ / ‖g(y_s)‖`` of that image ``y_s`` (known from the output
    ``g(y_s)``): the output's own is smaller by the contraction factor."""
    _, image, stats = solve_fixed_point(g, y0.detach(), config.tol, config.max_iter, **config.forward_method)
    y = g(image)
    worst = float(_relative_residual(y - image, y).max())
    return y, SolverStats(stats.iterations, worst, worst <= stats.tol, stats.tol, stats.max_iter)


class _ImplicitStep(torch.autograd.Function):
    """``(x, params) ↦ y`` with ``y = G(x, y)``: the forward solve, then ``G`` linearised at the returned ``y``;
    backward: adjoint solve, then one push to ``x`` and ``params``."""

    @staticmethod
    def forward(ctx, step, config, log, x, *params):
        inputs = _leaves((x, *params))
        with torch.enable_grad():  # the map's graph from x and params, for maps linearised by autograd
            g, y0 = step.forward_map(*inputs)
        y, stats = _solve_polished(g, y0, config)
        log.record('forward', step.name, stats)
        ctx.linearization, saved = linearize(g, y, inputs)
        # Saved (not kept as attributes), so autograd frees them once the step's backward has run, unless the
        # caller retains the graph.
        ctx.save_for_backward(*saved)
        ctx.name, ctx.config, ctx.log = step.name, config, log
        return y

    @staticmethod
    @once_differentiable  # the adjoint solve runs without a graph: no second derivatives
    def backward(ctx, grad):
        grads = _implicit_vjp(ctx.linearization, ctx.saved_tensors, grad, ctx.needs_input_grad[3:], ctx.name,
                              ctx.config, ctx.log)
        return (None, None, None, *grads)


def _leaves(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Detached copies of ``tensors`` that require grad where the originals do (a graph of its own)."""
    return [t.detach().requires_grad_(t.requires_grad) for t in tensors]


def implicit_step(step: ImplicitMap, x: torch.Tensor, params: Sequence[torch.Tensor], config: SolverConfig,
                  log: SolverStatsLog) -> torch.Tensor:
    """``y`` with ``y = G(x, y)``, differentiable by the implicit function theorem.

    Returns ``y = G(x, G(x, y_k))`` for the solver's best iterate ``y_k`` (the solver's image plus one plain
    application: a contraction factor more accurate than the solver's stopping test, for one evaluation without
    a graph). With grad needed, ``G`` is linearised at that very ``y``: the adjoint system ``(I − ∂G/∂y)ᵀ v = g``
    at the output itself, so the gradient's accuracy follows the output's. In a network the gradient error is a
    large multiple of the outputs' error (ReLU kinks), which is why the output is polished: without it the
    gradients of ``implicit_trapezoid_resnet`` at tolerance 1e-4 were off by ~4e-4, with it by ~1.5e-5. The
    linearisation's tensors are all the step stores.

    ``config.backward_solver='jacobian_free'`` replaces the adjoint solution by ``g`` itself (Fung et al.,
    "JFB: Jacobian-Free Backpropagation for Implicit Networks", arXiv:2103.12803): the first term of
    ``v = Σ_k ((∂G/∂y)ᵀ)^k g``. It is not the gradient, but a descent direction when ``G`` contracts strongly
    enough, at the cost of the push alone; opt-in, never a default.
    """
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _ImplicitStep.apply(step, config, log, x, *params)
    g, y0 = step.forward_map(x, *params)
    y, stats = _solve_polished(g, y0, config)
    log.record('forward', step.name, stats)
    return y


@torch.no_grad()
def reconstruct_input(step: ImplicitMap, y: torch.Tensor, params: Sequence[torch.Tensor], config: SolverConfig,
                      log: SolverStatsLog) -> torch.Tensor:
    """The input ``x`` with ``G(x, y) = y``, solved to the forward tolerance (kind ``'reconstruct'``)."""
    r, x0 = step.inverse_map(y, *params)
    return _solve('reconstruct', step.name, r, x0, config.tol, config.max_iter, config.forward_method, log)[1]


class _ReversibleChain(torch.autograd.Function):
    """``x ↦ y_K`` through K implicit steps, storing only ``y_K`` (and the parameters)."""

    @staticmethod
    def forward(ctx, steps, config, log, sizes, x, *flat_params):
        params = _split(flat_params, sizes)
        for step, p in zip(steps, params):
            x = implicit_step(step, x, p, config, log)  # grad is off inside forward: no graph, no storage
        ctx.steps, ctx.config, ctx.log, ctx.sizes = steps, config, log, sizes
        ctx.save_for_backward(x, *flat_params)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, *flat_params = ctx.saved_tensors
        param_grads: List[Sequence[torch.Tensor]] = []
        for step, p in reversed(list(zip(ctx.steps, _split(flat_params, ctx.sizes)))):
            x = reconstruct_input(step, y, p, ctx.config, ctx.log)
            inputs = [t.detach().requires_grad_() for t in (x, *p)]
            with torch.enable_grad():
                g = step.forward_map(*inputs)[0]
            linearization, saved = linearize(g, y, inputs)
            grad, *grads = _implicit_vjp(linearization, saved, grad, [True] * len(inputs), step.name, ctx.config,
                                         ctx.log)
            param_grads.insert(0, grads)
            y = x
        return (None, None, None, None, grad) + tuple(g for grads in param_grads for g in grads)


def _split(flat: Sequence[torch.Tensor], sizes: Sequence[int]) -> List[Sequence[torch.Tensor]]:
    out, start = [], 0
    for size in sizes:
        out.append(tuple(flat[start:start + size]))
        start += size
    return out


def reversible_implicit_chain(steps: Sequence[ImplicitMap], x: torch.Tensor,
                              params: Sequence[Sequence[torch.Tensor]], config: SolverConfig,
                              log: SolverStatsLog) -> torch.Tensor:
    """Apply ``steps`` in order (``params[k]`` belongs to ``steps[k]``) storing only the final output.

    Backward walks the chain in reverse: reconstructs each step's input from its output
    (:func:`reconstruct_input`), recomputes that one step with a graph, and applies the same implicit-function-
    theorem gradient as :func:`implicit_step`. Exact up to the solver tolerances; meant for steps whose inverse is
    well conditioned (the trapezoidal rule is symmetric: its inverse is the same rule with ``−h``).
    """
    if len(steps) != len(params):
        raise ValueError(f'got {len(steps)} steps but {len(params)} parameter groups')
    sizes = [len(p) for p in params]
    flat = [t for p in params for t in p]
    return _ReversibleChain.apply(tuple(steps), config, log, sizes, x, *flat)
