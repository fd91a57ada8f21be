"""Robustness evaluation: the attacks against analytic answers and their constraints, the CIFAR-10-C noise,
ensembles, the trust-check flags on models built to trip them, determinism, sharding over two processes, the
leaderboard files and their schema, and the command line's errors on bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from odenet_timm.data import create_dataset
from odenet_timm.models._common import CIFAR10_MEAN, CIFAR10_STD
from odenet_timm.robust import (
    NOISE_SEVERITIES, SCHEMA_PATH, AttackProtocol, CifarCNoise, ComputedNoise, EvaluationInputError,
    NormalizedModel, adversarial_examples, build_leaderboard, corrupt, evaluate, load_evaluation_examples,
    load_schema, make_ensemble, validate, write_markdown,
)
from odenet_timm.robust.attacks import LARGE_EPS_QUICK_STEPS, predict
from odenet_timm.robust.evaluator import aggregate_solver_stats
from odenet_timm.robust.cli import OUTPUT_FILES, main
from odenet_timm.robust.seeding import seeded

from robust_checks import eval_entry as _entry, first_digits, linear_classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device('cpu')
TINY = dict(layers=[1, 1, 1], widths=[4, 8, 8], stem_width=4)  # a few thousand parameters: fast to attack


pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture(scope='module')
def digits():
    """The first 32 validation digits as [0, 1] images."""
    return first_digits(32)


@pytest.fixture(scope='module')
def linear_model():
    """A linear classifier (on normalized input) trained on the digits training split: 97% clean accuracy on the
    first 32 validation digits, 56% under FGSM at 8/255."""
    return linear_classifier(steps=100, lr=1e-3)


# -- attacks -----------------------------------------------------------------------------------------------------
def test_fgsm_gives_the_analytic_adversarial_example_of_a_linear_classifier():
    # Two classes, z = W (x − mean) / std + b: the input gradient of the cross-entropy for label 0 is
    # p_1 (W_1 − W_0) / std, so FGSM must step by ε·sign(W_1 − W_0) (and the opposite way for label 1).
    torch.manual_seed(0)
    linear = nn.Linear(3 * 8 * 8, 2)
    nn.init.normal_(linear.weight, std=0.01)
    model = NormalizedModel(nn.Sequential(nn.Flatten(), linear), CIFAR10_MEAN, CIFAR10_STD).eval()
    images, labels = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 0, 1, 1, 0])
    direction = (linear.weight[1] - linear.weight[0]).detach().sign().view(3, 8, 8)
    assert (direction != 0).all()
    eps = 8 / 255
    expected = (images + eps * torch.where(labels.view(-1, 1, 1, 1) == 0, direction, -direction)).clamp(0, 1)
    adversarial = adversarial_examples('fgsm', model, images, labels, eps, AttackProtocol(), 2, seed=0)
    assert torch.equal(adversarial, expected)


@pytest.mark.parametrize('attack', ['ifgsm', 'pgd'])
def test_iterative_attacks_stay_in_the_eps_ball_around_the_clean_image_and_in_the_image_range(
        attack, linear_model, digits):
    images, labels = digits
    eps = 4 / 255  # 20 steps of 1/255 would reach 20/255 without the projection around the clean image
    protocol = AttackProtocol(attacks=(attack,), eps=(eps,))
    with seeded(1, CPU):
        adversarial = adversarial_examples(attack, linear_model, images, labels, eps, protocol, 10, seed=1)
    distance = (adversarial - images).abs().amax(dim=(1, 2, 3))
    assert distance.max() <= eps + 1e-6 and distance.max() >= eps - 1e-6  # reaches the boundary, not beyond
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert (predict(linear_model, adversarial) != predict(linear_model, images)).any()
    with seeded(1, CPU):
        again = adversarial_examples(attack, linear_model, images, labels, eps, protocol, 10, seed=1)
    assert torch.equal(adversarial, again)
    with seeded(2, CPU):
        other = adversarial_examples(attack, linear_model, images, labels, eps, protocol, 10, seed=2)
    assert torch.equal(adversarial, other) == (attack == 'ifgsm')  # only PGD has a random start


def test_protocol_rejects_bad_requests():
    for eps in (0.0, -0.1, 1.5):
        with pytest.raises(EvaluationInputError, match=r'\(0, 1\]'):
            AttackProtocol(eps=(eps,))
    with pytest.raises(EvaluationInputError, match='unknown attack'):
        AttackProtocol(attacks=('fgsm', 'cw'))
    assert AttackProtocol(attacks=('pgd', 'fgsm')).attacks == ('clean', 'fgsm', 'pgd')  # clean always measured


# -- noise -------------------------------------------------------------------------------------------------------
def test_noise_severities_are_the_cifar10c_constants():
    assert NOISE_SEVERITIES == {
        'gaussian_noise': (0.04, 0.06, 0.08, 0.09, 0.10),
        'shot_noise': (500, 250, 100, 75, 50),
        'impulse_noise': (0.01, 0.02, 0.03, 0.05, 0.07),
        'speckle_noise': (0.06, 0.1, 0.12, 0.16, 0.2),
    }
    grey = torch.full((8, 3, 64, 64), 128 / 255)  # away from the clipping bounds
    for severity in range(1, 6):
        generator = torch.Generator().manual_seed(severity)
        sigma = NOISE_SEVERITIES['gaussian_noise'][severity - 1]
        assert corrupt(grey, 'gaussian_noise', severity, generator).std().item() == pytest.approx(sigma, rel=0.03)
        c = NOISE_SEVERITIES['shot_noise'][severity - 1]
        shot = corrupt(grey, 'shot_noise', severity, generator)
        assert shot.var().item() == pytest.approx(128 / 255 / c, rel=0.05)  # Poisson(c·x) / c
        amount = NOISE_SEVERITIES['impulse_noise'][severity - 1]
        impulse = corrupt(grey, 'impulse_noise', severity, generator)
        assert ((impulse == 0) | (impulse == 1)).float().mean().item() == pytest.approx(amount, rel=0.05)
        sigma = NOISE_SEVERITIES['speckle_noise'][severity - 1]
        speckle = corrupt(grey, 'speckle_noise', severity, generator)
        assert speckle.std().item() == pytest.approx(sigma * 128 / 255, rel=0.03)
    for noisy in (shot, impulse, speckle):  # stored as 8-bit images, like CIFAR-10-C
        assert noisy.min() >= 0 and noisy.max() <= 1 and torch.equal(noisy * 255, (noisy * 255).round())


def test_computed_noise_is_reproducible_under_a_seed(digits):
    images = digits[0][:4]
    first, again, other = (ComputedNoise().corrupted(images, range(4), seed) for seed in (7, 7, 8))
    assert set(first) == {(c, s) for c in NOISE_SEVERITIES for s in range(1, 6)}
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)
    assert not torch.equal(first['gaussian_noise', 1], first['gaussian_noise', 2])


def _write_cifar_c(directory, labels, rows_per_severity):
    os.makedirs(directory, exist_ok=True)
    n = 5 * rows_per_severity
    for i, name in enumerate(NOISE_SEVERITIES):
        np.save(os.path.join(directory, f'{name}.npy'),
                (np.arange(n * 32 * 32 * 3).reshape(n, 32, 32, 3) * (i + 1) % 256).astype(np.uint8))
    np.save(os.path.join(directory, 'labels.npy'), np.tile(labels, 5))


def test_cifar_c_files_are_read_by_row_and_checked_against_the_labels(tmp_path, digits):
    labels = digits[1][:6].numpy()
    _write_cifar_c(tmp_path, labels, rows_per_severity=6)
    noise = CifarCNoise(str(tmp_path))
    noise.check_examples(torch.from_numpy(labels[:4]), (32, 32))
    batch = noise.corrupted(digits[0][2:4], [2, 3], seed=0)
    stored = np.load(tmp_path / 'shot_noise.npy')
    assert torch.equal(batch['shot_noise', 3][1], torch.from_numpy(stored[2 * 6 + 3]).permute(2, 0, 1) / 255)
    with pytest.raises(EvaluationInputError, match='labels.npy does not match'):
        noise.check_examples(torch.from_numpy(labels[:4][::-1].copy()), (32, 32))
    with pytest.raises(EvaluationInputError, match='exceeds'):
        noise.check_examples(digits[1][:7], (32, 32))
    os.remove(tmp_path / 'impulse_noise.npy')
    with pytest.raises(EvaluationInputError, match='impulse_noise.npy'):
        CifarCNoise(str(tmp_path))


# -- ensembles ----------------------------------------------------------------------------------------------------
def test_an_ensemble_of_identical_members_equals_the_single_model(linear_model, digits):
    images, labels = digits
    single = _entry('single', linear_model)
    ensemble = make_ensemble('ensemble', [single, single, single])
    assert ensemble.number_forward_passes == 3
    with torch.no_grad():
        assert torch.allclose(ensemble.module(images), F.log_softmax(linear_model(images), dim=1), atol=1e-5)
    protocol = AttackProtocol(eps=(2 / 255, 8 / 255), blackbox_queries=50)
    outcomes = evaluate([single, ensemble], images, labels, protocol, batch_size=16)
    for phase, correct in outcomes['single'].correct.items():
        assert torch.equal(outcomes['ensemble'].correct[phase], correct), phase
    assert 0 < outcomes['single'].correct['pgd'][1].float().mean() < 1  # a non-trivial comparison


# -- trust checks ---------------------------------------------------------------------------------------------------
def _on_grid(x: torch.Tensor) -> torch.Tensor:
    """Whether each value is a multiple of 1/255 (clean 8-bit images are; PGD's random start is not)."""
    return ((x * 255) - (x * 255).round()).abs() < 1e-3


class _GradientReversedOffGrid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return torch.where(_on_grid(x), grad, -grad)


class MisleadingGradientOffGrid(nn.Module):
    """Honest gradients on 8-bit images (FGSM works), reversed ones elsewhere: PGD's random start leads it uphill."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(_GradientReversedOffGrid.apply(x))


class FlipsLogitsOffGrid(nn.Module):
    """Negates its logits once pixels leave the 8-bit grid: FGSM at ε = 0.5/255 fools it, at 1/255 it does not."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        off_grid = (~_on_grid(x)).float().mean(dim=(1, 2, 3)).mul(10).clamp(max=1)
        return self.model(x) * (1 - 2 * off_grid).view(-1, 1)


class ZeroGradient(nn.Module):
    """``model(q(x))`` with ``q`` rounding to the 8-bit grid (``binarize=False``) or thresholding at 0.5: the same
    predictions on clean images, no input gradient at all."""

    def __init__(self, model, binarize):
        super().__init__()
        self.model, self.binarize = model, binarize

    def forward(self, x):
        q = (x > 0.5).float() if self.binarize else torch.round(x * 255) / 255
        return self.model(q + 0 * x)


class MaskedUnderAutoAttack(nn.Module):
    """Gives zero input gradients while pyautoattack is on the call stack, honest ones otherwise."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get('__name__', '').startswith('pyautoattack'):
                return self.model(x.detach() + 0 * x)
            frame = frame.f_back
        return self.model(x)


TRUST_PROTOCOL = AttackProtocol(attacks=('fgsm', 'ifgsm', 'pgd', 'autoattack'), eps=(4 / 255, 8 / 255),
                                autoattack_version='fast', blackbox_queries=300)


def _flags(entry, digits, protocol=TRUST_PROTOCOL) -> Dict:
    images, labels = digits
    outcomes = evaluate([entry], images, labels, protocol, batch_size=32)
    record = build_leaderboard([entry], outcomes, protocol, 'digits', chance_acc=15.62, noise_source='computed')
    assert validate(record, load_schema(SCHEMA_PATH)) == []
    return record['entries'][0]


def test_no_flag_fires_on_a_normal_model(linear_model, digits):
    record = _flags(_entry('linear', linear_model), digits)
    assert record['flags'] == dict.fromkeys(record['flags'], False)
    assert not record['unreliable'] and record['flag_details'] == []


@pytest.mark.parametrize('flag, make, eps', [
    ('iterative_above_fgsm', MisleadingGradientOffGrid, None),
    ('accuracy_rises_with_eps', FlipsLogitsOffGrid, (0.5 / 255, 1 / 255)),
    ('above_chance_at_large_eps', lambda m: ZeroGradient(m, binarize=True), None),
    ('autoattack_above_pgd', MaskedUnderAutoAttack, None),
    ('blackbox_beats_whitebox', lambda m: ZeroGradient(m, binarize=False), None),
])
def test_each_flag_fires_on_a_model_built_to_trip_it(flag, make, eps, linear_model, digits):
    protocol = TRUST_PROTOCOL if eps is None else AttackProtocol(
        attacks=TRUST_PROTOCOL.attacks, eps=eps, autoattack_version='fast', blackbox_queries=300)
    record = _flags(_entry(flag, make(linear_model)), digits, protocol)
    assert record['flags'][flag] is True, record['curves']
    assert record['unreliable'] and any(d.startswith(flag) for d in record['flag_details'])


def test_flags_are_unchecked_without_the_attacks_they_compare(linear_model, digits, tmp_path):
    images, labels = digits
    protocol = AttackProtocol(attacks=('noise',))
    entry = _entry('linear', linear_model)
    leaderboard = build_leaderboard([entry], evaluate([entry], images, labels, protocol, batch_size=32), protocol,
                                    'digits', chance_acc=15.62, noise_source='computed')
    record = leaderboard['entries'][0]
    assert record['flags'] == dict.fromkeys(record['flags'], None)
    assert record['worst_case_acc'] is None and record['noise_acc'] is not None
    write_markdown(leaderboard, tmp_path / 'leaderboard.md')
    row = next(line for line in (tmp_path / 'leaderboard.md').read_text().splitlines() if '| linear |' in line)
    assert row.endswith('| unchecked |') and '✓' not in row  # nothing checked is not "✓ (0/5 checked)"


class _CountingSolver(NormalizedModel):
    """A model 'with a solver': solver_stats() reports how many forwards ran since reset_solver_stats()."""
    forwards = 0

    def forward(self, images):
        self.forwards += 1
        return super().forward(images)

    def reset_solver_stats(self):
        self.forwards = 0

    def solver_stats(self):
        return {'forward_solves': self.forwards, 'forward_converged': True}


def test_solver_stats_are_recorded_per_phase(linear_model, digits):
    """Each phase reports the solves made during it: clean one prediction, FGSM one gradient and one prediction,
    the ε = 0.5 check its quick PGD's steps and two predictions (its own, which no example survives here, and the
    evaluator's)."""
    model = _CountingSolver(linear_model.model, CIFAR10_MEAN, CIFAR10_STD)
    protocol = AttackProtocol(attacks=('fgsm',), blackbox_queries=0)
    record = _flags(_entry('solver', model), digits, protocol)
    assert record['solver_stats'] == {
        phase: {'forward_converged': True, 'forward_solves': forwards}
        for phase, forwards in (('clean', 1), ('fgsm', 2), ('large_eps', LARGE_EPS_QUICK_STEPS + 2))}
    assert _flags(_entry('plain', linear_model), digits, AttackProtocol(attacks=()))['solver_stats'] is None


def test_solver_stats_of_the_batches_combine_by_kind():
    snapshots = [{'forward_iterations_max': 3, 'forward_iterations_mean': 2.0, 'converged': True},
                 {'forward_iterations_max': 5, 'forward_iterations_mean': 4.0, 'converged': False, 'solves': 6}]
    assert aggregate_solver_stats(snapshots) == {
        'forward_iterations_max': 5, 'forward_iterations_mean': 3.0, 'converged': False, 'solves': 6}


# -- the command line: determinism, two processes, outputs, schema ----------------------------------------------
def _train_briefly(model, epochs=2):
    """A few hundred SGD steps on the digits training split: enough for accuracies well above chance."""
    train = create_dataset('digits', split='train', transform=T.Compose([T.ToTensor(), T.Normalize(
        model.pretrained_cfg['mean'], model.pretrained_cfg['std'])]))
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
    """Three tiny export directories of briefly trained models, as train.py writes them."""
    root = tmp_path_factory.mktemp('runs')
    paths = {}
    for seed, (name, arch) in enumerate([('resnet', 'cifar_resnet_20'), ('inres_a', 'inresnet_20'),
                                         ('inres_b', 'inresnet_20')]):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = _train_briefly(timm.create_model(arch, **TINY))
        paths[name] = str(root / name / 'export')
        timm.models.save_for_hf(model, paths[name], safe_serialization=True)
    return paths


def _cli_args(exports, output, seed=0):
    return ['--checkpoints', exports['resnet'], '--ensemble', f"ens={exports['inres_a']},{exports['inres_b']}",
            '--n-examples', '12', '--batch-size', '4', '--eps', '4/255', '8/255', '--steps', '5',
            '--blackbox-queries', '10', '--seed', str(seed), '--output', str(output)]


@pytest.fixture(scope='module')
def cli_run(exports, tmp_path_factory):
    output = tmp_path_factory.mktemp('leaderboard')
    assert main(_cli_args(exports, output) + ['--cards']) == 0
    return output


def test_the_leaderboard_files(cli_run, exports):
    leaderboard = json.loads((cli_run / 'leaderboard.json').read_text())
    assert validate(leaderboard, load_schema(SCHEMA_PATH)) == []
    records = {e['name']: e for e in leaderboard['entries']}
    assert set(records) == {'resnet', 'inres_a', 'inres_b', 'ens'}
    assert [e['rank'] for e in leaderboard['entries']] == [1, 2, 3, 4]
    ens = records['ens']
    assert ens['kind'] == 'ensemble' and ens['number_forward_passes'] == 2 and ens['ensemble']['members'] == [
        'inres_a', 'inres_b']
    assert ens['ensemble']['improvement']['pgd_acc'] == pytest.approx(
        ens['pgd_acc'] - (records['inres_a']['pgd_acc'] + records['inres_b']['pgd_acc']) / 2, abs=0.011)
    resnet = records['resnet']
    assert resnet['architecture'] == 'cifar_resnet_20' and resnet['checkpoint']['path'] == exports['resnet']
    assert resnet['params'] == sum(p.numel() for p in timm.create_model('cifar_resnet_20', **TINY).parameters())
    assert resnet['eps_labels'] == ['4/255', '8/255'] and resnet['n_examples'] == 12
    assert set(resnet['noise']) == set(NOISE_SEVERITIES) and resnet['noise_source'] == 'computed'
    assert resnet['versions']['torchattacks'] and resnet['versions']['pyautoattack']
    assert resnet['worst_case_acc'] <= min(resnet['fgsm_acc'], resnet['ifgsm_acc'], resnet['pgd_acc'])

    markdown = (cli_run / 'leaderboard.md').read_text()
    assert '| rank | name |' in markdown and 'trust flags' in markdown and '## Ensembles' in markdown
    assert 'improvement' in markdown and 'iterative_above_fgsm' in markdown
    csv_lines = (cli_run / 'leaderboard.csv').read_text().splitlines()
    assert csv_lines[0].startswith('rank,name,kind') and len(csv_lines) == 5
    assert (cli_run / 'robustness_curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    card = ModelCard.load(cli_run / 'cards' / 'resnet' / 'README.md')
    assert card.data.library_name == 'timm'
    results = {r.metric_config: r.metric_value for r in card.data.eval_results}
    assert results['clean_acc'] == resnet['clean_acc'] and results['pgd_acc'] == resnet['pgd_acc']
    assert f"timm.create_model('local-dir:{exports['resnet']}'" in card.text
    assert not (cli_run / 'cards' / 'ens').exists()  # cards are per checkpoint

    config = json.loads((Path(exports['resnet']) / 'config.json').read_text())
    assert resnet['model_kwargs'] == config['model_args'] and resnet['model_kwargs']['layers'] == [1, 1, 1]
    assert ens['model_kwargs'] is None and ens['members'][0]['model_kwargs'] == records['inres_a']['model_kwargs']
    assert leaderboard['batch_size'] == 4 and leaderboard['noise_source'] == 'computed'


def test_the_same_seed_gives_an_identical_leaderboard(cli_run, exports, tmp_path):
    assert main(_cli_args(exports, tmp_path)) == 0
    assert (tmp_path / 'leaderboard.json').read_text() == (cli_run / 'leaderboard.json').read_text()


def test_two_processes_give_the_same_leaderboard_as_one(cli_run, exports, tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU='true', OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
               os.path.join(REPO, 'eval_robust.py'), *_cli_args(exports, tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'on 2 process(es)' in result.stderr
    assert (tmp_path / 'leaderboard.json').read_text() == (cli_run / 'leaderboard.json').read_text()


def test_the_schema_validator_reports_violations(cli_run):
    leaderboard = json.loads((cli_run / 'leaderboard.json').read_text())
    entry = leaderboard['entries'][0]
    del entry['clean_acc']
    entry['pgd_acc'] = 130.0
    entry['flags']['iterative_above_fgsm'] = 'yes'
    entry['checkpoint']['sha256'] = 'not-a-hash'
    problems = validate(leaderboard, load_schema(SCHEMA_PATH))
    assert any("missing required 'clean_acc'" in p for p in problems)
    assert any('pgd_acc: 130.0 > maximum 100' in p for p in problems)
    assert any('iterative_above_fgsm: expected boolean or null' in p for p in problems)
    assert any('sha256' in p for p in problems)


# -- bad input: clear errors before any work ------------------------------------------------------------------------
def _error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_input_fails_early_with_a_clear_message(exports, tmp_path, capsys):
    out = ['--output', str(tmp_path / 'out')]
    resnet_weights = os.path.join(exports['resnet'], 'model.safetensors')
    err = _error(capsys, ['--model', 'cifar_resnet_20', '--weights', resnet_weights, *out])
    assert 'does not fit cifar_resnet_20' in err and resnet_weights in err and 'shape mismatch' in err
    assert 'does not exist' in _error(capsys, ['--checkpoints', str(tmp_path / 'missing' / 'export'), *out])
    assert 'weights file' in _error(capsys, ['--model', 'cifar_resnet_20', '--weights', str(tmp_path / 'w.safetensors'),
                                             *out])
    (tmp_path / 'empty').mkdir()
    assert 'not a timm export' in _error(capsys, ['--checkpoints', str(tmp_path / 'empty'), *out])
    for eps in ('0', '1.5', '-8/255'):
        assert '(0, 1]' in _error(capsys, ['--checkpoints', exports['resnet'], f'--eps={eps}', *out])
    assert 'cannot read ε' in _error(capsys, ['--checkpoints', exports['resnet'], '--eps', '8/0', *out])
    assert "invalid choice: 'cw'" in _error(capsys, ['--checkpoints', exports['resnet'], '--attacks', 'fgsm', 'cw', *out])
    three_classes = str(tmp_path / 'three' / 'export')
    timm.models.save_for_hf(timm.create_model('cifar_resnet_20', num_classes=3, **TINY), three_classes,
                            safe_serialization=True)
    err = _error(capsys, ['--checkpoints', three_classes, *out])
    assert '3-class head but digits has 10 classes' in err
    assert 'unknown model' in _error(capsys, ['--model', 'no_such_net', '--weights', resnet_weights, *out])
    assert 'nothing to evaluate' in _error(capsys, out)
    assert not (tmp_path / 'out' / 'leaderboard.json').exists()


def test_weights_files_load_with_model_kwargs(exports, tmp_path):
    weights = os.path.join(exports['resnet'], 'model.safetensors')
    args = ['--model', 'cifar_resnet_20', '--weights', f'r20={weights}', '--model-kwargs', 'layers=[1,1,1]',
            'widths=[4,8,8]', 'stem_width=4', '--attacks', 'clean', '--n-examples', '8', '--output', str(tmp_path)]
    assert main(args) == 0
    record = json.loads((tmp_path / 'leaderboard.json').read_text())['entries'][0]
    assert record['name'] == 'r20' and record['checkpoint']['path'] == weights and record['flags'] == dict.fromkeys(
        record['flags'])


# -- model kwargs: YAML-typed, recorded ------------------------------------------------------------------------------
IMPLICIT_TINY = ['steps=[1,1,1]', 'widths=[4,8,8]']


@pytest.fixture(scope='module')
def implicit_weights(tmp_path_factory):
    """A tiny untrained implicit network whose classifier bias favours the label of the first digits validation
    example, so that at least that example is correct clean and gets attacked (with a backward through the solver)."""
    path = tmp_path_factory.mktemp('implicit') / 'trapezoid.safetensors'
    model = timm.create_model('implicit_trapezoid_resnet', steps=[1, 1, 1], widths=[4, 8, 8])
    _, labels, _ = load_evaluation_examples('digits', None, 1, model.pretrained_cfg['input_size'])
    with torch.no_grad():
        model.get_classifier().bias[labels[0]] = 100.0
    save_file(model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize('memory_efficient', [False, True])
def test_model_kwargs_are_yaml_typed_and_recorded(memory_efficient, implicit_weights, tmp_path):
    """``memory_efficient=false`` is the bool False (it used to arrive as the truthy string 'false', so the
    memory-efficient mode ran and reconstructed block inputs in backward)."""
    flag = str(memory_efficient).lower()
    assert main(['--model', 'implicit_trapezoid_resnet', '--weights', f'trap={implicit_weights}', '--model-kwargs',
                 f'memory_efficient={flag}', *IMPLICIT_TINY, '--attacks', 'fgsm', '--n-examples', '4',
                 '--batch-size', '4', '--steps', '1', '--blackbox-queries', '0', '--output', str(tmp_path)]) == 0
    record = json.loads((tmp_path / 'leaderboard.json').read_text())['entries'][0]
    assert record['model_kwargs'] == {'memory_efficient': memory_efficient, 'steps': [1, 1, 1], 'widths': [4, 8, 8]}
    reconstructions = [key for stats in record['solver_stats'].values() for key in stats
                       if key.startswith('reconstruct_')]
    assert bool(reconstructions) == memory_efficient and 'forward_converged' in record['solver_stats']['fgsm']


def test_wrongly_typed_model_kwargs_are_a_one_line_error(exports, tmp_path, capsys):
    weights = os.path.join(exports['resnet'], 'model.safetensors')
    err = _error(capsys, ['--model', 'cifar_resnet_20', '--weights', weights, '--model-kwargs', 'layers=1',
                          '--output', str(tmp_path)])
    assert err.count('\n') == 1 and 'CifarResNet: layers must be a sequence of positive integers' in err
    assert os.listdir(tmp_path) == []


# -- an existing leaderboard: refused, --overwrite, --append ---------------------------------------------------------
def _board_args(paths, output, *extra):
    return ['--checkpoints', *paths, '--attacks', 'fgsm', 'pgd', '--n-examples', '8', '--batch-size', '4',
            '--eps', '4/255', '8/255', '--steps', '2', '--blackbox-queries', '0', '--output', str(output), *extra]


def _snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def appended(exports, tmp_path_factory):
    """One board grown by two --append runs (the first into an empty directory), with cards."""
    output = tmp_path_factory.mktemp('appended')
    assert main(_board_args([f"resnet={exports['resnet']}"], output, '--append', '--cards')) == 0
    assert main(_board_args([f"inres_a={exports['inres_a']}"], output, '--append')) == 0
    return output


def test_append_twice_gives_the_board_of_one_run(appended, exports, tmp_path):
    assert main(_board_args([f"resnet={exports['resnet']}", f"inres_a={exports['inres_a']}"], tmp_path,
                            '--cards')) == 0
    for name in ('leaderboard.json', 'leaderboard.md', 'leaderboard.csv'):
        assert (appended / name).read_text() == (tmp_path / name).read_text(), name
    board = json.loads((appended / 'leaderboard.json').read_text())
    assert [e['rank'] for e in board['entries']] == [1, 2] and {e['name'] for e in board['entries']} == {
        'resnet', 'inres_a'}
    assert sorted(os.listdir(appended / 'cards')) == ['inres_a', 'resnet']  # cards re-rendered for the merged board
    assert (appended / 'cards/inres_a/README.md').read_text() == (tmp_path / 'cards/inres_a/README.md').read_text()
    assert not [p for p in os.listdir(appended) if p.startswith('.tmp')]


@pytest.mark.parametrize('extra, message', [
    ([], 'already holds a leaderboard (leaderboard.json, leaderboard.md, leaderboard.csv, robustness_curves.png, '
         'cards): pass --append'),
    (['--append', '--steps', '3'], 'evaluated under other settings, so its numbers cannot be ranked with these: '
                                   'steps: 2 on the board, 3 now'),
    (['--append', '--seed', '1', '--n-examples', '6'], 'n_examples: 8 on the board, 6 now; seed: 0 on the board, 1 now'),
    (['--append', '--attacks', 'fgsm'], "attacks: ['clean', 'fgsm', 'pgd'] on the board, ['clean', 'fgsm'] now"),
    (['--append', '--batch-size', '8'], 'batch_size: 4 on the board, 8 now'),
    (['--append', '--overwrite'], 'not allowed with argument'),
])
def test_an_existing_board_is_refused_and_left_byte_identical(extra, message, appended, exports, capsys):
    before = _snapshot(appended)
    err = _error(capsys, _board_args([f"inres_b={exports['inres_b']}"], appended, *extra))
    assert message in err, err
    assert _snapshot(appended) == before


def test_append_refuses_a_name_already_on_the_board(appended, exports, capsys):
    before = _snapshot(appended)
    err = _error(capsys, _board_args([f"resnet={exports['inres_b']}"], appended, '--append'))
    assert 'resnet already on the leaderboard in' in err and _snapshot(appended) == before


def test_append_refuses_a_board_it_cannot_read(exports, tmp_path, capsys):
    (tmp_path / 'leaderboard.json').write_text('{"schema_version": 1, "entries": []}')
    err = _error(capsys, _board_args([exports['resnet']], tmp_path, '--append'))
    assert 'is not a leaderboard this version can extend' in err and 'leaderboard.json' in err
    assert (tmp_path / 'leaderboard.json').read_text() == '{"schema_version": 1, "entries": []}'


def test_overwrite_replaces_the_board_and_its_cards_only(appended, exports, tmp_path):
    shutil.copytree(appended, tmp_path, dirs_exist_ok=True)
    (tmp_path / 'notes.txt').write_text('mine')
    assert main(_board_args([f"inres_b={exports['inres_b']}"], tmp_path, '--overwrite')) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(['notes.txt', *OUTPUT_FILES])  # the old cards/ went with its board
    assert [e['name'] for e in json.loads((tmp_path / 'leaderboard.json').read_text())['entries']] == ['inres_b']
    assert (tmp_path / 'notes.txt').read_text() == 'mine'


# -- non-finite numbers are refused before any attack ---------------------------------------------------------------
def _copy_export(source, target, change):
    shutil.copytree(source, target)
    weights = load_file(os.path.join(target, 'model.safetensors'))
    change(weights)
    save_file(weights, os.path.join(target, 'model.safetensors'))
    return str(target)


@pytest.mark.parametrize('change, message', [
    (lambda w: w['stages.1.0.residual.conv1.weight'].view(-1)[3:5].fill_(float('nan')),
     'holds NaN or infinite values in 1 tensor(s) (stages.1.0.residual.conv1.weight)'),
    (lambda w: w['norm.running_var'].fill_(float('inf')), 'holds NaN or infinite values in 1 tensor(s) (norm.running_var)'),
    (lambda w: (w['fc.weight'].fill_(3e38), w['fc.bias'].fill_(3e38)), 'gives NaN or infinite logits on 8 of 8 clean'),
])
def test_non_finite_weights_or_logits_are_refused(change, message, exports, tmp_path, capsys):
    bad = _copy_export(exports['resnet'], tmp_path / 'bad' / 'export', change)
    output = tmp_path / 'out'
    err = _error(capsys, _board_args([exports['inres_a'], f'broken={bad}'], output))
    assert err.startswith('eval_robust.py: error: broken') and message in err and err.count('\n') == 1
    assert os.path.join(bad, 'model.safetensors') in err or f'(weights {bad})' in err
    assert os.listdir(output) == []


# -- files and directories that cannot be used: one-line errors -------------------------------------------------------
class _NotPlainData:
    pass


def test_corrupt_files_are_named_in_one_line(exports, tmp_path, capsys):
    out = ['--output', str(tmp_path / 'out')]
    truncated = tmp_path / 'truncated' / 'export'
    shutil.copytree(exports['resnet'], truncated)
    weights = truncated / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:100])
    err = _error(capsys, ['--checkpoints', exports['inres_a'], str(truncated), exports['inres_b'], *out])
    assert f'truncated: {weights} cannot be read as weights' in err and 'SafetensorError' in err and err.count('\n') == 1
    bad_config = tmp_path / 'config' / 'export'
    shutil.copytree(exports['resnet'], bad_config)
    (bad_config / 'config.json').write_text('{"architecture": "cifar_resnet_20",')
    err = _error(capsys, ['--checkpoints', exports['inres_a'], str(bad_config), *out])
    assert f"{bad_config / 'config.json'} cannot be read as JSON" in err and err.count('\n') == 1
    pickled = tmp_path / 'pickled.pth'
    torch.save({'fc.weight': torch.zeros(10, 8), 'extra': _NotPlainData()}, pickled)
    err = _error(capsys, ['--model', 'cifar_resnet_20', '--weights', str(pickled), *out])
    assert f'pickled: {pickled} cannot be read as weights' in err and 'UnpicklingError' in err
    assert err.count('\n') == 1
    assert not (tmp_path / 'out' / 'leaderboard.json').exists()


def test_an_output_that_cannot_be_written_is_refused(exports, tmp_path, capsys):
    a_file = tmp_path / 'results.txt'
    a_file.write_text('keep')
    assert f'--output {a_file} is a file, not a directory' in _error(
        capsys, ['--checkpoints', exports['resnet'], '--output', str(a_file)])
    assert a_file.read_text() == 'keep'
    err = _error(capsys, ['--checkpoints', exports['resnet'], '--output', str(a_file / 'sub')])
    assert f'--output {a_file / "sub"} cannot be written: Not a directory' in err
    # a directory nobody may write into: /proc/self even for root, a read-only one otherwise
    assert '--output /proc/self cannot be written' in _error(
        capsys, ['--checkpoints', exports['resnet'], '--output', '/proc/self'])
    if os.geteuid() != 0:
        read_only = tmp_path / 'read_only'
        read_only.mkdir(mode=0o555)
        err = _error(capsys, ['--checkpoints', exports['resnet'], '--output', str(read_only)])
        assert f'--output {read_only} cannot be written: Permission denied' in err
