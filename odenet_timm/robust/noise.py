"""The four noise corruptions of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019, arXiv:1903.12261), computed on the
fly under a seed, or read from the real CIFAR-10-C / CIFAR-100-C ``.npy`` files.

Severity constants (1..5) are those of the CIFAR-10-C generation code:

* ``gaussian_noise``: ``x + N(0, σ²)``, σ ∈ [0.04, 0.06, 0.08, 0.09, 0.10]
* ``shot_noise``:     ``Poisson(c·x) / c``, c ∈ [500, 250, 100, 75, 50]
* ``impulse_noise``:  salt & pepper on a fraction ``amount`` of the values (each channel value independently,
  half salt, half pepper, as ``skimage.util.random_noise(mode='s&p')``), amount ∈ [0.01, 0.02, 0.03, 0.05, 0.07]
* ``speckle_noise``:  ``x + x·N(0, σ²)``, σ ∈ [0.06, 0.1, 0.12, 0.16, 0.2]

Results are clipped to [0, 1] and truncated to 8 bits like the stored dataset (``np.uint8(clip(x) * 255)``).
"""
import os
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from .errors import EvaluationInputError
from .seeding import derive_seed

__all__ = ['NOISE_SEVERITIES', 'corrupt', 'ComputedNoise', 'CifarCNoise']

NOISE_SEVERITIES: Dict[str, Tuple[float, ...]] = {
    'gaussian_noise': (0.04, 0.06, 0.08, 0.09, 0.10),
    'shot_noise': (500, 250, 100, 75, 50),
    'impulse_noise': (0.01, 0.02, 0.03, 0.05, 0.07),
    'speckle_noise': (0.06, 0.1, 0.12, 0.16, 0.2),
}
SEVERITIES = (1, 2, 3, 4, 5)

NoisyBatches = Dict[Tuple[str, int], torch.Tensor]


def corrupt(images: torch.Tensor, corruption: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """``images`` (CPU, values in [0, 1]) under ``corruption`` at ``severity`` (1..5), drawn from ``generator``."""
    if corruption not in NOISE_SEVERITIES:
        raise ValueError(f'unknown corruption {corruption!r}; expected one of {", ".join(NOISE_SEVERITIES)}')
    if severity not in SEVERITIES:
        raise ValueError(f'severity must be one of {SEVERITIES}, got {severity!r}')
    c = NOISE_SEVERITIES[corruption][severity - 1]
    if corruption == 'gaussian_noise':
        noisy = images + c * torch.randn(images.shape, generator=generator)
    elif corruption == 'shot_noise':
        noisy = torch.poisson(images * c, generator=generator) / c
    elif corruption == 'impulse_noise':
        flipped = torch.rand(images.shape, generator=generator) <= c
        salt = (torch.rand(images.shape, generator=generator) <= 0.5).to(images.dtype)
        noisy = torch.where(flipped, salt, images)
    else:  # speckle_noise
        noisy = images + images * c * torch.randn(images.shape, generator=generator)
    return torch.floor(noisy.clamp(0, 1) * 255) / 255


class ComputedNoise:
    """The 4 × 5 noisy versions of a batch, each drawn from its own generator seeded by
    ``(batch seed, corruption, severity)``: reproducible, and independent of how batches are spread over processes."""
    source = 'computed'

    def corrupted(self, images: torch.Tensor, indices: Sequence[int], seed: int) -> NoisyBatches:
        out = {}
        for corruption_idx, corruption in enumerate(NOISE_SEVERITIES):
            for severity in SEVERITIES:
                generator = torch.Generator().manual_seed(derive_seed(seed, corruption_idx, severity))
                out[corruption, severity] = corrupt(images, corruption, severity, generator)
        return out


class CifarCNoise:
    """The noise corruptions read from a CIFAR-10-C / CIFAR-100-C folder (``gaussian_noise.npy``, ``shot_noise.npy``,
    ``impulse_noise.npy``, ``speckle_noise.npy``, ``labels.npy``).

    Each file stacks the 5 severities of the whole test set: severity ``s`` of test example ``i`` is row
    ``(s − 1)·R + i`` with ``R = len(labels.npy) / 5`` (10,000 for the real files). Arrays are memory-mapped.
    """

    def __init__(self, directory: str):
        self.directory = directory
        missing = [f'{name}.npy' for name in (*NOISE_SEVERITIES, 'labels')
                   if not os.path.isfile(os.path.join(directory, f'{name}.npy'))]
        if missing:
            raise EvaluationInputError(
                f'--cifar-c-dir {os.path.abspath(directory)} lacks {", ".join(missing)} (expected the CIFAR-10-C / '
                f'CIFAR-100-C .npy files, https://zenodo.org/record/2535967)')
        self.labels = np.load(os.path.join(directory, 'labels.npy'))
        if len(self.labels) % len(SEVERITIES):
            raise EvaluationInputError(f'{directory}/labels.npy has {len(self.labels)} rows, not 5 severities × R')
        self.rows_per_severity = len(self.labels) // len(SEVERITIES)
        self.arrays = {}
        for name in NOISE_SEVERITIES:
            array = np.load(os.path.join(directory, f'{name}.npy'), mmap_mode='r')
            if array.ndim != 4 or array.shape[0] != len(self.labels) or array.shape[-1] != 3 or array.dtype != np.uint8:
                raise EvaluationInputError(
                    f'{directory}/{name}.npy has shape {array.shape} and dtype {array.dtype}; expected '
                    f'({len(self.labels)}, H, W, 3) uint8 like labels.npy')
            self.arrays[name] = array
        self.source = f'cifar-c:{directory}'

    @property
    def image_size(self) -> Tuple[int, int]:
        return tuple(next(iter(self.arrays.values())).shape[1:3])

    def check_examples(self, labels: torch.Tensor, image_size: Sequence[int]) -> None:
        """Raise unless the files cover the first ``len(labels)`` test examples with these labels at every severity."""
        n = len(labels)
        if n > self.rows_per_severity:
            raise EvaluationInputError(
                f'--n-examples {n} exceeds the {self.rows_per_severity} examples per severity in {self.directory}')
        if tuple(self.image_size) != tuple(image_size):
            raise EvaluationInputError(
                f'{self.directory} holds {self.image_size[0]}x{self.image_size[1]} images but the models take '
                f'{image_size[0]}x{image_size[1]}')
        expected = labels.numpy()
        for severity in SEVERITIES:
            start = (severity - 1) * self.rows_per_severity
            stored = self.labels[start:start + n]
            if not np.array_equal(stored, expected):
                first = int(np.flatnonzero(stored != expected)[0])
                raise EvaluationInputError(
                    f'{self.directory}/labels.npy does not match the dataset: severity {severity}, example {first} is '
                    f'labelled {stored[first]} there and {expected[first]} in the dataset (is it the -C version of '
                    f'another dataset?)')

    def corrupted(self, images: torch.Tensor, indices: Sequence[int], seed: int) -> NoisyBatches:
        out = {}
        rows = np.asarray(indices)
        for name, array in self.arrays.items():
            for severity in SEVERITIES:
                batch = np.ascontiguousarray(array[(severity - 1) * self.rows_per_severity + rows])
                out[name, severity] = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255)
        return out
