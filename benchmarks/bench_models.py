#!/usr/bin/env python
"""Side-by-side model benchmark: parameters, train-step and eval throughput, peak train-step memory.

Each configuration is measured in its own subprocess (so one model's allocations cannot pollute another's
peak), all configurations are measured in the same run, round-robin over ``--rounds`` rounds (the order reversed
every other round), and the median over rounds is reported together with the ratios to a named baseline, taken
round by round (the median of the per-round ratios and their min–max).

    python benchmarks/bench_models.py cifar_resnet_110 inresnet_110
    python benchmarks/bench_models.py hamiltonian_218 hamiltonian_218:memory_efficient=false \\
        --baseline cifar_resnet_110 --batch-size 128

A configuration is ``MODEL`` or ``MODEL:key=value,key=value`` (values parsed as YAML: ``false``, ``0.5``,
``[8,8,8]``), passed as kwargs to ``timm.create_model``, except ``grad_checkpointing=true``, which calls
``model.set_grad_checkpointing()`` instead (``cifar_resnet_1202:grad_checkpointing=true``).

Time: wall-clock per train step and, beside it, the process's CPU time per train step (all its threads), which
other processes competing for the cores inflate less than wall time; and the convolution/matmul GFLOP of one
train step (``torch.utils.flop_counter``, counted once after the timed steps), which no machine load changes.
On a shared machine compare CPU-bound configurations by those two.

Memory: the peak TENSOR memory one train step adds (activations, gradients, workspace), measured on a separate
step after the timed ones (optimizer state already exists). On CUDA ``torch.cuda.max_memory_allocated`` during
that step minus the memory allocated before it; on CPU the same figure from the allocator's own records: every
allocation and free of that step, as ``torch.profiler`` (``profile_memory=True``) reports them, summed in time
order, and the running total's maximum. The process's resident-set growth (``ru_maxrss``) is reported beside it
(``peak_rss_growth_mb``) but not compared: it is dominated by what the allocator keeps after frees.

Every timing and memory figure is the median over ``--rounds`` rounds, with its min–max spread over rounds.

Models that expose ``solver_stats()`` (implicit networks) get its numeric fields averaged over the timed
train steps as extra columns. Prints JSON and a Markdown table; writes the JSON to ``--json``.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

GRAD_CHECKPOINTING = 'grad_checkpointing'
"""The configuration key that is not a model kwarg but turns on ``model.set_grad_checkpointing()``."""
_TIME_KEYS = ('train_step_ms', 'train_step_cpu_ms', 'train_img_s', 'eval_img_s')


def parse_spec(spec: str):
    """``'name:a=1,b=false'`` → ``('name', {'a': 1, 'b': False})``, each value parsed like every command line's
    ``--model-kwargs`` (:func:`odenet_timm.options.parse_kwarg`)."""
    from odenet_timm.options import parse_kwarg
    name, _, arg_text = spec.partition(':')
    items, depth, current = [], 0, ''
    for char in arg_text:  # split on the commas that are not inside [...] or {...}
        depth += char in '[{'
        depth -= char in ']}'
        if char == ',' and depth == 0:
            items.append(current)
            current = ''
        else:
            current += char
    items.append(current)
    kwargs = {}
    for item in filter(None, items):
        try:
            key, value = parse_kwarg(item)
        except ValueError as e:
            raise ValueError(f'bad model kwarg in {spec!r}: {e}') from None
        kwargs[key] = value
    return name, kwargs


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def measure(spec: str, batch_size: int, img_size: int, steps: int, warmup: int, device: str) -> dict:
    """Build one configuration and measure it in this process."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    import odenet_timm  # noqa: F401  (registers the models)

    name, kwargs = parse_spec(spec)
    model_kwargs = {k: v for k, v in kwargs.items() if k != GRAD_CHECKPOINTING}
    torch.manual_seed(0)
    model = timm.create_model(name, **model_kwargs).to(device).train()
    model.set_grad_checkpointing(bool(kwargs.get(GRAD_CHECKPOINTING, False)))
    in_chans = model.pretrained_cfg['input_size'][0]
    x = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
    y = torch.randint(0, model.num_classes, (batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cuda = device.startswith('cuda')

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def train_step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    solver_fields = {}

    def record_solver_stats():
        stats = model.solver_stats() if hasattr(model, 'solver_stats') else {}
        for key, value in stats.items():
            if isinstance(value, (int, float, bool)):
                solver_fields.setdefault(key, []).append(float(value))

    sync()
    base_rss = _peak_rss_mb()
    for _ in range(warmup):
        train_step()
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        train_step()
        record_solver_stats()
    sync()
    train_s = (time.perf_counter() - start) / steps
    train_cpu_s = (time.process_time() - cpu_start) / steps
    with FlopCounterMode(display=False) as flop_counter:  # one more step, counted (convolutions, matmuls)
        train_step()
    peak_mb = step_tensor_peak_mb(train_step, cuda)
    rss_growth_mb = _peak_rss_mb() - base_rss

    model.eval()
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
        sync()
        eval_s = (time.perf_counter() - start) / steps

    return {
        'config': spec,
        'model': name,
        'kwargs': kwargs,
        'params': sum(p.numel() for p in model.parameters()),
        'train_step_ms': 1000 * train_s,
        'train_step_cpu_ms': 1000 * train_cpu_s,
        'train_step_gflop': flop_counter.get_total_flops() / 1e9,
        'train_img_s': batch_size / train_s,
        'eval_img_s': batch_size / eval_s,
        'peak_train_mem_mb': peak_mb,
        'peak_rss_growth_mb': rss_growth_mb,
        'solver': {k: statistics.mean(v) for k, v in solver_fields.items()},
        'device': torch.cuda.get_device_name() if cuda else f'cpu ({torch.get_num_threads()} threads)',
    }


def step_tensor_peak_mb(train_step, cuda: bool) -> float:
    """Peak tensor memory (MiB) that one call of ``train_step`` adds above what is allocated when it starts."""
    import torch
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step()
    # '[memory]' events: +bytes per allocation, -bytes per free, in time order
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == '[memory]')
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2 ** 20


def run_in_subprocess(spec: str, args) -> dict:
    cmd = [
        sys.executable, __file__, '--worker', spec, '--batch-size', str(args.batch_size),
        '--img-size', str(args.img_size), '--steps', str(args.steps), '--warmup', str(args.warmup),
        '--device', args.device,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {'config': spec, 'error': proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'failed'}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def aggregate(runs: list) -> dict:
    """Median over rounds of the timing and memory figures, and their [min, max] over rounds (``spread``); the
    rest from the first round."""
    ok = [r for r in runs if 'error' not in r]
    if not ok:
        return runs[0]
    row = dict(ok[0])
    row['spread'], row['per_round'] = {}, {}
    for key in _TIME_KEYS + ('peak_train_mem_mb', 'peak_rss_growth_mb'):
        values = [r[key] for r in ok]
        row[key] = statistics.median(values)
        row['spread'][key] = [min(values), max(values)]
        row['per_round'][key] = values if len(ok) == len(runs) else None  # aligned with the baseline's rounds
    row['rounds'] = len(ok)
    return row


def round_order(items, round_index: int) -> list:
    """``items`` in order on even rounds and reversed on odd ones, so that a drift of the machine's speed during a
    round favours none of them (every benchmark of ``benchmarks/`` runs its variants this way)."""
    return list(items) if round_index % 2 == 0 else list(items)[::-1]


def paired_ratio(mine: list, theirs: list):
    """The round-by-round ratios ``mine[i] / theirs[i]``: their median and ``[min, max]``."""
    ratios = [a / b for a, b in zip(mine, theirs)]
    return statistics.median(ratios), [min(ratios), max(ratios)]


def add_ratios(rows: list, baseline: str) -> None:
    """Ratios of every row to the baseline's. Time and memory are PAIRED: the ratio within each round (a row and the
    baseline measured minutes apart at most), their median and ``[min, max]`` (``spread``); the ratio of the two
    medians would pair one round's row with another round's baseline, which on a machine whose speed drifts between
    rounds reads a different figure (one run: per-round CPU-time ratios 1.54, 1.30, 1.54, 1.46, 1.74, median 1.54;
    ratio of the medians 1.71). FLOPs (counted, no spread) and eval time (not per round) are ratios of the figures."""
    base = next((r for r in rows if r['config'] == baseline and 'error' not in r), None)
    for row in rows:
        if base is None or 'error' in row:
            continue
        row['step_flop_ratio'] = row['train_step_gflop'] / base['train_step_gflop']
        row['eval_time_ratio'] = base['eval_img_s'] / row['eval_img_s']
        for key, ratio_key in (('train_step_ms', 'step_time_ratio'), ('train_step_cpu_ms', 'step_cpu_time_ratio'),
                               ('peak_train_mem_mb', 'memory_ratio')):
            mine, theirs = row.get('per_round', {}).get(key), base.get('per_round', {}).get(key)
            if mine and theirs and len(mine) == len(theirs) and min(theirs) > 0:
                row[ratio_key], row['spread'][ratio_key] = paired_ratio(mine, theirs)
            else:
                row[ratio_key] = row[key] / base[key] if base[key] > 0 else None


def markdown_table(rows: list, baseline: str) -> str:
    solver_keys = sorted({k for r in rows for k in r.get('solver', {})})
    header = ['config', 'params', 'train img/s', 'eval img/s', 'train step ms', 'train step CPU ms',
              'train step GFLOP', 'peak train tensor mem MB', f'step time / {baseline}', f'step CPU time / {baseline}',
              f'step GFLOP / {baseline}', f'eval time / {baseline}', f'memory / {baseline}'] + solver_keys
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]

    def fmt(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else '–'

    def ratio(r, key):  # median ratio and, when measured in several rounds, its min–max over rounds
        low_high = r.get('spread', {}).get(key)
        spread = f' ({low_high[0]:.2f}–{low_high[1]:.2f})' if low_high and r.get('rounds', 1) > 1 else ''
        return fmt(r.get(key), '.3f') + spread

    for r in rows:
        if 'error' in r:
            lines.append(f"| {r['config']} | error: {r['error']} |" + ' |' * (len(header) - 2))
            continue
        cells = [r['config'], f"{r['params']:,}", fmt(r['train_img_s'], '.1f'), fmt(r['eval_img_s'], '.1f'),
                 fmt(r['train_step_ms'], '.1f'), fmt(r['train_step_cpu_ms'], '.1f'), fmt(r['train_step_gflop'], '.2f'),
                 fmt(r['peak_train_mem_mb'], '.1f'),
                 ratio(r, 'step_time_ratio'), ratio(r, 'step_cpu_time_ratio'),
                 fmt(r.get('step_flop_ratio'), '.3f'), fmt(r.get('eval_time_ratio'), '.3f'),
                 ratio(r, 'memory_ratio')]
        cells += [fmt(r.get('solver', {}).get(k), '.3g') for k in solver_keys]  # residuals are ~1e-4
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='*', help='MODEL or MODEL:key=value,... (see above)')
    parser.add_argument('--baseline', default='cifar_resnet_110', help='configuration the ratios are against')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--steps', type=int, default=5, help='timed steps per measurement')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps before timing')
    parser.add_argument('--rounds', type=int, default=3, help='round-robin repetitions; the median is reported')
    parser.add_argument('--device', default='cuda' if _cuda_available() else 'cpu')
    parser.add_argument('--timeout', type=float, default=3600, help='seconds per measurement subprocess')
    parser.add_argument('--json', default='benchmarks/results/bench_models.json', help='where to write the JSON')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(measure(args.worker, args.batch_size, args.img_size, args.steps, args.warmup, args.device)))
        return 0
    if not args.configs:
        parser.error('name at least one model configuration')
    configs = list(dict.fromkeys(([args.baseline] if args.baseline not in args.configs else []) + args.configs))
    for spec in configs:
        parse_spec(spec)  # fail on a malformed spec before any measurement
    runs = {spec: [] for spec in configs}
    for round_idx in range(args.rounds):
        for spec in round_order(configs, round_idx):
            print(f'[round {round_idx + 1}/{args.rounds}] {spec}', file=sys.stderr, flush=True)
            runs[spec].append(run_in_subprocess(spec, args))
    rows = [aggregate(runs[spec]) for spec in configs]
    add_ratios(rows, args.baseline)
    result = {
        'settings': {k: v for k, v in vars(args).items() if k not in ('worker', 'configs')},
        'rows': rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    print()
    print(markdown_table(rows, args.baseline))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + '\n')
    return 1 if any('error' in r for r in rows) else 0


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == '__main__':
    sys.exit(main())
