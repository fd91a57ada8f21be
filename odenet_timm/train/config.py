"""The training command line: timm-style options, ``--config FILE.yaml`` defaults, YAML-parsed model kwargs.

Precedence, as in timm's ``train.py``: the parser's defaults < the config file < options given explicitly on the
command line. A config file holds ``option: value`` pairs named like the options (``batch_size`` or
``batch-size``); each value is checked exactly as the command line would check it, so a typo or a wrong type
fails with the file and the key named instead of being ignored.
"""
import argparse
import difflib
import json
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..options import ParseYamlKwargs, load_yaml

__all__ = [
    'ConfigError', 'EXTENSIONS_KEY', 'LATEST', 'RUN_MANAGEMENT_OPTIONS', 'SCHEDULES', 'build_parser', 'parse_args',
    'run_identity', 'identity_differences',
]

LATEST = 'latest'
"""``--resume`` without a path: the latest checkpoint of ``--output``."""

SCHEDULES = ('multistep', 'cosine', 'constant')
"""timm schedules fully described by this command line (``create_scheduler_v2`` names)."""

RUN_MANAGEMENT_OPTIONS = frozenset({'config', 'output', 'resume', 'overwrite', 'workers', 'data_dir', 'download',
                                    'keep_checkpoints', 'max_bad_steps', 'max_unreadable',
                                    'grad_checkpointing'})
"""Options that say where and how a run is executed, or when it gives up, not what a healthy run computes: they
may change on ``--resume``."""

EXTENSIONS_KEY = 'epochs_extended'
"""The key of train_config.json (beside the options) listing the ``--resume --epochs`` extensions of the run."""


class ConfigError(ValueError):
    """Command-line or config-file input that cannot describe a training run (the message names the problem)."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``train.py`` (defaults: the In-ResNet paper recipe, on the embedded ``digits`` dataset)."""
    parser = argparse.ArgumentParser(
        prog='train.py',
        description='Train an odenet_timm (or any timm) model under Hugging Face Accelerate: one CPU, one GPU, '
                    'many GPUs or nodes (launch with `accelerate launch train.py ...` or torchrun).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument('-c', '--config', metavar='FILE.yaml',
                        help='YAML file of option: value pairs used as defaults; options given on the command line '
                             'win (see configs/)')

    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='cifar_resnet_20', metavar='NAME', help='timm model name')
    group.add_argument('--model-kwargs', nargs='+', default={}, action=ParseYamlKwargs, metavar='KEY=VALUE',
                       help='keyword arguments of timm.create_model, values parsed as YAML (layers=[1,1,1])')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='classifier outputs (default: the number of classes of the dataset)')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help="train (and export) the model at N×N input, the dataset's images resized to it "
                            "(default: the model's input size, 32; digits are 8×8 images, so 16 loses nothing)")
    group.add_argument('--grad-checkpointing', action=argparse.BooleanOptionalAction, default=False,
                       help="model.set_grad_checkpointing(): keep one tensor per block and recompute the rest in "
                            "backward (same gradients, less memory, about one more forward)")

    group = parser.add_argument_group('Dataset')
    group.add_argument('--dataset', default='digits', metavar='NAME',
                       help="'digits' (embedded), 'torch/cifar10', 'torch/cifar100', or an ImageFolder directory")
    group.add_argument('--data-dir', default='data', metavar='DIR', help='where CIFAR is (or is downloaded to)')
    group.add_argument('--download', action=argparse.BooleanOptionalAction, default=False,
                       help='download CIFAR into --data-dir when it is not there')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data-loading processes per process')
    group.add_argument('--max-unreadable', type=float, default=0.01, metavar='FRACTION',
                       help='ImageFolder datasets: the fraction of training images that may be unreadable (they are '
                            'left out and counted in summary.json); more is an error, and so is any unreadable '
                            'validation image')

    group = parser.add_argument_group('Optimization')
    group.add_argument('--epochs', type=int, default=160, metavar='N')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                       help='samples per optimizer step over ALL processes (the papers\' batch size): split between '
                            'the processes and, with --grad-accum K, into K micro-batches')
    group.add_argument('--grad-accum', type=int, default=1, metavar='K',
                       help='micro-batches accumulated per optimizer step (saves memory; same effective batch)')
    group.add_argument('--opt', default='momentum', metavar='NAME',
                       help="timm optimizer ('momentum' = SGD with momentum as in the papers; timm's 'sgd' is "
                            "Nesterov SGD)")
    group.add_argument('--lr', type=float, default=0.1)
    group.add_argument('--momentum', type=float, default=0.9)
    group.add_argument('--weight-decay', type=float, default=1e-4)
    group.add_argument('--wd-filter', choices=('bias_and_bn', 'none'), default='bias_and_bn',
                       help="'bias_and_bn': timm's default, no weight decay on biases, norms and other 1-D "
                            "parameters (this includes In-ResNet's λ); 'none': weight decay on every parameter "
                            "(the In-ResNet authors' recipe)")
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip the gradient norm')
    group.add_argument('--max-bad-steps', type=int, default=0, metavar='N',
                       help='optimizer steps with a non-finite loss that may be skipped in the whole run (no update '
                            'of weights, optimizer, EMA or schedule; counted in metrics.jsonl). 0: the first one '
                            'stops the run (exit status 1), keeping the last checkpoint')
    group.add_argument('--bn-momentum', type=float, default=None, metavar='M',
                       help="momentum of every BatchNorm's running statistics (timm's flag; default: the layers' "
                            "own, 0.1). Short, high-lr runs of models with few norm layers need a larger one for "
                            "their evaluation-mode statistics to keep up with the weights")
    group.add_argument('--amp', choices=('no', 'fp16', 'bf16'), default=None,
                       help="mixed precision (default: Accelerate's, e.g. `accelerate launch --mixed_precision`, "
                            "else no)")

    group = parser.add_argument_group('Learning-rate schedule (timm create_scheduler_v2)')
    group.add_argument('--sched', choices=SCHEDULES, default='multistep')
    group.add_argument('--decay-milestones', type=int, nargs='+', default=[80, 120], metavar='EPOCH',
                       help="multistep: epochs at which the lr is multiplied by --decay-rate")
    group.add_argument('--decay-rate', type=float, default=0.1)
    group.add_argument('--min-lr', type=float, default=0.0, help='cosine: final lr')
    group.add_argument('--warmup-epochs', type=int, default=0)
    group.add_argument('--warmup-lr', type=float, default=1e-5, help='lr at the start of the warmup')

    group = parser.add_argument_group('Augmentation and regularization')
    group.add_argument('--hflip', type=float, default=0.5, metavar='P',
                       help='horizontal-flip probability of the CIFAR augmentation (pad 2 + random crop + flip)')
    group.add_argument('--mixup', type=float, default=0.0, metavar='ALPHA', help='timm Mixup alpha (0: off)')
    group.add_argument('--cutmix', type=float, default=0.0, metavar='ALPHA', help='timm CutMix alpha (0: off)')
    group.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')
    group.add_argument('--smoothness-decay', type=float, default=0.0, metavar='RATE',
                       help='Hamiltonian weight smoothness: loss += RATE * model.smoothness_loss()')
    group.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=False,
                       help='keep a timm ModelEmaV3 of the weights (evaluated each epoch, exported to export_ema/)')
    group.add_argument('--model-ema-decay', type=float, default=0.9998)

    group = parser.add_argument_group('Run')
    group.add_argument('--seed', type=int, default=42)
    group.add_argument('--output', metavar='DIR', help='run directory (required)')
    group.add_argument('--resume', nargs='?', const=LATEST, default=None, metavar='CHECKPOINT',
                       help='continue from the latest checkpoint of --output (no value), or from a checkpoint '
                            'directory / run directory; every option must match the checkpoint\'s, except that '
                            'a larger --epochs extends the run (the schedule is re-planned over the new total)')
    group.add_argument('--overwrite', action='store_true',
                       help='discard a previous run in --output instead of refusing to start')
    group.add_argument('--keep-checkpoints', type=int, default=0, metavar='N',
                       help='keep only the N latest epoch checkpoints (0: keep all)')
    return parser


def _config_value(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """``value`` from the config file for ``action``, checked and converted as the command line would."""
    where = f'{path}: {key}'
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise ConfigError(f'{where} must be true or false, got {value!r}')
        return value
    if isinstance(action, ParseYamlKwargs):
        if not isinstance(value, dict):
            raise ConfigError(f'{where} must be a mapping of keyword: value, got {value!r}')
        return dict(value)
    takes_list = action.nargs in ('+', '*')
    if isinstance(value, list) and not takes_list:
        raise ConfigError(f'{where} takes a single value, got the list {value!r}')
    items = value if isinstance(value, list) else [value]
    try:
        converted = [action.type(str(v)) if action.type else str(v) for v in items]
    except (TypeError, ValueError):
        type_name = getattr(action.type, '__name__', 'value')
        raise ConfigError(f'{where}: expected {"a list of " if takes_list else ""}{type_name}, got {value!r}') from None
    if action.choices is not None:
        bad = [v for v in converted if v not in action.choices]
        if bad:
            raise ConfigError(f'{where}: {bad[0]!r} is not one of {", ".join(map(str, action.choices))}')
    return converted if takes_list else converted[0]


def load_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The options of the YAML config file ``path`` as parser defaults (``dest: value``), validated."""
    try:
        with open(path) as f:
            data = load_yaml(f.read())
    except OSError as e:
        raise ConfigError(f'cannot read the config file {path}: {e.strerror}') from e
    except yaml.YAMLError as e:
        raise ConfigError(f'the config file {path} is not valid YAML: {e}') from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'the config file {path} must be a mapping of option: value, got a {type(data).__name__}')
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}
    values = {}
    for key, value in data.items():
        dest = str(key).replace('-', '_')
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=3)
            hint = f'; did you mean {", ".join(close)}?' if close else ''
            raise ConfigError(f'{path}: unknown option {key!r}{hint}')
        if value is not None:  # null: keep the default
            values[dest] = _config_value(actions[dest], str(key), value, path)
    return values


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) with a ``--config`` file's values as defaults.

    Raises :class:`ConfigError` for a bad config file; bad command-line options exit like any argparse parser.
    """
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    args = parser.parse_args(argv)
    if not args.output:
        parser.error('--output DIR is required (on the command line or in the config file)')
    return args


def run_identity(options: Dict[str, Any]) -> Dict[str, Any]:
    """The options that define what a run computes (all but :data:`RUN_MANAGEMENT_OPTIONS`) of ``vars(args)``
    or of a saved ``train_config.json`` (whose :data:`EXTENSIONS_KEY` is a record, not an option), as plain JSON
    values (so that both compare equal)."""
    ignored = RUN_MANAGEMENT_OPTIONS | {EXTENSIONS_KEY}
    return json.loads(json.dumps({k: v for k, v in options.items() if k not in ignored}))


def identity_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """``option: saved value in the checkpoint, current value now`` for every option on which two
    :func:`run_identity` dicts differ. An option the checkpoint does not record (added to train.py after it was
    written, like ``--img-size``) differs only when it is now set away from its default, which computes what the
    older train.py did."""
    parser = build_parser()
    saved = {**{k: parser.get_default(k) for k in current if k not in saved}, **saved}

    def shown(d, k):
        return repr(d[k]) if k in d else '(absent)'
    return [f'{k}: {shown(saved, k)} in the checkpoint, {shown(current, k)} now'
            for k in sorted(set(saved) | set(current)) if saved.get(k, ...) != current.get(k, ...)]
