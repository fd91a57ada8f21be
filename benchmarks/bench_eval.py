#!/usr/bin/env python
"""Evaluation cost: the evaluator's phases against the bare library calls they wrap, side by side in one process.

Each round (``--rounds``, round-robin) runs on the same model, examples, batches and attack settings:

* ``evaluator``: :func:`odenet_timm.robust.evaluate` with the protocol (default: ``eval_robust.py``'s defaults),
  each phase timed inside the evaluator (``EntryOutcome.cpu_seconds``), the whole call timed outside;
* ``same work``: the same with ``attack_all=True`` (every example attacked, as the bare calls do), which isolates
  the harness (normalizing wrapper, seeding, bookkeeping) from the work that skipping saves;
* ``bare``: per batch, the bare torchattacks / pyautoattack call of each phase on every example plus one prediction
  to score it (the noise phase: the predictions on the 20 corrupted batches, made beforehand as the evaluator's are;
  Square: on as many examples of the batch as the evaluator attacks when every example survives).

Before the timed rounds one untimed warm-up runs the evaluator (2 attack steps, 2 Square queries) and a bare FGSM
per batch, so that no variant pays for the first passes at a batch shape (kernel selection, allocator growth); the
variants then alternate their order from round to round. Times are the process's CPU seconds (one torch thread
by default), which the other processes of a shared machine inflate far less than wall time. It prints, per
phase, the median seconds over rounds (min–max beside them), the median of the per-round ratios to the bare call
(min–max beside it) and the share of the evaluator's total taken by the trust checks (black-box Square, large-ε
PGD); JSON to ``--json``, Markdown to stdout. ``--before DIR`` also times, alternating within each round,
``evaluate()`` of the checkout in DIR against this one, each in a fresh subprocess (the default protocol on the
same model and examples), in wall and CPU time.

    python benchmarks/bench_eval.py --checkpoint runs/inresnet/export --n-examples 256
    python benchmarks/bench_eval.py --checkpoint runs/inresnet/export --before ../odenet_timm_old --rounds 2

Without ``--checkpoint`` the model is a seeded random-init ``--model`` (clean accuracy near chance, so skipping the
misclassified examples saves most of the work: use a trained checkpoint for representative numbers).
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import timm  # noqa: E402
import torch  # noqa: E402
import torchattacks  # noqa: E402
from pyautoattack.square import SquareAttack  # noqa: E402

from odenet_timm.robust import AttackProtocol, evaluate, load_evaluation_examples, load_export_dir  # noqa: E402
from odenet_timm.robust.attacks import SQUARE_P_INIT, predict, sample_size  # noqa: E402
from odenet_timm.robust.noise import NOISE_SEVERITIES, SEVERITIES, ComputedNoise  # noqa: E402
from odenet_timm.robust.seeding import derive_seed  # noqa: E402
from bench_models import round_order  # noqa: E402  (its sibling; the script's directory is on sys.path)

TRUST_CHECKS = ('blackbox', 'large_eps')
WHITE_BOX = ('fgsm', 'ifgsm', 'pgd')
# Run by `--before` in a subprocess whose PYTHONPATH is the checkout timed: that checkout's default protocol (or
# the Square budget given), whole-call seconds of wall and of CPU time (the process's: what a loaded machine's
# other processes do not inflate).
_TIMED_EVALUATION = '''
import json, sys, time, torch
from odenet_timm.robust import AttackProtocol, evaluate, load_evaluation_examples, load_export_dir
export, n, batch_size, queries, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
entry = load_export_dir(export, 'model')
images, labels, _ = load_evaluation_examples('digits', None, n, entry.input_size)
protocol = AttackProtocol(**({} if queries == 'default' else {'blackbox_queries': int(queries)}))
start, cpu_start = time.perf_counter(), time.process_time()
evaluate([entry], images, labels, protocol, batch_size=batch_size)
print(json.dumps({'total': time.perf_counter() - start, 'cpu': time.process_time() - cpu_start}))
'''


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', default=None, help='export directory of a trained model (train.py RUN/export)')
    parser.add_argument('--model', default='inresnet_20', help='random-init architecture when no --checkpoint')
    parser.add_argument('--n-examples', type=int, default=256)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--eps', type=float, nargs='+', default=[8 / 255])
    parser.add_argument('--blackbox-queries', type=int, default=AttackProtocol.blackbox_queries,
                        help="Square's budget (default: the protocol's; --before uses each checkout's default)")
    parser.add_argument('--blackbox-share', type=float, default=AttackProtocol.blackbox_share,
                        help="share of the white-box survivors Square attacks (default: the protocol's; --before times "
                             "each checkout's default protocol)")
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--threads', type=int, default=1, help='torch threads (default 1: a shared 2-core machine)')
    parser.add_argument('--before', default=None, metavar='DIR', help='a checkout whose evaluate() to time too')
    parser.add_argument('--totals-only', action='store_true', help='with --before: only the two whole-protocol times')
    parser.add_argument('--json', default=None, help='write the results here')
    return parser.parse_args(argv)


def _timed(run: Callable[[], None]) -> float:
    """CPU seconds of ``run`` (this process's, like the evaluator's ``cpu_seconds``)."""
    start = time.process_time()
    run()
    return time.process_time() - start


def bare_phases(model, batches, noisy, protocol: AttackProtocol) -> Dict[str, float]:
    """Seconds of each phase as bare library calls on every example of every batch, each followed by a prediction."""
    eps = protocol.eps
    attacks = {
        'fgsm': [lambda e=e: torchattacks.FGSM(model, eps=e) for e in eps],
        'ifgsm': [lambda e=e: torchattacks.BIM(model, eps=e, alpha=protocol.step_size, steps=protocol.steps)
                  for e in eps],
        'pgd': [lambda e=e: torchattacks.PGD(model, eps=e, alpha=protocol.step_size, steps=protocol.steps,
                                             random_start=True) for e in eps],
        'large_eps': [lambda: torchattacks.PGD(model, eps=protocol.large_eps,
                                               alpha=protocol.large_eps_step_size(protocol.steps),
                                               steps=protocol.steps, random_start=True)],
    }
    seconds = {'clean': sum(_timed(lambda: predict(model, x)) for x, _ in batches),
               'noise': sum(_timed(lambda: [predict(model, n) for n in corrupted.values()]) for corrupted in noisy)}
    for phase in WHITE_BOX:
        seconds[phase] = sum(_timed(lambda: predict(model, make()(x, y))) for make in attacks[phase] for x, y in batches)
    if protocol.runs_blackbox:
        def square(x, y):
            attack = SquareAttack(model, norm='Linf', n_queries=protocol.blackbox_queries, eps=eps[0],
                                  p_init=SQUARE_P_INIT, n_restarts=1, seed=0, verbose=False, device=x.device,
                                  resc_schedule=True)
            sample = sample_size(len(x), protocol.blackbox_share)
            with torch.no_grad():
                predict(model, attack.perturb(x[:sample], y[:sample]))
        seconds['blackbox'] = sum(_timed(lambda: square(x, y)) for x, y in batches)
    seconds['large_eps'] = sum(_timed(lambda: predict(model, attacks['large_eps'][0]()(x, y))) for x, y in batches)
    return seconds


def warm_up(entry, images, labels, protocol, batches, batch_size) -> None:
    """One untimed short run of the evaluator (2 attack steps, 2 Square queries) and of a bare FGSM per batch: the
    first passes at each batch shape, forward and backward, are made before anything is timed."""
    short = dataclasses.replace(protocol, steps=2, blackbox_queries=min(protocol.blackbox_queries, 2))
    evaluate([entry], images, labels, short, batch_size=batch_size)
    for x, y in batches:
        predict(entry.module, torchattacks.FGSM(entry.module, eps=protocol.eps[0])(x, y))


def evaluator_phases(entry, images, labels, protocol, batch_size, attack_all) -> Dict[str, float]:
    """CPU seconds of each phase inside :func:`evaluate`, and of the whole call (``total``)."""
    start = time.process_time()
    outcome = evaluate([entry], images, labels, protocol, batch_size=batch_size, attack_all=attack_all)[entry.name]
    return dict(outcome.cpu_seconds, total=time.process_time() - start)


def timed_checkout(path: str, export: str, args: argparse.Namespace) -> Dict[str, float]:
    """Wall (``total``) and CPU (``cpu``) seconds of the default protocol's ``evaluate()`` in the checkout at
    ``path``, in a fresh subprocess."""
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(args.threads))
    queries = 'default' if args.blackbox_queries == AttackProtocol.blackbox_queries else str(args.blackbox_queries)
    # run from inside the checkout: `python -c` puts the working directory before PYTHONPATH on sys.path
    result = subprocess.run([sys.executable, '-c', _TIMED_EVALUATION, os.path.abspath(export), str(args.n_examples),
                             str(args.batch_size), queries, str(args.threads)],
                            env=env, cwd=path, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _spread(values: List[float]) -> Dict[str, float]:
    return {'median': statistics.median(values), 'min': min(values), 'max': max(values)}


def summarize(rounds: List[Dict[str, Dict[str, float]]]) -> Dict:
    """Median and spread per variant and phase; per-round ratios to the bare call (median and spread); the trust
    checks' share."""
    variants = rounds[0].keys()
    out = {v: {phase: _spread([r[v][phase] for r in rounds]) for phase in rounds[0][v]} for v in variants}
    if 'evaluator' not in out:
        return out
    evaluator = {phase: s['median'] for phase, s in out['evaluator'].items()}
    phases = [p for p in out['bare'] if p in evaluator]
    for variant, key in (('evaluator', 'ratio_to_bare'), ('same work', 'same_work_ratio_to_bare')):
        out[key] = {p: _spread([r[variant][p] / r['bare'][p] for r in rounds]) for p in phases}
    trust = sum(evaluator.get(p, 0.0) for p in TRUST_CHECKS)
    out['trust_share_of_total'] = trust / evaluator['total']
    out['trust_over_white_box'] = trust / sum(evaluator[p] for p in WHITE_BOX)
    out['harness_outside_phases'] = (evaluator['total'] - sum(v for p, v in evaluator.items() if p != 'total')) / \
        evaluator['total']
    return out


def markdown(summary: Dict) -> str:
    def cell(variant, phase):
        s = summary[variant].get(phase)
        return '–' if s is None else f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})"

    def ratio(key, phase):
        s = summary[key].get(phase)
        return '–' if s is None else f"{s['median']:.2f}× ({s['min']:.2f}–{s['max']:.2f})"

    lines = []
    if 'evaluator' in summary:
        lines = ['| phase | evaluator s | same work s | bare s | evaluator / bare | same work / bare |',
                 '|---|---:|---:|---:|---:|---:|']
        for phase in summary['evaluator']:
            lines.append(f"| {phase} | {cell('evaluator', phase)} | {cell('same work', phase)} | "
                         f"{cell('bare', phase)} | {ratio('ratio_to_bare', phase)} | "
                         f"{ratio('same_work_ratio_to_bare', phase)} |")
        lines += ['', f"trust checks (Square + large-ε PGD): {100 * summary['trust_share_of_total']:.1f}% of the "
                      f"evaluator's total, {100 * summary['trust_over_white_box']:.1f}% of its white-box attacks' "
                      f"time; outside the phases: {100 * summary['harness_outside_phases']:.1f}% of the total"]
    if 'before' in summary:
        lines.append(f"evaluate() of the whole default protocol: before {cell('before', 'total')} s, "
                     f"after {cell('after', 'total')} s of wall time; before {cell('before', 'cpu')} s, "
                     f"after {cell('after', 'cpu')} s of CPU time")
    return '\n'.join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        export = args.checkpoint
        if export is None:
            torch.manual_seed(0)
            export = os.path.join(tmp, 'export')
            timm.models.save_for_hf(timm.create_model(args.model), export, safe_serialization=True)
        entry = load_export_dir(export, 'model')
        model = entry.module
        images, labels, _ = load_evaluation_examples('digits', None, args.n_examples, entry.input_size)
        protocol = AttackProtocol(eps=tuple(args.eps), blackbox_queries=args.blackbox_queries,
                                  blackbox_share=args.blackbox_share)
        batches = [(images[i:i + args.batch_size], labels[i:i + args.batch_size])
                   for i in range(0, len(labels), args.batch_size)]
        noisy = [ComputedNoise().corrupted(x, list(range(i * args.batch_size, i * args.batch_size + len(x))),
                                           derive_seed(protocol.seed, i)) for i, (x, _) in enumerate(batches)]
        assert all(len(n) == len(NOISE_SEVERITIES) * len(SEVERITIES) for n in noisy)
        clean_acc = (predict(model, images) == labels).float().mean().item()
        variants = {
            'evaluator': lambda: evaluator_phases(entry, images, labels, protocol, args.batch_size, False),
            'bare': lambda: bare_phases(model, batches, noisy, protocol),
            'same work': lambda: evaluator_phases(entry, images, labels, protocol, args.batch_size, True),
        }
        if args.totals_only:
            variants = {}
        else:
            warm_up(entry, images, labels, protocol, batches, args.batch_size)
        if args.before:
            variants['after'] = lambda: timed_checkout(REPO, export, args)
            variants['before'] = lambda: timed_checkout(args.before, export, args)
        rounds = []
        for r in range(args.rounds):
            measured = {name: variants[name]() for name in round_order(variants, r)}
            if 'bare' in measured:
                measured['bare']['total'] = sum(measured['bare'].values())
            rounds.append(measured)
            print(f'round {r + 1}/{args.rounds}: ' + json.dumps(measured), file=sys.stderr)
    summary = summarize(rounds)
    summary['settings'] = dict(vars(args), model=entry.architecture, clean_acc=clean_acc,
                               protocol=protocol.describe()['libraries'], torch_threads=torch.get_num_threads())
    print(markdown(summary))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
