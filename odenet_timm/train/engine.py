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

Failure: a non-finite loss stops the run at that step (:class:`~.run_dir.NonFiniteError`), before anything
computed from it is written, so the last checkpoint stays the last good state; ``--max-bad-steps N`` skips up to
N such optimizer steps in the whole run instead (no weight, optimizer, EMA or schedule update; counted in
metrics.jsonl and summary.json). Weights that are not finite at the end of an epoch are never checkpointed or
exported.

Extending a run: ``--resume`` with a larger ``--epochs`` than the checkpoint's run continues it for the extra
epochs; the timm schedule is re-planned over the new total (as timm's own ``train.py`` does) from the
checkpoint's epoch, and the extension is recorded in train_config.json (``epochs_extended``) and in the
metrics line of the first extra epoch.

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
from ..data import DatasetError, DatasetNotFoundError, check_split, cifar_train_transform, create_dataset, \
    dataset_classes
from .config import EXTENSIONS_KEY, ConfigError, identity_differences, parse_args, run_identity
from .run_dir import CheckpointError, NonFiniteError, OutputDirError, RunDirectory, check_checkpoint, \
    check_finite, checkpoint_epoch, write_json_atomic

__all__ = ['TrainingProgress', 'Trainer', 'train', 'main', 'epoch_seed', 'model_diagnostics']

INPUT_ERRORS = (ConfigError, CheckpointError, OutputDirError, DatasetNotFoundError, DatasetError)
"""Errors caused by what the user asked for; the CLI reports them in one line instead of a traceback."""


class TrainingProgress:
    """Epochs completed, optimizer updates made and non-finite steps skipped: the counter saved in (and restored
    from) every checkpoint."""

    def __init__(self):
        self.epoch = 0
        self.num_updates = 0
        self.skipped_steps = 0

    def state_dict(self) -> Dict[str, int]:
        return {'epoch': self.epoch, 'num_updates': self.num_updates, 'skipped_steps': self.skipped_steps}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch = int(state['epoch'])
        self.num_updates = int(state['num_updates'])
        self.skipped_steps = int(state.get('skipped_steps', 0))  # absent from checkpoints of older versions


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
    if args.workers < 0 or args.keep_checkpoints < 0 or args.max_bad_steps < 0:
        raise ConfigError('--workers, --keep-checkpoints and --max-bad-steps cannot be negative')
    if not 0 <= args.max_unreadable <= 1:
        raise ConfigError(f'--max-unreadable is a fraction of the training images, in [0, 1], got '
                          f'{args.max_unreadable}')
    if args.batch_size % args.grad_accum:
        raise ConfigError(f'--batch-size {args.batch_size} is not a multiple of --grad-accum {args.grad_accum}')
    if args.bn_momentum is not None and not 0 < args.bn_momentum <= 1:
        raise ConfigError(f'--bn-momentum must be in (0, 1], got {args.bn_momentum}')
    if args.img_size is not None and args.img_size < 1:
        raise ConfigError(f'--img-size must be a positive number of pixels, got {args.img_size}')


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
    ``--bn-momentum`` applied to every BatchNorm layer and ``--grad-checkpointing`` turned on. ``--img-size``
    becomes the model's ``pretrained_cfg['input_size']``, so that the transforms and the export (which
    ``eval_robust.py`` reads) use it."""
    overlay = dict(input_size=(3, args.img_size, args.img_size)) if args.img_size is not None else None
    try:
        model = timm.create_model(args.model, num_classes=num_classes, pretrained_cfg_overlay=overlay,
                                  **args.model_kwargs)
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
        self.run_dir.check_writable()
        self.resume_from = self.run_dir.resolve_resume(args.resume, args.overwrite)
        saved_config, verified = (check_checkpoint(self.resume_from, 3 if args.model_ema else 2)
                                  if self.resume_from else (None, True))
        self.accelerator = accelerator = Accelerator(
            mixed_precision=args.amp,
            gradient_accumulation_steps=args.grad_accum,
            dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True,
                                                      data_seed=args.seed),
        )
        if accelerator.mixed_precision == 'fp16' and not accelerator.native_amp:
            raise ConfigError(f'fp16 mixed precision needs a GPU; on {accelerator.device.type} Accelerate would '
                              f'silently train in float32 (use --amp bf16 or --amp no)')
        if not verified and accelerator.is_main_process:
            print(f'train.py: WARNING: {self.resume_from} has no SHA256SUMS manifest (checkpoints of older versions '
                  f'have none), so its files cannot be checked for corruption; resuming it unverified',
                  file=sys.stderr)
        micro_batch = micro_batch_size(args, accelerator.num_processes)
        with accelerator.main_process_first():  # only one process downloads
            train_set = create_dataset(args.dataset, args.data_dir, 'train', args.download)
            eval_set = create_dataset(args.dataset, args.data_dir, 'validation', args.download)
        self.unreadable_train_images = check_split(train_set, 'train', args.max_unreadable)
        check_split(eval_set, 'validation')
        self.class_names = dataset_classes(train_set)
        if dataset_classes(eval_set) != self.class_names:
            raise DatasetError(f'the validation classes of {args.dataset} ({", ".join(dataset_classes(eval_set))}) '
                               f'are not the training classes ({", ".join(self.class_names)}): their labels would '
                               f'not match')
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

    @property
    def run_config(self) -> Dict[str, Any]:
        """What train_config.json records: every option, and the extensions of ``--epochs`` so far."""
        return {**vars(self.args), EXTENSIONS_KEY: self.epochs_extended}

    def _resolve(self, args: argparse.Namespace, saved_config: Optional[Dict[str, Any]]) -> argparse.Namespace:
        """``args`` with the values this run resolved (classes from the dataset, Accelerate's mixed precision),
        so that train_config.json says what actually runs; checked against the checkpoint's when resuming."""
        num_classes = args.num_classes or len(self.class_names)
        if num_classes < len(self.class_names):
            raise ConfigError(f'--num-classes {num_classes} is smaller than the {len(self.class_names)} classes of '
                              f'{args.dataset}')
        args = argparse.Namespace(**{**vars(args), 'num_classes': num_classes,
                                     'amp': self.accelerator.mixed_precision})
        self.epochs_extended, self.extension = [], None
        if saved_config is not None:
            self._continue_run(saved_config, args)
        return args

    def _continue_run(self, saved_config: Dict[str, Any], args: argparse.Namespace) -> None:
        """Refuse to continue a checkpoint of other settings: only a larger ``--epochs`` may differ, which extends
        the run (recorded in :attr:`extension` and appended to the run's :attr:`epochs_extended`)."""
        saved, current = run_identity(saved_config), run_identity(vars(args))
        self.epochs_extended = list(saved_config.get(EXTENSIONS_KEY, []))
        if current['epochs'] > saved.get('epochs', current['epochs']):
            self.extension = {'at_epoch': checkpoint_epoch(self.resume_from), 'from_epochs': saved['epochs'],
                              'to_epochs': current['epochs']}
            saved['epochs'] = current['epochs']
        differences = identity_differences(saved, current)
        if differences:
            hint = ' (--epochs can grow, to extend a run, but not shrink)' if any(
                d.startswith('epochs:') for d in differences) else ''
            raise CheckpointError(f'{self.resume_from} belongs to a run with other settings; continuing it would '
                                  f'mix two recipes: ' + '; '.join(differences) + hint)
        if self.extension:
            self.epochs_extended.append(self.extension)

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
            write_json_atomic(self.run_dir.config_path, self.run_config)
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
        planned = self.scheduler.state_dict()  # the schedule over this run's --epochs
        try:
            self.accelerator.load_state(str(self.resume_from))
        except Exception as e:  # a corrupt file or weights of another shape: nothing has been written yet
            raise CheckpointError(f'cannot resume from {self.resume_from}: {type(e).__name__}: {e}') from e
        if self.progress.epoch != checkpoint_epoch(self.resume_from):
            raise CheckpointError(f'{self.resume_from} records {self.progress.epoch} completed epochs, not '
                                  f'{checkpoint_epoch(self.resume_from)} as its name says')
        self.accelerator.print(f'resumed from {self.resume_from} (epoch {self.progress.epoch})')
        if self.extension:  # the checkpoint's scheduler plans the old total: plan the new one from here
            self.scheduler.load_state_dict(planned)
            self.scheduler.step(self.progress.epoch)
            self.accelerator.print(
                f'extending the run from {self.extension["from_epochs"]} to {self.extension["to_epochs"]} epochs: '
                f'the {self.args.sched} schedule is re-planned over {self.extension["to_epochs"]} epochs from epoch '
                f'{self.progress.epoch} (lr now {_current_lr(self.optimizer):.4g})')

    # -- one epoch ----------------------------------------------------------------------------------------------
    def _check_loss(self, loss: torch.Tensor, epoch: int, micro_step: int, step_is_bad: bool) -> bool:
        """Whether ``loss`` is finite on every process. A non-finite one starts a skipped step, counted against
        ``--max-bad-steps``; beyond it, :class:`NonFiniteError` names the epoch, the step and the loss."""
        losses = self.accelerator.gather(loss.detach().float().reshape(1))
        if bool(torch.isfinite(losses).all()):
            return True
        if not step_is_bad:  # the first non-finite micro-batch of this optimizer step
            self.progress.skipped_steps += 1
        if self.progress.skipped_steps > self.args.max_bad_steps:
            steps = math.ceil(len(self.train_loader) / self.args.grad_accum)
            bad_value = losses[~torch.isfinite(losses)][0].item()
            budget = (f'; {self.progress.skipped_steps} non-finite steps, more than --max-bad-steps '
                      f'{self.args.max_bad_steps}' if self.args.max_bad_steps else '')
            raise NonFiniteError(f'epoch {epoch + 1}, step {micro_step // self.args.grad_accum + 1}/{steps}: the '
                                 f'training loss is {bad_value}{budget}; training stopped ({self._last_good()})')
        return False

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        """One pass over the training set; the mean loss over processes (of the finite steps), the lr of the
        epoch's last update and the number of non-finite steps skipped."""
        accelerator, args = self.accelerator, self.args
        bare = accelerator.unwrap_model(self.model)
        self.model.train()
        loss_meter = AverageMeter()
        skipped_before = self.progress.skipped_steps
        step_is_bad = False  # a micro-batch of the current optimizer step had a non-finite loss
        bar = tqdm(self.train_loader, desc=f'epoch {epoch + 1}/{args.epochs}', leave=False, dynamic_ncols=True,
                   disable=None if accelerator.is_main_process else True)  # None: off when not a terminal
        for micro_step, (inputs, targets) in enumerate(bar):
            if self.mixup is not None:
                inputs, targets = self.mixup(inputs, targets)
            with accelerator.accumulate(self.model):
                loss = self.loss_fn(self.model(inputs), targets)
                if args.smoothness_decay:
                    loss = loss + args.smoothness_decay * bare.smoothness_loss()
                finite = self._check_loss(loss, epoch, micro_step, step_is_bad)
                step_is_bad = step_is_bad or not finite
                if finite:
                    accelerator.backward(loss)
                    if args.clip_grad is not None and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(self.model.parameters(), args.clip_grad)
                if not step_is_bad:
                    self.optimizer.step()  # at the end of an accumulation; a skipped step's gradients are dropped
                self.optimizer.zero_grad()
            if accelerator.sync_gradients:
                if not step_is_bad:
                    self.progress.num_updates += 1
                    if self.ema is not None:
                        self.ema.update(bare, step=self.progress.num_updates)
                    self.scheduler.step_update(num_updates=self.progress.num_updates)
                step_is_bad = False
            if finite:
                loss_meter.update(loss.item(), inputs.size(0))
            bar.set_postfix(loss=f'{loss_meter.avg:.4f}', lr=f'{_current_lr(self.optimizer):.3g}')
        mean_loss = accelerator.reduce(torch.tensor(loss_meter.avg if loss_meter.count else math.nan,
                                                    device=accelerator.device), 'mean').item()
        return {'lr': _current_lr(self.optimizer), 'train_loss': mean_loss if math.isfinite(mean_loss) else None,
                'skipped_steps': self.progress.skipped_steps - skipped_before}

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
            self._check_weights(epoch)
            if self.extension and epoch == self.extension['at_epoch']:
                record['epochs_extended'] = self.extension
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
            train_loss = math.nan if record['train_loss'] is None else record['train_loss']  # None: all skipped
            accelerator.print(f'epoch {record["epoch"]}/{args.epochs}: loss {train_loss:.4f}, '
                              f'eval top-1 {record["eval_top1"]:.2f}%, lr {record["lr"]:.4g}, '
                              f'{record["epoch_time_s"]:.1f}s')
            self.run_dir.save_checkpoint(accelerator, self.progress.epoch, self.run_config,
                                         keep=args.keep_checkpoints)

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

    def _check_weights(self, epoch: int) -> None:
        """Raise :class:`NonFiniteError` when a weight or buffer of the model (or EMA) is not finite after ``epoch``
        (so that it is neither checkpointed nor evaluated)."""
        modules = {'model': self.accelerator.unwrap_model(self.model), 'EMA': self.ema.module if self.ema else None}
        for name, module in modules.items():
            if module is not None:
                check_finite(module.state_dict(),
                             f'epoch {epoch + 1}: training stopped ({self._last_good()}); the {name}')

    def _last_good(self) -> str:
        """What a run stopped by a non-finite number leaves: its last checkpoint, untouched."""
        latest = self.run_dir.latest_checkpoint()
        return f'{latest} is the last good checkpoint, unchanged' if latest else 'no checkpoint was written'

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
            EXTENSIONS_KEY: self.epochs_extended,
            'skipped_steps': self.progress.skipped_steps,
            'unreadable_train_images': len(self.unreadable_train_images),
            'unreadable_train_image_files': self.unreadable_train_images,
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
    """``train.py``: parse the command line, train, and report bad input (exit status 2) or a non-finite loss or
    weight (exit status 1) in one line."""
    try:
        train(parse_args(argv))
    except INPUT_ERRORS as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return 1
    return 0
