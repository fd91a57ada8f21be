"""The attack protocol (docs/protocol.md#white-box-attacks) and one function that runs each attack, on [0, 1] images.

Which library does what:

* ``fgsm``: ``torchattacks.FGSM`` — one signed-gradient step of ε.
* ``ifgsm``: ``torchattacks.BIM`` — ``steps`` (20) signed-gradient steps of ``step_size`` (1/255), no random start,
  each projected onto the ε-ball around the CLEAN image and onto [0, 1].
* ``pgd``: ``torchattacks.PGD`` — the same iteration after a uniform random start in the ε-ball.
* ``autoattack``: ``pyautoattack.AutoAttack``: ``'standard'`` (APGD-CE, APGD-T, FAB-T, Square with 5,000 queries:
  the RobustBench numbers) or ``'fast'`` (APGD-CE and APGD-T with 3 target classes, for quick runs). With fewer
  than 10 classes the targeted attacks use ``num_classes − 1`` targets.
* ``blackbox`` (a trust check, not a leaderboard column): pyautoattack's Square attack, score-based and
  gradient-free, run on a seeded random sample (``blackbox_share``, rounded up, at least ``BLACKBOX_MIN_SAMPLE``)
  of the examples that survived every white-box attack, with ``blackbox_queries`` queries each. If it breaks any of them, the gradients those attacks
  followed were unreliable (gradient masking); Square depends only on the model itself, so the check means the
  same for every entry, unlike a transfer attack whose strength depends on the other entries.
* ``large_eps``: ``torchattacks.PGD`` at ε = ``large_eps`` (0.5) with Madry's step ``2.5·ε / steps``: at ε = 0.5 an
  attacker can turn every image into the same grey image, so accuracy must fall to chance. It only has to show
  that fall: a ``LARGE_EPS_QUICK_STEPS``-step PGD runs first and the ``steps``-step one only on what it left.

Every attack runs only on the rows of the batch that can still change the answer (``active``): an example the
model gets wrong clean counts as wrong under every attack, as in AutoAttack and RobustBench. The torchattacks
attacks still see the whole batch, through :class:`ActiveRows`, so their random draws (PGD's start) are those of
the whole batch and an example's result does not depend on which others were skipped.
"""
import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torchattacks
from pyautoattack import AutoAttack
from pyautoattack.square import SquareAttack

from .errors import EvaluationInputError

__all__ = [
    'ATTACKS', 'WHITE_BOX_ATTACKS', 'DEFAULT_ATTACKS', 'AUTOATTACK_VERSIONS', 'AttackProtocol', 'parse_eps',
    'eps_label', 'predict', 'ActiveRows', 'adversarial_examples', 'sample_size', 'sample_rows', 'BLACKBOX_MIN_SAMPLE',
    'LARGE_EPS_QUICK_STEPS',
]

ATTACKS = ('clean', 'noise', 'fgsm', 'ifgsm', 'pgd', 'autoattack')
WHITE_BOX_ATTACKS = ('fgsm', 'ifgsm', 'pgd', 'autoattack')
DEFAULT_ATTACKS = ('clean', 'noise', 'fgsm', 'ifgsm', 'pgd')
AUTOATTACK_VERSIONS = ('standard', 'fast')
FAST_AUTOATTACK = ('apgd-ce', 'apgd-t')
FAST_AUTOATTACK_TARGETS = 3
SQUARE_P_INIT = 0.8
# The black-box check's default: Square with 120 queries (3x the 40 of before) on a random eighth of the white-box
# survivors of each batch. Whether the white-box attacks were misled does not need every survivor: when Square
# can break a share q of them, a sample of k misses all with probability (1 - q)^k, and a deeper search breaks
# more of those it attacks. Per survivor it costs 120 / 8 = 15 forward passes, against 44 forward and 41 backward
# passes of the default white-box attacks (FGSM, IFGSM-20, PGD-20 and their predictions), so the check stays well
# within half of their time whatever share survives. --blackbox-share 1 --blackbox-queries 1000: a thorough one.
DEFAULT_BLACKBOX_QUERIES = 120
DEFAULT_BLACKBOX_SHARE = 1 / 8
# Square attacks at least this many survivors of a batch (all when fewer survived): how likely the check is to
# catch masking that lets Square break a few survivors depends on how many it attacks, not on their share.
BLACKBOX_MIN_SAMPLE = 16
LARGE_EPS_QUICK_STEPS = 2  # the large-ε check's first PGD; the full one runs only on what it left


def parse_eps(text: str, name: str = 'ε') -> float:
    """An ε (or another quantity called ``name``) written as a number (``0.03``) or a fraction (``8/255``)."""
    try:
        numerator, _, denominator = text.partition('/')
        return float(numerator) / float(denominator) if denominator else float(numerator)
    except (ValueError, ZeroDivisionError):
        raise EvaluationInputError(
            f'cannot read {name} {text!r}: write a number (0.03) or a fraction (8/255)') from None


def eps_label(eps: float) -> str:
    """``8/255`` for ε = 8/255: in units of one 8-bit grey level."""
    return f'{eps * 255:.4g}/255'


@dataclass(frozen=True)
class AttackProtocol:
    """What to run and how. ``eps[0]`` is the leaderboard ε; the others make the robustness curves. Clean
    accuracy is always measured (every other number is read against it), whether or not ``'clean'`` is listed.

    ``blackbox_queries`` is the Square attack's budget per example (0 skips the black-box trust check; default
    ``DEFAULT_BLACKBOX_QUERIES``) and ``blackbox_share`` the share of each batch's white-box survivors it attacks
    (a seeded random sample, rounded up, at least ``BLACKBOX_MIN_SAMPLE``; default ``DEFAULT_BLACKBOX_SHARE``, 1
    attacks all); it runs at the
    leaderboard ε only, or at every ε with ``blackbox_all_eps``.
    """
    attacks: Tuple[str, ...] = DEFAULT_ATTACKS
    eps: Tuple[float, ...] = (8 / 255,)
    steps: int = 20
    step_size: float = 1 / 255
    autoattack_version: str = 'standard'
    blackbox_queries: int = DEFAULT_BLACKBOX_QUERIES
    blackbox_share: float = DEFAULT_BLACKBOX_SHARE
    blackbox_all_eps: bool = False
    large_eps: float = 0.5
    seed: int = 0

    def __post_init__(self):
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise EvaluationInputError(f'unknown attack(s) {", ".join(unknown)}; choose from {", ".join(ATTACKS)}')
        # canonical order, no repeats: the outputs do not depend on how the attacks were listed
        object.__setattr__(self, 'attacks', tuple(a for a in ATTACKS if a in self.attacks or a == 'clean'))
        if not self.eps:
            raise EvaluationInputError('at least one ε is needed')
        for eps in (*self.eps, self.large_eps):
            if not 0 < eps <= 1:
                raise EvaluationInputError(f'ε must lie in (0, 1] (images are in [0, 1]), got {eps:g}')
        if len(set(self.eps)) != len(self.eps):
            raise EvaluationInputError(f'ε values repeat: {self.eps}')
        if self.steps < 1 or not 0 < self.step_size <= 1:
            raise EvaluationInputError(f'need steps >= 1 and a step size in (0, 1], got {self.steps}, {self.step_size:g}')
        if self.autoattack_version not in AUTOATTACK_VERSIONS:
            raise EvaluationInputError(
                f'AutoAttack version must be one of {", ".join(AUTOATTACK_VERSIONS)}, got {self.autoattack_version!r}')
        if self.blackbox_queries < 0:
            raise EvaluationInputError(f'the black-box query budget cannot be negative, got {self.blackbox_queries}')
        if not 0 < self.blackbox_share <= 1:
            raise EvaluationInputError(f'the black-box share of the survivors must lie in (0, 1], got '
                                       f'{self.blackbox_share:g}')

    @property
    def white_box(self) -> Tuple[str, ...]:
        """The white-box attacks requested, in canonical order."""
        return tuple(a for a in self.attacks if a in WHITE_BOX_ATTACKS)

    @property
    def runs_blackbox(self) -> bool:
        return bool(self.white_box) and self.blackbox_queries > 0

    @property
    def blackbox_eps(self) -> Tuple[float, ...]:
        """The ε the black-box check runs at: the leaderboard ε, or all of them with ``blackbox_all_eps``."""
        return self.eps if self.blackbox_all_eps else self.eps[:1]

    @property
    def runs_large_eps(self) -> bool:
        return bool(self.white_box)

    def large_eps_step_size(self, steps: int) -> float:
        """Madry's step for a ``steps``-step PGD at the large ε."""
        return 2.5 * self.large_eps / steps

    def describe(self) -> Dict:
        """The settings as recorded in the leaderboard (which library runs each attack, and with what)."""
        out = asdict(self)
        out['attacks'] = list(self.attacks)
        out['eps'] = list(self.eps)
        libraries = {
            'noise': 'CIFAR-10-C gaussian / shot / impulse / speckle noise, severities 1-5',
            'fgsm': 'torchattacks.FGSM',
            'ifgsm': f'torchattacks.BIM (steps={self.steps}, alpha={self.step_size:g}, no random start)',
            'pgd': f'torchattacks.PGD (steps={self.steps}, alpha={self.step_size:g}, uniform random start)',
            'autoattack': (
                "pyautoattack.AutoAttack(version='standard'): apgd-ce, apgd-t, fab-t, square"
                if self.autoattack_version == 'standard' else
                f"pyautoattack.AutoAttack(version='custom'): {', '.join(FAST_AUTOATTACK)}, "
                f'{FAST_AUTOATTACK_TARGETS} target classes'),
            'blackbox': f'pyautoattack Square attack (Linf, {self.blackbox_queries} queries, p_init={SQUARE_P_INIT}) '
                        f'on a seeded random {self.blackbox_share:.4g} of the examples that survived every white-box '
                        f'attack (rounded up, at least {BLACKBOX_MIN_SAMPLE}, per batch), at '
                        f'{"every ε" if self.blackbox_all_eps else "the leaderboard ε"}',
            'large_eps': f'torchattacks.PGD (eps={self.large_eps:g}, steps={LARGE_EPS_QUICK_STEPS}, '
                         f'alpha={self.large_eps_step_size(LARGE_EPS_QUICK_STEPS):g}, uniform random start), then '
                         f'steps={self.steps}, alpha={self.large_eps_step_size(self.steps):g} on the examples it '
                         f'left correct',
        }
        ran = set(self.attacks) | ({'blackbox'} if self.runs_blackbox else set()) | (
            {'large_eps'} if self.runs_large_eps else set())
        out['libraries'] = {name: text for name, text in libraries.items() if name in ran}
        return out


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Predicted labels of ``model`` (which takes [0, 1] images)."""
    return model(images).argmax(dim=1)


class ActiveRows(nn.Module):
    """``model`` run on the ``active`` rows of a batch only; the other rows get zero logits (so no input gradient).

    An attack given this module draws its random numbers for the whole batch, as it would attacking every row,
    while the model's forward and backward passes, the cost of an attack, cover the active rows alone.
    """

    def __init__(self, model: nn.Module, active: torch.Tensor):
        super().__init__()
        self.model = model
        self.train(model.training)  # attacks restore the mode they found, which must be the model's own
        self.register_buffer('rows', active.nonzero().squeeze(1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images[self.rows])
        return logits.new_zeros(len(images), logits.shape[1]).index_copy(0, self.rows, logits)


def _on_rows(model: nn.Module, active: torch.Tensor) -> nn.Module:
    return model if active.all() else ActiveRows(model, active)


def sample_size(n: int, share: float) -> int:
    """How many of ``n`` survivors the black-box check attacks: ``share`` of them rounded up, at least
    ``BLACKBOX_MIN_SAMPLE``, at most ``n``."""
    return min(n, max(math.ceil(share * n), BLACKBOX_MIN_SAMPLE))


def sample_rows(rows: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """A random :func:`sample_size` of the set rows of the boolean mask ``rows``, drawn from a generator seeded
    with ``seed``; all of them when ``share`` is 1 or too few are set."""
    candidates = rows.nonzero().squeeze(1)
    k = sample_size(len(candidates), share)
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    sample = torch.zeros_like(rows)
    sample[candidates[order[:k].to(candidates.device)]] = True
    return sample


def _torchattacks(attack, model, images, labels, eps, protocol):
    if attack == 'fgsm':
        return torchattacks.FGSM(model, eps=eps)(images, labels)
    if attack == 'ifgsm':
        return torchattacks.BIM(model, eps=eps, alpha=protocol.step_size, steps=protocol.steps)(images, labels)
    if attack == 'pgd':
        return torchattacks.PGD(model, eps=eps, alpha=protocol.step_size, steps=protocol.steps,
                                random_start=True)(images, labels)
    raise ValueError(f'no attack named {attack!r}')


def _large_eps(model, images, labels, active, protocol):
    """The large-ε PGD in two stages: a quick one on the ``active`` rows, the full one on the rows it left correct."""
    adversarial = images
    for steps in (LARGE_EPS_QUICK_STEPS, protocol.steps):
        if not active.any():
            break
        attack = torchattacks.PGD(_on_rows(model, active), eps=protocol.large_eps,
                                  alpha=protocol.large_eps_step_size(steps), steps=steps, random_start=True)
        adversarial = torch.where(active.view(-1, 1, 1, 1), attack(images, labels), adversarial)
        still_correct = active.clone()
        still_correct[active] = predict(model, adversarial[active]) == labels[active]
        active = still_correct
    return adversarial


def _autoattack(model, images, labels, eps, protocol, num_classes, seed):
    if protocol.autoattack_version == 'standard':
        attack = AutoAttack(model, norm='Linf', eps=eps, version='standard', seed=seed, device=images.device)
    else:
        attack = AutoAttack(model, norm='Linf', eps=eps, version='custom', attacks=list(FAST_AUTOATTACK), seed=seed,
                            device=images.device)
        attack.apgd_targeted.n_target_classes = FAST_AUTOATTACK_TARGETS
    attack.apgd_targeted.n_target_classes = min(attack.apgd_targeted.n_target_classes, num_classes - 1)
    attack.fab.n_target_classes = min(attack.fab.n_target_classes, num_classes - 1)
    adversarial, _ = attack.run_standard_evaluation(images, labels, batch_size=len(images))
    return adversarial


def _square(model, images, labels, eps, protocol, num_classes, seed):
    attack = SquareAttack(model, norm='Linf', n_queries=protocol.blackbox_queries, eps=eps, p_init=SQUARE_P_INIT,
                          n_restarts=1, seed=seed, verbose=False, device=images.device, resc_schedule=True)
    with torch.no_grad():
        return attack.perturb(images, labels)


def adversarial_examples(
        attack: str,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        eps: float,
        protocol: AttackProtocol,
        num_classes: int,
        seed: int,
        active: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Adversarial versions of ``images`` (in [0, 1]) for ``attack`` ∈ {fgsm, ifgsm, pgd, autoattack, blackbox,
    large_eps} at ``eps`` (``large_eps`` uses the protocol's), attacking only the rows where ``active`` (a boolean
    mask; default all) is set and returning the others unchanged. Random draws of torchattacks come from torch's
    global generator (seed it around the call, see :func:`~odenet_timm.robust.seeding.seeded`) and cover the whole
    batch whatever ``active`` is; pyautoattack's attacks take ``seed`` themselves and, like AutoAttack's own
    evaluation, see only the active rows."""
    active = torch.ones_like(labels, dtype=torch.bool) if active is None else active
    if not active.any():
        return images
    if attack == 'large_eps':
        return _large_eps(model, images, labels, active, protocol)
    if attack in ('autoattack', 'blackbox'):
        adversarial = images.clone()
        run = _autoattack if attack == 'autoattack' else _square
        adversarial[active] = run(model, images[active], labels[active], eps, protocol, num_classes, seed)
        return adversarial
    adversarial = _torchattacks(attack, _on_rows(model, active), images, labels, eps, protocol)
    return torch.where(active.view(-1, 1, 1, 1), adversarial, images)
