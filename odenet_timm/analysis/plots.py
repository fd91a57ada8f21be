"""Figures of the stability analysis (matplotlib, PNG): perturbation growth against depth and block spectral norms
(one panel per model family, log scale), leading eigenvalues over each scheme's stability region, and the learned
In-ResNet coefficients per depth with their stable range."""
from typing import Dict, List, Tuple

import numpy as np

from .schemes import Scheme

__all__ = ['plot_growth', 'plot_spectra', 'plot_interpolation_coefficients']


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _panels(plt, count: int, width: float = 4.2, height: float = 3.6):
    fig, axes = plt.subplots(1, max(count, 1), figsize=(width * max(count, 1), height), squeeze=False)
    return fig, axes[0]


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


def _by_family(models: Dict[str, Dict]) -> Dict[str, List[Tuple[str, Dict]]]:
    families: Dict[str, List[Tuple[str, Dict]]] = {}
    for name, record in models.items():
        families.setdefault(record['family'], []).append((name, record))
    return families


def plot_growth(models: Dict[str, Dict], path: str) -> None:
    """``models[name] = {'family', 'growth': {'random'|'pgd': {'median': [...]}}, 'blocks': [{'sigma_median'}]}``:
    per family, the median growth after every block (solid: PGD δ, dashed: random δ) and the blocks' median
    spectral norms (dotted), log scale."""
    plt = _pyplot()
    families = _by_family({n: r for n, r in models.items() if r.get('growth')})
    fig, axes = _panels(plt, len(families))
    for ax, (family, members) in zip(axes, families.items()):
        for name, record in members:
            depth = np.arange(1, len(record['blocks']) + 1)
            line = None
            for kind, style in (('pgd', '-'), ('random', '--')):
                if kind in record['growth']:
                    line, = ax.plot(depth, record['growth'][kind]['median'], style, marker='o', ms=3,
                                    color=None if line is None else line.get_color(), label=f'{name} ({kind} δ)')
            ax.plot(depth, [b['sigma_median'] for b in record['blocks']], ':', color=line.get_color(),
                    label=f'{name} (block ‖J‖₂)')
        ax.axhline(1.0, color='grey', lw=0.8)
        ax.set_yscale('log')
        ax.set_title(family)
        ax.set_xlabel('block')
        ax.grid(alpha=0.3, which='both')
        ax.legend(fontsize='x-small')
    axes[0].set_ylabel('‖h_k(x+δ) − h_k(x)‖ / ‖δ‖ (median)')
    _save(plt, fig, path)


def _region(ax, scheme: Scheme, extent: float, color: str) -> None:
    grid = np.linspace(-extent, extent, 401)
    w = grid[None, :] + 1j * grid[:, None]
    stable = np.abs(scheme.amplification(w)) <= 1
    ax.contourf(grid, grid, stable, levels=[0.5, 1.5], colors=[color], alpha=0.15)
    ax.contour(grid, grid, stable.astype(float), levels=[0.5], colors=[color], linewidths=0.8)


def plot_spectra(models: Dict[str, Dict], path: str) -> None:
    """Per family, the leading eigenvalues ``w = R⁻¹(z)`` of every analysed block (largest real part: circles,
    largest modulus: crosses) over the stability region ``|R(w)| ≤ 1`` of each block's scheme (shaded)."""
    plt = _pyplot()
    families = _by_family({n: r for n, r in models.items() if r.get('blocks')})
    fig, axes = _panels(plt, len(families), width=4.4, height=4.2)
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for ax, (family, members) in zip(axes, families.items()):
        points, schemes = [], {}
        for name, record in members:
            for block in record['blocks']:
                if not block['spectra']:
                    continue
                schemes.setdefault(block['scheme'], Scheme(block['scheme'], *block['scheme_coefficients']))
                for which, marker in (('LR', 'o'), ('LM', 'x')):
                    w = np.array([complex(*p) for p in block['spectra'][which]['step_eigenvalues']])
                    points.append((w, marker, f"{name} {block['name']} {which}"))
        extent = max([2.5] + [1.2 * float(np.abs(w).max()) for w, _, _ in points if len(w)])
        for i, scheme in enumerate(list(schemes.values())[:4]):
            _region(ax, scheme, extent, colors[i % len(colors)])
            ax.plot([], [], color=colors[i % len(colors)], label=scheme.label)
        for w, marker, label in points:
            ax.scatter(w.real, w.imag, marker=marker, s=18, label=label)
        ax.axhline(0, color='grey', lw=0.5)
        ax.axvline(0, color='grey', lw=0.5)
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.set_aspect('equal')
        ax.set_title(family)
        ax.set_xlabel('Re w')
        ax.legend(fontsize='xx-small', loc='upper left', bbox_to_anchor=(0, -0.15))
    axes[0].set_ylabel('Im w   (w = R⁻¹(eigenvalue of the block Jacobian))')
    _save(plt, fig, path)


def plot_interpolation_coefficients(models: Dict[str, Dict], path: str) -> None:
    """The learned λ of every interpolated block against depth (one marker per model) with the range of λ where the
    damping step ``(1 − λ) x`` is stable for forward Euler, ``|1 − λ| ≤ 1`` ⇔ 0 ≤ λ ≤ 2, shaded, and the
    distribution of all λ as a histogram beside it."""
    plt = _pyplot()
    coefficient_models = {n: r for n, r in models.items() if r.get('interpolation_coefficients')}
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw=dict(width_ratios=[3, 1]), sharey=True)
    every = []
    for name, record in coefficient_models.items():
        lams = record['interpolation_coefficients']
        every += lams
        ax.plot(np.arange(1, len(lams) + 1), lams, marker='o', ms=4, label=name)
    for a in (ax, hist):
        a.axhspan(0, 2, color='tab:green', alpha=0.12)
    ax.text(0.01, 0.97, 'stable range 0 ≤ λ ≤ 2 (|1 − λ| ≤ 1)', transform=ax.transAxes, va='top', fontsize='small')
    if every:
        hist.hist(every, bins=20, orientation='horizontal', color='tab:blue')
        low, high = min(every + [0.0]), max(every + [1.0])
        ax.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
    ax.set_xlabel('interpolated block (depth order)')
    ax.set_ylabel('learned λ')
    hist.set_xlabel('count')
    ax.legend(fontsize='small')
    ax.grid(alpha=0.3)
    _save(plt, fig, path)
