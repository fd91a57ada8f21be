"""The blocks of a timm staged network, the states that flow through them, and perturbation growth through depth.

Blocks are found through timm's layout only: the network (or the one module inside a wrapper) with a ``stages``
container; every child of a stage that is a sequence (``nn.Sequential`` / ``nn.ModuleList``) is a block, any other
stage is one block. A block's input and output are observed with forward hooks. A block that is itself an
``nn.Sequential`` is observed at its first and last step, because some stages run the steps of such a block one by
one without calling the block (a reversible stage flattens a Hamiltonian unit into its two couplings).

A state is a tensor or a tuple of tensors (the ``(Y, Z)`` halves of a Hamiltonian unit); it is flattened to one
``(B, n)`` matrix, so every block is a map ``R^n → R^m`` per sample.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .errors import AnalysisInputError

__all__ = [
    'Block', 'find_blocks', 'staged_network', 'StateLayout', 'flatten_state', 'block_states', 'block_map',
    'GrowthCurve', 'perturbation_growth', 'random_perturbation',
]

State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


@dataclass
class Block:
    """One block: its dotted ``name`` in the network, the module, and the modules whose input / output are the
    block's input / output."""
    name: str
    module: nn.Module
    entry: nn.Module
    exit: nn.Module


def staged_network(model: nn.Module) -> nn.Module:
    """The one module of ``model`` (itself or inside a wrapper) that has timm's ``stages`` container."""
    found = [m for m in model.modules() if isinstance(getattr(m, 'stages', None), nn.Module)]
    if not found:
        raise AnalysisInputError(
            f'cannot find the blocks of {type(model).__name__}: neither it nor any submodule has a `stages` container '
            f"(timm's staged-network layout)")
    if len(found) > 1:
        raise AnalysisInputError(
            f'{type(model).__name__} holds {len(found)} staged networks (an ensemble?): analyse each member')
    return found[0]


def _end_step(module: nn.Module, last: bool) -> nn.Module:
    while isinstance(module, nn.Sequential) and len(module):
        module = module[-1 if last else 0]
    return module


def find_blocks(model: nn.Module) -> List[Block]:
    """Every block of the staged network in ``model``, in forward order (see the module docstring)."""
    network = staged_network(model)
    blocks = []
    for stage_idx, (stage_name, stage) in enumerate(network.stages.named_children()):
        children = list(stage.named_children()) if isinstance(stage, (nn.Sequential, nn.ModuleList)) else []
        named = [(f'stages.{stage_name}.{n}', m) for n, m in children] or [(f'stages.{stage_name}', stage)]
        blocks += [Block(name, m, _end_step(m, last=False), _end_step(m, last=True)) for name, m in named]
    if not blocks:
        raise AnalysisInputError(f'the `stages` of {type(network).__name__} are empty: no blocks to analyse')
    return blocks


def flatten_state(state: State) -> torch.Tensor:
    """``(B, n)``: the tensors of a state, each flattened per sample, side by side."""
    tensors = (state,) if isinstance(state, torch.Tensor) else tuple(state)
    return torch.cat([t.flatten(1) for t in tensors], dim=1)


class StateLayout:
    """How a flattened state is cut back into its tensors (shapes without the batch dimension)."""

    def __init__(self, state: State):
        self.is_tuple = not isinstance(state, torch.Tensor)
        tensors = tuple(state) if self.is_tuple else (state,)
        self.shapes = [t.shape[1:] for t in tensors]
        self.sizes = [t[0].numel() for t in tensors]

    def unflatten(self, flat: torch.Tensor) -> State:
        parts = tuple(p.reshape(-1, *s) for p, s in zip(flat.split(self.sizes, dim=1), self.shapes))
        return parts if self.is_tuple else parts[0]


@contextmanager
def _recorded(blocks: Sequence[Block]) -> Iterator[Dict[str, List[State]]]:
    """``{name: [input, output]}`` of the latest call of every block while the context is open."""
    record: Dict[str, List[State]] = {b.name: [None, None] for b in blocks}
    handles = []
    for b in blocks:
        def save_input(module, args, name=b.name):
            record[name][0] = args[0]

        def save_output(module, args, output, name=b.name):
            record[name][1] = output
        handles += [b.entry.register_forward_pre_hook(save_input), b.exit.register_forward_hook(save_output)]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def block_states(model: nn.Module, blocks: Sequence[Block], x: torch.Tensor) -> List[Tuple[State, State]]:
    """``(input, output)`` of every block when ``model`` runs on ``x``."""
    with _recorded(blocks) as record:
        model(x)
    silent = [name for name, (inp, out) in record.items() if inp is None or out is None]
    if silent:
        raise AnalysisInputError(f'blocks {", ".join(silent)} did not run in the forward pass of {type(model).__name__}')
    return [tuple(record[b.name]) for b in blocks]


def block_map(block: Block, state: State) -> Tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """``(f, x)``: the block as a map of flattened states ``(B, n) → (B, m)`` and its flattened input ``state``."""
    layout = StateLayout(state)
    return (lambda flat: flatten_state(block.module(layout.unflatten(flat)))), flatten_state(state)


@dataclass
class GrowthCurve:
    """``ratios[b, k] = ‖h_k(x_b + δ_b) − h_k(x_b)‖ / ‖δ_b‖`` after every block ``k`` (names in ``blocks``)."""
    blocks: List[str]
    ratios: torch.Tensor

    def median(self) -> torch.Tensor:
        """The per-block median over samples."""
        return self.ratios.median(dim=0).values

    def largest(self) -> float:
        """The largest per-block median growth (the leaderboard column)."""
        return float(self.median().max())


def perturbation_growth(model: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> GrowthCurve:
    """How the perturbation ``δ`` of the input ``x`` of ``model`` grows or shrinks through its blocks (ℓ2 norms)."""
    if delta.shape != x.shape:
        raise AnalysisInputError(f'the perturbation has shape {tuple(delta.shape)}, the input {tuple(x.shape)}')
    size = delta.flatten(1).norm(dim=1)
    if not bool((size > 0).all()):
        raise AnalysisInputError(
            f'the perturbation is zero for {int((size == 0).sum())} of {len(size)} inputs (ε = 0?): growth '
            f'‖h(x + δ) − h(x)‖ / ‖δ‖ needs ‖δ‖ > 0')
    blocks = find_blocks(model)
    clean = block_states(model, blocks, x)
    moved = block_states(model, blocks, x + delta)
    ratios = torch.stack([
        (flatten_state(m[1]) - flatten_state(c[1])).norm(dim=1).to(size.dtype) / size
        for c, m in zip(clean, moved)], dim=1)
    return GrowthCurve([b.name for b in blocks], ratios.cpu())


def random_perturbation(x: torch.Tensor, eps: float, generator: torch.Generator = None) -> torch.Tensor:
    """A random vertex of the L∞ ball of radius ``eps``: ``eps · sign(z)``, z standard normal per entry."""
    if not eps > 0:
        raise AnalysisInputError(f'the perturbation size ε must be positive, got {eps}')
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device='cpu').to(x.device)
    return eps * torch.where(z >= 0, 1.0, -1.0).to(x.dtype)
