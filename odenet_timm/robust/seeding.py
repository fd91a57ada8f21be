"""Seeds derived from the run seed and a batch's position, so results do not depend on the process that runs it."""
import contextlib
from typing import Iterator

import numpy as np
import torch

__all__ = ['derive_seed', 'seeded']


def derive_seed(*keys: int) -> int:
    """A 31-bit seed mixed from integer ``keys`` (e.g. run seed, batch index, attack, ε index)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] >> 1)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with torch's global generators (CPU, and ``device``'s if it is an accelerator) seeded with
    ``seed``, restoring their previous state afterwards. torchattacks and pyautoattack draw from the global ones."""
    devices = [device] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
