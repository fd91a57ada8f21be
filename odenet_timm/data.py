"""Datasets: the embedded ``digits`` dataset and one factory for everything training and evaluation read.

``digits`` is scikit-learn's handwritten digits (1,797 real 8×8 grey images, shipped inside scikit-learn, so
every command runs offline), upsampled to 32×32 RGB so that CIFAR models, timm transforms and the attacks
apply to it unchanged. CIFAR-10/-100 go through timm's ``create_dataset('torch/cifar10', ...)``; any other
name that is a directory is read as an ImageFolder tree (``DIR/train/<class>/*.png``,
``DIR/validation/<class>/*.png``; ``val``/``test`` also accepted for the evaluation split).

No silent substitutes: timm's ``ImageDataset`` replaces an image it cannot read by the next one with only a log
line. Here an ImageFolder dataset tries each image once (a failure is an error), and :func:`check_split` decodes
every image up front: an unreadable validation image is an error naming the file, unreadable training images are
left out (and listed) up to a given fraction, and a split with fewer than two classes is refused.
"""
import os
from typing import Callable, List, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    'DigitsDataset', 'DatasetError', 'DatasetNotFoundError', 'check_split', 'create_dataset', 'dataset_classes',
    'cifar_train_transform', 'DATASET_NAMES',
]

DATASET_NAMES = ('digits', 'torch/cifar10', 'torch/cifar100')
_SPLITS = ('train', 'validation')
_CIFAR_FOLDERS = {'torch/cifar10': 'cifar-10-batches-py', 'torch/cifar100': 'cifar-100-python'}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset that is not on disk (and was not asked to be downloaded), or an unknown dataset name."""


class DatasetError(ValueError):
    """A dataset that cannot train or measure a classifier: fewer than two classes, unreadable images."""


class DigitsDataset(Dataset):
    """scikit-learn's ``digits`` as ``(PIL.Image 32×32 RGB, int label)`` pairs.

    Split (fixed, independent of library versions and seeds): sample ``i`` of ``load_digits()`` belongs to
    ``'validation'`` when ``i % 5 == 4``, otherwise to ``'train'`` — 1,438 training and 359 validation
    images, every class present in both. Pixels: the 0..16 intensities scaled to 0..255, upsampled 8×8 → 32×32
    bilinearly, replicated to three channels.
    """
    classes = [str(d) for d in range(10)]

    def __init__(self, split: str = 'train', transform: Optional[Callable] = None):
        if split not in _SPLITS:
            raise ValueError(f"DigitsDataset split must be one of {_SPLITS}, got {split!r}")
        from sklearn.datasets import load_digits
        digits = load_digits()
        index = np.arange(len(digits.target))
        keep = (index % 5 == 4) if split == 'validation' else (index % 5 != 4)
        grey = np.clip(np.round(digits.images[keep] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        self.images = [
            Image.fromarray(g, mode='L').resize((32, 32), Image.BILINEAR).convert('RGB') for g in grey
        ]
        self.targets: List[int] = [int(t) for t in digits.target[keep]]
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, idx: int):
        img = self.images[idx]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[idx]


def create_dataset(
        name: str = 'digits',
        root: Optional[str] = None,
        split: str = 'train',
        download: bool = False,
        transform: Optional[Callable] = None,
) -> Dataset:
    """The dataset ``name`` (``'digits'``, ``'torch/cifar10'``, ``'torch/cifar100'`` or an ImageFolder
    directory) for ``split`` ∈ {``'train'``, ``'validation'``}.

    Raises :class:`DatasetNotFoundError` with the way to get the data when it is not on disk.
    """
    if split not in _SPLITS:
        raise ValueError(f'split must be one of {_SPLITS}, got {split!r}')
    if name == 'digits':
        return DigitsDataset(split, transform=transform)

    import timm.data
    if name in _CIFAR_FOLDERS:
        root = root or 'data'
        folder = os.path.join(root, _CIFAR_FOLDERS[name])
        if not download and not os.path.isdir(folder):
            raise DatasetNotFoundError(
                f'{name} is not in {os.path.abspath(folder)}. Pass --download (needs internet) to fetch it into '
                f'--data-dir {root}, or extract the python version of the archive (https://www.cs.toronto.edu/'
                f'~kriz/cifar.html) there.')
        try:
            return timm.data.create_dataset(name, root=root, split=split, download=download, transform=transform)
        except RuntimeError as e:  # torchvision: 'Dataset not found or corrupted'
            raise DatasetNotFoundError(f'{name} in {os.path.abspath(folder)} is incomplete or corrupted ({e}); '
                                       f'delete it and pass --download, or extract a fresh copy there') from e

    if os.path.isdir(name):
        candidates = [os.path.join(name, s) for s in ((split,) if split == 'train' else ('validation', 'val', 'test'))]
        split_dir = next((c for c in candidates if os.path.isdir(c)), None)
        if split_dir is None:
            raise DatasetNotFoundError(
                f'ImageFolder {os.path.abspath(name)} has no {split} split: expected one of '
                f'{", ".join(os.path.basename(c) for c in candidates)} holding one sub-directory per class')
        try:
            dataset = timm.data.create_dataset('', root=split_dir, split=split, search_split=False,
                                               transform=transform)
        except RuntimeError as e:  # timm: 'Found 0 images in subfolders of ...'
            raise DatasetError(f'ImageFolder {os.path.abspath(split_dir)}: {e}') from e
        dataset._max_retries = 1  # an unreadable image is an error, never replaced by its neighbour
        return dataset

    raise DatasetNotFoundError(
        f'unknown dataset {name!r}: expected one of {", ".join(DATASET_NAMES)} or an existing ImageFolder directory')


def dataset_classes(dataset: Dataset) -> List[str]:
    """Class names of a dataset built by :func:`create_dataset`, in label order."""
    if hasattr(dataset, 'classes'):
        return list(dataset.classes)
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    if class_to_idx:
        return [c for c, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
    raise ValueError(f'cannot tell the classes of {type(dataset).__name__}')


def _labels(dataset: Dataset) -> List[int]:
    """The label of every sample of a dataset built by :func:`create_dataset` (without loading any image)."""
    if hasattr(dataset, 'targets'):
        return list(dataset.targets)
    return [target for _, target in dataset.reader.samples]


def _unreadable_images(dataset: Dataset) -> List[str]:
    """The files of an ImageFolder dataset that PIL cannot decode (as timm's ``ImageDataset`` opens them);
    none for the in-memory datasets (digits, CIFAR)."""
    samples = getattr(getattr(dataset, 'reader', None), 'samples', None)
    if samples is None:
        return []
    unreadable = []
    for path, _ in samples:
        try:
            with Image.open(path) as img:
                img.convert(getattr(dataset, 'input_img_mode', None) or 'RGB')
        except (OSError, ValueError, Image.DecompressionBombError):
            unreadable.append(str(path))
    return unreadable


def check_split(dataset: Dataset, split: str, max_unreadable: float = 0.0) -> List[str]:
    """Check a split built by :func:`create_dataset` before anything trains or measures on it, and return the
    unreadable images left out of it.

    Raises :class:`DatasetError` when more than the fraction ``max_unreadable`` of its images cannot be decoded
    (naming them; ``0``: any unreadable image), or when what remains holds fewer than two classes. Otherwise the
    unreadable images (of an ImageFolder dataset) are removed from ``dataset``.
    """
    unreadable = _unreadable_images(dataset)
    if len(unreadable) > max_unreadable * len(dataset):
        shown = ', '.join(unreadable[:3]) + (f' and {len(unreadable) - 3} more' if len(unreadable) > 3 else '')
        allowed = f'more than {max_unreadable:.2%} of them (--max-unreadable)' if max_unreadable else 'none may be'
        raise DatasetError(f'{len(unreadable)} of the {len(dataset)} {split} images cannot be read ({allowed}): '
                           f'{shown}')
    if unreadable:
        left_out = set(unreadable)
        dataset.reader.samples = [s for s in dataset.reader.samples if str(s[0]) not in left_out]
    present = sorted(set(_labels(dataset)))
    if len(present) < 2:
        classes = dataset_classes(dataset)
        names = ', '.join(classes[label] for label in present) or 'none'
        raise DatasetError(f'the {split} split holds {len(present)} class ({names}); a classifier needs at '
                           f'least 2 (an ImageFolder split needs one sub-directory of images per class)')
    return unreadable


def cifar_train_transform(
        mean: Sequence[float],
        std: Sequence[float],
        size: int = 32,
        padding: int = 2,
        hflip: float = 0.5,
) -> Callable:
    """The CIFAR papers' training augmentation: reflect-pad by ``padding`` pixels, random ``size``×``size``
    crop, horizontal flip with probability ``hflip``, then ``ToTensor`` and ``Normalize(mean, std)`` (pass the
    model's, from ``timm.data.resolve_model_data_config``). Takes a PIL image, like timm's transforms; an image
    of another size is first resized (bilinear, shorter side to ``size``), as the evaluation transform does.
    """
    from torchvision import transforms
    steps = [transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
             transforms.RandomCrop(size, padding=padding, padding_mode='reflect')]
    if hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(hflip))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)
