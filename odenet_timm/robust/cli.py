"""``eval_robust.py``: parse the request, check all of it, evaluate, write the leaderboard (and cards).

Everything that can be wrong with the input (paths, weights that do not fit, ε, attack names, datasets whose
classes do not match a model's head, CIFAR-C files of another dataset) is checked before the first attack runs.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

from ..data import DatasetError, DatasetNotFoundError
from .. import CheckpointMismatchError
from ..options import ParseYamlKwargs
from .attacks import ATTACKS, AUTOATTACK_VERSIONS, DEFAULT_ATTACKS, AttackProtocol, parse_eps
from .entries import (
    ENSEMBLE_COMBINES, EvalEntry, check_finite_logits, load_export_dir, load_weights_file, make_ensemble,
)
from .errors import EvaluationInputError
from .evaluator import DEFAULT_BATCH_SIZE, default_batch_size, evaluate, load_evaluation_examples, make_accelerator
from .leaderboard import (
    SCHEMA_PATH, build_leaderboard, leaderboard_settings, merge_leaderboards, protocol_differences, write_csv,
    write_json, write_markdown,
)
from .noise import CifarCNoise, ComputedNoise
from .plots import plot_robustness_curves
from .schema import load_schema, validate

__all__ = ['build_parser', 'main']

OUTPUT_FILES = ('leaderboard.json', 'leaderboard.md', 'leaderboard.csv', 'robustness_curves.png')
_WRITERS = dict(zip(OUTPUT_FILES, (write_json, write_markdown, write_csv, plot_robustness_curves)))
CARDS_DIR = 'cards'


def _number_called(name: str):
    """An argparse type reading a number or a fraction (``8/255``) called ``name`` in its error."""
    def convert(text: str) -> float:
        try:
            return parse_eps(text, name)
        except EvaluationInputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


_eps = _number_called('ε')
_share = _number_called('share')


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {value}')
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='eval_robust.py',
        description='Robustness leaderboard: clean, CIFAR-10-C noise, FGSM, IFGSM, PGD and AutoAttack accuracy of '
                    'trained models and ensembles, with trust checks for gradient masking. Runs under '
                    '`accelerate launch` / `torchrun` too (examples are sharded over the processes).')
    models = parser.add_argument_group('what to evaluate (NAME= is optional; the default name is the run directory)')
    models.add_argument('--checkpoints', nargs='+', action='extend', default=[], metavar='[NAME=]DIR',
                        help='export directories written by train.py (timm.models.save_for_hf, safetensors)')
    models.add_argument('--model', action='append', default=[], metavar='ARCH',
                        help='a registered architecture, paired in order with --weights')
    models.add_argument('--weights', action='append', default=[], metavar='[NAME=]FILE',
                        help='weights (.safetensors) for the --model given at the same position')
    models.add_argument('--model-kwargs', nargs='+', default={}, action=ParseYamlKwargs, metavar='KEY=VALUE',
                        help='architecture arguments for every --model, values parsed as YAML like train.py\'s '
                             '(layers=[1,1,1], memory_efficient=false)')
    models.add_argument('--ensemble', action='append', default=[], metavar='NAME=DIR,DIR,...',
                        help='an ensemble of export directories, attacked as one model (repeatable)')
    models.add_argument('--ensemble-combine', choices=ENSEMBLE_COMBINES, default='probs',
                        help='average member probabilities (default, as in the In-ResNet paper) or logits')
    data = parser.add_argument_group('data')
    data.add_argument('--dataset', default='digits', help='digits (default), torch/cifar10, torch/cifar100 or an '
                                                          'ImageFolder directory; the validation split is used')
    data.add_argument('--data-dir', default=None, help='root of torch/cifar* (default ./data)')
    data.add_argument('--cifar-c-dir', default=None, help='real CIFAR-10-C / CIFAR-100-C .npy files to read the '
                                                          'noise corruptions from (default: computed on the fly)')
    data.add_argument('--n-examples', type=int, default=None, help='the first N examples, in order (default: all)')
    data.add_argument('--batch-size', type=_positive_int, default=None,
                      help=f"examples per batch (default {DEFAULT_BATCH_SIZE['cpu']} on CPU, "
                           f"{DEFAULT_BATCH_SIZE['cuda']} on GPU); random draws are seeded per batch")
    attacks = parser.add_argument_group('protocol')
    attacks.add_argument('--attacks', nargs='+', choices=ATTACKS, default=list(DEFAULT_ATTACKS),
                         help=f'default: {" ".join(DEFAULT_ATTACKS)} (clean accuracy is always measured)')
    attacks.add_argument('--eps', nargs='+', type=_eps, default=[8 / 255], metavar='EPS',
                         help='L∞ budgets in (0, 1], e.g. 8/255; the first is the leaderboard ε (default 8/255)')
    attacks.add_argument('--steps', type=int, default=20, help='IFGSM / PGD steps (default 20)')
    attacks.add_argument('--step-size', type=_eps, default=1 / 255, help='IFGSM / PGD step (default 1/255)')
    attacks.add_argument('--autoattack-version', choices=AUTOATTACK_VERSIONS, default='standard',
                         help="standard (leaderboard numbers) or fast (APGD-CE + APGD-T, 3 targets)")
    attacks.add_argument('--blackbox-queries', type=int, default=AttackProtocol.blackbox_queries,
                         help='Square attack budget per example for the black-box trust check (0 skips it; default '
                              f'{AttackProtocol.blackbox_queries}; 1000 with --blackbox-share 1 for a thorough one)')
    attacks.add_argument('--blackbox-share', type=_share, default=AttackProtocol.blackbox_share,
                         help='share of the examples that survived every white-box attack that Square attacks, a '
                              'seeded random sample per batch, rounded up, at least 16 (default 1/8; 1: all of them)')
    attacks.add_argument('--blackbox-all-eps', action='store_true',
                         help='run the black-box check at every ε (default: the leaderboard ε only)')
    attacks.add_argument('--seed', type=int, default=0)
    stability = parser.add_argument_group('stability analysis')
    stability.add_argument('--stability', action='store_true',
                           help='also analyse forward stability (end-to-end Lipschitz estimate, perturbation growth '
                                'through the blocks, block spectra, In-ResNet λ): two extra leaderboard columns, '
                                'stability.json and stability_*.png')
    stability.add_argument('--stability-examples', type=int, default=64, metavar='N',
                           help='the first N evaluated examples are analysed (default 64)')
    out = parser.add_argument_group('outputs')
    out.add_argument('--output', default=None, help=f'directory for {", ".join(OUTPUT_FILES)}')
    out.add_argument('--cards', action='store_true', help='also write OUTPUT/cards/NAME/README.md per checkpoint')
    existing = out.add_mutually_exclusive_group()
    existing.add_argument('--overwrite', action='store_true',
                          help='replace the leaderboard already in --output (its files and cards/ only; nothing else '
                               'there is touched, and the old board stays until the new one is written)')
    existing.add_argument('--append', action='store_true',
                          help='evaluate only the entries given and merge them into the leaderboard already in '
                               '--output, re-ranked; refused unless dataset, examples, batch size, noise, ε, '
                               'attacks, steps, step size, seed and the versions that change numbers are the same')
    out.add_argument('--write-architecture-cards', default=None, metavar='DIR',
                     help='write one card per registered architecture into DIR (e.g. model_cards/) and exit '
                          'unless models are given too')
    return parser


def _split_name(value: str) -> Tuple[Optional[str], str]:
    """``NAME=PATH`` → (NAME, PATH); a plain PATH → (None, PATH)."""
    name, sep, path = value.partition('=')
    return (name, path) if sep and name and os.sep not in name else (None, value)


def _default_name(path: str) -> str:
    """``runs/inresnet/export`` → ``inresnet``; ``weights/r20.safetensors`` → ``r20``."""
    path = os.path.normpath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in ('export', 'model'):
        return os.path.basename(os.path.dirname(path)) or stem
    return stem


def _load_entries(args: argparse.Namespace) -> List[EvalEntry]:
    """Single models first (in the order given), then members of ensembles not listed already, then ensembles."""
    if len(args.model) != len(args.weights):
        raise EvaluationInputError(f'--model and --weights pair up in order: got {len(args.model)} --model and '
                                   f'{len(args.weights)} --weights')
    if not (args.checkpoints or args.model or args.ensemble):
        raise EvaluationInputError('nothing to evaluate: pass --checkpoints, --model/--weights or --ensemble')
    entries: List[EvalEntry] = []
    by_path: Dict[str, EvalEntry] = {}

    def add_export(value: str) -> EvalEntry:
        name, path = _split_name(value)
        key = os.path.abspath(path)
        if key not in by_path:
            by_path[key] = load_export_dir(path, name or _default_name(path))
            entries.append(by_path[key])
        return by_path[key]

    for value in args.checkpoints:
        add_export(value)
    for model_name, value in zip(args.model, args.weights):
        name, path = _split_name(value)
        entries.append(load_weights_file(model_name, path, name or _default_name(path), args.model_kwargs))
    ensembles = []
    for value in args.ensemble:
        name, sep, members = value.partition('=')
        paths = [p for p in members.split(',') if p]
        if not sep or not name or not paths:
            raise EvaluationInputError(f'--ensemble takes NAME=DIR,DIR,...; got {value!r}')
        ensembles.append(make_ensemble(name, [add_export(p) for p in paths], args.ensemble_combine))
    entries += ensembles
    duplicates = [name for name, count in Counter(e.name for e in entries).items() if count > 1]
    if duplicates:
        raise EvaluationInputError(f'several entries are named {", ".join(duplicates)}: give them names with NAME=PATH')
    return entries


def _check_entries_fit(entries: Sequence[EvalEntry], classes: Sequence[str], dataset: str) -> None:
    for entry in entries:
        if entry.num_classes != len(classes):
            shown = ', '.join(classes[:5]) + (', …' if len(classes) > 5 else '')
            raise EvaluationInputError(
                f'{entry.name} ({entry.architecture}) has a {entry.num_classes}-class head but {dataset} has '
                f'{len(classes)} classes ({shown})')
    sizes = {entry.input_size for entry in entries}
    if len(sizes) > 1:
        raise EvaluationInputError(f'the models take different input sizes {sorted(sizes)}; evaluate them separately')


def _read_board(path: str) -> Dict:
    """The leaderboard in ``path`` to append to, refused (naming the file) when unreadable or not of this schema."""
    try:
        with open(path) as f:
            board = json.load(f)
    except (OSError, ValueError) as e:
        raise EvaluationInputError(f'--append: cannot read the leaderboard to append to, {path}: {e}') from e
    problems = validate(board, load_schema(SCHEMA_PATH))
    if problems:
        raise EvaluationInputError(f'--append: {path} is not a leaderboard this version can extend '
                                   f'({problems[0]}{" …" if len(problems) > 1 else ""}); re-run with --overwrite')
    return board


def _prepare_output(args: argparse.Namespace) -> Optional[Dict]:
    """Check, before anything is evaluated, that ``--output`` can take the results without losing an existing
    leaderboard; returns the leaderboard to append to (``--append``), else None."""
    output = args.output
    if os.path.exists(output) and not os.path.isdir(output):
        raise EvaluationInputError(f'--output {output} is a file, not a directory')
    try:
        os.makedirs(output, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as e:
        raise EvaluationInputError(f'--output {output} cannot be written: {e.strerror or e}') from None
    present = [name for name in (*OUTPUT_FILES, CARDS_DIR) if os.path.exists(os.path.join(output, name))]
    if not present or args.overwrite:
        return None
    if not args.append:
        raise EvaluationInputError(
            f'{output} already holds a leaderboard ({", ".join(present)}): pass --append to evaluate only the '
            f'entries given and merge them into it, or --overwrite to replace it')
    return _read_board(os.path.join(output, 'leaderboard.json'))


def _check_appendable(board: Dict, entries: Sequence[EvalEntry], settings: Dict, output: str) -> None:
    differences = protocol_differences(board, settings)
    if differences:
        raise EvaluationInputError(f'--append: the leaderboard in {output} was evaluated under other settings, so '
                                   f'its numbers cannot be ranked with these: ' + '; '.join(differences))
    taken = [e.name for e in entries if e.name in {record['name'] for record in board['entries']}]
    if taken:
        raise EvaluationInputError(f'--append: {", ".join(taken)} already on the leaderboard in {output}; give the '
                                   f'new entries other names (NAME=PATH) or replace the board with --overwrite')


def _write_outputs(leaderboard: Dict, output: str, cards: bool, replace_cards: bool) -> None:
    """Write every output file next to its final name first, then move them all into place (an interrupted write
    leaves the previous board whole); ``replace_cards`` removes the previous board's cards/."""
    problems = validate(leaderboard, load_schema(SCHEMA_PATH))
    if problems:
        raise RuntimeError('the leaderboard does not match its schema:\n' + '\n'.join(problems))
    staged = {}
    for name, write in _WRITERS.items():
        staged[name] = os.path.join(output, f'.tmp.{name}')  # keeps the extension that picks the image format
        write(leaderboard, staged[name])
    for name, path in staged.items():
        os.replace(path, os.path.join(output, name))
    cards_dir = os.path.join(output, CARDS_DIR)
    if replace_cards:
        shutil.rmtree(cards_dir, ignore_errors=True)
    if cards:
        from ..cards import checkpoint_card
        for record in leaderboard['entries']:
            if record['kind'] == 'model':
                card_dir = os.path.join(cards_dir, record['name'])
                os.makedirs(card_dir, exist_ok=True)
                checkpoint_card(record, leaderboard).save(os.path.join(card_dir, 'README.md'))


def run(args: argparse.Namespace) -> Optional[dict]:
    """Check the whole request, evaluate, and (on the main process) write the outputs; returns the leaderboard."""
    if args.stability and args.stability_examples < 1:
        raise EvaluationInputError(f'--stability-examples must be positive, got {args.stability_examples}')
    if args.stability and args.append:
        raise EvaluationInputError('--stability cannot be combined with --append (the stability section covers the '
                                   'entries of one run): evaluate all entries with --stability, or --overwrite')
    protocol = AttackProtocol(
        attacks=tuple(args.attacks), eps=tuple(args.eps), steps=args.steps, step_size=args.step_size,
        autoattack_version=args.autoattack_version, blackbox_queries=args.blackbox_queries,
        blackbox_share=args.blackbox_share,
        blackbox_all_eps=args.blackbox_all_eps, seed=args.seed)
    if args.output is None:
        raise EvaluationInputError('--output DIR is required to evaluate')
    board = _prepare_output(args)
    entries = _load_entries(args)
    images, labels, classes = load_evaluation_examples(args.dataset, args.data_dir, args.n_examples,
                                                       entries[0].input_size)
    _check_entries_fit(entries, classes, args.dataset)
    noise = CifarCNoise(args.cifar_c_dir) if args.cifar_c_dir else ComputedNoise()
    if args.cifar_c_dir:
        noise.check_examples(labels, entries[0].input_size[1:])
    accelerator = make_accelerator()
    batch_size = args.batch_size or default_batch_size(accelerator.device)  # recorded: it keys the random draws
    if board is not None:
        settings = leaderboard_settings(protocol, args.dataset, len(labels), noise.source, batch_size)
        _check_appendable(board, entries, settings, args.output)
    for entry in entries:
        if not entry.is_ensemble:  # an ensemble of members with finite logits has finite outputs
            check_finite_logits(entry, images, batch_size, accelerator.device)
    if accelerator.is_main_process:
        print(f'evaluating {len(entries)} entries on {len(labels)} {args.dataset} examples '
              f'({", ".join(protocol.attacks)}) on {accelerator.num_processes} process(es)', file=sys.stderr)

    outcomes = evaluate(entries, images, labels, protocol, batch_size=batch_size, noise=noise,
                        accelerator=accelerator)
    if not accelerator.is_main_process:
        return None
    chance_acc = round(100.0 * max(Counter(labels.tolist()).values()) / len(labels), 2)
    leaderboard = build_leaderboard(entries, outcomes, protocol, args.dataset, chance_acc, noise.source,
                                    batch_size)
    if args.overwrite:  # a stability section of the replaced board must not stay beside the new one
        from ..analysis.section import STABILITY_FILES
        for name in STABILITY_FILES:
            if os.path.exists(os.path.join(args.output, name)):
                os.remove(os.path.join(args.output, name))
    if args.stability:
        from ..analysis.report import StabilitySettings
        from ..analysis.section import add_stability_section
        add_stability_section(leaderboard, entries, images, labels, protocol, args.output,
                              StabilitySettings(n_examples=min(args.stability_examples, len(labels)), seed=args.seed))
    if board is not None:
        leaderboard = merge_leaderboards(board, leaderboard)
    cards = args.cards or (board is not None and os.path.isdir(os.path.join(args.output, CARDS_DIR)))
    _write_outputs(leaderboard, args.output, cards, replace_cards=args.overwrite)
    return leaderboard


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.write_architecture_cards:
            from ..cards import write_architecture_cards
            paths = write_architecture_cards(args.write_architecture_cards)
            print(f'wrote {len(paths)} architecture cards to {args.write_architecture_cards}')
            if not (args.checkpoints or args.model or args.ensemble):
                return 0
        leaderboard = run(args)
    except (EvaluationInputError, CheckpointMismatchError, DatasetNotFoundError, DatasetError) as e:
        parser.exit(2, f'{parser.prog}: error: {e}\n')
    if leaderboard is not None:
        with open(os.path.join(args.output, 'leaderboard.md')) as f:
            sys.stdout.write(f.read())
        print(f'\nwrote {", ".join(OUTPUT_FILES)}{" and cards/" if args.cards else ""}'
              f'{" and stability.json, stability_*.png" if args.stability else ""} to {args.output}')
    return 0
