"""``eval_robust.py --stability``: the stability analysis of every leaderboard entry, written beside the leaderboard.

Adds ``lipschitz_median`` and ``max_block_growth`` to every leaderboard record and writes ``stability.json`` (every
number of :func:`~odenet_timm.analysis.report.analyse_model` per entry), ``stability_growth.png``,
``stability_spectra.png`` and, when an In-ResNet is among the entries, ``stability_lambdas.png``.
"""
import json
import os
import sys
from typing import Dict, Sequence

import torch

from ..robust.attacks import AttackProtocol, adversarial_examples
from ..robust.entries import EvalEntry
from ..robust.seeding import derive_seed, seeded
from .plots import plot_growth, plot_interpolation_coefficients, plot_spectra
from .report import StabilitySettings, analyse_model, family_of, leaderboard_columns

__all__ = ['STABILITY_FILES', 'add_stability_section']

STABILITY_FILES = ('stability.json', 'stability_growth.png', 'stability_spectra.png', 'stability_lambdas.png')
_PGD_PHASE = 99  # a seed key apart from the leaderboard's own phases


def _pgd_delta(entry: EvalEntry, images: torch.Tensor, labels: torch.Tensor, protocol: AttackProtocol) -> torch.Tensor:
    seed = derive_seed(protocol.seed, _PGD_PHASE)
    with seeded(seed, images.device):
        adversarial = adversarial_examples('pgd', entry.module, images, labels, protocol.eps[0], protocol,
                                           entry.num_classes, seed)
    return (adversarial - images).detach()


def add_stability_section(leaderboard: Dict, entries: Sequence[EvalEntry], images: torch.Tensor,
                          labels: torch.Tensor, protocol: AttackProtocol, output: str,
                          settings: StabilitySettings) -> Dict[str, Dict]:
    """Analyse every entry on the first ``settings.n_examples`` images, add the two columns to the leaderboard
    records, write the files into ``output``; returns the analyses by entry name."""
    device = next(entries[0].module.parameters()).device
    x, y = images[:settings.n_examples].to(device), labels[:settings.n_examples].to(device)
    analyses: Dict[str, Dict] = {}
    for entry in sorted(entries, key=lambda e: e.is_ensemble):  # members before their ensembles
        print(f'stability: {entry.name} on {len(x)} examples', file=sys.stderr)
        delta = _pgd_delta(entry, x, y, protocol) if 'pgd' in protocol.attacks else None
        analysis = analyse_model(entry.module, x, delta, protocol.eps[0], settings, blocks=not entry.is_ensemble)
        analysis['family'] = 'ensemble' if entry.is_ensemble else family_of(entry.architecture)
        analysis['columns'] = leaderboard_columns(analysis, [analyses[m.name] for m in entry.members])
        analyses[entry.name] = analysis
    for record in leaderboard['entries']:
        record.update(analyses[record['name']]['columns'])
    with open(os.path.join(output, 'stability.json'), 'w') as f:
        json.dump({'settings': settings.__dict__, 'entries': analyses}, f, indent=2)
        f.write('\n')
    plot_growth(analyses, os.path.join(output, 'stability_growth.png'))
    plot_spectra(analyses, os.path.join(output, 'stability_spectra.png'))
    if any(a.get('interpolation_coefficients') for a in analyses.values()):
        plot_interpolation_coefficients(analyses, os.path.join(output, 'stability_lambdas.png'))
    return analyses
