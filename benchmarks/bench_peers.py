#!/usr/bin/env python
"""The project's reversible and implicit backward passes beside the peer libraries, measured in one run.

Peers (the optional extra ``pip install -e '.[bench]'``): memcnn and revlib for reversible backpropagation,
torchdeq for implicit layers.

    python benchmarks/bench_peers.py                      # every row, CPU
    python benchmarks/bench_peers.py --part reversible    # or implicit; --device cuda on a GPU

Rows. Reversible (train step = forward, ``Σ w·output`` or cross-entropy, backward): one Hamiltonian unit and one
RevNet unit (16 channels per half, the first stage's width; ``--batch-size``), the first stage of
``hamiltonian_218`` (18 units) and the whole ``hamiltonian_218`` (``--model-batch-size``); variants: the
project's memory-efficient path (:func:`odenet_timm.layers.reversible.reversible_sequence`), plain autograd,
memcnn (``InvertibleModuleWrapper`` around its ``AdditiveCoupling``, one per unit) and revlib
(``ReversibleSequential``), all sharing the same modules, hence the same weights. Unit and stage inputs are
non-leaf tensors, as inside a network (memcnn returns twice the input gradient for a leaf input). The RevNet unit
is the first unit of ``revnet_110``'s first stage when that model is registered, else the same unit built here
(``F``, ``G`` pre-activation basic residuals).

Implicit (the trapezoidal block ``y = x + ½[F(x) + F(y)]`` of ``implicit_trapezoid_resnet``'s first stage, and
the whole network at ``--model-batch-size``; eval mode, so the spectral-norm probe and BatchNorm are fixed and
every variant computes the same function): the project's Anderson solve + implicit-function-theorem backward
(:func:`odenet_timm.layers.fixed_point.implicit_step`) and torchdeq's (Anderson forward, IFT backward with its
Anderson solver; relative stopping residual, same starting point), at EQUAL tolerance and at MATCHED gradient
error (the loosest torchdeq tolerance whose gradient error is at most the project's), plus torchdeq's phantom
gradient (5 unrolled steps: a cheaper, inexact reference). Gradient error: relative to a float64 reference solved
to 1e-12. Iterations are the solvers' own counts (the project then evaluates the map twice more, once without
and once with a graph; torchdeq once with a graph in forward and once in backward).

First, every variant must compute the same outputs and gradients (reversible: against plain autograd to
``--check-tol``; implicit: project and torchdeq agree in float64 at tolerance 1e-12, outputs and gradients, and
every float32 variant's output is within 10× its tolerance of that reference; float32 gradient errors are
reported, not bounded: through ReLU kinks they are up to ~100× the output errors); the script stops with an
error naming the row and the variant otherwise. Then the variants are timed round-robin, ``--rounds`` rounds of
``--steps`` steps each, the order reversed every other round and each variant's timed steps after an untimed one of
its own (the median and min–max over rounds are reported, ratios round by round, of wall time and of the process's
CPU time), and one more step of each is measured for peak tensor memory: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the allocator's own allocation and free records (``torch.profiler``,
``profile_memory=True``) summed in time order (see ``bench_models.py``), after one profiled step of the same
variant so that every variant's frees of what the previous step left are counted.
Ratios are project / peer: below 1 the project is faster or smaller. Prints JSON and a Markdown table and
writes ``--json``.
"""
import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import paired_ratio, round_order, step_tensor_peak_mb  # noqa: E402  (shared with bench_models)

PROJECT = 'project'


# -- reversible rows ---------------------------------------------------------------------------------------------
def _coupling_pairs(steps):
    """Consecutive couplings ``(x₀ ← x₀ + γ f(x₁), x₁ ← x₁ + γ' g(x₀))`` as pairs, the peers' unit."""
    from odenet_timm.layers.reversible import AdditiveCoupling
    f, g = steps
    ok = all(isinstance(c, AdditiveCoupling) and not c.source_scale and not c.negate_target for c in (f, g))
    if not (ok and (f.target, f.source, g.target, g.source) == (0, 1, 1, 0)):
        raise ValueError(f'the peers run two-half additive couplings only, got {f!r}, {g!r}')
    return f, g


def _scaled(coupling):
    import torch.nn as nn

    class Scaled(nn.Module):  # γ·φ(x), the residual function the peers add
        def __init__(self):
            super().__init__()
            self.fn = coupling.fn

        def forward(self, x):
            out = self.fn(x)
            return out if coupling.scale == 1 else out * coupling.scale

    return Scaled()


def _segments(steps):
    """``steps`` as runs of coupling pairs and single non-invertible steps: ``[('pairs', [...]), ('step', s)]``."""
    from odenet_timm.layers.reversible import AdditiveCoupling
    out, i = [], 0
    while i < len(steps):
        if isinstance(steps[i], AdditiveCoupling):
            pair = _coupling_pairs(steps[i:i + 2])
            if out and out[-1][0] == 'pairs':
                out[-1][1].append(pair)
            else:
                out.append(('pairs', [pair]))
            i += 2
        else:
            out.append(('step', steps[i]))
            i += 1
    return out


def reversible_runner(kind, steps, input_is_saved=False, keep_last_graph=True):
    """``x ↦ y`` on the concatenated halves through ``steps`` by the project, plain autograd, memcnn or revlib.

    ``input_is_saved``: another layer saved ``x`` for its backward (a ReLU before the stage), so memcnn must keep
    the input of its first unit instead of freeing and restoring its storage (which autograd rejects).
    ``keep_last_graph``: the project's option of that name (a network sets it on its last stage only)."""
    import torch
    from odenet_timm.layers.reversible import reversible_sequence

    if kind in (PROJECT, 'plain autograd'):
        return lambda x: torch.cat(reversible_sequence(
            steps, x.chunk(2, dim=1), memory_efficient=kind == PROJECT, keep_last_graph=keep_last_graph), 1)
    parts = []
    for what, item in _segments(steps):
        if what == 'step':
            parts.append(lambda x, step=item: torch.cat(step(x.chunk(2, dim=1)), 1))
        elif kind == 'memcnn':
            import memcnn
            wrappers = torch.nn.Sequential(*[
                memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(_scaled(f), _scaled(g)),
                                               keep_input=input_is_saved and not parts and i == 0,
                                               keep_input_inverse=False) for i, (f, g) in enumerate(item)])
            parts.append(wrappers)
        elif kind == 'revlib':
            import revlib
            parts.append(revlib.ReversibleSequential(*[_scaled(c) for pair in item for c in pair]))
        else:
            raise ValueError(f'unknown variant {kind!r}')

    def run(x):
        for part in parts:
            x = part(x)
        return x
    return run


def _stage_steps(stage):
    from odenet_timm.layers.reversible import flatten_steps
    units = list(stage)
    return flatten_steps(units if stage.pad is None else [units[0], stage.transition, *units[1:]])


def _revnet_unit(device):
    """The first RevNet unit of ``revnet_110`` (when registered), else the same unit built here."""
    import timm
    import torch.nn as nn
    from odenet_timm.layers.reversible import AdditiveCoupling, flatten_steps
    from odenet_timm.models.inresnet import BasicResidual
    if 'revnet_110' in timm.list_models('revnet_110'):
        return 'revnet_110 first unit', flatten_steps([timm.create_model('revnet_110').stages[0][0].to(device)])
    f = AdditiveCoupling(BasicResidual(16, 16), target=0, source=1)
    g = AdditiveCoupling(BasicResidual(16, 16), target=1, source=0)
    return 'RevNet unit (built here)', list(nn.ModuleList([f, g]).to(device))


def reversible_rows(args, device):
    """``[(row name, {variant: step}, check)]``; a step returns ``(output, [gradients])``."""
    import timm
    import torch
    import torch.nn.functional as F
    variants = [PROJECT, 'plain autograd', 'memcnn', 'revlib']
    torch.manual_seed(0)
    model = timm.create_model('hamiltonian_218').to(device).train()
    rows = []

    def part_row(name, steps, channels, size, batch):
        modules = [s for s in steps if isinstance(s, torch.nn.Module)]
        params = [p for m in modules for p in m.parameters()]
        x_leaf = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
        weight = None

        def make(kind):
            run = reversible_runner(kind, steps)

            def step():
                nonlocal weight
                for p in params + [x_leaf]:
                    p.grad = None
                out = run(x_leaf * 1.0)  # a non-leaf input, as inside a network
                if weight is None:
                    weight = torch.randn_like(out)
                (out * weight).sum().backward()
                return out.detach(), [x_leaf.grad] + [p.grad for p in params]
            return step
        rows.append((name, {kind: make(kind) for kind in variants}))

    stage = model.stages[0]
    part_row('Hamiltonian unit', _stage_steps(stage)[2:4], 32, 32, args.batch_size)
    name, revnet_steps = _revnet_unit(device)
    part_row(name, revnet_steps, 32, 32, args.batch_size)
    part_row('hamiltonian_218 stage 1 (18 units)', _stage_steps(stage), 32, 32, args.model_batch_size)

    x = torch.randn(args.model_batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.model_batch_size,), device=device)
    runners = {kind: [reversible_runner(kind, _stage_steps(s), input_is_saved=i == 0, keep_last_graph=s.keep_last_graph)
                      for i, s in enumerate(model.stages)] for kind in variants}

    def model_step(kind):
        def step():
            model.zero_grad(set_to_none=True)
            h = model.stem(x)
            for run in runners[kind]:
                h = run(h)
            out = model.forward_head(h)
            F.cross_entropy(out, y).backward()
            return out.detach(), [p.grad for p in model.parameters() if p.requires_grad]
        return step
    rows.append(('hamiltonian_218 (whole model)', {kind: model_step(kind) for kind in variants}))
    return rows


# -- implicit rows -----------------------------------------------------------------------------------------------
def torchdeq_forward(block, tol, phantom=0, stats=None):
    """``x ↦ y`` for an :class:`~odenet_timm.models.implicit.ImplicitBlock` solved by torchdeq: Anderson forward
    from the same explicit Euler predictor, IFT backward (Anderson) or, with ``phantom=k``, k unrolled steps."""
    from torchdeq import get_deq
    options = dict(f_solver='anderson', b_solver='anderson', f_tol=tol, b_tol=tol, f_stop_mode='rel',
                   b_stop_mode='rel', f_max_iter=block.config.max_iter, b_max_iter=block.config.backward_max_iter)
    deq = get_deq(ift=True, **options) if not phantom else get_deq(grad=phantom, tau=1.0, **options)
    deq.train()  # the training path (its gradient); the block itself stays in eval mode

    def writer(info):
        if stats is not None:
            stats.setdefault('backward_iterations', []).append(float(info['nstep'].float().mean()))

    def forward(x):
        g, y0 = block.forward_map(x, *block.residual.normalized_params())
        z_out, info = deq(g, y0.detach(), backward_writer=writer)
        if stats is not None:
            stats.setdefault('forward_iterations', []).append(float(info['nstep'].float().mean()))
        return z_out[-1]
    return forward


def _blocks(model):
    from odenet_timm.models.implicit import ImplicitBlock
    return [m for m in model.modules() if isinstance(m, ImplicitBlock)]


def _with_solver(model, tol):
    """``model`` with every block's tolerances set to ``tol`` (a copy of its solver config)."""
    import dataclasses
    for block in _blocks(model):
        if block.config.tol != tol or block.config.backward_tol != tol:
            block.config = dataclasses.replace(block.config, tol=tol, backward_tol=tol)
    return model


def implicit_variant(model, kind, tol, stats):
    """A function running ``model`` with each implicit block solved by ``kind`` (``project``, ``torchdeq`` or
    ``torchdeq phantom``) at tolerance ``tol``."""
    if kind == PROJECT:
        return lambda x: _with_solver(model, tol)(x)
    blocks = _blocks(model)
    solvers = [torchdeq_forward(b, tol, phantom=5 if 'phantom' in kind else 0, stats=stats) for b in blocks]

    def run(x):
        for block, fn in zip(blocks, solvers):
            block.forward = fn  # an instance attribute: hooks still run around it
        try:
            return model(x)
        finally:
            for block in blocks:
                del block.forward
    return run


def true_residual(model, run, x):
    """Largest per-sample relative residual ``‖G(y) − y‖ / ‖G(y)‖`` of the outputs the blocks return in ``run``."""
    import torch
    worst = []

    def hook(block, args, out):
        g = block.forward_map(args[0], *block.residual.normalized_params())[0](out)
        worst.append(float(((g - out).flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)).max()))
    handles = [b.register_forward_hook(hook) for b in _blocks(model)]
    with torch.no_grad():
        run(x)
    for h in handles:
        h.remove()
    return max(worst)


def _solver_kind(variant):
    return PROJECT if variant == PROJECT else 'torchdeq phantom' if 'phantom' in variant else 'torchdeq'


def implicit_train_step(model, variant, tol, stats, x, y, weight, dtype):
    """``(step, run)``: a train step of ``model`` on ``x`` (loss ``Σ weight·out`` or cross-entropy to ``y``)
    returning ``(output, [input gradient, parameter gradients])``, and the forward ``run`` alone."""
    import torch
    run = implicit_variant(model, _solver_kind(variant), tol, stats)
    x = x.detach().clone().requires_grad_()
    params = list(model.parameters())

    def step():
        for p in params + [x]:
            p.grad = None
        out = run(x)
        loss = (out * weight.to(dtype)).sum() if weight is not None else torch.nn.functional.cross_entropy(out, y)
        loss.backward()
        return out.detach(), [x.grad] + [p.grad for p in params]
    return step, run


def match_label(error, target):
    """What a tighter-tolerance torchdeq row achieved against the project's gradient error ``target``."""
    if error <= target:
        return 'gradient error matched'
    return f'gradient error {error:.1e}, not matched: project {target:.1e}'


def implicit_rows(args, device, log):
    """``[(row name, {variant: step}, {variant: accuracy figures})]`` after the loud equality checks."""
    import timm
    import torch
    import torch.nn as nn
    torch.manual_seed(0)
    net = timm.create_model('implicit_trapezoid_resnet').to(device).eval()
    tol = args.implicit_tol
    rows = []
    for name, model, shape, weighted in (
            ('implicit trapezoid block (16 ch)', nn.Sequential(net.stages[0][0]), (args.batch_size, 16, 32, 32), True),
            ('implicit_trapezoid_resnet (whole network)', net, (args.model_batch_size, 3, 32, 32), False)):
        x = torch.randn(*shape, device=device)
        y = torch.randint(0, 10, (shape[0],), device=device)
        weight = torch.randn(*shape, device=device) if weighted else None

        def make_step(m, variant, variant_tol, stats, dtype=torch.float32):
            return implicit_train_step(m, variant, variant_tol, stats, x.to(dtype), y, weight, dtype)

        # the float64 reference, and the loud check: project and torchdeq agree when both solve to 1e-12
        reference = copy.deepcopy(model).double()
        for block in _blocks(reference):
            block.config = type(block.config)(tol=1e-12, backward_tol=1e-12, max_iter=300, backward_max_iter=300)
        ref_out, ref_grads = make_step(reference, PROJECT, 1e-12, {}, torch.float64)[0]()
        deq_out, deq_grads = make_step(reference, 'torchdeq', 1e-12, {}, torch.float64)[0]()
        agree = max(_rel(a, b) for a, b in zip([deq_out] + deq_grads, [ref_out] + ref_grads))
        log(f'check {name}: float64, tolerance 1e-12: project vs torchdeq, max relative difference {agree:.1e}')
        if not agree <= 1e-8:
            raise SystemExit(f'{name}: the project and torchdeq disagree in float64 ({agree:.1e} > 1e-8)')

        def accuracy(variant, variant_tol):
            stats = {}
            step, run = make_step(model, variant, variant_tol, stats)
            out, grads = step()
            if variant == PROJECT:
                summary = _blocks(model)[0].solver_log.summary()
                stats = dict(forward_iterations=summary['forward_iterations_mean'],
                             backward_iterations=summary['backward_iterations_mean'])
            else:  # means over the blocks
                stats = {key: statistics.mean(values) for key, values in stats.items()}
            return dict(stats, tol=variant_tol, output_error=_rel(out, ref_out),
                        input_grad_error=_rel(grads[0], ref_grads[0]),
                        param_grad_error=_rel(torch.cat([g.flatten() for g in grads[1:]]),
                                              torch.cat([g.flatten() for g in ref_grads[1:]])),
                        true_residual=true_residual(model, run, x))

        def grad_error(acc):
            return max(acc['param_grad_error'], acc['input_grad_error'])

        found = {PROJECT: accuracy(PROJECT, tol), f'torchdeq IFT, tol {tol:g}': accuracy('torchdeq', tol)}
        target = grad_error(found[PROJECT])
        tried = [found[f'torchdeq IFT, tol {tol:g}']]  # torchdeq at ever tighter tolerances
        for candidate in (tol / 3, tol / 10, tol / 30, tol / 100):
            errors = [grad_error(acc) for acc in tried]
            if errors[-1] <= target or (len(errors) > 1 and errors[-1] > 0.9 * errors[-2]):
                break  # matched, or at float32's floor (a tighter tolerance no longer helps)
            tried.append(accuracy('torchdeq', candidate))
        for acc in tried[1:]:
            found[f'torchdeq IFT, tol {acc["tol"]:g} ({match_label(grad_error(acc), target)})'] = acc
        found[f'torchdeq phantom k=5, tol {tol:g}'] = accuracy('torchdeq phantom', tol)
        for variant, acc in found.items():
            limit = 10 * acc['tol']
            log(f'check {name} / {variant}: vs float64 reference: output {acc["output_error"]:.1e}, '
                f'gradients {grad_error(acc):.1e}')
            if acc['output_error'] > limit:  # gradients: reported, not bounded (ReLU kinks amplify output errors)
                raise SystemExit(f'{name} / {variant}: outputs differ from the float64 reference by more than 10x '
                                 f'the tolerance ({limit:g})')
        steps = {v: make_step(model, v, acc['tol'], {})[0] for v, acc in found.items()}
        rows.append((name, steps, found))
    return rows


def _flat(tensors):
    """Every gradient as one vector (``None``: a parameter no variant reaches, left out)."""
    import torch
    return torch.cat([t.double().flatten() for t in tensors if t is not None])


def _rel(a, b):
    """Relative difference ``‖a − b‖ / ‖b‖``; 0 when both are ``None`` (a parameter no variant reaches)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float('inf')
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


# -- measuring ---------------------------------------------------------------------------------------------------
def check_reversible(name, steps, tol, log):
    """Every variant's output and gradients against plain autograd's; exits naming the first mismatch."""
    ref_out, ref_grads = steps['plain autograd']()
    for kind, step in steps.items():
        out, grads = step()
        worst = max(_rel(out, ref_out), _rel(_flat(grads), _flat(ref_grads)))
        log(f'check {name} / {kind}: relative difference to plain autograd (output; all gradients) {worst:.1e}')
        if not worst <= tol:
            raise SystemExit(f'{name} / {kind}: output or gradients differ from plain autograd ({worst:.1e} > {tol:g})')


def peak_memory_mb(step, cuda):
    """Peak tensor memory of one ``step`` (``bench_models.step_tensor_peak_mb``) that follows a step of the SAME
    variant under the memory profiler. On CPU the profiler counts a free only for a block allocated while it
    recorded memory: the variants share their modules, so without this warm-up the gradients a step frees as it
    starts would count as freed for a variant measured just after another's profiled step, and not for the one
    measured first (about the size of the gradients; the whole model: 6 MB in the first one's disfavour)."""
    if not cuda:
        step_tensor_peak_mb(step, cuda)
    return step_tensor_peak_mb(step, cuda)


def measure(steps, rounds, n_steps, sync, cuda):
    """Round-robin timing (seconds per step, per round: wall time, and the process's CPU time, which on a shared
    machine counts the work done rather than the share of a core it got) and one peak-memory step per variant.

    Each variant's timed steps follow an untimed step of the SAME variant, and the order of the variants is reversed
    every other round: a step's speed on CPU depends on the heap the previous step left (which memory is still
    mapped, where the allocator finds blocks), so without this the variant timed after the one with the largest
    peak ran on a warmer heap. Measured on the whole ``hamiltonian_218``, project / revlib read 1.01 when the two
    alternated alone and 0.86 with memcnn between them, in the same minutes."""
    times = {kind: [] for kind in steps}
    cpu_times = {kind: [] for kind in steps}
    for round_index in range(rounds):
        for kind, step in round_order(steps.items(), round_index):
            step()
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(n_steps):
                step()
            sync()
            times[kind].append((time.perf_counter() - start) / n_steps)
            cpu_times[kind].append((time.process_time() - cpu_start) / n_steps)
    memory = {kind: peak_memory_mb(step, cuda) for kind, step in steps.items()}
    return times, cpu_times, memory


def summarise(name, times, cpu_times, memory, extra=None):
    rows = []
    for kind, values in times.items():
        time_ratio, time_spread = paired_ratio(times[PROJECT], values)
        cpu_ratio, cpu_spread = paired_ratio(cpu_times[PROJECT], cpu_times[kind])
        row = dict(row=name, variant=kind, step_ms=1000 * statistics.median(values),
                   step_ms_spread=[1000 * min(values), 1000 * max(values)], peak_mem_mb=memory[kind],
                   time_ratio=time_ratio, time_ratio_spread=time_spread,
                   cpu_time_ratio=cpu_ratio, cpu_time_ratio_spread=cpu_spread,
                   memory_ratio=memory[PROJECT] / memory[kind] if memory[kind] > 0 else None)
        if extra:
            row.update(extra.get(kind, {}))
        rows.append(row)
    return rows


def markdown_table(rows):
    header = ['row', 'variant', 'step ms (min–max)', 'peak tensor MB', 'project / variant time (min–max)',
              'project / variant CPU time (min–max)', 'project / variant memory', 'fwd iters', 'bwd iters',
              'true residual', 'grad error']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]

    def g(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else '–'
    for r in rows:
        grad_error = max(r['param_grad_error'], r['input_grad_error']) if 'param_grad_error' in r else None
        lines.append('| ' + ' | '.join([
            r['row'], r['variant'], f"{r['step_ms']:.1f} ({r['step_ms_spread'][0]:.0f}–{r['step_ms_spread'][1]:.0f})",
            g(r['peak_mem_mb'], '.1f'),
            f"{r['time_ratio']:.2f} ({r['time_ratio_spread'][0]:.2f}–{r['time_ratio_spread'][1]:.2f})",
            f"{r['cpu_time_ratio']:.2f} ({r['cpu_time_ratio_spread'][0]:.2f}–{r['cpu_time_ratio_spread'][1]:.2f})",
            g(r['memory_ratio'], '.2f'), g(r.get('forward_iterations'), '.2f'), g(r.get('backward_iterations'), '.2f'),
            g(r.get('true_residual'), '.1e'), g(grad_error, '.1e')]) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--part', choices=('all', 'reversible', 'implicit'), default='all')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch-size', type=int, default=128, help='batch of the unit and block rows')
    parser.add_argument('--model-batch-size', type=int, default=16,
                        help='batch of the stage and whole-network rows (small: a CPU run stays within minutes)')
    parser.add_argument('--rounds', type=int, default=3, help='round-robin repetitions (median and min–max)')
    parser.add_argument('--steps', type=int, default=2, help='timed steps per variant per round')
    parser.add_argument('--implicit-tol', type=float, default=1e-4, help='the equal tolerance of the implicit rows')
    parser.add_argument('--check-tol', type=float, default=1e-4,
                        help='largest relative difference to plain autograd accepted by the reversible check')
    parser.add_argument('--only', default='', help='run only the rows whose name contains this text')
    parser.add_argument('--json', default='benchmarks/results/bench_peers.json')
    args = parser.parse_args(argv)

    import torch
    import odenet_timm  # noqa: F401  (registers the models)
    cuda = args.device.startswith('cuda')
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    results, checks = [], []

    def note(message):
        checks.append(message)
        log(message)

    if args.part in ('all', 'reversible'):
        for name, steps in reversible_rows(args, args.device):
            if args.only not in name:
                continue
            check_reversible(name, steps, args.check_tol, note)
            results += summarise(name, *measure(steps, args.rounds, args.steps, sync, cuda))
            log(markdown_table(results[-len(steps):]))
    if args.part in ('all', 'implicit'):
        for name, steps, accuracy in implicit_rows(args, args.device, note):
            if args.only not in name:
                continue
            results += summarise(name, *measure(steps, args.rounds, args.steps, sync, cuda), accuracy)
            log(markdown_table(results[-len(steps):]))
    device = torch.cuda.get_device_name() if cuda else f'cpu ({torch.get_num_threads()} threads)'
    result = dict(settings=dict(vars(args), device_name=device), checks=checks, rows=results)
    text = json.dumps(result, indent=2)
    print(text)
    print()
    print(markdown_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
