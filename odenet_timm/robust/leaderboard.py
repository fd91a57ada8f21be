"""The leaderboard: one record per model or ensemble (RobustBench-like fields, accuracies in %), ranked, and
written as ``leaderboard.json`` (schema: ``leaderboard.schema.json`` beside this file), ``leaderboard.md`` and
``leaderboard.csv``.

Rank: worst-case accuracy at the leaderboard ε (``eps[0]``; per example: correct on the clean image and under every
white-box attack that ran), then clean accuracy, then name. Nothing run-dependent (time, host, process count) is
recorded, so the same request gives the same files.
"""
import csv
import importlib.metadata
import json
import os
import platform
from typing import Dict, List, Optional, Sequence

import torch

from .attacks import AttackProtocol, eps_label
from .entries import EvalEntry
from .evaluator import EntryOutcome
from .noise import NOISE_SEVERITIES
from .trust import FLAGS, trust_flags

__all__ = [
    'SCHEMA_VERSION', 'SCHEMA_PATH', 'LEADERBOARD_METRICS', 'summarize', 'build_leaderboard', 'package_versions',
    'leaderboard_settings', 'protocol_differences', 'merge_leaderboards', 'write_json', 'write_markdown', 'write_csv',
]

SCHEMA_VERSION = 3  # 3: the black-box check attacks a sample of the survivors
SCHEMA_PATH = os.path.join(os.path.dirname(__file__), 'leaderboard.schema.json')
LEADERBOARD_METRICS = ('clean_acc', 'noise_acc', 'fgsm_acc', 'ifgsm_acc', 'pgd_acc', 'autoattack_acc', 'worst_case_acc')
_ATTACK_CURVES = ('fgsm', 'ifgsm', 'pgd', 'autoattack', 'blackbox')
_COLUMN_TITLES = {
    'clean_acc': 'clean', 'noise_acc': 'noise', 'fgsm_acc': 'FGSM', 'ifgsm_acc': 'IFGSM', 'pgd_acc': 'PGD',
    'autoattack_acc': 'AutoAttack', 'worst_case_acc': 'worst case',
}
# optional columns of the stability analysis (eval_robust.py --stability), present only when it ran
STABILITY_COLUMNS = {'lipschitz_median': 'Lipschitz (median)', 'max_block_growth': 'max block growth'}
_PACKAGES = ('torch', 'timm', 'torchattacks', 'pyautoattack', 'accelerate', 'numpy', 'huggingface_hub')
_NUMBER_PACKAGES = ('odenet_timm', 'torch', 'timm', 'torchattacks', 'pyautoattack', 'numpy')
"""The packages whose version can change the numbers (models, attacks, random draws): boards merge only if these
agree. Python, Accelerate and huggingface_hub only run or describe the evaluation."""


def _accuracy(correct: torch.Tensor) -> float:
    return round(100.0 * correct.float().mean().item(), 2)


def package_versions() -> Dict[str, str]:
    """Versions of Python and the packages the numbers depend on."""
    import odenet_timm
    versions = {'python': platform.python_version(), 'odenet_timm': odenet_timm.__version__}
    versions.update({name: importlib.metadata.version(name) for name in _PACKAGES})
    return versions


def summarize(outcome: EntryOutcome, protocol: AttackProtocol) -> Dict:
    """Accuracies (%) of one entry: clean, noise (mean, per corruption and severity), each attack at every ε
    (``curves``, aligned with ``eps``), the per-example worst case over the white-box attacks, PGD at the large ε and
    the number of examples the black-box check attacked at each of its ε."""
    correct = outcome.correct
    curves = {'eps': list(protocol.eps)}
    for attack in _ATTACK_CURVES:
        curves[attack] = [_accuracy(row) for row in correct[attack]] if attack in correct else None
    if protocol.white_box:
        worst = correct['clean'].unsqueeze(0)
        for attack in protocol.white_box:
            worst = worst & correct[attack]
        curves['worst_case'] = [_accuracy(row) for row in worst]
    else:
        curves['worst_case'] = None
    noise = None
    if 'noise' in correct:
        noise = {corruption: {'mean': _accuracy(correct['noise'][i]),
                              'severities': [_accuracy(row) for row in correct['noise'][i]]}
                 for i, corruption in enumerate(NOISE_SEVERITIES)}
    summary = {'n_examples': len(correct['clean']), 'clean_acc': _accuracy(correct['clean']),
               'noise_acc': _accuracy(correct['noise']) if noise else None,
               'noise': noise}
    for attack in ('fgsm', 'ifgsm', 'pgd', 'autoattack', 'worst_case'):
        summary[f'{attack}_acc'] = curves[attack][0] if curves[attack] is not None else None
    summary['curves'] = curves
    summary['large_eps'] = protocol.large_eps
    summary['large_eps_acc'] = _accuracy(correct['large_eps']) if 'large_eps' in correct else None
    summary['blackbox_attacked'] = ([int(row.sum()) for row in correct['blackbox_attacked']]
                                    if 'blackbox_attacked' in correct else None)
    return summary


def _checkpoint(entry: EvalEntry) -> Optional[Dict[str, str]]:
    return dict(entry.checkpoint) if entry.checkpoint else None


def _rank_key(record: Dict):
    headline = record['worst_case_acc'] if record['worst_case_acc'] is not None else record['clean_acc']
    return -headline, -record['clean_acc'], record['name']


def _ranked(records: Sequence[Dict]) -> List[Dict]:
    ranked = sorted(records, key=_rank_key)
    for rank, record in enumerate(ranked, start=1):
        record['rank'] = rank
    return ranked


def leaderboard_settings(protocol: AttackProtocol, dataset: str, n_examples: int, noise_source: str,
                         batch_size: Optional[int] = None, versions: Optional[Dict[str, str]] = None) -> Dict:
    """The top-level fields of a leaderboard: everything its numbers depend on besides the entries themselves
    (the batch size too: the random draws of noise and attacks are seeded per batch)."""
    return {
        'schema_version': SCHEMA_VERSION,
        'dataset': dataset,
        'n_examples': n_examples,
        'batch_size': batch_size,
        'noise_source': noise_source if 'noise' in protocol.attacks else None,
        'seed': protocol.seed,
        'protocol': protocol.describe(),
        'versions': versions or package_versions(),
    }


def protocol_differences(board: Dict, settings: Dict) -> List[str]:
    """``setting: value on the board, value now`` for every setting that changes the numbers on which an existing
    ``board`` and a new evaluation's :func:`leaderboard_settings` differ (empty: their entries can be merged)."""
    def comparable(doc: Dict) -> Dict:
        protocol = {k: v for k, v in (doc.get('protocol') or {}).items() if k != 'libraries'}
        versions = doc.get('versions') or {}
        return {**{k: doc.get(k) for k in ('schema_version', 'dataset', 'n_examples', 'batch_size', 'noise_source')},
                **protocol, **{f'{name} version': versions.get(name) for name in _NUMBER_PACKAGES}}
    old, new = comparable(board), comparable(settings)
    return [f'{key}: {old.get(key)!r} on the board, {new.get(key)!r} now'
            for key in list(dict.fromkeys([*old, *new])) if old.get(key) != new.get(key)]


def merge_leaderboards(board: Dict, addition: Dict) -> Dict:
    """``board`` with the entries of ``addition`` (same settings, other names) added and all of them re-ranked."""
    return dict(board, entries=_ranked([*board['entries'], *addition['entries']]))


def build_leaderboard(
        entries: Sequence[EvalEntry],
        outcomes: Dict[str, EntryOutcome],
        protocol: AttackProtocol,
        dataset: str,
        chance_acc: float,
        noise_source: str,
        batch_size: Optional[int] = None,
) -> Dict:
    """The leaderboard document: run settings and one ranked record per entry (ensembles with the mean of their
    members and the improvement ensemble − mean, as in the In-ResNet paper)."""
    n_examples = len(outcomes[entries[0].name].correct['clean'])
    settings = leaderboard_settings(protocol, dataset, n_examples, noise_source, batch_size)
    versions = settings['versions']
    records = {}
    for entry in entries:
        summary = summarize(outcomes[entry.name], protocol)
        flags, details = trust_flags(summary, chance_acc)
        records[entry.name] = {
            'name': entry.name,
            'kind': 'ensemble' if entry.is_ensemble else 'model',
            'architecture': entry.architecture,
            'checkpoint': _checkpoint(entry),
            'model_kwargs': entry.model_kwargs,
            'members': [{'name': m.name, 'architecture': m.architecture, 'checkpoint': _checkpoint(m),
                         'model_kwargs': m.model_kwargs} for m in entry.members] or None,
            'ensemble_combine': entry.ensemble_combine,
            'params': entry.params,
            'number_forward_passes': entry.number_forward_passes,
            'dataset': dataset,
            'n_examples': n_examples,
            'threat_model': 'Linf',
            'eps': list(protocol.eps),
            'eps_labels': [eps_label(e) for e in protocol.eps],
            **{metric: summary[metric] for metric in LEADERBOARD_METRICS},
            'noise': summary['noise'],
            'noise_source': noise_source if summary['noise'] else None,
            'curves': summary['curves'],
            'ensemble': None,
            'trust_checks': {'chance_acc': chance_acc, 'large_eps': protocol.large_eps,
                             'large_eps_acc': summary['large_eps_acc'],
                             'blackbox_queries': protocol.blackbox_queries if protocol.runs_blackbox else None,
                             'blackbox_attacked': summary['blackbox_attacked']},
            'flags': flags,
            'flag_details': details,
            'unreliable': any(flags.values()),
            'solver_stats': outcomes[entry.name].solver_stats or None,
            'seed': protocol.seed,
            'versions': versions,
        }
    for entry in entries:
        if entry.is_ensemble:
            member_records = [records[m.name] for m in entry.members]
            record = records[entry.name]
            metrics = [m for m in LEADERBOARD_METRICS if record[m] is not None]
            mean = {m: round(sum(r[m] for r in member_records) / len(member_records), 2) for m in metrics}
            record['ensemble'] = {
                'members': [m.name for m in entry.members],
                'member_mean': mean,
                'improvement': {m: round(record[m] - mean[m], 2) for m in metrics},
            }
    return dict(settings, entries=_ranked(list(records.values())))


def write_json(leaderboard: Dict, path: str) -> None:
    with open(path, 'w') as f:
        json.dump(leaderboard, f, indent=2)
        f.write('\n')


def _cell(value: Optional[float]) -> str:
    return '–' if value is None else f'{value:.2f}'


def _stat_cell(value) -> str:
    """A solver statistic: flags as yes/no, counts as they are, means to 2 decimals, residuals in 3 digits."""
    if value is None:
        return '–'
    if isinstance(value, bool):
        return 'yes' if value else 'NO'
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f'{value:.3g}' if abs(value) < 0.01 else f'{value:.2f}'
    return str(value)


def _flags_cell(record: Dict) -> str:
    fired = [name for name, value in record['flags'].items() if value]
    if fired:
        return '⚠ ' + ', '.join(fired)
    checked = sum(value is not None for value in record['flags'].values())
    if not checked:
        return 'unchecked'
    return '✓' if checked == len(FLAGS) else f'✓ ({checked}/{len(FLAGS)} checked)'


def _table(header: Sequence[str], rows: Sequence[Sequence], align: Sequence[str]) -> List[str]:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---:' if a == 'r' else '---' for a in align) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return lines


def write_markdown(leaderboard: Dict, path: str) -> None:
    """A ranked table with the trust flags, the ensembles against their members, the flag evidence, the protocol."""
    entries, protocol = leaderboard['entries'], leaderboard['protocol']
    metrics = [m for m in LEADERBOARD_METRICS if any(e[m] is not None for e in entries)]
    eps = protocol['eps']
    lines = [
        '# Robustness leaderboard', '',
        f"{leaderboard['dataset']} · first {leaderboard['n_examples']} validation examples · L∞ ε = "
        f"{eps_label(eps[0])}" + (f" (curves also at {', '.join(eps_label(e) for e in eps[1:])})" if len(eps) > 1 else '')
        + f" · seed {leaderboard['seed']} · accuracies in %", '',
    ]
    stability = [c for c in STABILITY_COLUMNS if any(c in e for e in entries)]
    lines += _table(
        ['rank', 'name', 'architecture', 'params', *(_COLUMN_TITLES[m] for m in metrics), 'trust flags',
         *(STABILITY_COLUMNS[c] for c in stability)],
        [[e['rank'], e['name'], e['architecture'], f"{e['params'] / 1e6:.3f}M", *(_cell(e[m]) for m in metrics),
          _flags_cell(e), *(_cell(e.get(c)) for c in stability)] for e in entries],
        ['r', 'l', 'l', 'r', *('r' * len(metrics)), 'l', *('r' * len(stability))])
    ensembles = [e for e in entries if e['ensemble']]
    if ensembles:
        lines += ['', '## Ensembles', '', 'Averaged member probabilities, attacked as one model; improvement = '
                  'ensemble − mean of the members (In-ResNet paper).', '']
        rows = []
        for e in ensembles:
            rows += [[e['name'], 'ensemble', *(_cell(e[m]) for m in metrics)],
                     ['', f"mean of {', '.join(e['ensemble']['members'])}",
                      *(_cell(e['ensemble']['member_mean'][m]) for m in metrics)],
                     ['', 'improvement', *(f"{e['ensemble']['improvement'][m]:+.2f}" for m in metrics)]]
        lines += _table(['ensemble', 'row', *(_COLUMN_TITLES[m] for m in metrics)], rows,
                        ['l', 'l', *('r' * len(metrics))])
    lines += ['', '## Trust flags', '', '⚠ = fired, ✓ = checked and silent (k/5 checked: only k could be checked); '
              'a flag is unchecked when the attacks it compares did not run.', '']
    lines += [f'- `{name}`: {text}' for name, text in FLAGS.items()]
    fired = [(e['name'], d) for e in entries for d in e['flag_details']]
    if fired:
        lines += ['', 'Evidence:', ''] + [f'- {name} — {detail}' for name, detail in fired]
    solver = [e for e in entries if e['solver_stats']]
    if solver:
        lines += ['', '## Solver statistics', '', "What each model's solver reported, per evaluation phase (the "
                  'statistics of its batches combined).']
        for e in solver:
            phases = list(e['solver_stats'])
            keys = sorted({key for stats in e['solver_stats'].values() for key in stats})
            lines += ['', f"**{e['name']}**", '']
            lines += _table(['statistic', *phases],
                            [[key, *(_stat_cell(e['solver_stats'][phase].get(key)) for phase in phases)]
                             for key in keys], ['l', *('r' * len(phases))])
    lines += ['', '## Protocol', '']
    lines += [f'- {name}: {text}' for name, text in protocol['libraries'].items()]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def write_csv(leaderboard: Dict, path: str) -> None:
    """One row per entry at the leaderboard ε; fired flags joined by ``;``."""
    columns = ['rank', 'name', 'kind', 'architecture', 'params', 'dataset', 'n_examples', 'eps', *LEADERBOARD_METRICS,
               'unreliable', 'flags', 'number_forward_passes', 'checkpoint_sha256',
               *(c for c in STABILITY_COLUMNS if any(c in e for e in leaderboard['entries']))]
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for e in leaderboard['entries']:
            row = {c: e[c] for c in columns if c in e}
            row['eps'] = e['eps'][0]
            row['flags'] = ';'.join(name for name, value in e['flags'].items() if value)
            row['checkpoint_sha256'] = e['checkpoint']['sha256'] if e['checkpoint'] else ''
            writer.writerow({c: '' if row[c] is None else row[c] for c in columns})
