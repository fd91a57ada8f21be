"""The model-agnostic reversible Function: exact inversion, gradients equal to plain autograd, BatchNorm
statistics updated once, dropout masks replayed, input gradients, autocast, and O(1) stored activations."""
import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn
from model_checks import counting_saved_bytes

from odenet_timm.layers.reversible import (
    AdditiveCoupling, ReversibleSequenceFunction, invert_sequence, reversible_sequence,
)

C = 4


def _fn(dropout: float = 0.0) -> nn.Module:
    layers = [nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C), nn.Tanh()]  # no bias: BN cancels it
    return nn.Sequential(*layers, nn.Dropout(dropout)) if dropout else nn.Sequential(*layers)


def _couplings(n: int, dropout: float = 0.0):
    """Alternating couplings exercising every coefficient: ±x_t, β·x_s and γ·φ(x_s)."""
    return [
        AdditiveCoupling(_fn(dropout), target=i % 2, source=1 - i % 2, scale=0.5 - 0.2 * i,
                         source_scale=0.7 if i % 2 else 0.0, negate_target=i % 3 == 1)
        for i in range(n)
    ]


class PoolShift(nn.Module):
    """A non-invertible step with parameters: ``(a, b) → (pool(a)·s, pool(b) + t)``."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(1.3))
        self.t = nn.Parameter(torch.randn(1, C, 1, 1))

    def forward(self, state):
        a, b = state
        return nn.functional.avg_pool2d(a, 2) * self.s, nn.functional.avg_pool2d(b, 2) + self.t


def _sequence(dropout: float = 0.0, n: int = 3) -> nn.ModuleList:
    return nn.ModuleList([*_couplings(n, dropout), PoolShift(), *_couplings(n, dropout)]).double().train()


def _state(batch: int = 3, size: int = 8):
    return [torch.randn(batch, C, size, size, dtype=torch.float64) for _ in range(2)]


def _grads(steps, inputs, memory_efficient, seed=0, weights=None):
    """Output, and gradients of a random linear functional of it w.r.t. the inputs and every parameter."""
    params = [p for m in steps for p in m.parameters()]
    state = [x.clone().requires_grad_() for x in inputs]
    torch.manual_seed(seed)
    out = reversible_sequence(list(steps), state, memory_efficient=memory_efficient)
    if weights is None:
        weights = [torch.randn_like(o) for o in out]
    loss = sum((o * w).sum() for o, w in zip(out, weights))
    return out, torch.autograd.grad(loss, [*state, *params]), weights


def _assert_close_rel(actual, expected, rtol):
    for a, e in zip(actual, expected):
        assert (a - e).norm() <= rtol * e.norm() + 1e-300, f'relative error {((a - e).norm() / e.norm()).item():.3g}'


def test_couplings_invert_exactly_in_float64():
    steps = nn.ModuleList(_couplings(6)).double().eval()
    state = _state()
    with torch.no_grad():
        out = reversible_sequence(list(steps), state)
        back = invert_sequence(list(steps), out)
        for x, y in zip(state, back):
            assert (x - y).abs().max() < 1e-10
        # one step: x_t ← ±x_t + β x_s + γ φ(x_s), the other entry untouched
        step = steps[1]
        y = step(tuple(state))
        assert y[0] is state[0]
        expected = -state[1] + 0.7 * state[0] + step.scale * step.fn(state[0])
        torch.testing.assert_close(y[1], expected, rtol=0, atol=1e-14)


def test_non_invertible_steps_cannot_be_inverted_and_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match='cannot be inverted'):
        invert_sequence([PoolShift()], _state())
    with pytest.raises(ValueError, match='target != source'):
        AdditiveCoupling(_fn(), target=1, source=1)
    with pytest.raises(ValueError, match='non-empty sequence of tensors'):
        reversible_sequence([], [])


def test_gradients_equal_plain_autograd_float64():
    steps, inputs = _sequence(), _state()
    out_plain, plain, weights = _grads(steps, inputs, memory_efficient=False)
    out_rev, rev, _ = _grads(steps, inputs, memory_efficient=True, weights=weights)
    for a, b in zip(out_rev, out_plain):
        assert torch.equal(a, b)  # the same forward computation
    _assert_close_rel(rev, plain, 1e-8)


def test_batchnorm_statistics_are_updated_exactly_once():
    base, inputs = _sequence(), _state()
    models = {}
    for memory_efficient in (False, True):
        steps = copy.deepcopy(base)
        _grads(steps, inputs, memory_efficient=memory_efficient)
        models[memory_efficient] = steps
    plain, rev = models[False].state_dict(), models[True].state_dict()
    for key, value in plain.items():
        if 'running' in key or 'num_batches' in key:
            assert torch.equal(rev[key], value), key
    assert all(v.item() == 1 for k, v in rev.items() if k.endswith('num_batches_tracked'))


def test_dropout_masks_are_replayed_and_the_callers_rng_is_untouched():
    steps, inputs = _sequence(dropout=0.5), _state()
    _, plain, weights = _grads(steps, inputs, memory_efficient=False, seed=3)
    _, rev, _ = _grads(steps, inputs, memory_efficient=True, seed=3, weights=weights)
    _assert_close_rel(rev, plain, 1e-8)
    _, other_seed, _ = _grads(steps, inputs, memory_efficient=True, seed=4, weights=weights)
    assert not torch.allclose(other_seed[0], plain[0])  # the masks do matter

    state = [x.clone().requires_grad_() for x in inputs]
    out = reversible_sequence(list(steps), state)
    after_forward = torch.get_rng_state()
    sum(o.sum() for o in out).backward()
    assert torch.equal(torch.get_rng_state(), after_forward)


def test_input_gradient_through_autograd_grad_in_eval_mode():
    steps, inputs = _sequence().eval(), _state()
    results = []
    for memory_efficient in (False, True):
        state = [x.clone().requires_grad_() for x in inputs]
        out = reversible_sequence(list(steps), state, memory_efficient=memory_efficient)
        results.append(torch.autograd.grad(out[0].square().sum() + out[1].sum(), state))
    _assert_close_rel(results[1], results[0], 1e-8)


class FullBias(nn.Module):
    """``φ(x) = x + b`` with a full-shaped ``b``: autograd hands the incoming gradient itself back to both ``x`` and
    ``b``, the case where updating a gradient in place would corrupt another."""

    def __init__(self, shape):
        super().__init__()
        self.b = nn.Parameter(torch.randn(shape, dtype=torch.float64))

    def forward(self, x):
        return x + self.b


def test_gradients_when_phi_passes_the_incoming_gradient_through():
    shape = (3, C, 8, 8)
    steps = nn.ModuleList([
        AdditiveCoupling(FullBias(shape), target=0, source=1, scale=0.5),
        AdditiveCoupling(FullBias(shape), target=1, source=0, scale=-0.3, source_scale=0.7, negate_target=True),
        AdditiveCoupling(nn.Identity(), target=0, source=1, scale=2.0),  # φ returns its input itself
        AdditiveCoupling(FullBias(shape), target=1, source=0, scale=1.5),
    ])
    inputs = _state()
    out_plain, plain, weights = _grads(steps, inputs, memory_efficient=False)
    saved_outputs = [o.clone() for o in out_plain]
    _, rev, _ = _grads(steps, inputs, memory_efficient=True, weights=weights)
    _assert_close_rel(rev, plain, 1e-12)
    for a, b in zip(out_plain, saved_outputs):
        assert torch.equal(a, b)


@pytest.mark.parametrize('keep_last_graph', [True, False])
def test_backward_recomputes_every_phi_but_the_last_one_and_all_of_them_when_run_again(keep_last_graph):
    """With keep_last_graph, the last coupling's φ graph from forward serves the first backward; a second one
    (retain_graph) recomputes that φ too. Without, every backward recomputes every φ. The gradients are the same
    (bitwise for the two backwards of one forward; to rounding across the options: without, the last coupling's
    input is reconstructed rather than saved)."""
    steps, inputs = _sequence(), _state()  # couplings 0-2, pooling step 3, couplings 4-6
    runs = []
    for index, step in enumerate(steps):
        if isinstance(step, AdditiveCoupling):
            step.fn.register_forward_hook(lambda module, args, out, index=index: runs.append(index))
    results = []
    for keep in (keep_last_graph, False):
        state = [x.clone().requires_grad_() for x in inputs]
        loss = sum(o.square().sum() for o in reversible_sequence(list(steps), state, keep_last_graph=keep))
        assert runs == [0, 1, 2, 4, 5, 6]
        runs.clear()
        results.append(torch.autograd.grad(loss, state, retain_graph=True))
        assert runs == ([5, 4, 2, 1, 0] if keep else [6, 5, 4, 2, 1, 0])
        runs.clear()
        results.append(torch.autograd.grad(loss, state))
        assert runs == [6, 5, 4, 2, 1, 0]
        runs.clear()
    for first, second in (results[:2], results[2:]):
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    _assert_close_rel(results[2], results[0], 1e-12)


def test_gradients_under_non_reentrant_checkpointing():
    """torch.utils.checkpoint's saved-tensor hooks around the sequence do not reach the φ graph the last coupling
    keeps from forward: otherwise backward's autograd.grad on it would recompute the whole checkpointed sequence
    once more (6 more φ runs; with a context_fn that can be entered once, e.g. checkpoint_blocks', it fails)."""
    from torch.utils.checkpoint import checkpoint
    steps, inputs = _sequence(), _state()
    _, plain, weights = _grads(steps, inputs, memory_efficient=False)
    runs = []
    for step in steps:
        if isinstance(step, AdditiveCoupling):
            step.fn.register_forward_hook(lambda *args: runs.append(1))
    state = [x.clone().requires_grad_() for x in inputs]
    out = checkpoint(lambda *s: reversible_sequence(list(steps), s), *state, use_reentrant=False)
    params = [p for m in steps for p in m.parameters()]
    found = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), [*state, *params])
    _assert_close_rel(found, plain, 1e-8)
    assert len(runs) == 6 + 6 + 5  # forward, checkpoint's recomputation of it, backward's recomputations


@pytest.mark.parametrize('run_backward', [False, True])
def test_the_graph_kept_from_forward_is_freed_without_the_garbage_collector(run_backward):
    """The last coupling's φ (ending in tanh, which saves its own output) keeps its graph from forward to backward;
    it is freed by backward, or with the outputs when no backward runs, by reference counting alone."""
    last = _fn().double()
    outputs = []
    last.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out.untyped_storage())))
    steps = [AdditiveCoupling(_fn().double(), target=0, source=1), AdditiveCoupling(last, target=1, source=0)]
    state = [x.clone().requires_grad_() for x in _state()]
    gc.disable()
    try:
        out = reversible_sequence(steps, state)
        assert outputs[0]() is not None
        if run_backward:
            torch.autograd.grad(sum(o.sum() for o in out), state)
        del out
        assert len(outputs) == 1 and outputs[0]() is None
    finally:
        gc.enable()


class Probe(nn.Module):
    """``φ(x) = 0.5·x`` that records, each time it runs under grad (the recomputations in backward), how many of
    the storages in ``watched`` are still allocated."""

    def __init__(self):
        super().__init__()
        self.watched, self.alive_when_recomputed = [], []

    def forward(self, x):
        if torch.is_grad_enabled():
            self.alive_when_recomputed.append(sum(ref() is not None for ref in self.watched))
        return 0.5 * x


@pytest.mark.parametrize('retain_graph', [False, True])
def test_saved_state_is_freed_as_soon_as_backward_no_longer_needs_it(retain_graph):
    """The Function saves the final state with the last coupling's output entry replaced by that coupling's input,
    so that output entry goes with the outputs. Backward frees each saved entry once the walk has replaced it
    (without retain_graph) and lets go of the first step's output before its recomputation; with retain_graph
    every saved entry stays alive."""
    probe = Probe()
    steps = [AdditiveCoupling(probe, target=0, source=1), AdditiveCoupling(_fn().double(), target=1, source=0),
             AdditiveCoupling(_fn().double(), target=0, source=1)]
    state = [x.clone().requires_grad_() for x in _state()]
    out = reversible_sequence(steps, state)
    loss = sum(o.sum() for o in out)  # a sum saves nothing: the Function's saved tensors alone hold the state
    last_output = weakref.ref(out[0].untyped_storage())
    probe.watched = [weakref.ref(t.untyped_storage()) for t in out[0].grad_fn.saved_tensors]
    del out
    assert last_output() is None and sum(ref() is not None for ref in probe.watched) == 2
    grads = torch.autograd.grad(loss, state, retain_graph=retain_graph)
    # φ of step 0 ran last: step 2 needed no reconstruction (its input x₀ is saved, dropped before step 0's φ),
    # step 1 reconstructed x₁ from its saved output
    assert probe.alive_when_recomputed == ([2] if retain_graph else [0])
    assert all(g.abs().sum() > 0 for g in grads)


def test_not_used_when_no_gradient_is_needed(monkeypatch):
    calls = []
    apply = ReversibleSequenceFunction.apply
    monkeypatch.setattr(ReversibleSequenceFunction, 'apply', lambda *a: calls.append(1) or apply(*a))
    steps, inputs = _sequence(), _state()
    with torch.no_grad():
        reversible_sequence(list(steps), inputs)
    steps.requires_grad_(False)
    reversible_sequence(list(steps), inputs)  # nothing requires grad
    assert calls == []
    out = reversible_sequence(list(steps), [inputs[0].requires_grad_(), inputs[1]])
    assert calls == [1] and out[0].requires_grad


def _saved_bytes(steps, inputs, memory_efficient):
    with counting_saved_bytes() as total:
        reversible_sequence(list(steps), [x.clone().requires_grad_() for x in inputs],
                            memory_efficient=memory_efficient)
    return sum(total)


def test_stored_activations_do_not_grow_with_depth():
    inputs = _state()
    shallow, deep = _sequence(n=2), _sequence(n=8)
    assert _saved_bytes(shallow, inputs, True) == _saved_bytes(deep, inputs, True)
    # exactly the final state (2 entries, pooled; the last coupling's input entry in place of its output entry),
    # the kept input of the pooling step (2 entries), float64, and what the last coupling's φ saves on its pooled
    # input (its graph from forward, which backward uses)
    n = inputs[0].numel()
    last = deep[-1]
    with counting_saved_bytes() as phi_bytes:
        last.fn(torch.randn(3, C, 4, 4, dtype=torch.float64, requires_grad=True))
    assert sum(phi_bytes) > 8 * n // 4
    assert _saved_bytes(deep, inputs, True) == 8 * (2 * (n // 4) + 2 * n) + sum(phi_bytes)
    assert _saved_bytes(deep, inputs, False) > 3 * _saved_bytes(shallow, inputs, False)


def test_autocast_bfloat16_runs_and_stays_close_to_plain():
    steps = _sequence().float()
    inputs = [x.float() for x in _state()]
    results = []
    for memory_efficient in (False, True):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out, grads, _ = _grads(steps, inputs, memory_efficient=memory_efficient, weights=[
                torch.ones(3, C, 4, 4), torch.ones(3, C, 4, 4)])
        assert all(g.dtype == torch.float32 for g in grads)
        results.append((out, grads))
    for a, b in zip(results[1][0], results[0][0]):
        assert torch.equal(a, b)
    _assert_close_rel(results[1][1], results[0][1], 0.05)

    # the recomputation in backward runs under the forward's autocast state (convolutions in bfloat16)
    dtypes = []
    for m in steps.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        state = [x.clone().requires_grad_() for x in inputs]
        out = reversible_sequence(list(steps), state)
    sum(o.sum() for o in out).backward()
    # 6 in forward, 5 in backward (the last coupling's φ is not recomputed)
    assert len(dtypes) == 6 + 5 and set(dtypes) == {torch.bfloat16}
