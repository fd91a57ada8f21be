"""Memory-efficient backpropagation through a sequence of reversible additive couplings.

A *reversible sequence* maps a state tuple ``(x_0, …, x_{m-1})`` through a list of steps. A step is

* an :class:`AdditiveCoupling`, which updates ONE entry from ANOTHER,

      x_t ← ±x_t + β·x_s + γ·φ(x_s)        (s ≠ t; every other entry unchanged),

  and is inverted exactly by ``x_t = ±(x_t' − β·x_s − γ·φ(x_s))`` because ``x_s`` is unchanged; or
* any other callable ``state → state`` (pooling, padding, a change of width, …), which is not assumed to be
  invertible; memory-efficient mode keeps its input.

This covers the residual couplings of RevNets (Gomez et al., NeurIPS 2017) and the Hamiltonian, MidPoint
and Leapfrog discretisations of Chang et al. (AAAI 2018, arXiv:1709.03698).

:func:`reversible_sequence` runs the steps either with plain autograd (every intermediate activation kept
for backward) or with :class:`ReversibleSequenceFunction`, which keeps only the final state and the inputs of
the non-invertible steps. Its backward walks the steps in reverse; for a coupling it recomputes ``φ(x_s)``
once under grad, which gives at the same time the reconstructed input ``x_t`` and, through one
vector-Jacobian product, the gradients of ``x_s`` and of ``φ``'s parameters (Gomez et al., Algorithm 1).
Activation memory is therefore that of one ``φ`` plus a few state-sized tensors, whatever the depth; and,
unless backward runs with ``retain_graph``, each saved entry of the final state is freed as soon as backward has
reconstructed the input of its step (the first step's output entry before its recomputation). By default
(``keep_last_graph``) the last coupling, whose backward runs first, is not recomputed: its ``φ`` graph from
forward is kept (without ``φ``'s output) and its input entry saved in place of its output entry, so one
recomputation fewer per sequence for one ``φ``'s activations held from forward to backward.

The Function

* takes every parameter of the steps that requires grad as an explicit input and returns its gradient, so
  gradients reach parameters through the ordinary ``AccumulateGrad`` nodes: DDP's reducer hooks fire once
  per parameter as with plain autograd, and ``torch.autograd.grad`` w.r.t. the input works;
* restores every buffer of a step after recomputing it, so BatchNorm running statistics (and
  ``num_batches_tracked``) are updated exactly once per forward, as in plain autograd;
* records the RNG state before each step in forward and replays it when recomputing, so stochastic layers
  (dropout) draw the same masks; the caller's RNG state is left untouched by backward;
* re-enters the forward's autocast state in backward, so mixed precision recomputes with the same dtypes;
* is used only when gradients are needed: under ``torch.no_grad()``, or when neither the state nor any
  parameter requires grad, the steps simply run.

Numerical note: reconstruction is exact in exact arithmetic; in floating point each step adds a rounding
error, so reconstructed activations drift slowly with depth (tests measure it). Drift restarts from zero at
every non-invertible step, whose input is stored.
"""
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import get_device_states, set_device_states

__all__ = [
    'AdditiveCoupling', 'ReversibleSequenceFunction', 'reversible_sequence', 'invert_sequence', 'flatten_steps',
]

State = Tuple[torch.Tensor, ...]
Step = Callable[[State], State]


class AdditiveCoupling(nn.Module):
    """One reversible step on a state tuple: ``x_t ← ±x_t + β·x_s + γ·φ(x_s)``, all other entries unchanged.

    Args:
        fn: ``φ``, a module mapping ``x_s`` to a tensor of ``x_t``'s shape.
        target: index ``t`` of the entry that is updated.
        source: index ``s ≠ t`` of the entry ``φ`` reads.
        scale: ``γ``.
        source_scale: ``β`` (default 0).
        negate_target: ``True`` for ``−x_t`` (a Leapfrog step), ``False`` for ``+x_t``.
    """

    def __init__(
            self,
            fn: nn.Module,
            target: int,
            source: int,
            scale: float = 1.0,
            source_scale: float = 0.0,
            negate_target: bool = False,
    ):
        super().__init__()
        if target == source or min(target, source) < 0:
            raise ValueError(
                f'an additive coupling updates one state entry from ANOTHER one (target != source, both >= 0); '
                f'got target={target}, source={source}')
        self.fn = fn
        self.target = target
        self.source = source
        self.scale = float(scale)
        self.source_scale = float(source_scale)
        self.negate_target = bool(negate_target)

    def extra_repr(self) -> str:
        sign = '-' if self.negate_target else ''
        beta = f' + {self.source_scale:g}·x{self.source}' if self.source_scale else ''
        return f'x{self.target} ← {sign}x{self.target}{beta} + {self.scale:g}·fn(x{self.source})'

    def combine(self, x_target: torch.Tensor, x_source: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        """The step's new ``x_t = ±x_t + β·x_s + γ·fx`` given ``fx = φ(x_s)`` (one new tensor)."""
        out = torch.add(x_target, fx, alpha=-self.scale if self.negate_target else self.scale)
        if self.negate_target:
            out.neg_()
        return out.add_(x_source, alpha=self.source_scale) if self.source_scale else out

    def uncombine(self, y_target: torch.Tensor, x_source: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`combine`, ``x_t = ±(y_t − β·x_s − γ·fx)``, computed IN PLACE in ``fx`` (a buffer
        the caller owns and no longer needs; ``y_target`` and ``x_source`` are left alone), or out of place when
        autograd records (an inverse taken with gradients, e.g. to differentiate a reconstruction)."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in (y_target, x_source, fx)):
            out = y_target - self.scale * fx
            if self.source_scale:
                out = out - self.source_scale * x_source
            return -out if self.negate_target else out
        out = torch.add(y_target, fx, alpha=-self.scale, out=fx)  # one pass, one rounding
        if self.source_scale:
            out.sub_(x_source, alpha=self.source_scale)
        return out.neg_() if self.negate_target else out

    def forward(self, state: State) -> State:
        x_source = state[self.source]
        out = list(state)
        out[self.target] = self.combine(state[self.target], x_source, self.fn(x_source))
        return tuple(out)

    def inverse(self, state: State) -> State:
        x_source = state[self.source]
        out = list(state)
        out[self.target] = self.uncombine(state[self.target], x_source, self.fn(x_source).clone())
        return tuple(out)


def flatten_steps(steps: Sequence[Step]) -> List[Step]:
    """Expand ``nn.Sequential`` containers (e.g. a unit made of two couplings) into their steps."""
    flat = []
    for step in steps:
        if isinstance(step, nn.Sequential):
            flat.extend(flatten_steps(list(step)))
        else:
            flat.append(step)
    return flat


def _step_parameters(step: Step) -> List[nn.Parameter]:
    return [p for p in step.parameters() if p.requires_grad] if isinstance(step, nn.Module) else []


@contextmanager
def _buffers_restored(step: Step) -> Iterator[None]:
    """Undo whatever a recomputation does to the step's buffers (BatchNorm running statistics)."""
    buffers = [b for b in step.buffers() if b is not None] if isinstance(step, nn.Module) else []
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


class _RngState:
    """The CPU RNG state and that of the accelerator holding ``like``, as ``torch.utils.checkpoint`` keeps."""

    def __init__(self, like: torch.Tensor):
        self.cpu = torch.get_rng_state()
        self.device_type = like.device.type
        self.devices, self.device_states = get_device_states(like)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        set_device_states(self.devices, self.device_states, device_type=self.device_type)

    def same_as(self, other: '_RngState') -> bool:
        return torch.equal(self.cpu, other.cpu) and all(
            torch.equal(a, b) for a, b in zip(self.device_states, other.device_states))


class ReversibleSequenceFunction(torch.autograd.Function):
    """``(state…, params…) → final state`` through ``steps``, keeping only the final state and the inputs of
    the non-invertible steps for backward (with ``keep_last_graph``, the last coupling's input entry in place of
    its output entry, and its ``φ`` graph; see the module docstring).

    Call as ``ReversibleSequenceFunction.apply(steps, preserve_rng_state, keep_last_graph, len(state), *state,
    *params)`` with ``steps`` already flattened and ``params`` every parameter of the steps that requires grad.
    """

    @staticmethod
    def forward(ctx, steps: List[Step], preserve_rng_state: bool, keep_last_graph: bool, num_state: int,
                *tensors: torch.Tensor):
        inputs, params = tensors[:num_state], tensors[num_state:]
        device_type = inputs[0].device.type
        ctx.steps = steps
        ctx.param_index = {id(p): i for i, p in enumerate(params)}
        ctx.params = params
        ctx.device_type = device_type
        ctx.autocast = dict(
            device_type=device_type,
            enabled=torch.is_autocast_enabled(device_type),
            dtype=torch.get_autocast_dtype(device_type),
            cache_enabled=torch.is_autocast_cache_enabled(),
        )
        ctx.rng_states = [] if preserve_rng_state else None
        kept, kept_sizes = [], []
        state = tuple(inputs)
        last_coupling = steps[-1] if keep_last_graph and isinstance(steps[-1], AdditiveCoupling) else None
        ctx.keep_last_graph = last_coupling is not None
        ctx.last_phi = None
        for index, step in enumerate(steps):
            if preserve_rng_state:
                # Steps that draw no random numbers share one record: no long-lived small allocation per step
                # in between the large temporaries (heap fragmentation inflates the resident set on CPU).
                rng = _RngState(state[0])
                ctx.rng_states.append(ctx.rng_states[-1] if ctx.rng_states and rng.same_as(ctx.rng_states[-1]) else rng)
            if not isinstance(step, AdditiveCoupling):
                kept.extend(state)
                kept_sizes.append(len(state))
            if last_coupling is not None and index == len(steps) - 1:  # see _coupling_with_graph
                last_input = state[step.target]
                state, ctx.last_phi = _coupling_with_graph(step, state)
            else:
                state = step(state)
        # An entry no step touched is still an input tensor; a Function must return new tensors.
        seen = {id(t) for t in inputs}
        outputs = []
        for t in state:
            outputs.append(t.clone() if id(t) in seen else t)
            seen.add(id(outputs[-1]))
        ctx.num_outputs = len(outputs)
        ctx.kept_sizes = kept_sizes
        # The last coupling's input entry is saved in place of its output entry (the same size): backward then needs
        # neither to reconstruct it nor φ(x_s), and φ's graph from forward is kept without its output.
        final = list(outputs)
        if last_coupling is not None:
            final[last_coupling.target] = last_input
        ctx.save_for_backward(*final, *kept)
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: torch.Tensor):
        saved = ctx.saved_tensors
        # Without retain_graph, autograd lets go of the saved tensors now rather than after this backward: the
        # lists below then hold the only references, and each saved entry of the state is freed as soon as the
        # walk has replaced it by the reconstructed input of its step. With retain_graph they stay saved, so
        # backward can run again.
        ctx.maybe_clear_saved_tensors()
        # Nothing saved or received is written to, and no state-sized copy is made: each coupling writes its
        # reconstructed input into the buffer of its recomputed φ(x_s), and the new gradient of x_s into the buffer
        # autograd returned for φ's input gradient. The last coupling's input is saved (see forward).
        state = [t.detach() for t in saved[:ctx.num_outputs]]
        kept = list(saved[ctx.num_outputs:])
        del saved
        grads = list(grad_outputs)
        # Parameter gradients are allocated up front rather than one per step between the large temporaries.
        param_grads = [torch.zeros_like(p) for p in ctx.params]

        def accumulate(params: List[nn.Parameter], step_grads: Sequence[Optional[torch.Tensor]], scale: float):
            for p, g in zip(params, step_grads):
                if g is not None:
                    param_grads[ctx.param_index[id(p)]].add_(g, alpha=scale)

        kept_sizes = list(ctx.kept_sizes)  # local copies: backward may run again with retain_graph=True
        rng_devices = ctx.rng_states[0].devices if ctx.rng_states else []
        with torch.random.fork_rng(devices=rng_devices, enabled=ctx.rng_states is not None,
                                   device_type=ctx.device_type), torch.autocast(**ctx.autocast):
            for index in reversed(range(len(ctx.steps))):
                step = ctx.steps[index]
                if ctx.rng_states is not None:
                    ctx.rng_states[index].restore()
                params = _step_parameters(step)
                if isinstance(step, AdditiveCoupling):
                    # with keep_last_graph, the last step's input is saved, and its φ graph from forward serves
                    # the first backward only (autograd.grad frees it: a backward run again recomputes that φ)
                    kept_input = ctx.keep_last_graph and index == len(ctx.steps) - 1
                    recorded = None
                    if kept_input:
                        recorded, ctx.last_phi = ctx.last_phi, None
                    if index == 0:
                        state[step.target] = None  # nothing needs the sequence's input: let go of it before φ
                    step_grads = _coupling_backward(step, state, grads, params,
                                                    reconstruct=index > 0 and not kept_input, recorded=recorded)
                    scale = step.scale  # dθ = γ·J_θᵀ dy_t, scaled as it is accumulated
                else:
                    size = kept_sizes.pop()
                    step_inputs, kept = kept[len(kept) - size:], kept[:len(kept) - size]
                    grads, step_grads = _recompute_backward(step, step_inputs, grads, params)
                    scale = 1.0
                    state = [t.detach() for t in step_inputs]
                    del step_inputs
                accumulate(params, step_grads, scale)
        input_grads = [g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[4:])]
        return (None, None, None, None, *input_grads, *param_grads)


def _non_leaf(leaf: torch.Tensor) -> torch.Tensor:
    """An alias of ``leaf`` that is not a leaf, to feed a recomputation differentiated w.r.t. ``leaf``. Module
    hooks that track gradients of module inputs (``torch.utils.flop_counter.FlopCounterMode``, PyTorch's module
    and memory trackers) fail on a leaf input inside the nested ``autograd.grad`` of a backward."""
    return leaf.view_as(leaf)


def _phi_with_graph(step: AdditiveCoupling, x_source: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x_s, φ(x_s))`` with ``φ`` recorded under grad from ``x_s`` as a new leaf that requires grad."""
    x_source = x_source.detach().requires_grad_()
    with torch.enable_grad():
        return x_source, step.fn(_non_leaf(x_source))


def _detached(t: torch.Tensor) -> torch.Tensor:
    """Saved-tensor hook (pack and unpack) that stores the tensor itself, without its ``grad_fn``: a tensor
    saved by the operation that made it then holds no reference cycle and is freed without the garbage
    collector."""
    return t.detach()


RecordedPhi = Tuple[torch.Tensor, torch.autograd.graph.GradientEdge, torch.dtype]


def _coupling_with_graph(step: AdditiveCoupling, state: State) -> Tuple[State, RecordedPhi]:
    """The coupling's output state, and ``(x_s, φ's gradient edge, φ's dtype)``: ``φ(x_s)``'s graph without the
    tensor ``φ(x_s)`` itself, for backward to use instead of a recomputation. The graph keeps its saved tensors
    itself (inner saved-tensor hooks take precedence over the caller's): the hooks of a non-reentrant
    ``torch.utils.checkpoint`` around the sequence would otherwise replace them by a recomputation that the
    nested ``autograd.grad`` of backward cannot trigger."""
    with torch.autograd.graph.saved_tensors_hooks(_detached, _detached):
        x_source, fx = _phi_with_graph(step, state[step.source])
    out = list(state)
    out[step.target] = step.combine(state[step.target], state[step.source], fx.detach())
    return tuple(out), (x_source, torch.autograd.graph.get_gradient_edge(fx), fx.dtype)


def _coupling_backward(step: AdditiveCoupling, state, grads, params, reconstruct: bool = True,
                       recorded: Optional[RecordedPhi] = None):
    """Push the gradients through the coupling, replacing the entries of the (backward's own) ``state`` and
    ``grads`` lists; the tensors they held are not written to. ``reconstruct``: ``state[t]`` holds the
    coupling's output, replaced by its input reconstructed from ``φ(x_s)``; otherwise it holds the input
    already (or ``None``: the caller does not need it). ``φ(x_s)`` is recomputed, or its graph from forward
    taken from ``recorded`` (see :func:`_coupling_with_graph`; it cannot reconstruct).
    Returns the parameter gradients ``J_θᵀ dy_t`` of ``φ``, not yet multiplied by ``γ``."""
    t, s = step.target, step.source
    grad_target = grads[t]
    if recorded is not None:  # φ ran in forward, the one run that updates the buffers
        x_source, fx_edge, dtype = recorded
        found = _phi_vjp(fx_edge, dtype, x_source, params, grad_target, grads)
    else:
        # Buffers are restored only after autograd.grad: BatchNorm saves its running statistics for backward.
        with _buffers_restored(step):
            x_source, fx = _phi_with_graph(step, state[s])
            found = _phi_vjp(fx, fx.dtype, x_source, params, grad_target, grads)
        if reconstruct:
            fx = fx.detach()
            if fx.dtype != state[t].dtype or fx.untyped_storage().data_ptr() == x_source.untyped_storage().data_ptr():
                fx = fx.to(state[t].dtype, copy=True)  # autocast's lower precision, or φ returned (a view of) x_s
            state[t] = step.uncombine(state[t], state[s], fx)
        del fx
    # y_t = ±x_t + β·x_s + γ·φ(x_s):  dx_t = ±dy_t,  dx_s = dy_s + β·dy_t + γ·J_φᵀ dy_t,  dθ = γ·J_θᵀ dy_t
    grad_source = grads[s] if found[0] is None else torch.add(grads[s], found[0], alpha=step.scale, out=found[0])
    if step.source_scale:
        grad_source = grad_source.add(grad_target, alpha=step.source_scale) if found[0] is None else \
            grad_source.add_(grad_target, alpha=step.source_scale)
    grads[s] = grad_source
    if step.negate_target:
        grads[t] = -grad_target
    return found[1:]  # J_θᵀ dy_t: the caller accumulates γ times it


def _phi_vjp(fx, dtype, x_source, params, grad_target, grads):
    """``(J_φᵀ dy_t w.r.t. x_s, then each parameter)`` through the graph of ``fx`` (a tensor or its gradient
    edge), each gradient a tensor of its own (see :func:`_private`)."""
    return _private(torch.autograd.grad(
        fx, [x_source, *params], grad_outputs=grad_target.to(dtype), allow_unused=True), grads)


def _recompute_backward(step: Step, step_inputs, grads, params):
    """Recompute a non-invertible step from its kept input and push the gradients through it."""
    inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in step_inputs]
    wrt = [x for x in inputs if x.requires_grad]
    with _buffers_restored(step):
        with torch.enable_grad():
            outputs = step(tuple(_non_leaf(x) if x.requires_grad else x for x in inputs))
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
        found = torch.autograd.grad(
            [o for o, _ in pairs], [*wrt, *params], grad_outputs=[g.to(o.dtype) for o, g in pairs],
            allow_unused=True) if pairs else [None] * (len(wrt) + len(params))
    by_input = dict(zip(map(id, wrt), found))
    input_grads = [by_input.get(id(x)) for x in inputs]
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, input_grads)], found[len(wrt):]


def _private(found: Sequence[Optional[torch.Tensor]], others: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """``found`` with copies of the tensors that share memory with ``others`` or with an earlier entry (autograd
    may hand the incoming gradient itself back, e.g. through an addition), so each can be updated in place."""
    seen = {t.untyped_storage().data_ptr() for t in others}
    out = []
    for g in found:
        if g is not None:
            g = g.clone() if g.untyped_storage().data_ptr() in seen else g
            seen.add(g.untyped_storage().data_ptr())
        out.append(g)
    return out


def reversible_sequence(
        steps: Sequence[Step],
        state: Sequence[torch.Tensor],
        memory_efficient: bool = True,
        preserve_rng_state: bool = True,
        keep_last_graph: bool = True,
) -> State:
    """Run ``state`` through ``steps`` (``nn.Sequential`` containers expanded).

    With ``memory_efficient=True`` and gradients needed, backward reconstructs the activations of the
    :class:`AdditiveCoupling` steps instead of keeping them (see the module docstring); otherwise the steps
    run under plain autograd. ``preserve_rng_state=False`` skips recording the RNG state per step (only
    safe when no step draws random numbers in training). ``keep_last_graph`` (when the last step is a coupling):
    keep that coupling's ``φ`` graph from forward for backward, which then recomputes one ``φ`` fewer, at the
    price of holding ``φ``'s activations from this forward until backward reaches the sequence: worth it when
    nothing big runs in between (a sequence whose backward follows its forward, a network's last stage).
    """
    state = tuple(state)
    if not state or not all(isinstance(t, torch.Tensor) for t in state):
        raise ValueError(f'state must be a non-empty sequence of tensors, got {state!r}')
    steps = flatten_steps(steps)
    if memory_efficient and torch.is_grad_enabled():
        params = list({id(p): p for step in steps for p in _step_parameters(step)}.values())
        if params or any(t.requires_grad for t in state):
            return ReversibleSequenceFunction.apply(
                steps, preserve_rng_state, keep_last_graph, len(state), *state, *params)
    for step in steps:
        state = step(state)
    return state


def invert_sequence(steps: Sequence[Step], state: Sequence[torch.Tensor]) -> State:
    """The input of a sequence of couplings reconstructed from its output (the inverse map; what backward
    does in memory-efficient mode, without the gradients). Raises ``ValueError`` on a non-invertible step."""
    state = tuple(state)
    for step in reversed(flatten_steps(steps)):
        if not isinstance(step, AdditiveCoupling):
            raise ValueError(f'{step!r} is not an AdditiveCoupling and cannot be inverted')
        state = step.inverse(state)
    return state
