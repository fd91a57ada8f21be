"""Haber & Ruthotto's three linear ODEs dY/dt = K Y ("Stable Architectures for Deep Neural Networks",
arXiv:1705.03341) through the stability analysis of odenet_timm.analysis.

For each K: Arnoldi (here the dense fallback of ``leading_eigenvalues``, the operator being 2×2) on the right-hand
side ``y ↦ K y`` and on one forward Euler step ``y ↦ y + hKy`` (mapped back through the scheme), and the
perturbation growth through 20 steps of forward Euler and of the trapezoidal rule (solved by the project's
fixed-point solver, ``odenet_timm.layers.fixed_point.implicit_step``).

    PYTHONPATH=. python examples/linear_odes.py [--output examples/linear_odes.png]
"""
import argparse

import torch
import torch.nn as nn

from odenet_timm.analysis import forward_euler, leading_eigenvalues, perturbation_growth, random_perturbation
from odenet_timm.layers.fixed_point import SolverConfig, SolverStatsLog, implicit_step

SYSTEMS = {
    'K+': [[2., -2.], [0., 2.]],
    'K-': [[-2., 0.], [2., -2.]],
    'K0': [[0., -1.], [1., 0.]],
}
H, STEPS = 0.25, 20


class EulerStep(nn.Module):
    """``y ↦ y + h K y``."""

    def __init__(self, K: torch.Tensor, h: float):
        super().__init__()
        self.register_buffer('K', K)
        self.h = h

    def forward(self, y):
        return y + self.h * y @ self.K.T


class TrapezoidalStep(nn.Module):
    """``y ↦ y'`` with ``y' = y + h/2 (K y + K y')``, an ImplicitMap solved by the project's fixed-point solver."""

    def __init__(self, K: torch.Tensor, h: float):
        super().__init__()
        self.register_buffer('K', K)
        self.h, self.name = h, 'trapezoidal'
        self.config = SolverConfig(tol=1e-13, max_iter=200)
        self.log = SolverStatsLog()

    def forward_map(self, y):
        explicit = y + 0.5 * self.h * y @ self.K.T
        return (lambda z: explicit + 0.5 * self.h * z @ self.K.T), y + self.h * y @ self.K.T

    def inverse_map(self, z):
        raise NotImplementedError('not needed: the chain is not run reversibly')

    def forward(self, y):
        return implicit_step(self, y, (), self.config, self.log)


class Network(nn.Module):
    def __init__(self, steps):
        super().__init__()
        self.stages = nn.Sequential(nn.Sequential(*steps))

    def forward(self, y):
        return self.stages(y)


def _fmt(values) -> str:
    return ', '.join(f'{z.real:+.6g}{z.imag:+.6g}i' if z.imag else f'{z.real:+.6g}' for z in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--output', default='examples/linear_odes.png')
    args = parser.parse_args()
    torch.manual_seed(0)
    y = torch.randn(64, 2, dtype=torch.float64)
    delta = random_perturbation(y, 1e-3)
    curves = {}
    print('| K | eig(K) (Arnoldi on y ↦ Ky) | eig recovered from one Euler step | growth after 20 Euler steps | '
          'growth after 20 trapezoidal steps |')
    print('|---|---|---|---:|---:|')
    for name, values in SYSTEMS.items():
        K = torch.tensor(values, dtype=torch.float64)
        rhs = leading_eigenvalues(lambda v: v @ K.T, y[:1], k=2).values
        step = forward_euler().step_eigenvalue(leading_eigenvalues(EulerStep(K, H), y[:1], k=2).values) / H
        for scheme, make in (('Euler', EulerStep), ('trapezoidal', TrapezoidalStep)):
            curves[name, scheme] = perturbation_growth(Network([make(K, H) for _ in range(STEPS)]), y, delta).median()
        print(f'| {name} | {_fmt(rhs)} | {_fmt(step)} | {float(curves[name, "Euler"][-1]):.4g} | '
              f'{float(curves[name, "trapezoidal"][-1]):.4g} |')

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, scheme in zip(axes, ('Euler', 'trapezoidal')):
        for name in SYSTEMS:
            ax.plot(range(1, STEPS + 1), curves[name, scheme], marker='o', ms=3, label=name)
        ax.set_yscale('log')
        ax.set_title(f'{scheme}, h = {H}')
        ax.set_xlabel('step')
        ax.grid(alpha=0.3, which='both')
    axes[0].set_ylabel('‖y_k(x+δ) − y_k(x)‖ / ‖δ‖ (median)')
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f'\nwrote {args.output}')


if __name__ == '__main__':
    main()
