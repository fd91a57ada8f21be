"""The stability analysis of one model at data points, and of every leaderboard entry (``eval_robust.py --stability``).

Per model, on the first ``n_examples`` images (in [0, 1], through the entry's normalizing wrapper):

* ``lipschitz``: the spectral norm of the input → logits Jacobian per image (power iteration), its median, the
  largest residual reached and whether every image converged;
* ``growth``: ``‖h_k(x + δ) − h_k(x)‖ / ‖δ‖`` after every block, median over images, for a random δ (a vertex of the
  L∞ ε-ball) and for the PGD δ of the leaderboard's protocol (``torchattacks.PGD`` with its ε, steps and step, seeded
  like the leaderboard), both clipped so that ``x + δ`` stays an image;
* ``blocks``: the spectral norm of every block's Jacobian at the images (median), and for the square blocks (at most
  ``spectra_blocks``, spread over depth) the leading eigenvalues at the first image (Arnoldi, largest real part and
  largest modulus) with the block's scheme;
* ``interpolation_coefficients``: the learned λ of every interpolated block (In-ResNets), where the network has them.

An ensemble gets its own end-to-end estimate; its blocks are those of its members, so its growth column is the
largest of theirs.
"""
import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .blocks import block_map, block_states, find_blocks, perturbation_growth, random_perturbation, staged_network
from .errors import AnalysisInputError
from .jacobian import leading_eigenvalues, spectral_norm
from .schemes import scheme_of

__all__ = ['StabilitySettings', 'analyse_model', 'family_of', 'STABILITY_COLUMNS']

STABILITY_COLUMNS = ('lipschitz_median', 'max_block_growth')


@dataclass(frozen=True)
class StabilitySettings:
    """How much the analysis computes: images, power-iteration tolerance / iterations, eigenvalues per criterion,
    how many square blocks get spectra (ARPACK restarts at most ``arnoldi_restarts`` times), and the seed of the random perturbation and power-iteration starts."""
    n_examples: int = 64
    power_tol: float = 1e-3
    power_max_iter: int = 50
    eig_k: int = 4
    spectra_blocks: int = 3
    arnoldi_restarts: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.n_examples < 1 or self.eig_k < 1 or self.spectra_blocks < 0:
            raise AnalysisInputError(f'stability settings must be positive, got {self}')


def family_of(architecture: str) -> str:
    """``inresnet_20`` → ``inresnet``: the registered name without its depth (one plot panel per family)."""
    return re.sub(r'_\d+$', '', architecture)


def _spread(indices: Sequence[int], count: int) -> List[int]:
    if len(indices) <= count:
        return list(indices)
    return [indices[i] for i in np.linspace(0, len(indices) - 1, count).round().astype(int)]


def _eigen_record(estimate, scheme) -> Dict:
    values = estimate.values
    return {'block_eigenvalues': [[float(z.real), float(z.imag)] for z in values],
            'step_eigenvalues': [[float(w.real), float(w.imag)] for w in scheme.step_eigenvalue(values)],
            'matvecs': estimate.matvecs, 'converged': estimate.converged, 'method': estimate.method}


def _analyse_blocks(model: nn.Module, images: torch.Tensor, settings: StabilitySettings,
                    generator: torch.Generator) -> List[Dict]:
    blocks = find_blocks(model)
    states = block_states(model, blocks, images)
    square = [i for i, (inp, out) in enumerate(states)
              if block_map(blocks[i], inp)[1].shape == block_map(blocks[i], out)[1].shape]
    with_spectra = set(_spread(square, settings.spectra_blocks))
    records = []
    for index, (block, (state, _)) in enumerate(zip(blocks, states)):
        f, flat = block_map(block, state)
        est = spectral_norm(f, flat, settings.power_tol, settings.power_max_iter, generator)
        record = {'name': block.name, 'sigma_median': float(est.sigma.median()),
                  'sigma_max': float(est.sigma.max()), 'residual_max': float(est.residual.max()),
                  'iterations': est.iterations, 'converged': est.converged, 'spectra': None}
        if index in with_spectra:
            first = state[:1] if isinstance(state, torch.Tensor) else tuple(t[:1] for t in state)
            scheme = scheme_of(block.module, first if isinstance(first, torch.Tensor) else None)
            f1, flat1 = block_map(block, first)
            record['scheme'] = scheme.label
            record['scheme_coefficients'] = [scheme.a, scheme.b, scheme.c, scheme.d]
            record['spectra'] = {
                which: _eigen_record(leading_eigenvalues(f1, flat1, settings.eig_k, which, max_iter=settings.arnoldi_restarts),
                                     scheme)
                for which in ('LR', 'LM')}
        records.append(record)
    return records


def _clipped(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (images + delta).clamp(0, 1) - images


def analyse_model(module: nn.Module, images: torch.Tensor, delta_pgd: Optional[torch.Tensor], eps: float,
                  settings: StabilitySettings, blocks: bool = True) -> Dict:
    """The analysis of ``module`` (a function of [0, 1] images) at ``images``; ``delta_pgd`` the adversarial
    perturbations of these images (None: no PGD curve); ``blocks=False`` (ensembles) stops after the end-to-end
    estimate. Every number is a plain float / list, ready for JSON."""
    generator = torch.Generator().manual_seed(settings.seed)
    start = time.perf_counter()
    est = spectral_norm(module, images, settings.power_tol, settings.power_max_iter, generator)
    out = {'n_examples': len(images), 'eps': eps,
           'lipschitz': {'median': float(est.sigma.median()), 'max': float(est.sigma.max()),
                         'per_example': [float(s) for s in est.sigma], 'residual_max': float(est.residual.max()),
                         'iterations': est.iterations, 'converged': est.converged, 'tol': est.tol},
           'growth': None, 'blocks': None, 'interpolation_coefficients': None}
    if blocks:
        delta_random = _clipped(images, random_perturbation(images, eps, generator))
        curves = {'random': perturbation_growth(module, images, delta_random)}
        if delta_pgd is not None:
            curves['pgd'] = perturbation_growth(module, images, _clipped(images, delta_pgd))
        out['growth'] = {name: {'blocks': c.blocks, 'median': [float(r) for r in c.median()], 'largest': c.largest()}
                         for name, c in curves.items()}
        out['blocks'] = _analyse_blocks(module, images, settings, generator)
        network = staged_network(module)
        if callable(getattr(network, 'interpolation_coefficients', None)):
            lams = network.interpolation_coefficients(_normalized_input(module, network, images))
            out['interpolation_coefficients'] = [float(v) for v in lams] or None
    out['seconds'] = round(time.perf_counter() - start, 2)
    return out


def _normalized_input(module: nn.Module, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What ``network`` receives when ``module`` runs on ``images`` (a wrapper may normalise them first)."""
    seen = []
    handle = network.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            module(images)
    finally:
        handle.remove()
    return seen[0]


def leaderboard_columns(analysis: Dict, members: Sequence[Dict] = ()) -> Dict[str, Optional[float]]:
    """The two leaderboard columns of one entry: the median end-to-end Lipschitz estimate, and the largest per-block
    median growth under the PGD perturbation (the random one when PGD did not run; for an ensemble, the largest of
    its members')."""
    sources = [analysis, *members] if members else [analysis]
    growths = [g.get('pgd', g['random'])['largest'] for g in (s['growth'] for s in sources) if g]
    return {'lipschitz_median': round(analysis['lipschitz']['median'], 4),
            'max_block_growth': round(max(growths), 4) if growths else None}
