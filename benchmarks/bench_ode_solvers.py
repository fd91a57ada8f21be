#!/usr/bin/env python
"""torchdiffeq against torchode on the same ODE-Net block: forward+backward time and function evaluations.

The block is ``odenet_timm.models.odenet.ODEFunc`` (the paper's time-conditioned dynamics) integrated over
[0, 1] with dopri5 at the same tolerances, gradients by backpropagation through the solver and by the adjoint
method in each library:

* ``torchdiffeq``: ``odeint`` (backprop) and ``odeint_adjoint``;
* ``torchode``: ``AutoDiffAdjoint`` (backprop) and ``BacksolveAdjoint`` (adjoint), ``IntegralController``,
  without ``torch.compile`` (as a model's forward would call it).

Every variant runs once per round, in the same process, round-robin over ``--rounds`` rounds; the table gives the
median time and its spread (min–max) and the function evaluations (batched calls of f) forward and backward.

    python benchmarks/bench_ode_solvers.py --channels 64 --size 8 --batch-size 32 --tol 1e-3 --rounds 3
"""
import argparse
import statistics
import time

import torch
import torchode
from torchdiffeq import odeint, odeint_adjoint

from odenet_timm.layers.ode import CountedDynamics
from odenet_timm.models.odenet import ODEFunc


def torchdiffeq_run(dynamics, y0, tol, adjoint):
    solve = odeint_adjoint if adjoint else odeint
    return solve(dynamics, y0, torch.tensor([0.0, 1.0]), rtol=tol, atol=tol, method='dopri5')[-1]


class FlatDynamics(torch.nn.Module):
    """torchode integrates (batch, features) states with one time per sample (its adjoint: one sample per call,
    under vmap)."""

    def __init__(self, dynamics, shape):
        super().__init__()
        self.dynamics, self.shape = dynamics, shape

    def forward(self, t, y):
        return self.dynamics(t.reshape(-1, 1, 1, 1), y.reshape(-1, *self.shape[1:])).reshape(y.shape)


def torchode_run(dynamics, y0, tol, adjoint):
    shape = y0.shape
    term = torchode.ODETerm(FlatDynamics(dynamics, shape))
    step, control = torchode.Dopri5(term=term), torchode.IntegralController(atol=tol, rtol=tol, term=term)
    solver = (torchode.BacksolveAdjoint(term, step, control) if adjoint
              else torchode.AutoDiffAdjoint(step, control))
    problem = torchode.InitialValueProblem(
        y0=y0.flatten(1), t_start=torch.zeros(shape[0]), t_end=torch.ones(shape[0]))
    return solver.solve(problem).ys[:, -1].view(shape)


VARIANTS = {
    'torchdiffeq backprop': (torchdiffeq_run, False),
    'torchdiffeq adjoint': (torchdiffeq_run, True),
    'torchode backprop': (torchode_run, False),
    'torchode adjoint': (torchode_run, True),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--channels', type=int, default=64)
    parser.add_argument('--size', type=int, default=8, help='feature-map height and width')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--tol', type=float, default=1e-3, help='rtol = atol of both libraries')
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dynamics = CountedDynamics(ODEFunc(args.channels))
    y0 = torch.randn(args.batch_size, args.channels, args.size, args.size)
    times = {name: [] for name in VARIANTS}
    nfe = {}
    for _ in range(args.rounds):
        for name, (run, adjoint) in VARIANTS.items():
            x = y0.clone().requires_grad_()
            dynamics.zero_grad(set_to_none=True)
            start = time.perf_counter()
            dynamics.reset_counts()
            dynamics.start_solve()
            out = run(dynamics, x, args.tol, adjoint)
            dynamics.end_solve()
            out.square().mean().backward()
            times[name].append(time.perf_counter() - start)
            nfe[name] = (dynamics.forward_nfe, dynamics.backward_nfe)
    print(f'dopri5, rtol = atol = {args.tol:g}, f = ODEFunc({args.channels}) on {args.batch_size}×{args.channels}×'
          f'{args.size}×{args.size}, {args.rounds} rounds, threads {torch.get_num_threads()}')
    print('| variant | forward+backward s (median, min–max) | NFE forward | NFE backward |')
    print('|---|---:|---:|---:|')
    for name in VARIANTS:
        t = times[name]
        print(f'| {name} | {statistics.median(t):.2f} ({min(t):.2f}–{max(t):.2f}) | {nfe[name][0]} | {nfe[name][1]} |')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
