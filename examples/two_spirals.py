"""Two spirals (Haber & Ruthotto, "Stable Architectures for Deep Neural Networks", arXiv:1705.03341), the second
example of Reshniak & Webster, "Robust learning with implicit residual networks" (arXiv:1905.10479): a fully
connected ResNet against the implicit trapezoidal network of the same width and depth, several seeds.

Both networks lift the 2-D point to ``width`` features, run ``depth`` steps of ``dy/dt = tanh(K y + b)`` with an
antisymmetric ``K = W − Wᵀ`` (Haber & Ruthotto's stable parametrisation), step ``h``, and classify with a linear layer
and a sigmoid. ResNet: ``y + h F(y)``; trapezoidal: ``y' = y + h/2 (F(y) + F(y'))``, solved and differentiated by
``odenet_timm.layers.fixed_point.implicit_step`` (Anderson + implicit-function-theorem backward). Every other point
of the spirals is held out for validation. Reports validation accuracy, loss curves (PNG) and the perturbation growth
through the blocks (``odenet_timm.analysis``).

    PYTHONPATH=. python examples/two_spirals.py [--seeds 3] [--epochs 150] [--output examples/two_spirals.png]
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from odenet_timm.analysis import perturbation_growth, random_perturbation, spectral_norm
from odenet_timm.layers.fixed_point import SolverConfig, SolverStatsLog, implicit_step


def two_spirals(points_per_spiral: int = 128, turns: float = 1.5):
    """Points ``r(cos θ, sin θ)`` with ``r ∝ θ`` on a spiral (label 0) and its mirror image (label 1); along each
    spiral the even points train, the odd ones are held out."""
    theta = torch.linspace(0.25, 2 * math.pi * turns, points_per_spiral, dtype=torch.float64)
    r = theta / theta.max()
    arm = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)
    zeros, ones = torch.zeros(points_per_spiral // 2, dtype=torch.float64), torch.ones(points_per_spiral // 2,
                                                                                        dtype=torch.float64)
    train = torch.cat([arm[0::2], -arm[0::2]]), torch.cat([zeros, ones])
    val = torch.cat([arm[1::2], -arm[1::2]]), torch.cat([zeros, ones])
    return train, val


class AntisymmetricLayer(nn.Module):
    """``F(y) = tanh((W − Wᵀ) y + b)``."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / math.sqrt(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def params(self):
        return self.weight, self.bias

    @staticmethod
    def evaluate(y, weight, bias):
        return torch.tanh(y @ (weight - weight.T).T + bias)


class EulerStep(AntisymmetricLayer):
    """ResNet step ``y + h F(y)``."""

    def __init__(self, width: int, h: float):
        super().__init__(width)
        self.h = h

    def forward(self, y):
        return y + self.h * self.evaluate(y, *self.params())


class TrapezoidalStep(AntisymmetricLayer):
    """Implicit step ``y' = y + h/2 (F(y) + F(y'))``: an ImplicitMap for the project's fixed-point solver."""

    def __init__(self, width: int, h: float, log: SolverStatsLog, name: str):
        super().__init__(width)
        self.h, self.log, self.name = h, log, name
        self.config = SolverConfig(tol=1e-6, max_iter=50, backward_tol=1e-6, backward_max_iter=50)

    def forward_map(self, y, weight, bias):
        explicit = y + 0.5 * self.h * self.evaluate(y, weight, bias)
        return (lambda z: explicit + 0.5 * self.h * self.evaluate(z, weight, bias)), explicit * 2 - y

    def inverse_map(self, z, weight, bias):
        raise NotImplementedError('not needed: the chain is not run reversibly')

    def forward(self, y):
        return implicit_step(self, y, self.params(), self.config, self.log)


class SpiralNet(nn.Module):
    """lift → ``stages`` of steps → linear classifier (one logit)."""

    def __init__(self, kind: str, width: int, depth: int, h: float):
        super().__init__()
        self.lift = nn.Linear(2, width)
        log = SolverStatsLog()
        steps = [EulerStep(width, h) if kind == 'resnet' else TrapezoidalStep(width, h, log, f'step{i}')
                 for i in range(depth)]
        self.stages = nn.Sequential(nn.Sequential(*steps))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.stages(self.lift(x))).squeeze(-1)


def train(kind, seed, data, args):
    (x_train, y_train), (x_val, y_val) = data
    torch.manual_seed(seed)
    model = SpiralNet(kind, args.width, args.depth, args.h).double()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    train_loss, val_loss = [], []
    for _ in range(args.epochs):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x_train), y_train)
        loss.backward()
        opt.step()
        train_loss.append(loss.item())
        with torch.no_grad():
            val_loss.append(F.binary_cross_entropy_with_logits(model(x_val), y_val).item())
    model.eval()
    with torch.no_grad():
        accuracy = 100.0 * ((model(x_val) > 0).double() == y_val).double().mean().item()
    delta = random_perturbation(x_val, args.eps, torch.Generator().manual_seed(seed))
    growth = perturbation_growth(model, x_val, delta).median()
    lipschitz = spectral_norm(lambda x: model(x)[:, None], x_val, tol=1e-4, max_iter=200).sigma.median().item()
    return dict(train_loss=train_loss, val_loss=val_loss, accuracy=accuracy, growth=growth, lipschitz=lipschitz)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--epochs', type=int, default=150)
    parser.add_argument('--width', type=int, default=4)
    parser.add_argument('--depth', type=int, default=10)
    parser.add_argument('--h', type=float, default=0.5)
    parser.add_argument('--lr', type=float, default=0.02)
    parser.add_argument('--eps', type=float, default=0.05, help='L∞ size of the random input perturbation')
    parser.add_argument('--output', default='examples/two_spirals.png')
    args = parser.parse_args()
    data = two_spirals()
    start = time.perf_counter()
    results = {kind: [train(kind, seed, data, args) for seed in range(args.seeds)] for kind in ('resnet', 'trapezoidal')}
    print(f'{len(data[0][1])} training / {len(data[1][1])} validation points, width {args.width}, depth {args.depth}, '
          f'h {args.h}, {args.epochs} full-batch Adam steps, {args.seeds} seeds ({time.perf_counter() - start:.0f}s)\n')
    print('| network | seed | val. accuracy (%) | final val. loss | largest block growth | growth after last block | '
          'median Lipschitz (input→logit) |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    for kind, runs in results.items():
        for seed, r in enumerate(runs):
            print(f"| {kind} | {seed} | {r['accuracy']:.1f} | {r['val_loss'][-1]:.3f} | {float(r['growth'].max()):.3f} | "
                  f"{float(r['growth'][-1]):.3f} | {r['lipschitz']:.2f} |")
        mean = lambda key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
        print(f"| {kind} | mean | {mean('accuracy'):.1f} | {sum(r['val_loss'][-1] for r in runs) / len(runs):.3f} | "
              f"{sum(float(r['growth'].max()) for r in runs) / len(runs):.3f} | "
              f"{sum(float(r['growth'][-1]) for r in runs) / len(runs):.3f} | {mean('lipschitz'):.2f} |")

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for (kind, runs), color in zip(results.items(), ('tab:red', 'tab:blue')):
        for seed, r in enumerate(runs):
            axes[0].plot(r['train_loss'], color=color, alpha=0.5, label=f'{kind} train' if seed == 0 else None)
            axes[0].plot(r['val_loss'], '--', color=color, alpha=0.5, label=f'{kind} validation' if seed == 0 else None)
            axes[1].plot(range(1, args.depth + 1), r['growth'], marker='o', ms=3, color=color, alpha=0.6,
                         label=kind if seed == 0 else None)
    axes[0].set_yscale('log')
    axes[0].set_xlabel('Adam step')
    axes[0].set_ylabel('binary cross-entropy')
    axes[1].set_yscale('log')
    axes[1].set_xlabel('block')
    axes[1].set_ylabel(f'median ‖h_k(x+δ) − h_k(x)‖ / ‖δ‖ (random δ, ε = {args.eps})')
    for ax in axes:
        ax.grid(alpha=0.3, which='both')
        ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f'\nwrote {args.output}')


if __name__ == '__main__':
    main()
