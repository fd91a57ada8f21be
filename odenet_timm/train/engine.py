"""The training loop: timm's model, data, optimizer, scheduler, loss, Mixup and EMA machinery under Accelerate.

Accelerate provides device placement, DDP (``accelerate launch`` / ``torchrun``), mixed precision, gradient
accumulation and the checkpoint state (``save_state`` / ``load_state``, with the timm scheduler, the EMA and the
:class:`TrainingProgress` counter registered through ``register_for_checkpointing``).

Determinism that survives ``--resume``: the shuffling comes from Accelerate's ``SeedableRandomSampler``
(``use_seedable_sampler=True``, ``data_seed=--seed``; ``set_epoch(e)`` seeds it with ``seed + e``, the same on every
process), and at the start of every epoch the global ``random`` / NumPy / torch generators — which drive the
augmentation, the data-loader worker seeds, Mixup and dropout — are re-seeded from ``(seed, epoch, process)``.
An epoch therefore depends only on what a checkpoint holds (weights, optimizer, scheduler, EMA, counters) and on
its number — not on the RNG states, which Accelerate restores only best-effort: N epochs in one go and N−1
epochs plus a resumed one give the same weights bit for bit (same hardware, thread count and number of
processes; a checkpoint also continues on another number of processes, then not bit for bit).

Batch size: ``--batch-size`` is the number of samples per optimizer step over all processes (the papers' batch
size), so a recipe means the same on one CPU and on eight GPUs. The data loader yields ``batch_size / grad_accum``
samples per micro-batch, which Accelerate splits between the processes (``split_batches=True``).
"""
import argparse
import difflib
import math
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import extract_model_from_parallel, set_seed
from safetensors.torch import load_file
from timm.data import Mixup, create_transform, resolve_model_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import AverageMeter, ModelEmaV3, accuracy
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import list_models
from ..data import DatasetNotFoundError, cifar_train_transform, create_dataset, dataset_classes
from .config import ConfigError, identity_differences, parse_args, run_identity
from .run_dir import CheckpointError, OutputDirError, RunDirectory, check_checkpoint, checkpoint_epoch, \
    write_json_atomic

__all__ = ['TrainingProgress', 'Trainer', 'train', 'main', 'epoch_seed', 'model_diagnostics']

INPUT_ERRORS = (ConfigError, CheckpointError, OutputDirError, DatasetNotFoundError)
"""Errors caused by what the user asked for; the CLI reports them in one line instead of a traceback."""


class TrainingProgress:
    """Epochs completed and optimizer updates made: the counter saved in (and restored from) every checkpoint."""

    def __init__(self):
        self.epoch = 0
        self.num_updates = 0

    def state_dict(self) -> Dict[str, int]:
        return {'epoch': self.epoch, 'num_updates': self.num_updates}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch = int(state['epoch'])
        self.num_updates = int(state['num_updates'])


def epoch_seed(seed: int, epoch: int, process_index: int) -> int:
    """The seed of the global generators for ``epoch`` on process ``process_index`` (independent streams)."""
    return int(np.random.SeedSequence([seed, epoch, process_index]).generate_state(1)[0])


def _unknown_name(kind: str, name: str, *pools: Sequence[str], hint: str = '') -> ConfigError:
    """The error for an unknown ``name``, listing the close names of the first pools first."""
    close = []
    for pool in pools:
        close += [c for c in difflib.get_close_matches(name, pool, n=5, cutoff=0.6) if c not in close]
    suggestion = f'; close matches: {", ".join(close[:5])}' if close else ''
    return ConfigError(f'unknown {kind} {name!r}{suggestion}{hint}')


def check_args(args: argparse.Namespace) -> None:
    """Raise :class:`ConfigError` for options no run can use (before anything is built or written)."""
    if not timm.is_model(args.model):
        raise _unknown_name('model', args.model, list_models(), timm.list_models(),
                            hint="; odenet_timm's models: python -c 'import odenet_timm; print(odenet_timm.list_models())'")
    if args.opt not in list_optimizers():
        raise _unknown_name('optimizer', args.opt, list_optimizers())
    for name in ('epochs', 'batch_size', 'grad_accum'):
        if getattr(args, name) < 1:
            raise ConfigError(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    if args.workers < 0 or args.keep_checkpoints < 0:
        raise ConfigError('--workers and --keep-checkpoints cannot be negative')
    if args.batch_size % args.grad_accum:
        raise ConfigError(f'--batch-size {args.batch_size} is not a multiple of --grad-accum {args.grad_accum}')
    if args.bn_momentum is not None and not 0 < args.bn_momentum <= 1:
        raise ConfigError(f'--bn-momentum must be in (0, 1], got {args.bn_momentum}')


def micro_batch_size(args: argparse.Namespace, num_processes: int) -> int:
    """Samples per data-loader batch over all processes (``batch_size / grad_accum``), checked to split evenly."""
    micro = args.batch_size // args.grad_accum
    if micro % num_processes:
        raise ConfigError(
            f'--batch-size {args.batch_size} / --grad-accum {args.grad_accum} = {micro} samples per micro-batch '
            f'cannot be split evenly between {num_processes} processes')
    if (args.mixup > 0 or args.cutmix > 0) and (micro // num_processes) % 2:
        raise ConfigError(f'Mixup/CutMix pair the samples of a batch: {micro // num_processes} per process is odd')
    return micro


def create_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """``timm.create_model(args.model, num_classes=..., **args.model_kwargs)``, with kwargs errors explained,
    ``--bn-momentum`` applied to every BatchNorm layer and ``--grad-checkpointing`` turned on."""
    try:
        model = timm.create_model(args.model, num_classes=num_classes, **args.model_kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f'{args.model} cannot be built with --model-kwargs {args.model_kwargs}: {e}') from e
    if args.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (AttributeError, NotImplementedError) as e:
            raise ConfigError(f'--grad-checkpointing: {e}') from e
    if args.bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = args.bn_momentum
    return model


def _to_json(value: Any) -> Any:
    """``value`` with tensors and NumPy values turned into lists and numbers, and anything else unknown into str."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@torch.no_grad()
def model_diagnostics(model: nn.Module, batch: torch.Tensor) -> Dict[str, Any]:
    """What a model family reports about itself, duck-typed: In-ResNet λ (``interpolation_coefficients(x)``;
    gated variants compute λ from the normalized batch ``x``), implicit-solver statistics (``solver_stats()``),
    Hamiltonian weight smoothness (``smoothness_loss()``)."""
    found = {}
    if hasattr(model, 'interpolation_coefficients'):
        coefficients = model.interpolation_coefficients(batch)
        if coefficients.numel():
            found['interpolation_coefficients'] = coefficients.tolist()
    if hasattr(model, 'solver_stats'):
        found['solver_stats'] = _to_json(model.solver_stats())
    if hasattr(model, 'smoothness_loss'):
        found['smoothness_loss'] = float(model.smoothness_loss())
    return found


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    lrs = [group['lr'] for group in optimizer.param_groups]
    return sum(lrs) / len(lrs)


class Trainer:
    """One training run: built and checked in ``__init__`` (nothing is written until everything has been
    validated and any checkpoint loaded), then :meth:`fit`."""

    def __init__(self, args: argparse.Namespace):
        check_args(args)
        self.run_dir = RunDirectory(args.output)
        self.resume_from = self.run_dir.resolve_resume(args.resume, args.overwrite)
        saved_config = check_checkpoint(self.resume_from, 3 if args.model_ema else 2) if self.resume_from else None
        self.accelerator = accelerator = Accelerator(
            mixed_precision=args.amp,
            gradient_accumulation_steps=args.grad_accum,
            dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True,
                                                      data_seed=args.seed),
        )
        if accelerator.mixed_precision == 'fp16' and not accelerator.native_amp:
            raise ConfigError(f'fp16 mixed precision needs a GPU; on {accelerator.device.type} Accelerate would '
                              f'silently train in float32 (use --amp bf16 or --amp no)')
        micro_batch = micro_batch_size(args, accelerator.num_processes)
        with accelerator.main_process_first():  # only one process downloads
            train_set = create_dataset(args.dataset, args.data_dir, 'train', args.download)
            eval_set = create_dataset(args.dataset, args.data_dir, 'validation', args.download)
        self.class_names = dataset_classes(train_set)
        self.args = args = self._resolve(args, saved_config)

        set_seed(args.seed)  # the same initial weights on every process
        model = create_model(args, args.num_classes)
        if args.smoothness_decay and not hasattr(model, 'smoothness_loss'):
            raise ConfigError(f'--smoothness-decay needs a model with smoothness_loss() (the Hamiltonian family); '
                              f'{args.model} has none')
        train_loader, eval_loader = self._loaders(model, train_set, eval_set, micro_batch)
        model.to(accelerator.device)
        self.ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
        optimizer = create_optimizer_v2(
            model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
            filter_bias_and_bn=args.wd_filter == 'bias_and_bn')
        self.model, self.optimizer, self.train_loader, self.eval_loader = accelerator.prepare(
            model, optimizer, train_loader, eval_loader)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=args.sched, num_epochs=args.epochs, decay_milestones=args.decay_milestones,
            decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr, updates_per_epoch=math.ceil(len(self.train_loader) / args.grad_accum))
        if args.mixup > 0 or args.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                               num_classes=args.num_classes)
            self.loss_fn = SoftTargetCrossEntropy()  # Mixup already smooths the targets
        else:
            self.mixup = None
            self.loss_fn = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else nn.CrossEntropyLoss()

        self.progress = TrainingProgress()
        accelerator.register_for_checkpointing(self.progress, self.scheduler, *([self.ema] if self.ema else []))
        accelerator.register_save_state_pre_hook(self._save_bare_weights)
        accelerator.register_load_state_pre_hook(self._load_bare_weights)
        if self.resume_from is not None:
            self._resume()
        self._start_run_dir()

    def _resolve(self, args: argparse.Namespace, saved_config: Optional[Dict[str, Any]]) -> argparse.Namespace:
        """``args`` with the values this run resolved (classes from the dataset, Accelerate's mixed precision),
        so that train_config.json says what actually runs; checked against the checkpoint's when resuming."""
        num_classes = args.num_classes or len(self.class_names)
        if num_classes < len(self.class_names):
            raise ConfigError(f'--num-classes {num_classes} is smaller than the {len(self.class_names)} classes of '
                              f'{args.dataset}')
        args = argparse.Namespace(**{**vars(args), 'num_classes': num_classes,
                                     'amp': self.accelerator.mixed_precision})
        if saved_config is not None:
            differences = identity_differences(run_identity(saved_config), run_identity(vars(args)))
            if differences:
                raise CheckpointError(f'{self.resume_from} belongs to a run with other settings; continuing it would '
                                      f'mix two recipes: ' + '; '.join(differences))
        return args

    def _loaders(self, model: nn.Module, train_set, eval_set, micro_batch: int):
        """The train / validation loaders, with the transforms of ``model``'s data config (set on the datasets,
        as timm's ``create_loader`` does: the transforms depend on the model, the model on the classes)."""
        args = self.args
        data_config = resolve_model_data_config(model)
        train_set.transform = cifar_train_transform(data_config['mean'], data_config['std'],
                                                    size=data_config['input_size'][-1], hflip=args.hflip)
        eval_set.transform = create_transform(**data_config, is_training=False)
        per_process = micro_batch // self.accelerator.num_processes
        self.diagnostic_batch = torch.stack([eval_set[i][0] for i in range(min(per_process, len(eval_set)))])
        pin_memory = self.accelerator.device.type == 'cuda'
        train_loader = DataLoader(train_set, batch_size=micro_batch, shuffle=True, drop_last=True,
                                  num_workers=args.workers, pin_memory=pin_memory)
        if len(train_loader) == 0:
            raise ConfigError(f'--batch-size {args.batch_size} is larger than the {len(train_set)} training images')
        eval_loader = DataLoader(eval_set, batch_size=micro_batch, num_workers=args.workers, pin_memory=pin_memory)
        return train_loader, eval_loader

    def _start_run_dir(self) -> None:
        """Now that everything is validated and loaded: discard a run being overwritten, record the options."""
        # the metrics of the epochs the checkpoint has completed (those of a discarded run do not count)
        self.records = [] if self.args.overwrite else self.run_dir.read_metrics(self.progress.epoch)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.run_dir.root.mkdir(parents=True, exist_ok=True)
            if self.args.overwrite:
                self.run_dir.clear()
            write_json_atomic(self.run_dir.config_path, vars(self.args))
        self.accelerator.wait_for_everyone()

    # -- checkpoints --------------------------------------------------------------------------------------------
    @staticmethod
    def _save_bare_weights(models: List[nn.Module], weights: List[Dict[str, torch.Tensor]], output_dir: str):
        """``save_state`` hook: store the bare model's keys (no DDP ``module.`` prefix), so that a checkpoint
        resumes on any number of processes and holds the same keys as the export."""
        weights[0] = extract_model_from_parallel(models[0]).state_dict()  # the one model this trainer prepares

    @staticmethod
    def _load_bare_weights(models: List[nn.Module], input_dir: str):
        """``load_state`` hook: the counterpart of :meth:`_save_bare_weights` (strict: every key, every shape)."""
        bare = extract_model_from_parallel(models[0])
        bare.load_state_dict(load_file(f'{input_dir}/model.safetensors', device=str(next(bare.parameters()).device)))
        models.clear()  # loaded here; Accelerate must not load it again

    def _resume(self) -> None:
        try:
            self.accelerator.load_state(str(self.resume_from))
        except Exception as e:  # a corrupt file or weights of another shape: nothing has been written yet
            raise CheckpointError(f'cannot resume from {self.resume_from}: {type(e).__name__}: {e}') from e
        if self.progress.epoch != checkpoint_epoch(self.resume_from):
            raise CheckpointError(f'{self.resume_from} records {self.progress.epoch} completed epochs, not '
                                  f'{checkpoint_epoch(self.resume_from)} as its name says')
        self.accelerator.print(f'resumed from {self.resume_from} (epoch {self.progress.epoch})')

    # -- one epoch ----------------------------------------------------------------------------------------------
    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        """One pass over the training set; the mean loss over processes and the lr of the epoch's last update."""
        accelerator, args = self.accelerator, self.args
        bare = accelerator.unwrap_model(self.model)
        self.model.train()
        loss_meter = AverageMeter()
        bar = tqdm(self.train_loader, desc=f'epoch {epoch + 1}/{args.epochs}', leave=False, dynamic_ncols=True,
                   disable=None if accelerator.is_main_process else True)  # None: off when not a terminal
        for inputs, targets in bar:
            if self.mixup is not None:
                inputs, targets = self.mixup(inputs, targets)
            with accelerator.accumulate(self.model):
                loss = self.loss_fn(self.model(inputs), targets)
                if args.smoothness_decay:
                    loss = loss + args.smoothness_decay * bare.smoothness_loss()
                accelerator.backward(loss)
                if args.clip_grad is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.model.parameters(), args.clip_grad)
                self.optimizer.step()
                self.optimizer.zero_grad()
            if accelerator.sync_gradients:
                self.progress.num_updates += 1
                if self.ema is not None:
                    self.ema.update(bare, step=self.progress.num_updates)
                self.scheduler.step_update(num_updates=self.progress.num_updates)
            loss_meter.update(loss.item(), inputs.size(0))
            bar.set_postfix(loss=f'{loss_meter.avg:.4f}', lr=f'{_current_lr(self.optimizer):.3g}')
        mean_loss = accelerator.reduce(torch.tensor(loss_meter.avg, device=accelerator.device), 'mean')
        return {'lr': _current_lr(self.optimizer), 'train_loss': mean_loss.item()}

    @torch.no_grad()
    def evaluate(self, module: nn.Module) -> Dict[str, float]:
        """Loss and top-1 accuracy (%) of ``module`` on the whole validation split (gathered over processes)."""
        module.eval()
        loss_meter, top1_meter = AverageMeter(), AverageMeter()
        for inputs, targets in self.eval_loader:
            with self.accelerator.autocast():
                logits = module(inputs)
            logits, targets = self.accelerator.gather_for_metrics((logits.float(), targets))
            loss_meter.update(F.cross_entropy(logits, targets).item(), targets.size(0))
            top1_meter.update(accuracy(logits, targets, topk=(1,))[0].item(), targets.size(0))
        return {'loss': loss_meter.avg, 'top1': top1_meter.avg}

    # -- the run ------------------------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Train from the current epoch to ``--epochs`` (a checkpoint and a metrics line per epoch), export the
        model (and EMA) with ``save_for_hf`` and write ``summary.json``; returns the summary."""
        accelerator, args = self.accelerator, self.args
        started = time.time()
        bare = accelerator.unwrap_model(self.model)
        for epoch in range(self.progress.epoch, args.epochs):
            epoch_started = time.time()
            set_seed(epoch_seed(args.seed, epoch, accelerator.process_index))
            self.train_loader.set_epoch(epoch)
            record = {'epoch': epoch + 1, **self.train_one_epoch(epoch)}
            record.update({f'eval_{k}': v for k, v in self.evaluate(self.model).items()})
            if self.ema is not None:
                record.update({f'eval_{k}_ema': v for k, v in self.evaluate(self.ema.module).items()})
            record.update(model_diagnostics(bare, self.diagnostic_batch.to(accelerator.device)))
            self.progress.epoch = epoch + 1
            self.scheduler.step(self.progress.epoch)  # the lr of the next epoch
            record['epoch_time_s'] = time.time() - epoch_started
            self.records.append(record)
            if accelerator.is_main_process:
                self.run_dir.write_metrics(self.records)
            accelerator.print(f'epoch {record["epoch"]}/{args.epochs}: loss {record["train_loss"]:.4f}, '
                              f'eval top-1 {record["eval_top1"]:.2f}%, lr {record["lr"]:.4g}, '
                              f'{record["epoch_time_s"]:.1f}s')
            self.run_dir.save_checkpoint(accelerator, self.progress.epoch, vars(args), keep=args.keep_checkpoints)

        summary = self._summary(time.time() - started)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
            self.run_dir.export(self.run_dir.export_dir, model, args.model_kwargs, self.class_names)
            if self.ema is not None:
                self.run_dir.export(self.run_dir.export_ema_dir, self.ema.module, args.model_kwargs, self.class_names)
            write_json_atomic(self.run_dir.summary_path, summary)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary

    def _summary(self, seconds: float) -> Dict[str, Any]:
        args, records = self.args, self.records
        best = max(records, key=lambda r: r['eval_top1']) if records else {}
        return {
            'model': args.model,
            'model_kwargs': args.model_kwargs,
            'num_classes': args.num_classes,
            'class_names': self.class_names,
            'dataset': args.dataset,
            'epochs': args.epochs,
            'num_params': sum(p.numel() for p in self.accelerator.unwrap_model(self.model).parameters()),
            'final': records[-1] if records else {},
            'best_eval_top1': best.get('eval_top1'),
            'best_epoch': best.get('epoch'),
            'export': self.run_dir.export_dir.name,
            'export_ema': self.run_dir.export_ema_dir.name if self.ema is not None else None,
            'resumed_from': str(self.resume_from) if self.resume_from else None,
            'num_processes': self.accelerator.num_processes,
            'mixed_precision': self.accelerator.mixed_precision,
            'wall_time_s': seconds,
            'versions': {'timm': timm.__version__, 'torch': torch.__version__},
        }


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run (or continue) the training described by ``args`` (see :func:`~odenet_timm.train.config.parse_args`);
    returns the summary also written to ``--output``/summary.json."""
    return Trainer(args).fit()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``train.py``: parse the command line, train, and report bad input in one line (exit status 2)."""
    try:
        train(parse_args(argv))
    except INPUT_ERRORS as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return 2
    return 0
