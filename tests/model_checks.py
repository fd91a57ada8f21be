"""Helpers shared by the model tests: the same reversible network in memory-efficient and plain mode, its
reconstruction drift, and what a training forward keeps for backward."""
from contextlib import contextmanager
from typing import Iterator, List
from unittest import mock

import timm
import torch

from odenet_timm.layers import reversible
from odenet_timm.layers.reversible import invert_sequence


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def memory_efficient_and_plain(model_name, **kwargs):
    """The same network in memory-efficient and plain mode, float64, identical weights."""
    rev = timm.create_model(model_name, memory_efficient=True, **kwargs).double()
    plain = timm.create_model(model_name, memory_efficient=False, **kwargs).double()
    plain.load_state_dict(rev.state_dict())
    return rev, plain


@contextmanager
def counting_saved_bytes() -> Iterator[List[int]]:
    """Within the context, the bytes of each tensor saved for backward are appended to the list it yields: those
    the saved-tensor hooks of the context see, and those the φ graph of a reversible sequence's last coupling keeps
    through its own hooks (``reversible._detached``), which take precedence over the context's."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    def counted_detached(t):
        return pack(t).detach()

    with mock.patch.object(reversible, '_detached', counted_detached), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def saved_bytes(model, x) -> int:
    """Bytes of the tensors a forward of ``model`` on ``x`` saves for backward."""
    with counting_saved_bytes() as total:
        model(x)
    return sum(total)


def assert_gradients_equal_plain_autograd(rev, plain, x, rel_tol=1e-8):
    """Input and parameter gradients of a train-mode step of ``rev`` equal those of ``plain`` (relative)."""
    target = torch.randn(x.shape[0], plain.num_classes, dtype=x.dtype)
    results = []
    for model in (plain, rev):
        model.train()
        inp = x.clone().requires_grad_()
        (model(inp) * target).sum().backward()
        results.append([inp.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(results[1], results[0]):
        assert (a - b).norm() <= rel_tol * b.norm(), f'relative error {((a - b).norm() / b.norm()).item():.3g}'


def stage_reconstruction_error(model, dtype, batch=2) -> float:
    """Relative error of the input of the model's first (reversible, channel-halves) stage reconstructed from its
    output, in eval mode."""
    model = model.to(dtype).eval()
    stage = model.stages[0]
    state = model.stem(torch.randn(batch, 3, 32, 32, dtype=dtype)).chunk(2, dim=1)
    with torch.no_grad():
        out = state
        for unit in stage:
            out = unit(out)
        back = invert_sequence(list(stage), out)
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(back, state))


def assert_unit_inverts_in_float64(unit, channels=4):
    """A reversible unit on a pair state, in training mode (BN normalises with the batch statistics), changes its
    input and is inverted to 1e-10 by :func:`invert_sequence`."""
    unit = unit.double().train()
    state = tuple(torch.randn(3, channels, 8, 8, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        out = unit(state)
        back = invert_sequence([unit], out)
    assert max((a - b).abs().max().item() for a, b in zip(back, state)) < 1e-10
    assert max((a - b).abs().max().item() for a, b in zip(out, state)) > 1e-2
