"""Training (train.py / odenet_timm.train) on the embedded digits dataset, on CPU.

Runs in this process go through ``odenet_timm.train.main`` (what train.py calls); the launcher tests (torchrun,
accelerate launch, plain python) start train.py in subprocesses that import this checkout.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from odenet_timm.models.inresnet import CifarResNet
from odenet_timm.train import main
from odenet_timm.train.config import ConfigError, identity_differences, parse_args
from odenet_timm.train.engine import check_args, create_model
from odenet_timm.train.run_dir import CheckpointError, check_checkpoint, write_manifest

REPO = Path(__file__).resolve().parents[1]

# One short digits run per model family: {family: (model, model kwargs, minimum final validation top-1 in %)}.
# Each runs the family's quick recipe configs/digits_<family>.yaml with these model kwargs for EPOCHS epochs.
FAMILIES = {
    'resnet': ('cifar_resnet_20', 'layers=[1,1,1]', 80.0),
    'inresnet': ('inresnet_20', 'layers=[2,2,2]', 80.0),
    'hamiltonian': ('hamiltonian_74', 'layers=[2,2,2]', 80.0),
    'implicit': ('implicit_trapezoid_resnet', 'steps=[1,1,1]', 75.0),
    # the recipes of the newer families run here exactly as in the README (their config is already this small)
    'revnet': ('revnet_38', 'layers=[1,1,1]', 85.0),  # measured 96.7
    'resnet_1202': ('cifar_resnet_1202', 'layers=[1,1,1]', 80.0),  # grad checkpointing on; measured 88.3
    'hamiltonian_reg': ('hamiltonian_reg_74', 'layers=[1,1,1]', 35.0),  # dropout 0.4 slows it; measured 45.4
    'hamiltonian_inception': ('hamiltonian_inception_74', 'layers=[1,1,1]', 15.0),  # learns slowly; measured 19.5
    'stable': ('antisymmetric_resnet_20', 'layers=[2,1,1]', 30.0),
    'odenet': ('odenet_small', 'widths=[8,8,8]', 20.0),
}
EPOCHS = 4
# Every source of randomness that a resume has to reproduce: augmentation with flips, Mixup (NumPy), a data-loader
# worker, gradient accumulation and an EMA, on top of the seeded shuffling and the per-update schedule.
STRESS_OPTIONS = ['--hflip', '0.5', '--mixup', '0.1', '--workers', '1', '--grad-accum', '2',
                  '--model-ema', '--model-ema-decay', '0.9']


# one torch thread (results are deterministic either way; resume equivalence needs the same count in both runs)
pytestmark = pytest.mark.usefixtures('one_torch_thread')


def run(*argv) -> int:
    """``train.py ARGV`` in this process; Accelerate's process-wide singletons are reset afterwards, so that
    every run starts from a clean state, as a new process would."""
    try:
        return main([str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def family_args(family, output, *extra):
    """The command line of the family's short run: its digits recipe with the tiny model of :data:`FAMILIES`."""
    model, kwargs, _ = FAMILIES[family]
    return ['--config', REPO / f'configs/digits_{family}.yaml', '--model', model, '--model-kwargs', kwargs,
            '--epochs', EPOCHS, '--output', output, *extra]


def quick_args(output, model='cifar_resnet_20', kwargs='layers=[1,1,1]', epochs=1, *extra):
    return ['--config', REPO / 'configs/digits_resnet.yaml', '--model', model, '--model-kwargs', kwargs,
            '--epochs', epochs, '--output', output, *extra]


def subprocess_env(**extra):
    """The environment of a child process that must import THIS checkout (not an installed copy)."""
    return {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
            'OMP_NUM_THREADS': '1', **extra}


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / 'metrics.jsonl').read_text().splitlines()]


def snapshot(directory):
    """Every file below ``directory`` with its bytes, to show that nothing was changed."""
    return {p.relative_to(directory): p.read_bytes() for p in sorted(Path(directory).rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def family_runs(tmp_path_factory):
    """One finished run per family (the In-ResNet one with :data:`STRESS_OPTIONS`), shared by the tests below."""
    runs = {}
    for family in FAMILIES:
        output = tmp_path_factory.mktemp(family)
        assert run(*family_args(family, output, *(STRESS_OPTIONS if family == 'inresnet' else []))) == 0
        runs[family] = output
    return runs


# -- what a run produces ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_family_reaches_accuracy_and_writes_its_outputs(family, family_runs):
    model_name, _, min_top1 = FAMILIES[family]
    output = family_runs[family]
    history = records(output)
    assert [r['epoch'] for r in history] == list(range(1, EPOCHS + 1))
    assert all({'lr', 'train_loss', 'eval_loss', 'eval_top1', 'epoch_time_s'} <= set(r) for r in history)
    summary = json.loads((output / 'summary.json').read_text())
    assert summary['model'] == model_name and summary['final'] == history[-1]
    assert history[-1]['eval_top1'] >= min_top1, f'{family}: {history[-1]["eval_top1"]:.1f}% < {min_top1}%'
    assert sorted(p.name for p in (output / 'checkpoints').iterdir()) == [f'checkpoint_{e}' for e in range(1, EPOCHS + 1)]
    assert (output / 'checkpoints/checkpoint_1/model.safetensors').is_file()
    if family == 'inresnet':  # 3 λ (one per stage: the first block of each stage is plain), and the EMA
        assert all(len(r['interpolation_coefficients']) == 3 for r in history)
        assert 'eval_top1_ema' in history[-1] and summary['export_ema'] == 'export_ema'
    else:
        assert 'interpolation_coefficients' not in history[-1]
    if family == 'implicit':  # the solves of the last evaluation batch, every one converged
        stats = history[-1]['solver_stats']
        assert stats['converged'] and 0 < stats['forward_iterations_mean'] <= 15
    elif family == 'odenet':  # dopri5's function evaluations in the last evaluation batch (6 per step + 2)
        stats = history[-1]['solver_stats']
        assert stats['forward_nfe'] >= 8 and (stats['forward_nfe'] - 2) % 6 == 0
    else:
        assert 'solver_stats' not in history[-1]
    if family in ('hamiltonian', 'stable'):  # the smoothness decay between consecutive units (>1 unit per stage here)
        assert all(r['smoothness_loss'] > 0 for r in history)
    elif family.startswith('hamiltonian'):  # trained with the decay, but one unit per stage: no consecutive pair
        assert all(r['smoothness_loss'] == 0 for r in history)
    else:
        assert 'smoothness_loss' not in history[-1]


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_export_reloads_through_timm_with_identical_outputs(family, family_runs):
    output = family_runs[family]
    exported = timm.create_model(f'local-dir:{output}/export', pretrained=True).eval()
    config = json.loads((output / 'export/config.json').read_text())
    kwarg, value = FAMILIES[family][1].split('=')
    assert config['model_args'][kwarg] == json.loads(value)
    assert config['label_names'] == [str(d) for d in range(10)]
    # the last checkpoint holds the final weights under the bare model's keys
    rebuilt = timm.create_model(FAMILIES[family][0], **config['model_args']).eval()
    rebuilt.load_state_dict(load_file(output / f'checkpoints/checkpoint_{EPOCHS}/model.safetensors'))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(exported(x), rebuilt(x))
    if family == 'inresnet':
        ema = timm.create_model(f'local-dir:{output}/export_ema', pretrained=True).eval()
        assert not torch.equal(ema(x), exported(x))


def test_img_size_trains_and_exports_at_that_size_which_the_evaluator_reads(tmp_path):
    from odenet_timm.robust.entries import load_export_dir
    assert run(*quick_args(tmp_path / 'zero'), '--img-size', '0') == 2 and not (tmp_path / 'zero').exists()
    output = tmp_path / 'small'
    assert run(*quick_args(output), '--img-size', '16') == 0
    config = json.loads((output / 'export/config.json').read_text())
    assert config['pretrained_cfg']['input_size'] == [3, 16, 16]
    assert json.loads((output / 'train_config.json').read_text())['img_size'] == 16
    assert load_export_dir(str(output / 'export'), 'small').input_size == (3, 16, 16)
    assert records(output)[-1]['eval_top1'] > 10.0  # the digits, resized, are learnable at 16×16 too


def test_options_added_after_a_checkpoint_was_written_count_as_their_defaults_on_resume():
    older = {'model': 'inresnet_20', 'lr': 0.1}  # a train_config.json from before --img-size existed
    assert identity_differences(older, {**older, 'img_size': None}) == []
    assert identity_differences(older, {**older, 'img_size': 16}) == ['img_size: None in the checkpoint, 16 now']
    assert identity_differences({**older, 'img_size': 16}, {**older, 'img_size': None}) == [
        'img_size: 16 in the checkpoint, None now']


def test_resume_is_bit_identical_to_an_uninterrupted_run(family_runs, tmp_path):
    """N epochs in one go == N-1 epochs, killed, then --resume: same weights, EMA, lr, losses.

    The resumed checkpoint holds no RNG state for the process (as one written by fewer processes): Accelerate
    restores them only on a best-effort basis, so the run must not depend on them — it re-seeds every epoch.
    """
    straight = family_runs['inresnet']
    resumed = tmp_path / 'resumed'
    shutil.copytree(straight, resumed)
    # what a run killed during the last epoch leaves: no last checkpoint, no export/summary, but possibly the
    # last metrics line (written just before the checkpoint)
    for name in (f'checkpoints/checkpoint_{EPOCHS}', 'export', 'export_ema', 'summary.json',
                 f'checkpoints/checkpoint_{EPOCHS - 1}/random_states_0.pkl'):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    write_manifest(resumed / f'checkpoints/checkpoint_{EPOCHS - 1}')
    assert run(*family_args('inresnet', resumed, *STRESS_OPTIONS), '--resume') == 0

    for export in ('export', 'export_ema'):
        a, b = load_file(straight / export / 'model.safetensors'), load_file(resumed / export / 'model.safetensors')
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), export
    last = f'checkpoints/checkpoint_{EPOCHS}'
    lrs = [[g['lr'] for g in torch.load(d / last / 'optimizer.bin', weights_only=True)['param_groups']]
           for d in (straight, resumed)]
    assert lrs[0] == lrs[1]
    strip = [{k: v for k, v in r.items() if k != 'epoch_time_s'} for r in records(straight)]
    assert [{k: v for k, v in r.items() if k != 'epoch_time_s'} for r in records(resumed)] == strip
    assert json.loads((resumed / 'summary.json').read_text())['resumed_from'].endswith(f'checkpoint_{EPOCHS - 1}')


# -- launchers ----------------------------------------------------------------------------------------------------
def test_two_cpu_processes_with_torchrun_write_one_export_that_resumes_on_one(tmp_path):
    output = tmp_path / 'ddp'
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', 'train.py',
               *map(str, quick_args(output, epochs=2))]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(ACCELERATE_USE_CPU='true'), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((output / 'summary.json').read_text())
    assert summary['num_processes'] == 2
    assert sorted(p.name for p in output.iterdir()) == ['checkpoints', 'export', 'metrics.jsonl', 'summary.json',
                                                       'train_config.json']
    assert len(records(output)) == 2 and done.stdout.count('epoch 2/2:') == 1  # the main process reports
    checkpoint = output / 'checkpoints/checkpoint_1'
    assert {'random_states_0.pkl', 'random_states_1.pkl'} <= {p.name for p in checkpoint.iterdir()}
    assert not any(k.startswith('module.') for k in load_file(checkpoint / 'model.safetensors'))
    timm.create_model(f'local-dir:{output}/export', pretrained=True)
    # the checkpoint of two processes continues on one
    shutil.rmtree(output / 'checkpoints/checkpoint_2')
    assert run(*quick_args(output, epochs=2), '--resume') == 0
    assert json.loads((output / 'summary.json').read_text())['num_processes'] == 1


def test_accelerate_launch_as_in_the_readme(tmp_path):
    output = tmp_path / 'launched'
    # README: accelerate launch train.py --config configs/digits_resnet.yaml --output runs/digits_resnet
    # (the families' tiny runs use the other digits recipes)
    command = [sys.executable, '-m', 'accelerate.commands.accelerate_cli', 'launch', 'train.py',
               '--config', 'configs/digits_resnet.yaml', '--output', str(output),
               '--epochs', '1', '--model-kwargs', 'layers=[1,1,1]']  # command-line options beat the config file
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r['epoch'] for r in records(output)] == [1]
    assert json.loads((output / 'train_config.json').read_text())['model_kwargs'] == {'layers': [1, 1, 1]}
    timm.create_model(f'local-dir:{output}/export', pretrained=True)


def test_every_config_parses_and_its_model_builds():
    for path in sorted((REPO / 'configs').glob('*.yaml')):
        args = parse_args(['--config', str(path), '--output', 'unused'])
        assert args.epochs >= 1 and args.opt == 'momentum', path.name
        check_args(args)
        model = create_model(args, num_classes=10)
        momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
        assert momenta == ({0.1} if args.bn_momentum is None else {args.bn_momentum}), path.name
    paper = parse_args(['--config', str(REPO / 'configs/inresnet_110_cifar10.yaml'), '--output', 'unused'])
    assert (paper.lr, paper.weight_decay, paper.wd_filter, paper.decay_milestones, paper.epochs,
            paper.batch_size) == (0.1, 1e-4, 'none', [80, 120], 160, 128)


# -- options ------------------------------------------------------------------------------------------------------
def test_config_file_precedence_and_yaml_kwargs(tmp_path):
    config = tmp_path / 'c.yaml'
    config.write_text('model: inresnet_20\nlr: 0.05\nweight-decay: 1e-4\nmodel_kwargs: {layers: [1, 1, 1]}\n'
                      'decay_milestones: [3, 6]\nmodel_ema: true\n')
    args = parse_args(['--config', str(config), '--output', 'o', '--lr', '0.2', '--no-model-ema',
                       '--model-kwargs', 'memory_efficient=false', 'h=1e-1'])
    assert (args.model, args.lr, args.weight_decay, args.decay_milestones, args.model_ema) == (
        'inresnet_20', 0.2, 1e-4, [3, 6], False)
    assert args.model_kwargs == {'layers': [1, 1, 1], 'memory_efficient': False, 'h': 0.1}
    for text, message in [('batchsize: 3\n', "unknown option 'batchsize'; did you mean batch_size"),
                          ('epochs: 1.5\n', 'epochs: expected int, got 1.5'),
                          ('sched: linear\n', "'linear' is not one of"),
                          ('model_kwargs: [1]\n', 'must be a mapping'),
                          ('- a\n', 'must be a mapping of option: value')]:
        config.write_text(text)
        with pytest.raises(ConfigError, match=message):
            parse_args(['--config', str(config), '--output', 'o'])


@pytest.mark.parametrize('wd_filter', ['none', 'bias_and_bn'])
def test_weight_decay_filter_decides_whether_lambda_decays(wd_filter, tmp_path):
    from odenet_timm.train import Trainer
    args = parse_args([str(a) for a in quick_args(tmp_path, 'inresnet_20', 'layers=[2,2,2]')] + [
        '--wd-filter', wd_filter])
    trainer = Trainer(args)  # builds everything, trains nothing
    decay_of = {id(p): group['weight_decay'] for group in trainer.optimizer.param_groups for p in group['params']}
    model = trainer.accelerator.unwrap_model(trainer.model)
    lambdas = [p for name, p in model.named_parameters() if name.endswith('.k')]
    assert len(lambdas) == 3
    assert {decay_of[id(p)] for p in lambdas} == ({args.weight_decay} if wd_filter == 'none' else {0.0})
    assert decay_of[id(model.fc.weight)] == args.weight_decay > 0


def test_smoothness_decay_adds_the_models_smoothness_loss(tmp_path, monkeypatch):
    """``--smoothness-decay RATE`` trains against ``RATE * model.smoothness_loss()`` (here a stand-in on the
    ResNet, as the Hamiltonian family lives on another branch) and logs its value per epoch."""
    monkeypatch.setattr(CifarResNet, 'smoothness_loss', lambda self: self.fc.weight.pow(2).sum(), raising=False)
    finals = {}
    for rate in ('0', '1.0'):
        assert run(*quick_args(tmp_path / rate), '--smoothness-decay', rate) == 0
        finals[rate] = records(tmp_path / rate)[-1]['smoothness_loss']
    assert finals['1.0'] < 0.5 * finals['0']
    monkeypatch.delattr(CifarResNet, 'smoothness_loss')
    assert run(*quick_args(tmp_path / 'none'), '--smoothness-decay', '1.0') == 2


# -- bad input ----------------------------------------------------------------------------------------------------
def test_unknown_model_lists_close_names_and_writes_nothing(tmp_path, capsys):
    assert run(*quick_args(tmp_path / 'out', model='inresnet_21')) == 2
    error = capsys.readouterr().err
    assert "unknown model 'inresnet_21'" in error and 'inresnet_20' in error
    assert not (tmp_path / 'out').exists()


def test_grad_checkpointing_a_model_cannot_do_is_refused_and_writes_nothing(tmp_path, capsys):
    args = quick_args(tmp_path / 'out', 'implicit_trapezoid_resnet', 'steps=[1,1,1]')
    assert run(*args, '--grad-checkpointing') == 2
    error = capsys.readouterr().err
    assert '--grad-checkpointing: implicit_trapezoid_resnet does not support gradient checkpointing' in error
    assert not (tmp_path / 'out').exists()


def test_missing_dataset_says_how_to_get_it_and_writes_nothing(tmp_path, capsys):
    assert run(*quick_args(tmp_path / 'out'), '--dataset', 'torch/cifar10', '--data-dir', tmp_path / 'data') == 2
    assert 'Pass --download' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_output_holding_another_run_is_refused_unless_overwrite(family_runs, tmp_path, capsys):
    output = tmp_path / 'taken'
    shutil.copytree(family_runs['resnet'], output)
    (output / 'notes.txt').write_text('mine')
    before = snapshot(output)
    assert run(*quick_args(output, model='inresnet_20')) == 2
    assert 'already holds a training run' in capsys.readouterr().err and snapshot(output) == before
    assert run(*quick_args(output, 'inresnet_20', 'layers=[1,1,1]', 2), '--overwrite', '--keep-checkpoints', '1') == 0
    assert json.loads((output / 'summary.json').read_text())['model'] == 'inresnet_20'
    assert [p.name for p in (output / 'checkpoints').iterdir()] == ['checkpoint_2']
    assert [r['epoch'] for r in records(output)] == [1, 2]
    assert (output / 'notes.txt').read_text() == 'mine'  # only the run's own files are discarded


def _resume_args(output, resume_from):
    """Continue the ResNet family run (copied to ``output``) from ``resume_from``."""
    return [*family_args('resnet', output), '--resume', resume_from]


def test_resume_of_a_corrupt_checkpoint_fails_cleanly(family_runs, tmp_path, capsys):
    output = tmp_path / 'run'
    shutil.copytree(family_runs['resnet'], output)
    weights = output / f'checkpoints/checkpoint_{EPOCHS}/model.safetensors'
    weights.write_bytes(weights.read_bytes()[:1000])
    before = snapshot(output)
    assert run(*_resume_args(output, 'latest')) == 2
    assert f'{weights} has changed since the checkpoint was written' in capsys.readouterr().err
    write_manifest(weights.parent)  # a manifest that matches the damage: the load itself fails
    before = snapshot(output)
    assert run(*_resume_args(output, 'latest')) == 2
    assert 'cannot resume from' in capsys.readouterr().err
    assert snapshot(output) == before


def test_resume_of_a_foreign_checkpoint_is_refused(family_runs, tmp_path, capsys):
    # a checkpoint of another run (another model) into a fresh output
    foreign = family_runs['inresnet'] / 'checkpoints/checkpoint_1'
    assert run(*_resume_args(tmp_path / 'new', foreign)) == 2
    error = capsys.readouterr().err
    assert "belongs to a run with other settings" in error and "model: 'inresnet_20' in the checkpoint" in error
    assert not (tmp_path / 'new').exists()
    # a directory that this trainer did not write
    stranger = tmp_path / 'checkpoint_3'
    stranger.mkdir()
    (stranger / 'model.safetensors').write_bytes(b'')
    assert run(*_resume_args(tmp_path / 'new', stranger)) == 2
    assert 'was not written by odenet_timm' in capsys.readouterr().err
    # an earlier checkpoint of the run itself: the later ones would be overwritten
    output = tmp_path / 'run'
    shutil.copytree(family_runs['resnet'], output)
    before = snapshot(output)
    assert run(*_resume_args(output, output / 'checkpoints/checkpoint_2')) == 2
    assert 'would overwrite' in capsys.readouterr().err and snapshot(output) == before


class _RunsCodeWhenUnpickled:
    """A pickle payload like a tampered checkpoint's: unpickling it calls ``Path.touch``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_resume_never_unpickles_code_from_a_tampered_checkpoint(family_runs, tmp_path, capsys):
    output = tmp_path / 'run'
    shutil.copytree(family_runs['resnet'], output)
    marker = tmp_path / 'code-ran'
    checkpoint = output / f'checkpoints/checkpoint_{EPOCHS}'
    torch.save({'x': _RunsCodeWhenUnpickled(marker)}, checkpoint / 'custom_checkpoint_1.pkl')
    with pytest.raises(CheckpointError, match='custom_checkpoint_1.pkl has changed since the checkpoint was written'):
        check_checkpoint(checkpoint, num_registered=2)
    write_manifest(checkpoint)  # a tamperer who rewrites the manifest as well
    with pytest.raises(CheckpointError, match='cannot be read as plain tensors'):
        check_checkpoint(checkpoint, num_registered=2)
    assert run(*_resume_args(output, 'latest')) == 2
    assert 'custom_checkpoint_1.pkl cannot be read as plain tensors' in capsys.readouterr().err
    assert not marker.exists()


def test_batch_that_cannot_be_split_and_cli_errors(tmp_path):
    with pytest.raises(ConfigError, match='not a multiple of --grad-accum 3'):
        from odenet_timm.train import train
        train(parse_args([str(a) for a in quick_args(tmp_path)] + ['--batch-size', '10', '--grad-accum', '3']))
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match=r'--bn-momentum must be in \(0, 1\], got 0.0'):
        check_args(parse_args([str(a) for a in quick_args(tmp_path)] + ['--bn-momentum', '0']))
    assert run(*quick_args(tmp_path / 'o'), '--amp', 'fp16') == 2  # Accelerate would silently ignore it on CPU
    # plain `python train.py`: one line on stderr, exit status 2
    done = subprocess.run([sys.executable, 'train.py', '--model', 'resnet_cifar_20', '--output', str(tmp_path / 'o')],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith('train.py: error: unknown model')
    assert 'cifar_resnet_20' in done.stderr and 'Traceback' not in done.stderr
