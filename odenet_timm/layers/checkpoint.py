"""Gradient checkpointing of a sequence of blocks that keeps BatchNorm statistics right.

``torch.utils.checkpoint`` stores a block's input instead of its activations and runs the block's forward a
second time in backward. That second forward runs in training mode, so every BatchNorm inside the block
would update its running statistics (and ``num_batches_tracked``) twice per step: timm's ``checkpoint_seq``
has this defect. :func:`checkpoint_blocks` recomputes with the momentum of those BatchNorms set to zero and
their batch counters restored, so the statistics after a step are those of plain autograd.
"""
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Iterator, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = ['checkpoint_blocks', 'frozen_norm_statistics']


@contextmanager
def frozen_norm_statistics(module: nn.Module) -> Iterator[None]:
    """Within the context, the BatchNorms of ``module`` in training mode normalise with the batch statistics as
    usual but leave their running statistics and ``num_batches_tracked`` as they were."""
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 − 0)·running + 0·batch: unchanged (also replaces the cumulative None)
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            with torch.no_grad():
                m.num_batches_tracked.copy_(count)


def _contexts(block: nn.Module):
    """``torch.utils.checkpoint`` ``context_fn``: the first forward as usual, the recomputation frozen."""
    return nullcontext(), frozen_norm_statistics(block)


def checkpoint_blocks(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``x`` through ``blocks`` in order, each block checkpointed on its own (its input kept, its activations
    recomputed in backward; non-reentrant ``torch.utils.checkpoint`` with the RNG state replayed)."""
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False, context_fn=partial(_contexts, block))
    return x
