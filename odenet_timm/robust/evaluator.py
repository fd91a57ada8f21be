"""Run the protocol on the first N evaluation examples for every entry, sharded over processes.

Sharding: the N examples are cut into fixed global batches of ``batch_size`` (batch ``b`` holds examples
``b·batch_size …``); process ``r`` of ``W`` (Accelerate: ``accelerate launch`` or ``torchrun``) runs batches
``r, r + W, r + 2W, …`` and the per-example results are gathered on every process in batch order. Every random draw
of a batch (noise, PGD's start, AutoAttack's and Square's seeds) is seeded from ``(seed, batch index, attack,
ε index)``, and a batch is the same tensor whichever process runs it, so one process and many give the same
numbers. The batch size therefore keys the draws too: pass the same ``--batch-size`` to reproduce a run on another
machine (the default is ``DEFAULT_BATCH_SIZE`` of the device type).

Work skipped (see :mod:`~odenet_timm.robust.attacks`): an example misclassified clean counts as wrong under every
attack and is not attacked (noise is a corruption, not an attack: it is measured on every example, as RobustBench's
corruption accuracy is); the black-box check attacks only a seeded random sample (``blackbox_share``) of the
examples that survived every white-box attack.
"""
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from timm.data import create_transform
from tqdm.auto import tqdm

from ..data import check_split, create_dataset, dataset_classes
from .attacks import AttackProtocol, adversarial_examples, predict, sample_rows
from .entries import EvalEntry, reset_solver_stats_of, solver_stats_of
from .errors import EvaluationInputError
from .noise import NOISE_SEVERITIES, SEVERITIES, CifarCNoise, ComputedNoise
from .seeding import derive_seed, seeded

__all__ = [
    'EntryOutcome', 'load_evaluation_examples', 'evaluate', 'aggregate_solver_stats', 'make_accelerator', 'PHASES',
    'DEFAULT_BATCH_SIZE', 'default_batch_size',
]

# Every phase of the evaluation of one batch; the position of a phase keys its random seed.
PHASES = ('clean', 'noise', 'fgsm', 'ifgsm', 'pgd', 'autoattack', 'blackbox', 'large_eps')
NoiseSource = Union[ComputedNoise, CifarCNoise]
_SAMPLE_KEY = 1  # keys the draw of the survivors Square attacks apart from the seed Square itself gets
# Examples per batch by device type: on a CPU larger batches gain nothing (and shard less evenly), a GPU needs
# hundreds of CIFAR images per pass to be busy.
DEFAULT_BATCH_SIZE = {'cpu': 128, 'cuda': 512}


def default_batch_size(device: torch.device) -> int:
    """The evaluation batch size used on ``device`` when none is given (:data:`DEFAULT_BATCH_SIZE`)."""
    return DEFAULT_BATCH_SIZE.get(device.type, DEFAULT_BATCH_SIZE['cpu'])


@dataclass
class EntryOutcome:
    """Per-example correctness of one entry, over the N examples in order.

    ``correct['clean']`` and ``correct['large_eps']`` have shape (N,), ``correct['noise']`` (4 corruptions, 5
    severities, N), each attack of ``fgsm / ifgsm / pgd / autoattack`` (len(eps), N) and ``blackbox``
    (len(protocol.blackbox_eps), N): correct under every white-box attack and not broken by Square;
    ``correct['blackbox_attacked']`` (same shape) marks the survivors Square attacked. ``solver_stats``
    maps a phase to the model's aggregated ``solver_stats()`` (empty for models without a solver); ``seconds`` and
    ``cpu_seconds`` (this process's CPU time, which other processes on a shared machine do not inflate) to
    the time spent in it, summed over the batches (of every process), for ``benchmarks/bench_eval.py``.
    """
    correct: Dict[str, torch.Tensor]
    solver_stats: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    cpu_seconds: Dict[str, float] = field(default_factory=dict)


def make_accelerator() -> Accelerator:
    """Accelerate's view of the launch. On a host without CUDA, processes started by ``torchrun`` or ``accelerate
    launch --multi_gpu`` are CPU workers (gloo) even when the launcher was not told ``--cpu``; otherwise each of them
    would believe it is alone and evaluate everything."""
    launched_several = int(os.environ.get('WORLD_SIZE', '1')) > 1
    return Accelerator(cpu=launched_several and not torch.cuda.is_available())


def load_evaluation_examples(
        dataset: str,
        data_dir: Optional[str],
        n_examples: Optional[int],
        input_size: Sequence[int],
) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """The first ``n_examples`` (all when None) of the ``'validation'`` split, in order, as [0, 1] images of
    ``input_size`` (timm's eval transform with mean 0 / std 1), their labels and the dataset's class names."""
    transform = create_transform(tuple(input_size), crop_pct=1.0, interpolation='bilinear', mean=(0, 0, 0),
                                 std=(1, 1, 1))
    ds = create_dataset(dataset, root=data_dir, split='validation', transform=transform)
    check_split(ds, 'validation')  # an unreadable image is an error naming it, never a silent substitute
    n = len(ds) if n_examples is None else n_examples
    if not 0 < n <= len(ds):
        raise EvaluationInputError(f'--n-examples must be in 1..{len(ds)} for {dataset}, got {n_examples}')
    images, labels = zip(*(ds[i] for i in range(n)))
    return torch.stack(images), torch.tensor(labels), dataset_classes(ds)


def aggregate_solver_stats(snapshots: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Combine per-batch ``solver_stats()`` snapshots (in batch order): booleans by ``all``, keys ending in
    ``_max`` by ``max``, other numbers by their mean."""
    out = {}
    for key in sorted({k for s in snapshots for k in s}):
        values = [s[key] for s in snapshots if key in s]
        if all(isinstance(v, bool) for v in values):
            out[key] = all(values)
        elif key.endswith('_max'):
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    return out


def _evaluate_batch(
        entry: EvalEntry,
        images: torch.Tensor,
        labels: torch.Tensor,
        noisy: Dict[Tuple[str, int], torch.Tensor],
        protocol: AttackProtocol,
        batch_seed: int,
        attack_all: bool = False,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, Any]], Dict[str, float]]:
    """Correctness of ``entry`` on one batch for every phase of the protocol, its solver stats and seconds per phase.

    The white-box attacks and the large-ε check attack the examples correct clean (every example with
    ``attack_all``, the old way, kept to test that the skipping changes nothing else); the black-box check attacks
    a seeded random ``blackbox_share`` of the examples that survived every white-box attack at its ε."""
    model, device = entry.module, images.device
    correct, solver_stats, seconds, cpu_seconds = {}, {}, {}, {}

    def record(phase: str, compute: Callable[[], torch.Tensor]) -> None:
        """Run one phase; its solver statistics are those of the solves made during it, not earlier ones."""
        reset_solver_stats_of(model)
        start, cpu_start = time.perf_counter(), time.process_time()
        correct[phase] = compute()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        seconds[phase] = time.perf_counter() - start
        cpu_seconds[phase] = time.process_time() - cpu_start
        stats = solver_stats_of(model)
        if stats:
            solver_stats[phase] = stats

    def attacked(attack: str, eps: float, eps_index: int, active: torch.Tensor) -> torch.Tensor:
        """Correctness under ``attack`` of the ``active`` examples; the others count as wrong."""
        seed = derive_seed(batch_seed, PHASES.index(attack), eps_index)
        with seeded(seed, device):
            adversarial = adversarial_examples(attack, model, images, labels, eps, protocol, entry.num_classes, seed,
                                               active)
        still_correct = torch.zeros_like(active)
        if active.any():
            still_correct[active] = predict(model, adversarial[active]) == labels[active]
        return still_correct

    record('clean', lambda: predict(model, images) == labels)
    targets = torch.ones_like(correct['clean']) if attack_all else correct['clean']
    if 'noise' in protocol.attacks:
        record('noise', lambda: torch.stack([
            torch.stack([predict(model, noisy[corruption, severity].to(device)) == labels for severity in SEVERITIES])
            for corruption in NOISE_SEVERITIES
        ]))
    for attack in protocol.white_box:
        record(attack, lambda: torch.stack([attacked(attack, eps, i, targets) for i, eps in enumerate(protocol.eps)]))
    if protocol.runs_blackbox:
        survivors = correct['clean'] & torch.stack([correct[attack] for attack in protocol.white_box]).all(dim=0)
        sampled = torch.stack([sample_rows(survivors[i], protocol.blackbox_share,
                                           derive_seed(batch_seed, PHASES.index('blackbox'), i, _SAMPLE_KEY))
                               for i in range(len(protocol.blackbox_eps))])
        correct['blackbox_attacked'] = sampled
        record('blackbox', lambda: torch.stack([survivors[i] & (attacked('blackbox', eps, i, sampled[i]) | ~sampled[i])
                                                for i, eps in enumerate(protocol.blackbox_eps)]))
    if protocol.runs_large_eps:
        record('large_eps', lambda: attacked('large_eps', protocol.large_eps, 0, targets))
    return {phase: value.cpu() for phase, value in correct.items()}, solver_stats, seconds, cpu_seconds


def evaluate(
        entries: Sequence[EvalEntry],
        images: torch.Tensor,
        labels: torch.Tensor,
        protocol: AttackProtocol,
        batch_size: Optional[int] = None,
        noise: Optional[NoiseSource] = None,
        accelerator: Optional[Accelerator] = None,
        attack_all: bool = False,
) -> Dict[str, EntryOutcome]:
    """Evaluate every entry on ``images`` (N, C, H, W in [0, 1]) / ``labels``; see the module docstring for how the
    work is shared between processes. Returns the outcome of each entry by name, on every process. ``attack_all``
    attacks the examples misclassified clean too (as before the skipping; the tests compare the two)."""
    accelerator = accelerator or make_accelerator()
    noise = noise or ComputedNoise()
    if batch_size is None:
        batch_size = default_batch_size(accelerator.device)
    if batch_size < 1:
        raise EvaluationInputError(f'--batch-size must be positive, got {batch_size}')
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise EvaluationInputError(f'entry names must be unique, got {names}')
    for entry in entries:
        entry.module.to(accelerator.device).eval()
    starts = range(0, len(labels), batch_size)
    my_batches = list(enumerate(starts))[accelerator.process_index::accelerator.num_processes]

    records = []
    progress = tqdm(total=len(my_batches) * len(entries), desc='robustness', unit='batch·model',
                    disable=not accelerator.is_main_process)
    for batch_index, start in my_batches:
        indices = list(range(start, min(start + batch_size, len(labels))))
        batch_seed = derive_seed(protocol.seed, batch_index)
        noisy = noise.corrupted(images[indices], indices, batch_seed) if 'noise' in protocol.attacks else {}
        x, y = images[indices].to(accelerator.device), labels[indices].to(accelerator.device)
        for entry in entries:
            progress.set_postfix_str(entry.name)
            records.append((batch_index, entry.name,
                            *_evaluate_batch(entry, x, y, noisy, protocol, batch_seed, attack_all)))
            progress.update()
    progress.close()

    if accelerator.num_processes > 1:
        records = gather_object(records)
    records.sort(key=lambda record: record[0])
    outcomes = {}
    for entry in entries:
        mine = [(correct, stats, wall, cpu) for _, name, correct, stats, wall, cpu in records if name == entry.name]
        correct = {phase: torch.cat([c[phase] for c, *_ in mine], dim=-1) for phase in mine[0][0]}
        phases = [p for p in PHASES if any(p in s for _, s, *_ in mine)]
        solver_stats = {p: aggregate_solver_stats([s[p] for _, s, *_ in mine if p in s]) for p in phases}
        seconds, cpu_seconds = ({phase: sum(m[k][phase] for m in mine) for phase in mine[0][k]} for k in (2, 3))
        outcomes[entry.name] = EntryOutcome(correct, solver_stats, seconds, cpu_seconds)
    return outcomes
