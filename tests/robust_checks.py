"""Helpers shared by the robustness tests: the first validation digits, small trained classifiers to attack, and
the evaluation entry wrapping a module."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from odenet_timm.data import create_dataset
from odenet_timm.models._common import CIFAR10_MEAN, CIFAR10_STD
from odenet_timm.robust import EvalEntry, NormalizedModel, load_evaluation_examples


def first_digits(n: int):
    """The first ``n`` validation digits as [0, 1] images (3×32×32) and their labels."""
    images, labels, _ = load_evaluation_examples('digits', None, n, (3, 32, 32))
    return images, labels


def fit(model: nn.Module, steps: int, lr: float, n_train: Optional[int] = None) -> nn.Module:
    """``steps`` full-batch Adam steps on the first ``n_train`` (default: all) training digits; in eval mode."""
    train = create_dataset('digits', split='train', transform=T.ToTensor())
    n_train = len(train) if n_train is None else n_train
    x, y = torch.stack([train[i][0] for i in range(n_train)]), torch.tensor(train.targets[:n_train])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def normalized(model: nn.Module) -> NormalizedModel:
    """``model`` on CIFAR-10-normalized input, as a function of [0, 1] images."""
    return NormalizedModel(model, CIFAR10_MEAN, CIFAR10_STD)


def linear_classifier(steps: int, lr: float, n_train: Optional[int] = None) -> NormalizedModel:
    """A linear classifier on normalized digits, initialised from seed 0 and :func:`fit`."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = normalized(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)))
    return fit(model, steps, lr, n_train)


def eval_entry(name: str, module: nn.Module, num_classes: int = 10) -> EvalEntry:
    """``module`` as an evaluation entry on 3×32×32 images."""
    return EvalEntry(name=name, module=module.eval(), architecture=type(module).__name__, num_classes=num_classes,
                     input_size=(3, 32, 32))
