"""Pieces shared by the CIFAR-style families: the pretrained cfg, the stem, the authors' initialisation,
and the ``stem → stages → final BN-ReLU → global pool → classifier`` skeleton with timm's model API.

Every family in this package (In-ResNet, Hamiltonian, implicit θ-ResNets) is a CIFAR network of that
shape; they differ only in what a stage computes. A family builds its stem and its three stages and hands
them to :class:`CifarStagedNet`, which provides ``forward_features`` / ``forward_head`` /
``forward_intermediates`` / ``reset_classifier`` / ``group_matcher`` / ``feature_info`` and the input checks.
"""
import math
import numbers
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, create_classifier
from timm.models._features import feature_take_indices

from odenet_timm.layers.checkpoint import checkpoint_blocks

__all__ = [
    'CIFAR10_MEAN', 'CIFAR10_STD', 'CheckpointMismatchError', 'cifar_cfg', 'init_weights_cifar_', 'ConvStem',
    'ConvTransition', 'PoolPadTransition', 'pool_and_pad_channels', 'weight_smoothness_loss', 'CifarStagedNet',
    'KwargTypeError', 'check_kwarg_types', 'INPUT_DTYPES',
]

INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Input dtypes a model takes under autocast; without autocast the input must have the parameters' dtype."""

# The In-ResNet authors' normalisation constants (docs/models.md#the-shared-cifar-skeleton), used by every family.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def cifar_cfg(paper_ids: str, paper_name: str, **kwargs) -> Dict[str, Any]:
    """Pretrained cfg of a CIFAR-10 model: 32×32 input, no resize crop, CIFAR mean/std, 8×8 final map; the paper by
    arXiv id and title (the model cards cite it from here)."""
    return {
        'url': '',
        'num_classes': 10,
        'input_size': (3, 32, 32),
        'pool_size': (8, 8),
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'mean': CIFAR10_MEAN,
        'std': CIFAR10_STD,
        'first_conv': 'stem.conv',
        'classifier': 'fc',
        'license': 'apache-2.0',
        'paper_ids': paper_ids,
        'paper_name': paper_name,
        **kwargs,
    }


def init_weights_cifar_(module: nn.Module) -> None:
    """The CIFAR ResNet authors' initialisation: conv ~ N(0, sqrt(2 / (k·k·out))), BN weight 1 / bias 0.

    Linear layers keep PyTorch's default initialisation, as in the authors' code.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


# kind of a model kwarg → (what a user is told it must be, the test of a value)
_KWARG_KINDS: Dict[str, Tuple[str, Callable[[Any], bool]]] = {
    'bool': ('a bool (true or false)', lambda v: isinstance(v, bool)),
    'int': ('an integer', _is_integer),
    'number': ('a number', _is_number),
    'str': ('a string', lambda v: isinstance(v, str)),
    'stage_ints': ('a sequence of positive integers (one per stage)',
                   lambda v: _is_sequence(v) and len(v) > 0 and all(_is_integer(n) and n >= 1 for n in v)),
    'range': ('a (low, high) pair of numbers', lambda v: _is_sequence(v) and len(v) == 2 and all(map(_is_number, v))),
}


class KwargTypeError(TypeError, ValueError):
    """A model kwarg that is not of the kind its model takes (a ``TypeError``, and a ``ValueError`` for callers
    that catch bad arguments as such)."""


def check_kwarg_types(owner: str, **kwargs: Tuple[Any, str]) -> None:
    """Raise a :class:`KwargTypeError` naming the kwarg, its value and the expected type for the first ``name=(value, kind)``
    whose value is not of ``kind`` (``'bool'``, ``'int'``, ``'number'``, ``'str'``, ``'stage_ints'``,
    ``'range'``). Command lines hand over YAML-typed values; this stops a string such as ``'false'`` (truthy) or a
    float layer count from silently building another model than the one asked for."""
    for name, (value, kind) in kwargs.items():
        expected, is_valid = _KWARG_KINDS[kind]
        if not is_valid(value):
            raise KwargTypeError(f'{owner}: {name} must be {expected}, got {value!r} ({type(value).__name__})')


class CheckpointMismatchError(RuntimeError):
    """A state dict that does not fit the model it is loaded into (another architecture or configuration)."""


def _preview(items: List[str], limit: int = 6) -> str:
    shown = ', '.join(items[:limit])
    return shown + (f', … ({len(items) - limit} more)' if len(items) > limit else '')


class ConvStem(nn.Module):
    """``conv3x3(in → out)`` without bias, optionally followed by BN-ReLU."""

    def __init__(self, in_chans: int, out_chans: int, norm: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False)
        self.norm = BatchNormAct2d(out_chans) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class ConvTransition(nn.Sequential):
    """Stage transition ``conv3x3_stride2(ReLU(BN(x)))`` to the next width and half the resolution."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.norm = BatchNormAct2d(in_chs)
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, bias=False)


def pool_and_pad_channels(x: torch.Tensor, pad: int) -> torch.Tensor:
    """2×2 average pooling, then ``pad`` zero channels on each side: the parameter-free stage transition of the
    Hamiltonian networks (Chang et al., arXiv:1709.03698). Not invertible."""
    return F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, pad, pad))


class PoolPadTransition(nn.Module):
    """:func:`pool_and_pad_channels` as a module: half the resolution, ``2·pad`` more channels."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_and_pad_channels(x, self.pad)


def weight_smoothness_loss(stages: Iterable[Sequence[Sequence[torch.Tensor]]], like: torch.Tensor) -> torch.Tensor:
    """Weight smoothness decay ``Σ ½‖K_{j+1} − K_j‖²`` (Chang et al., arXiv:1709.03698) between consecutive layers
    of each stage. ``stages`` gives, per stage, per layer, that layer's kernels (corresponding kernels of
    consecutive layers are compared); a zero like ``like`` when no two layers are consecutive."""
    terms: List[torch.Tensor] = []
    for layers in stages:
        for prev, nxt in zip(layers[:-1], layers[1:]):
            for k_prev, k_next in zip(prev, nxt):
                terms.append(0.5 * (k_next - k_prev).square().sum())
    return torch.stack(terms).sum() if terms else like.new_zeros(())


class CifarStagedNet(nn.Module):
    """``stem → stages[0..2] → BN-ReLU → global pool → (dropout) → fc``, with timm's model API.

    Feature levels (``feature_info``, ``forward_intermediates``, ``features_only=True``): index 0 is the
    stem output, indices 1.. the outputs of the stages. ``forward_features`` returns the last stage's
    output after the final BN-ReLU (pre-activation networks normalise once before the head).

    Models take NORMALIZED input, like every timm model. ``stem_channels`` defaults to ``stage_channels[0]`` and
    ``stage_reductions`` to 1, 2, 4, … (the stem keeps the resolution, every later stage halves it).
    """

    def __init__(
            self,
            stem: nn.Module,
            stages: Sequence[nn.Module],
            stage_channels: Sequence[int],
            stem_channels: Optional[int] = None,
            stage_reductions: Optional[Sequence[int]] = None,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            final_norm: bool = True,
    ):
        super().__init__()
        check_kwarg_types(type(self).__name__, num_classes=(num_classes, 'int'), in_chans=(in_chans, 'int'),
                          global_pool=(global_pool, 'str'), drop_rate=(drop_rate, 'number'))
        stem_channels = stage_channels[0] if stem_channels is None else stem_channels
        if stage_reductions is None:  # stride 1 in the first stage, then 2 in each next one
            stage_reductions = tuple(2 ** i for i in range(len(stage_channels)))
        if len(stages) != len(stage_channels) or len(stages) != len(stage_reductions):
            raise ValueError('stages, stage_channels and stage_reductions must have the same length')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.stem = stem
        self.stages = nn.Sequential(*stages)
        self.feature_info = [dict(num_chs=stem_channels, reduction=1, module='stem')]
        self.feature_info += [
            dict(num_chs=c, reduction=r, module=f'stages.{i}')
            for i, (c, r) in enumerate(zip(stage_channels, stage_reductions))
        ]
        self.min_input_size = max(stage_reductions)
        self.num_features = self.head_hidden_size = stage_channels[-1]
        self.norm = BatchNormAct2d(self.num_features) if final_norm else nn.Identity()
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

    # -- input validation -------------------------------------------------------------------------------
    def _name(self) -> str:
        cfg = getattr(self, 'pretrained_cfg', None) or {}
        return cfg.get('architecture') or type(self).__name__

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the expected shape when ``x`` cannot go through this network."""
        expected = f'(batch, {self.in_chans}, H, W) with H, W >= {self.min_input_size}'
        if not isinstance(x, torch.Tensor):
            raise ValueError(f'{self._name()} expects a tensor of shape {expected}; got {type(x).__name__}')
        if x.ndim != 4:
            raise ValueError(
                f'{self._name()} expects a 4-D input of shape {expected}; got a {x.ndim}-D tensor of shape '
                f'{tuple(x.shape)}')
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f'{self._name()} expects {self.in_chans} input channels, shape {expected}; got {x.shape[1]} '
                f'channels in a tensor of shape {tuple(x.shape)}')
        self._check_input_dtype(x)
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f'{self._name()} expects a spatial size of at least {self.min_input_size}x{self.min_input_size} '
                f'(its stages downsample by {self.min_input_size}), shape {expected}; got {tuple(x.shape)}')

    def _check_input_dtype(self, x: torch.Tensor) -> None:
        """Images as bytes (uint8) or in another precision than the weights would fail deep inside a convolution
        (or, for integers, be silently wrong: they are not normalized)."""
        weight_dtype = next(self.parameters()).dtype
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype in (INPUT_DTYPES if autocast else (weight_dtype,)):
            return
        expected = ('float32, float16 or bfloat16 (under autocast)' if autocast else
                    f'{str(weight_dtype).replace("torch.", "")} (the dtype of its weights; float16 or bfloat16 '
                    f'under autocast)')
        raise TypeError(
            f'{self._name()} expects NORMALIZED floating-point input of dtype {expected}; got {x.dtype} '
            f'(convert images with .float() / 255 and normalize them with the mean and std of '
            f'timm.data.resolve_model_data_config(model))')

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that, when strict, checks every key and shape BEFORE copying
        anything and raises :class:`CheckpointMismatchError` naming what does not fit."""
        if strict:
            own = self.state_dict()
            missing = [k for k in own if k not in state_dict]
            unexpected = [k for k in state_dict if k not in own]
            mismatched = [
                f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
                for k, v in own.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
            ]
            if missing or unexpected or mismatched:
                problems = []
                if missing:
                    problems.append(f'{len(missing)} missing key(s): {_preview(missing)}')
                if unexpected:
                    problems.append(f'{len(unexpected)} unexpected key(s): {_preview(unexpected)}')
                if mismatched:
                    problems.append(f'{len(mismatched)} shape mismatch(es): {_preview(mismatched)}')
                raise CheckpointMismatchError(
                    f'checkpoint does not fit {self._name()} (was it saved from another architecture or '
                    f'configuration?): ' + '; '.join(problems))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- timm API ---------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=[
                (r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block (each stage, where a stage is not a sequence of blocks) in backward, BatchNorm
        statistics updated once per step (:func:`odenet_timm.layers.checkpoint.checkpoint_blocks`)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the stem (index 0) and of each stage (1..); ``norm`` applies the final BN-ReLU to
        the last stage's feature."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        self.check_input(x)
        num_levels = len(self.stages) + 1
        take_indices, max_index = feature_take_indices(num_levels, indices)
        intermediates = []
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        for feat_idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if feat_idx in take_indices:
                is_last = feat_idx == len(self.stages)
                intermediates.append(self.norm(x) if norm and is_last else x)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and head) not needed to produce the feature levels ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        prune_end = max_index < len(self.stages)
        self.stages = self.stages[:max_index]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            # Expand only the stages that are sequences of blocks: a ModuleList stage of units works only as a whole.
            blocks = [b for s in self.stages for b in (s if isinstance(s, nn.Sequential) else (s,))]
            x = checkpoint_blocks(blocks, x)
        else:
            x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
