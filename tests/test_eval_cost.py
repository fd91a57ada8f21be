"""Evaluation at the cost of its attacks: skipping the examples misclassified clean changes no per-example result
on the others, the skipped examples cost no model passes, and the black-box check (Square on the survivors of every
white-box attack) fires on a gradient-masking model with the count as evidence and stays silent on a normal one."""
import math

import pytest
import torch
import torch.nn as nn

from odenet_timm.robust import SCHEMA_PATH, AttackProtocol, build_leaderboard, evaluate, load_schema, validate
from odenet_timm.robust.attacks import BLACKBOX_MIN_SAMPLE, LARGE_EPS_QUICK_STEPS, sample_rows

from robust_checks import eval_entry as _entry, first_digits, fit, linear_classifier, normalized

pytestmark = pytest.mark.usefixtures('one_torch_thread')
PHASES = ('clean', 'noise', 'fgsm', 'ifgsm', 'pgd', 'autoattack')
# One ε and one batch: AutoAttack's iterations cost the same for few examples as for many.
PROTOCOL = AttackProtocol(attacks=PHASES, eps=(8 / 255,), steps=5, autoattack_version='fast',
                          blackbox_queries=0)


@pytest.fixture(scope='module')
def digits():
    return first_digits(48)


@pytest.fixture(scope='module')
def linear_model():
    """A linear classifier after 3 steps on 512 training digits: it errs on some validation digits."""
    return linear_classifier(steps=3, lr=1e-2, n_train=512)


@pytest.fixture(scope='module')
def conv_model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = normalized(nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(16, 10)))
    return fit(model, steps=80, lr=1e-2, n_train=256)


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


# the default black-box check (Square budget and share of the survivors), fewer white-box steps
BLACKBOX = AttackProtocol(attacks=('fgsm', 'ifgsm', 'pgd'), eps=(8 / 255, 4 / 255), steps=5)


def test_the_blackbox_flag_fires_on_a_gradient_masking_model_with_the_count(linear_model, digits):
    record, correct = _record(_entry('masked', _RoundsItsInput(linear_model)), digits, BLACKBOX)
    survivors = correct['clean'] & correct['fgsm'][0] & correct['ifgsm'][0] & correct['pgd'][0]
    attacked = correct['blackbox_attacked'][0]
    broken = int((survivors & ~correct['blackbox'][0]).sum())
    assert correct['blackbox'].shape == correct['blackbox_attacked'].shape == (1, len(survivors)), 'leaderboard ε only'
    assert int(attacked.sum()) == min(int(survivors.sum()), max(math.ceil(int(survivors.sum()) / 8),
                                                                 BLACKBOX_MIN_SAMPLE)) < int(survivors.sum())
    assert not (attacked & ~survivors).any(), 'Square attacks only the survivors'
    assert torch.equal(correct['blackbox'][0] | attacked, survivors), 'what Square did not attack counts as it was'
    assert record['trust_checks']['blackbox_attacked'] == [int(attacked.sum())]
    assert record['flags']['blackbox_beats_whitebox'] is True and broken > 0
    assert (f'blackbox_beats_whitebox: Square broke {broken} of the {int(attacked.sum())} it attacked among the '
            f'{int(survivors.sum())} examples that survived every white-box attack at ε=8/255'
            ) in record['flag_details'][-1]


def test_the_blackbox_flag_stays_silent_on_a_normal_model_and_runs_at_every_eps_when_asked(linear_model, digits):
    protocol = AttackProtocol(attacks=BLACKBOX.attacks, eps=BLACKBOX.eps, steps=5, blackbox_share=1,
                              blackbox_all_eps=True)
    record, correct = _record(_entry('linear', linear_model), digits, protocol)
    assert correct['blackbox'].shape == (2, 48) and len(record['curves']['blackbox']) == 2
    worst = correct['clean'] & correct['fgsm'] & correct['ifgsm'] & correct['pgd']
    assert torch.equal(correct['blackbox_attacked'], worst), 'share 1: every survivor, at every ε'
    assert record['flags']['blackbox_beats_whitebox'] is False
    assert record['curves']['blackbox'] == record['curves']['worst_case'] and record['worst_case_acc'] > 0


def test_the_blackbox_sample_is_seeded_rounded_up_and_at_least_the_minimum():
    rows = torch.zeros(1000, dtype=torch.bool)
    rows[::3] = True  # 334 candidates
    sample = sample_rows(rows, 1 / 8, seed=7)
    assert int(sample.sum()) == 42 and not (sample & ~rows).any()
    assert int(sample_rows(rows, 1 / 64, seed=7).sum()) == BLACKBOX_MIN_SAMPLE
    assert torch.equal(sample_rows(rows[:3 * BLACKBOX_MIN_SAMPLE], 1 / 8, seed=7), rows[:3 * BLACKBOX_MIN_SAMPLE])
    assert torch.equal(sample, sample_rows(rows, 1 / 8, seed=7))
    assert len({tuple(sample_rows(rows, 1 / 8, seed).nonzero().squeeze(1).tolist()) for seed in range(5)}) > 1
    assert torch.equal(sample_rows(rows, 1, seed=7), rows)
    assert not sample_rows(torch.zeros(5, dtype=torch.bool), 1 / 8, seed=7).any()
