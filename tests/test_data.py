"""Dataset factory: the embedded digits dataset, and the real CIFAR / ImageFolder paths on local files."""
import pickle

import numpy as np
import pytest
import torchvision
from PIL import Image

from odenet_timm.data import DatasetError, DatasetNotFoundError, DigitsDataset, check_split, cifar_train_transform, \
    create_dataset, dataset_classes


def test_digits_split_is_fixed_and_documented():
    train, val = DigitsDataset('train'), DigitsDataset('validation')
    assert (len(train), len(val)) == (1438, 359)
    assert sorted(set(train.targets)) == sorted(set(val.targets)) == list(range(10))
    img, label = val[0]
    assert isinstance(img, Image.Image) and img.size == (32, 32) and img.mode == 'RGB'
    from sklearn.datasets import load_digits
    digits = load_digits()
    assert label == digits.target[4] and train[4][1] == digits.target[5]  # sample 4 → validation
    pixels = np.asarray(img)
    assert pixels.dtype == np.uint8 and pixels.max() > 200 and np.array_equal(pixels[..., 0], pixels[..., 2])
    assert np.array_equal(np.asarray(DigitsDataset('validation')[0][0]), pixels)  # deterministic
    with pytest.raises(ValueError, match='split'):
        DigitsDataset('test')


def test_digits_take_timm_transforms():
    from timm.data import create_transform
    ds = create_dataset('digits', split='validation', transform=create_transform((3, 32, 32), crop_pct=1.0))
    x, y = ds[0]
    assert tuple(x.shape) == (3, 32, 32) and isinstance(y, int)
    assert dataset_classes(ds) == [str(d) for d in range(10)]


def _write_fake_cifar10(root, n=6):
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        batch = {'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8), 'labels': list(range(n))}
        with open(folder / name, 'wb') as f:
            pickle.dump(batch, f)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': [f'class{i}' for i in range(10)]}, f)


def test_cifar_is_read_through_timm_from_local_files(tmp_path, monkeypatch):
    _write_fake_cifar10(tmp_path)
    # the md5 check can only pass on the real archive; everything after it is the real loading code
    monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity', lambda path, md5=None: True)
    train = create_dataset('torch/cifar10', root=str(tmp_path), split='train')
    val = create_dataset('torch/cifar10', root=str(tmp_path), split='validation')
    assert (len(train), len(val)) == (30, 6)
    img, label = val[2]
    assert img.size == (32, 32) and label == 2
    assert dataset_classes(train) == [f'class{i}' for i in range(10)]


def test_missing_or_corrupt_cifar_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match='Pass --download'):
        create_dataset('torch/cifar100', root=str(tmp_path))
    _write_fake_cifar10(tmp_path)  # the md5 check fails on these files
    with pytest.raises(DatasetNotFoundError, match='incomplete or corrupted'):
        create_dataset('torch/cifar10', root=str(tmp_path))


def test_image_folder(tmp_path):
    for split in ('train', 'val'):
        for cls in ('cat', 'dog', 'emu'):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new('RGB', (32, 32), (10, 20, 30)).save(tmp_path / split / cls / 'a.png')
    ds = create_dataset(str(tmp_path), split='validation')
    assert len(ds) == 3 and dataset_classes(ds) == ['cat', 'dog', 'emu']
    img, label = ds[1]
    assert label == 1 and img.size == (32, 32)
    (tmp_path / 'val').rename(tmp_path / 'other')
    with pytest.raises(DatasetNotFoundError, match='no validation split'):
        create_dataset(str(tmp_path), split='validation')
    with pytest.raises(DatasetNotFoundError, match='unknown dataset'):
        create_dataset('no/such/thing')


def test_image_folder_never_replaces_an_unreadable_image_by_its_neighbour(tmp_path):
    """timm's ImageDataset returns the next sample instead of an unreadable one (a log line only); here reading it is
    an error, check_split names it, and leaves it out of a training split only below the allowed fraction."""
    for cls in ('cat', 'dog'):
        (tmp_path / 'train' / cls).mkdir(parents=True)
        for i in range(4):
            Image.new('RGB', (32, 32), (10 * i, 20, 30)).save(tmp_path / 'train' / cls / f'{i}.png')
    bad = tmp_path / 'train/dog/2.png'
    bad.write_bytes(bad.read_bytes()[:50])
    ds = create_dataset(str(tmp_path), split='train')
    index = [str(path) for path, _ in ds.reader.samples].index(str(bad))
    with pytest.raises(RuntimeError):
        ds[index]
    with pytest.raises(DatasetError, match=f'^1 of the 8 validation images cannot be read \\(none may be\\): {bad}$'):
        check_split(ds, 'validation')
    with pytest.raises(DatasetError, match=r'1 of the 8 train images cannot be read \(more than 10.00% of them'):
        check_split(ds, 'train', max_unreadable=0.1)
    assert len(ds) == 8  # a refused split is left as it was
    assert check_split(ds, 'train', max_unreadable=0.125) == [str(bad)]
    assert len(ds) == 7 and str(bad) not in [str(path) for path, _ in ds.reader.samples]
    assert [ds[i][1] for i in range(7)] == [0, 0, 0, 0, 1, 1, 1]


def test_check_split_refuses_fewer_than_two_classes(tmp_path):
    assert check_split(DigitsDataset('validation'), 'validation') == []
    (tmp_path / 'train/only').mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(tmp_path / 'train/only/a.png')
    with pytest.raises(DatasetError, match=r'^the train split holds 1 class \(only\); a classifier needs at least 2'):
        check_split(create_dataset(str(tmp_path), split='train'), 'train')
    (tmp_path / 'train/only/a.png').unlink()
    with pytest.raises(DatasetError, match='Found 0 images'):
        create_dataset(str(tmp_path), split='train')


def test_cifar_train_transform_pads_by_reflection_crops_flips_and_normalizes():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    expected = [(c / 255 - m) / s for c, m, s in zip((51, 102, 153), mean, std)]
    for _ in range(10):  # reflection keeps a flat image flat in every crop: no zero-padded border
        flat = cifar_train_transform(mean, std)(Image.new('RGB', (32, 32), (51, 102, 153)))
        assert tuple(flat.shape) == (3, 32, 32) and float(flat.std(dim=(1, 2)).max()) < 1e-5
        assert np.allclose(flat.mean(dim=(1, 2)).numpy(), expected, atol=1e-6)
    ramp = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))).convert('RGB')
    always_flip = cifar_train_transform((0, 0, 0), (1, 1, 1), padding=0, hflip=1.0)(ramp)
    assert np.allclose(always_flip[0, 0].numpy() * 255, np.arange(32)[::-1] * 8, atol=1e-3)
    shifts = set()
    for _ in range(50):
        row = cifar_train_transform((0, 0, 0), (1, 1, 1), hflip=0.0)(ramp)[0, 16].numpy() * 255
        shifts.add(int(round(row[16] / 8)) - 16)  # the column that lands in the middle
    assert shifts == {-2, -1, 0, 1, 2}
    # an image of another size is resized to ``size`` (as the evaluation transform does), not cropped from
    halves = Image.fromarray(np.repeat(np.array([[0, 255]], dtype=np.uint8), 32, axis=1).repeat(64, axis=0))
    small = cifar_train_transform((0, 0, 0), (1, 1, 1), size=16, padding=0, hflip=0.0)(halves.convert('RGB'))
    assert tuple(small.shape) == (3, 16, 16)
    assert float(small[:, :, :7].max()) == 0.0 and float(small[:, :, 9:].min()) == 1.0
