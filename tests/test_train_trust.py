"""train.py never gives a silently wrong result and never loses one: non-finite losses and weights, corrupt or
tampered checkpoints, degenerate or unreadable datasets, unusable --output, file modes, and extending a run.

Every run here trains the tiniest ResNet on a tiny ImageFolder dataset (3 classes, 8 training and 2 validation
images each; 3 optimizer steps per epoch), in this process (see test_train.run).
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from accelerate.utils import set_seed
from PIL import Image
from safetensors.torch import load_file, save_file

from odenet_timm.train.run_dir import MANIFEST_NAME, NonFiniteError, RunDirectory, verify_manifest, write_manifest
from test_train import REPO, records, run, snapshot

CLASSES = ('cat', 'dog', 'emu')
STEPS_PER_EPOCH = 3  # 24 training images, batch 8


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def make_image_folder(root: Path, classes=CLASSES, train_per_class=8, val_per_class=2) -> Path:
    """An ImageFolder dataset of flat-coloured noisy 32×32 images, one colour per class."""
    rng = np.random.default_rng(0)
    for split, count in (('train', train_per_class), ('validation', val_per_class)):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 + 70 * label, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('images'))


def tiny_args(output, dataset, epochs=1, *extra):
    return ['--config', REPO / 'configs/digits_resnet.yaml', '--dataset', dataset, '--model-kwargs', 'layers=[1,1,1]',
            '--batch-size', 8, '--epochs', epochs, '--output', output, *extra]


@pytest.fixture(scope='module')
def finished_run(images, tmp_path_factory):
    """A finished 2-epoch run, copied by the tests that damage it."""
    output = tmp_path_factory.mktemp('finished') / 'run'
    assert run(*tiny_args(output, images, 2)) == 0
    return output


def copy_run(run_dir, tmp_path) -> Path:
    copy = tmp_path / 'run'
    shutil.copytree(run_dir, copy)
    return copy


def killed_during_epoch_2(run_dir: Path) -> Path:
    """What a 2-epoch run killed during its last epoch leaves (checkpoint_1 is its latest)."""
    for name in ('checkpoints/checkpoint_2', 'export', 'summary.json'):
        shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    return run_dir / 'checkpoints/checkpoint_1'


def garble(path: Path, offset: int, length: int) -> None:
    """Overwrite ``length`` bytes at ``offset`` with 0xFF."""
    data = bytearray(path.read_bytes())
    data[offset:offset + length] = b'\xff' * length
    path.write_bytes(bytes(data))


@pytest.fixture
def nan_losses(monkeypatch):
    """``nan_losses({2, 3})`` makes the 2nd and 3rd training losses (counted from 1 over the run) NaN."""
    def install(bad_calls):
        calls = []
        forward = nn.CrossEntropyLoss.forward

        def maybe_nan(self, logits, targets):
            calls.append(1)
            loss = forward(self, logits, targets)
            return loss * float('nan') if len(calls) in bad_calls else loss
        monkeypatch.setattr(nn.CrossEntropyLoss, 'forward', maybe_nan)
    return install


# -- non-finite losses and weights --------------------------------------------------------------------------------
def test_first_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(images, tmp_path, nan_losses,
                                                                                 capsys):
    nan_losses({STEPS_PER_EPOCH + 2})  # epoch 2, step 2
    output = tmp_path / 'run'
    assert run(*tiny_args(output, images, 2)) == 1
    error = capsys.readouterr().err.strip()
    assert error == (f'train.py: error: epoch 2, step 2/{STEPS_PER_EPOCH}: the training loss is nan; training stopped '
                     f'({output}/checkpoints/checkpoint_1 is the last good checkpoint, unchanged)')
    assert [p.name for p in (output / 'checkpoints').iterdir()] == ['checkpoint_1']
    assert verify_manifest(output / 'checkpoints/checkpoint_1')
    assert not (output / 'export').exists() and not (output / 'summary.json').exists()
    assert [r['epoch'] for r in records(output)] == [1]


def test_corrupt_old_checkpoint_resumes_into_nan_and_stops_without_export(images, finished_run, tmp_path, capsys):
    """The issue's reproduction: garbled tensor bytes in a checkpoint without a manifest (as older versions
    wrote) → resumed → NaN loss. It used to finish with exit status 0 and export NaN weights."""
    output = copy_run(finished_run, tmp_path)
    checkpoint = killed_during_epoch_2(output)
    (checkpoint / MANIFEST_NAME).unlink(missing_ok=True)  # as older versions wrote it
    weights = checkpoint / 'model.safetensors'
    header_size = int.from_bytes(weights.read_bytes()[:8], 'little')
    garble(weights, offset=8 + header_size, length=4096)  # 4 KiB of NaN float32s in the tensor data
    before = snapshot(output / 'checkpoints')
    assert run(*tiny_args(output, images, 2), '--resume') == 1
    error = capsys.readouterr().err
    assert f'WARNING: {checkpoint} has no SHA256SUMS manifest' in error
    assert f'epoch 2, step 1/{STEPS_PER_EPOCH}: the training loss is nan' in error
    assert snapshot(output / 'checkpoints') == before
    assert not (output / 'export').exists() and not (output / 'summary.json').exists()


def test_skipped_non_finite_steps_change_nothing_and_are_counted(images, tmp_path, nan_losses, capsys):
    nan_losses(set(range(1, STEPS_PER_EPOCH + 1)))  # every step of the only epoch
    output = tmp_path / 'run'
    assert run(*tiny_args(output, images, 1, '--max-bad-steps', STEPS_PER_EPOCH)) == 0
    (record,) = records(output)
    assert record['skipped_steps'] == STEPS_PER_EPOCH and record['train_loss'] is None
    summary = json.loads((output / 'summary.json').read_text())
    assert summary['skipped_steps'] == STEPS_PER_EPOCH
    # no update: the parameters are the initial ones, the optimizer holds no momentum, the counter is 0
    set_seed(42)
    initial = dict(timm.create_model('cifar_resnet_20', layers=[1, 1, 1], num_classes=3).named_parameters())
    exported = load_file(output / 'export/model.safetensors')
    assert all(torch.equal(exported[name], p.detach()) for name, p in initial.items())
    checkpoint = output / 'checkpoints/checkpoint_1'
    assert torch.load(checkpoint / 'optimizer.bin', weights_only=True)['state'] == {}
    progress = torch.load(checkpoint / 'custom_checkpoint_0.pkl', weights_only=True)
    assert progress == {'epoch': 1, 'num_updates': 0, 'skipped_steps': STEPS_PER_EPOCH}


def test_a_non_finite_micro_batch_skips_its_whole_accumulated_step(images, tmp_path, nan_losses):
    nan_losses({2})  # the second of the two micro-batches of step 1
    output = tmp_path / 'run'
    assert run(*tiny_args(output, images, 1, '--grad-accum', 2, '--max-bad-steps', 1)) == 0
    assert records(output)[0]['skipped_steps'] == 1
    progress = torch.load(output / 'checkpoints/checkpoint_1/custom_checkpoint_0.pkl', weights_only=True)
    assert progress == {'epoch': 1, 'num_updates': STEPS_PER_EPOCH - 1, 'skipped_steps': 1}


def test_more_non_finite_steps_than_allowed_stop_the_run(images, tmp_path, nan_losses, capsys):
    nan_losses({1, 3})
    assert run(*tiny_args(tmp_path / 'run', images, 1, '--max-bad-steps', 1)) == 1
    assert capsys.readouterr().err.strip() == (
        f'train.py: error: epoch 1, step 3/{STEPS_PER_EPOCH}: the training loss is nan; 2 non-finite steps, more '
        f'than --max-bad-steps 1; training stopped (no checkpoint was written)')
    assert not (tmp_path / 'run/checkpoints').exists()


def test_export_refuses_non_finite_weights_and_leaves_the_previous_export(tmp_path):
    run_dir = RunDirectory(str(tmp_path))
    model = timm.create_model('cifar_resnet_20', layers=[1, 1, 1], num_classes=3)
    run_dir.export(run_dir.export_dir, model, {'layers': [1, 1, 1]}, list(CLASSES))
    before = snapshot(run_dir.export_dir)
    with torch.no_grad():
        model.fc.weight[0, 0] = float('nan')
        model.stem.conv.weight.fill_(float('inf'))
    with pytest.raises(NonFiniteError, match=r'^export refused: 2 of \d+ tensors hold NaN or infinite values '
                                             r'\(stem.conv.weight, fc.weight\)$'):
        run_dir.export(run_dir.export_dir, model, {'layers': [1, 1, 1]}, list(CLASSES))
    assert snapshot(run_dir.export_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['export']  # no half-written temporary directory


def test_finished_run_with_nan_weights_is_not_exported(images, finished_run, tmp_path, capsys):
    """A checkpoint whose weights are NaN (manifest rewritten to match) resumed with nothing left to train."""
    output = copy_run(finished_run, tmp_path)
    checkpoint = output / 'checkpoints/checkpoint_2'
    weights = load_file(checkpoint / 'model.safetensors')
    weights['fc.bias'] = torch.full_like(weights['fc.bias'], float('nan'))
    save_file(weights, checkpoint / 'model.safetensors')
    write_manifest(checkpoint)
    before = snapshot(output / 'export')
    assert run(*tiny_args(output, images, 2), '--resume') == 1
    assert 'export refused: 1 of' in capsys.readouterr().err
    assert snapshot(output / 'export') == before


# -- checkpoint manifest ------------------------------------------------------------------------------------------
def test_every_checkpoint_has_a_sha256sum_manifest_of_all_its_files(finished_run):
    for checkpoint in sorted((finished_run / 'checkpoints').iterdir()):
        listed = [line.split('  ')[1] for line in (checkpoint / MANIFEST_NAME).read_text().splitlines()]
        assert listed == sorted(p.name for p in checkpoint.iterdir() if p.name != MANIFEST_NAME)
        assert {'model.safetensors', 'optimizer.bin', 'random_states_0.pkl', 'train_config.json'} <= set(listed)
        if shutil.which('sha256sum'):
            done = subprocess.run(['sha256sum', '--check', '--strict', MANIFEST_NAME], cwd=checkpoint,
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize('damage, message', [
    ('garble model.safetensors', 'model.safetensors has changed since the checkpoint was written'),
    ('garble random_states_0.pkl', 'random_states_0.pkl has changed since the checkpoint was written'),
    ('delete optimizer.bin', 'optimizer.bin is missing (listed in SHA256SUMS)'),
    ('add random_states_1.pkl', 'random_states_1.pkl is not part of the checkpoint (not in SHA256SUMS)'),
])
def test_resume_refuses_a_checkpoint_that_differs_from_its_manifest(images, finished_run, tmp_path, capsys, damage,
                                                                     message):
    output = copy_run(finished_run, tmp_path)
    checkpoint = killed_during_epoch_2(output)
    action, name = damage.split()
    if action == 'garble':
        garble(checkpoint / name, offset=100, length=64)
    elif action == 'delete':
        (checkpoint / name).unlink()
    else:
        shutil.copy(checkpoint / 'random_states_0.pkl', checkpoint / name)
    before = snapshot(output)
    assert run(*tiny_args(output, images, 2), '--resume') == 2
    assert capsys.readouterr().err.startswith(f'train.py: error: {checkpoint}/{message}')
    assert snapshot(output) == before


def test_old_checkpoint_with_unreadable_rng_state_is_refused_not_skipped(images, finished_run, tmp_path, capsys):
    """Without a manifest, Accelerate would skip a garbled random_states_0.pkl with an INFO log line."""
    output = copy_run(finished_run, tmp_path)
    checkpoint = killed_during_epoch_2(output)
    (checkpoint / MANIFEST_NAME).unlink(missing_ok=True)  # as older versions wrote it
    garble(checkpoint / 'random_states_0.pkl', offset=0, length=64)
    assert run(*tiny_args(output, images, 2), '--resume') == 2
    error = capsys.readouterr().err
    assert f'{checkpoint}/random_states_0.pkl is not a readable RNG state (UnpicklingError: ' in error
    assert error.count('\n') == 1  # one line
    torch.save({'anything': torch.zeros(1)}, checkpoint / 'random_states_0.pkl')  # readable, but no RNG state
    assert run(*tiny_args(output, images, 2), '--resume') == 2
    assert f'{checkpoint}/random_states_0.pkl is not an RNG state' in capsys.readouterr().err


def test_old_checkpoint_without_manifest_resumes_after_a_warning(images, finished_run, tmp_path, capsys):
    output = copy_run(finished_run, tmp_path)
    checkpoint = killed_during_epoch_2(output)
    (checkpoint / MANIFEST_NAME).unlink(missing_ok=True)  # as older versions wrote it
    assert run(*tiny_args(output, images, 2), '--resume') == 0
    assert f'WARNING: {checkpoint} has no SHA256SUMS manifest' in capsys.readouterr().err
    assert verify_manifest(output / 'checkpoints/checkpoint_2')
    a, b = load_file(finished_run / 'export/model.safetensors'), load_file(output / 'export/model.safetensors')
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- datasets -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('split', ['train', 'validation'])
def test_a_split_with_one_class_is_refused(tmp_path, capsys, split):
    dataset = make_image_folder(tmp_path / 'data')
    for name in CLASSES[1:]:
        shutil.rmtree(dataset / split / name)
    assert run(*tiny_args(tmp_path / 'run', dataset)) == 2
    assert capsys.readouterr().err.strip() == (
        f'train.py: error: the {split} split holds 1 class (cat); a classifier needs at least 2 (an ImageFolder '
        f'split needs one sub-directory of images per class)')
    assert not (tmp_path / 'run').exists()


def test_an_unreadable_validation_image_is_an_error_naming_it(tmp_path, capsys):
    dataset = make_image_folder(tmp_path / 'data')
    bad = dataset / 'validation/dog/1.png'
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    assert run(*tiny_args(tmp_path / 'run', dataset)) == 2
    assert capsys.readouterr().err.strip() == (
        f'train.py: error: 1 of the 6 validation images cannot be read (none may be): {bad}')
    assert not (tmp_path / 'run').exists()


def test_unreadable_training_images_are_counted_and_limited(tmp_path, capsys):
    dataset = make_image_folder(tmp_path / 'data')
    bad = dataset / 'train/emu/3.png'
    bad.write_bytes(b'not a png')
    assert run(*tiny_args(tmp_path / 'refused', dataset)) == 2  # default --max-unreadable 0.01: 1 of 24 is too many
    assert capsys.readouterr().err.strip() == (
        f'train.py: error: 1 of the 24 train images cannot be read (more than 1.00% of them (--max-unreadable)): '
        f'{bad}')
    assert not (tmp_path / 'refused').exists()
    assert run(*tiny_args(tmp_path / 'run', dataset, 1, '--max-unreadable', '0.05')) == 0
    summary = json.loads((tmp_path / 'run/summary.json').read_text())
    assert (summary['unreadable_train_images'], summary['unreadable_train_image_files']) == (1, [str(bad)])


def test_a_clean_run_reports_zero_unreadable_images_and_skipped_steps(finished_run):
    summary = json.loads((finished_run / 'summary.json').read_text())
    assert (summary['unreadable_train_images'], summary['skipped_steps']) == (0, 0)
    assert [r['skipped_steps'] for r in records(finished_run)] == [0, 0]


# -- --output and file modes --------------------------------------------------------------------------------------
def test_output_naming_a_file_or_below_a_file_is_a_one_line_error(images, tmp_path, capsys):
    taken = tmp_path / 'notes.txt'
    taken.write_text('mine')
    assert run(*tiny_args(taken, images)) == 2
    assert capsys.readouterr().err.strip() == f'train.py: error: --output {taken} is a file, not a directory'
    assert run(*tiny_args(taken / 'run', images)) == 2
    assert capsys.readouterr().err.strip() == (
        f'train.py: error: --output {taken}/run lies below {taken}, which is a file, not a directory')
    assert taken.read_text() == 'mine'


def test_read_only_output_is_a_one_line_error(images, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through permission bits: use a location the kernel refuses to everyone
        parent = Path('/sys')
    else:
        parent = tmp_path / 'read-only'
        parent.mkdir()
        parent.chmod(0o555)
    assert run(*tiny_args(parent / 'run', images)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f'train.py: error: --output {parent}/run: cannot write in {parent} (') and '\n' not in error
    assert not (parent / 'run').exists()


@pytest.mark.parametrize('mask', [0o022, 0o027])
def test_every_file_of_a_run_honours_the_umask(images, tmp_path, mask):
    previous = os.umask(mask)
    try:
        assert run(*tiny_args(tmp_path / 'run', images)) == 0
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in (tmp_path / 'run').rglob('*')
             if p.is_file()}
    assert 'run/export/model.safetensors' in modes and 'run/checkpoints/checkpoint_1/model.safetensors' in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~mask)


# -- extending a finished run -------------------------------------------------------------------------------------
def test_resume_with_more_epochs_extends_the_run_like_one_long_run(images, finished_run, tmp_path, capsys):
    """A 1-epoch run extended to 2 epochs equals a 2-epoch run: the cosine schedule is re-planned over 2 epochs
    (the 1-epoch schedule would have left the lr at 0)."""
    output = tmp_path / 'extended'
    assert run(*tiny_args(output, images, 1)) == 0
    capsys.readouterr()
    assert run(*tiny_args(output, images, 2), '--resume') == 0
    assert ('extending the run from 1 to 2 epochs: the cosine schedule is re-planned over 2 epochs from epoch 1 '
            '(lr now 0.05)') in capsys.readouterr().out
    extension = {'at_epoch': 1, 'from_epochs': 1, 'to_epochs': 2}
    config = json.loads((output / 'train_config.json').read_text())
    assert config['epochs'] == 2 and config['epochs_extended'] == [extension]
    assert json.loads((output / 'checkpoints/checkpoint_2/train_config.json').read_text())['epochs_extended'] == [
        extension]
    assert records(output)[1]['epochs_extended'] == extension and 'epochs_extended' not in records(output)[0]
    assert json.loads((output / 'summary.json').read_text())['epochs_extended'] == [extension]

    def comparable(run_dir):
        return [{k: v for k, v in r.items() if k not in ('epoch_time_s', 'epochs_extended')} for r in records(run_dir)]
    assert comparable(output) == comparable(finished_run)
    a, b = load_file(finished_run / 'export/model.safetensors'), load_file(output / 'export/model.safetensors')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_may_not_shrink_epochs_or_change_another_option_while_extending(images, finished_run, tmp_path, capsys):
    output = copy_run(finished_run, tmp_path)
    before = snapshot(output)
    assert run(*tiny_args(output, images, 1), '--resume') == 2
    assert capsys.readouterr().err.strip().endswith(
        'epochs: 2 in the checkpoint, 1 now (--epochs can grow, to extend a run, but not shrink)')
    assert run(*tiny_args(output, images, 3, '--lr', '0.2'), '--resume') == 2
    assert capsys.readouterr().err.strip().endswith('mix two recipes: lr: 0.1 in the checkpoint, 0.2 now')
    assert snapshot(output) == before
