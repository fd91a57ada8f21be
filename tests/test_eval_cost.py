"""Evaluation at the cost of its attacks: skipping the examples misclassified clean changes no per-example result
on the others, the skipped examples cost no model passes, and the black-box check (Square on the survivors of every
white-box attack) fires on a gradient-masking model with the count as evidence and stays silent on a normal one."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from odenet_timm.data import create_dataset
from odenet_timm.models._common import CIFAR10_MEAN, CIFAR10_STD
from odenet_timm.robust import (
    SCHEMA_PATH, AttackProtocol, EvalEntry, NormalizedModel, build_leaderboard, evaluate, load_evaluation_examples,
    load_schema, validate,
)
from odenet_timm.robust.attacks import LARGE_EPS_QUICK_STEPS

PHASES = ('clean', 'noise', 'fgsm', 'ifgsm', 'pgd', 'autoattack')
# One ε and one batch: AutoAttack's iterations cost the same for few examples as for many.
PROTOCOL = AttackProtocol(attacks=PHASES, eps=(8 / 255,), steps=5, autoattack_version='fast',
                          blackbox_queries=0)


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def digits():
    images, labels, _ = load_evaluation_examples('digits', None, 48, (3, 32, 32))
    return images, labels


def _fit(model: nn.Module, steps: int, n_train: int = 512) -> nn.Module:
    """``steps`` full-batch Adam steps on the first ``n_train`` training digits (a model that errs on some digits)."""
    train = create_dataset('digits', split='train', transform=T.ToTensor())
    x, y = torch.stack([train[i][0] for i in range(n_train)]), torch.tensor(train.targets[:n_train])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope='module')
def linear_model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = NormalizedModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), CIFAR10_MEAN, CIFAR10_STD)
    return _fit(model, steps=3)


@pytest.fixture(scope='module')
def conv_model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = NormalizedModel(nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(16, 10)), CIFAR10_MEAN, CIFAR10_STD)
    return _fit(model, steps=80, n_train=256)


def _entry(name, module):
    return EvalEntry(name=name, module=module.eval(), architecture=type(module).__name__, num_classes=10,
                     input_size=(3, 32, 32))


@pytest.mark.parametrize('model_name', ['linear_model', 'conv_model'])
def test_skipping_the_misclassified_changes_nothing_on_the_examples_correct_clean(model_name, digits, request):
    images, labels = digits
    entry = _entry(model_name, request.getfixturevalue(model_name))
    before = evaluate([entry], images, labels, PROTOCOL, batch_size=48, attack_all=True)[model_name].correct
    after = evaluate([entry], images, labels, PROTOCOL, batch_size=48)[model_name].correct
    clean = after['clean']
    assert torch.equal(before['clean'], clean)
    assert 0 < clean.sum() < len(clean) - 2, 'the comparison needs examples both correct and misclassified clean'
    for phase in PHASES[1:]:
        assert torch.equal(before[phase][..., clean], after[phase][..., clean]), phase
    for attack in PROTOCOL.white_box:
        assert not after[attack][:, ~clean].any(), f'{attack}: misclassified clean counts as wrong'
    assert torch.equal(before['noise'], after['noise']), 'noise is measured on every example'
    worst_before, worst_after = (clean & torch.stack([c[a] for a in PROTOCOL.white_box]).all(dim=0)
                                 for c in (before, after))
    assert torch.equal(worst_before, worst_after)
    pgd = after['pgd'][:, clean].float().mean()
    assert 0 < pgd < 1, 'a non-trivial attack: some examples broken, some not'


class _RowCounter(nn.Module):
    """Counts the examples (rows) that pass through the model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += len(x)
        return self.model(x)


def test_the_examples_misclassified_clean_cost_no_model_pass(linear_model, digits):
    images, labels = digits
    counter = _RowCounter(linear_model)
    protocol = AttackProtocol(attacks=('fgsm',), blackbox_queries=0)
    outcome = evaluate([_entry('counted', counter)], images, labels, protocol, batch_size=16)['counted'].correct
    n_correct = int(outcome['clean'].sum())
    broken_quickly = n_correct - int(outcome['large_eps'].sum())
    # clean: every example once; FGSM: one gradient and one prediction per example correct clean; the large-ε check:
    # the quick PGD (its steps and a prediction) on those, then the evaluator's prediction of them; none survives it
    assert broken_quickly == n_correct < len(labels)
    assert counter.rows == len(labels) + 2 * n_correct + (LARGE_EPS_QUICK_STEPS + 2) * n_correct


class _RoundsItsInput(nn.Module):
    """``model(round(255 x) / 255)``: the same predictions on 8-bit images, no input gradient at all."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 255) / 255 + 0 * x)


def _record(entry, digits, protocol):
    images, labels = digits
    outcomes = evaluate([entry], images, labels, protocol, batch_size=48)
    leaderboard = build_leaderboard([entry], outcomes, protocol, 'digits', chance_acc=12.5, noise_source='computed')
    assert validate(leaderboard, load_schema(SCHEMA_PATH)) == []
    return leaderboard['entries'][0], outcomes[entry.name].correct


BLACKBOX = AttackProtocol(attacks=('fgsm', 'ifgsm', 'pgd'), eps=(8 / 255, 4 / 255), steps=5, blackbox_queries=100)


def test_the_blackbox_flag_fires_on_a_gradient_masking_model_with_the_count(linear_model, digits):
    record, correct = _record(_entry('masked', _RoundsItsInput(linear_model)), digits, BLACKBOX)
    survivors = correct['clean'] & correct['fgsm'][0] & correct['ifgsm'][0] & correct['pgd'][0]
    broken = int((survivors & ~correct['blackbox'][0]).sum())
    assert correct['blackbox'].shape == (1, len(survivors)), 'at the leaderboard ε only'
    assert not (correct['blackbox'][0] & ~survivors).any(), 'Square attacks only the survivors'
    assert record['flags']['blackbox_beats_whitebox'] is True and broken > 0
    assert (f'blackbox_beats_whitebox: Square broke {broken} of the {int(survivors.sum())} examples that survived '
            f'every white-box attack at ε=8/255') in record['flag_details'][-1]


def test_the_blackbox_flag_stays_silent_on_a_normal_model_and_runs_at_every_eps_when_asked(linear_model, digits):
    protocol = AttackProtocol(attacks=BLACKBOX.attacks, eps=BLACKBOX.eps, steps=5, blackbox_queries=100,
                              blackbox_all_eps=True)
    record, correct = _record(_entry('linear', linear_model), digits, protocol)
    assert correct['blackbox'].shape == (2, 48) and len(record['curves']['blackbox']) == 2
    assert record['flags']['blackbox_beats_whitebox'] is False
    assert record['curves']['blackbox'] == record['curves']['worst_case'] and record['worst_case_acc'] > 0
