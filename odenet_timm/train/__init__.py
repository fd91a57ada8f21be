"""Training under Hugging Face Accelerate with timm's machinery (``train.py`` is the command line over this).

``python train.py --config configs/digits_resnet.yaml --output runs/r20`` — or ``accelerate launch train.py ...``
on one or many GPUs, or ``torchrun`` — trains, checkpoints every epoch into ``runs/r20/checkpoints/``, logs
``metrics.jsonl``, and exports ``runs/r20/export/`` for ``timm.create_model('local-dir:runs/r20/export',
pretrained=True)``. See :mod:`.engine` (the loop, determinism), :mod:`.config` (options) and :mod:`.run_dir`
(layout, checkpoints, resume rules).
"""
from .config import ConfigError, build_parser, parse_args
from .engine import Trainer, TrainingProgress, main, train
from .run_dir import CheckpointError, OutputDirError, RunDirectory

__all__ = ['ConfigError', 'CheckpointError', 'OutputDirError', 'RunDirectory', 'Trainer', 'TrainingProgress',
           'build_parser', 'main', 'parse_args', 'train']
