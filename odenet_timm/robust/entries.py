"""What gets evaluated: single models wrapped to take [0, 1] images, and ensembles attacked as one model.

Models are reached only through timm (``timm.create_model('local-dir:DIR', pretrained=True)`` for the ``export/``
directories that training writes with ``timm.models.save_for_hf(..., safe_serialization=True)``, or
``timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=WEIGHTS))``); the mean/std of the
wrapper come from each model's pretrained cfg.
"""
import hashlib
import json
import math
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.data import resolve_model_data_config

from .. import CheckpointMismatchError
from .errors import EvaluationInputError

__all__ = [
    'NormalizedModel', 'Ensemble', 'EvalEntry', 'ENSEMBLE_COMBINES', 'load_export_dir', 'load_weights_file',
    'make_ensemble', 'sha256_file', 'solver_stats_of', 'reset_solver_stats_of', 'check_finite_logits',
]

ENSEMBLE_COMBINES = ('probs', 'logits')


def solver_stats_of(module: nn.Module) -> Dict[str, Any]:
    """``module.solver_stats()`` for modules whose forward runs a solver (duck-typed, e.g. implicit networks), else
    ``{}``."""
    stats = getattr(module, 'solver_stats', None)
    return dict(stats()) if callable(stats) else {}


def reset_solver_stats_of(module: nn.Module) -> None:
    """Forget the solves recorded so far by every submodule that has ``reset_solver_stats()`` (through wrappers and
    ensembles), so that the next ``solver_stats()`` describes only what runs after this call."""
    for submodule in module.modules():
        reset = getattr(submodule, 'reset_solver_stats', None)
        if callable(reset):
            reset()


class NormalizedModel(nn.Module):
    """``model((x − mean) / std)``: a timm model (which takes NORMALIZED input) as a function of [0, 1] images."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)

    def solver_stats(self) -> Dict[str, Any]:
        """The wrapped model's ``solver_stats()`` (models whose forward runs a solver), else ``{}``."""
        return solver_stats_of(self.model)


class Ensemble(nn.Module):
    """Members combined into one model, attacked white-box through every member.

    ``combine='probs'`` (default, as in the In-ResNet paper): the output is ``log(mean_m softmax(z_m))``, the log of
    the averaged member probabilities, so cross-entropy attacks the averaged prediction; ``'logits'``: the mean of
    the member logits.
    """

    def __init__(self, members: Sequence[nn.Module], combine: str = 'probs'):
        super().__init__()
        if combine not in ENSEMBLE_COMBINES:
            raise EvaluationInputError(f'ensemble combine must be one of {ENSEMBLE_COMBINES}, got {combine!r}')
        if not members:
            raise EvaluationInputError('an ensemble needs at least one member')
        self.members = nn.ModuleList(members)
        self.combine = combine

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([member(images) for member in self.members])
        if self.combine == 'logits':
            return outputs.mean(dim=0)
        return torch.logsumexp(F.log_softmax(outputs, dim=-1), dim=0) - math.log(len(self.members))

    def solver_stats(self) -> Dict[str, Any]:
        """Members' solver statistics, keys prefixed ``member{i}.``."""
        return {f'member{i}.{k}': v for i, m in enumerate(self.members) for k, v in solver_stats_of(m).items()}


@dataclass
class EvalEntry:
    """One leaderboard row: a model (or ensemble) as a function of [0, 1] images, and what is recorded about it."""
    name: str
    module: nn.Module
    architecture: str
    num_classes: int
    input_size: Tuple[int, int, int]
    checkpoint: Optional[Dict[str, str]] = None   # {'path', 'sha256'} of a single model's weights
    model_kwargs: Optional[Dict[str, Any]] = None  # what the architecture was built with (a single model's)
    members: List['EvalEntry'] = field(default_factory=list)
    ensemble_combine: Optional[str] = None

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @property
    def number_forward_passes(self) -> int:
        """Network evaluations per prediction (RobustBench's field): 1, or the number of ensemble members."""
        return len(self.members) or 1


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _entry_from_model(name: str, model: nn.Module, weights_path: str, checkpoint_path: str,
                      model_kwargs: Dict[str, Any]) -> EvalEntry:
    model.eval()
    cfg = resolve_model_data_config(model)
    return EvalEntry(
        name=name,
        module=NormalizedModel(model, cfg['mean'], cfg['std']).eval(),
        architecture=model.pretrained_cfg.get('architecture') or type(model).__name__,
        num_classes=model.num_classes,
        input_size=tuple(cfg['input_size']),
        checkpoint={'path': checkpoint_path, 'sha256': sha256_file(weights_path)},
        model_kwargs=json.loads(json.dumps(model_kwargs)),  # as the leaderboard stores them (tuples → lists)
    )


def _tensors(value: Any, prefix: str = '') -> Dict[str, torch.Tensor]:
    """Every tensor in a (nested) state dict, by dotted key."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return {k: t for key, item in items for k, t in _tensors(item, f'{prefix}.{key}' if prefix else str(key)).items()}


def _check_weights_file(name: str, path: str) -> None:
    """Read ``path`` as timm will (safetensors, or a state dict under ``weights_only=True``) and refuse it, naming
    the entry and the file, when it cannot be read or holds a NaN or infinite value: such a model's robustness
    numbers would be meaningless (a NaN network predicts one class for every input, attacked or not)."""
    try:
        if path.endswith('.safetensors'):
            tensors = load_file(path)
        else:
            tensors = _tensors(torch.load(path, map_location='cpu', weights_only=True))
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise EvaluationInputError(
            f'{name}: {path} cannot be read as weights (a corrupt or truncated file, or a pickle that is not plain '
            f'tensors and containers, which is not unpickled): {type(e).__name__}: {str(e).splitlines()[0]}') from e
    bad = [key for key, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise EvaluationInputError(f'{name}: {path} holds NaN or infinite values in {len(bad)} tensor(s) '
                                   f'({", ".join(bad[:5])}{", …" if len(bad) > 5 else ""}); refusing to evaluate it')


def _read_export_config(name: str, path: str) -> Dict[str, Any]:
    config_path = os.path.join(path, 'config.json')
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise EvaluationInputError(f'{name}: {config_path} cannot be read as JSON: {e}') from e
    if not isinstance(config, dict) or not isinstance(config.get('model_args', {}), dict):
        raise EvaluationInputError(f'{name}: {config_path} is not a timm model config (a mapping with '
                                   f'architecture, model_args, pretrained_cfg)')
    return config


@torch.no_grad()
def check_finite_logits(entry: EvalEntry, images: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """Refuse ``entry`` (naming it and its weights) when its logits on any clean image are NaN or infinite."""
    module = entry.module.to(device).eval()
    bad = [start + i for start in range(0, len(images), batch_size)
           for i in (~torch.isfinite(module(images[start:start + batch_size].to(device))).all(dim=1)).nonzero()
           .flatten().tolist()]
    if bad:
        source = f' (weights {entry.checkpoint["path"]})' if entry.checkpoint else ''
        raise EvaluationInputError(
            f'{entry.name}{source} gives NaN or infinite logits on {len(bad)} of {len(images)} clean examples '
            f'(first: example {bad[0]}); refusing to evaluate it')


def load_export_dir(path: str, name: str) -> EvalEntry:
    """The model saved in ``path`` by ``timm.models.save_for_hf(..., safe_serialization=True)``.

    Raises :class:`EvaluationInputError` when the directory or its files are missing, and lets
    ``odenet_timm.CheckpointMismatchError`` through (naming the directory) when the weights do not fit."""
    if not os.path.isdir(path):
        raise EvaluationInputError(f'checkpoint directory {path} does not exist')
    weights = os.path.join(path, 'model.safetensors')
    if not os.path.isfile(os.path.join(path, 'config.json')) or not os.path.isfile(weights):
        raise EvaluationInputError(
            f'{path} is not a timm export: expected config.json and model.safetensors (written by '
            f'timm.models.save_for_hf(model, DIR, safe_serialization=True), e.g. RUN/export from train.py)')
    config = _read_export_config(name, path)
    _check_weights_file(name, weights)
    model = _create(f'local-dir:{path}', name, path, pretrained=True)
    return _entry_from_model(name, model, weights, path, config.get('model_args', {}))


def load_weights_file(model_name: str, weights: str, name: str, model_kwargs: Optional[Dict] = None) -> EvalEntry:
    """The registered architecture ``model_name`` (with ``model_kwargs``) holding the weights in ``weights``
    (``.safetensors``, or a state dict timm reads with ``weights_only=True``)."""
    if not timm.is_model(model_name):
        raise EvaluationInputError(f'unknown model {model_name!r}; odenet_timm.list_models() lists ours')
    if not os.path.isfile(weights):
        raise EvaluationInputError(f'weights file {weights} does not exist')
    _check_weights_file(name, weights)
    model = _create(model_name, name, weights, pretrained=True,
                    pretrained_cfg_overlay=dict(file=os.path.abspath(weights)), **(model_kwargs or {}))
    return _entry_from_model(name, model, weights, weights, model_kwargs or {})


def _create(model_name: str, name: str, source: str, **kwargs) -> nn.Module:
    """``timm.create_model`` on files already checked to be readable: what still fails is the architecture's
    arguments (``--model-kwargs``, an export's ``model_args``) or weights that do not fit it."""
    try:
        return timm.create_model(model_name, **kwargs)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f'{source}: {e}') from e
    except (TypeError, ValueError) as e:
        raise EvaluationInputError(f'{name}: cannot build {model_name} for {source}: {e}') from e


def make_ensemble(name: str, members: Sequence[EvalEntry], combine: str = 'probs') -> EvalEntry:
    """An ensemble entry over already loaded member entries (which must agree on classes and input size)."""
    if len({m.num_classes for m in members}) > 1 or len({m.input_size for m in members}) > 1:
        raise EvaluationInputError(
            f'ensemble {name}: members disagree on classes or input size: '
            + ', '.join(f'{m.name} ({m.num_classes} classes, {m.input_size})' for m in members))
    architectures = sorted({m.architecture for m in members})
    return EvalEntry(
        name=name,
        module=Ensemble([m.module for m in members], combine).eval(),
        architecture=f'ensemble of {len(members)}: {", ".join(architectures)}',
        num_classes=members[0].num_classes,
        input_size=members[0].input_size,
        members=list(members),
        ensemble_combine=combine,
    )
