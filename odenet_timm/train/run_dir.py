"""The run directory: its layout, its checkpoints, and the rules that keep earlier work from being lost.

```
DIR/train_config.json              every option of the run (what --resume compares against)
DIR/metrics.jsonl                  one JSON object per epoch
DIR/summary.json                   final numbers, written when the run ends
DIR/checkpoints/checkpoint_N/      Accelerate ``save_state`` after N epochs: model.safetensors (the bare model's
                                   keys, whatever the number of processes), optimizer.bin, custom_checkpoint_K.pkl
                                   (K = 0 progress counter, 1 timm scheduler, 2 EMA), random_states_R.pkl,
                                   train_config.json, and SHA256SUMS (the sha256 of every other file)
DIR/export/, DIR/export_ema/       ``timm.models.save_for_hf(..., safe_serialization=True)``
```

Files are written through a temporary file and ``os.replace``; checkpoint and export directories are written
under a temporary name and renamed into place, so a run killed at any moment leaves only complete checkpoints.
Every file gets the permissions the umask gives (safetensors writes its files 0600; they are widened to match).

Integrity: safetensors and pickles carry no checksum, so bytes garbled on disk would load as wrong numbers.
Each checkpoint holds ``SHA256SUMS`` (the ``sha256sum`` format: ``cd checkpoint_N && sha256sum -c SHA256SUMS``
checks it by hand), written into the checkpoint before it is renamed into place; :func:`check_checkpoint`
verifies it before anything is read, and refuses a changed, missing or unlisted file. A checkpoint written
before manifests existed has none: it is resumed after a warning (:func:`verify_manifest` returns False).

Unpickling: ``Accelerator.load_state`` reads optimizer.bin and random_states_R.pkl with ``torch.load(...,
weights_only=True)``, but the objects registered with ``register_for_checkpointing`` (custom_checkpoint_K.pkl)
with ``weights_only=False`` — a tampered file would run arbitrary code. :func:`check_checkpoint` therefore loads
each of those files with ``weights_only=True`` first and refuses the checkpoint unless they hold only tensors
and plain containers; only then is ``load_state`` called. Accelerate skips RNG states it cannot read without a
word; :func:`check_checkpoint` refuses a ``random_states_R.pkl`` that is not a readable RNG state instead.
"""
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from accelerate.utils import load as accelerate_load

from .config import LATEST

__all__ = ['CheckpointError', 'NonFiniteError', 'OutputDirError', 'RunDirectory', 'check_checkpoint',
           'checkpoint_epoch', 'non_finite_tensors', 'verify_manifest', 'write_json_atomic', 'write_manifest',
           'CONFIG_NAME', 'MANIFEST_NAME']

CONFIG_NAME = 'train_config.json'
MANIFEST_NAME = 'SHA256SUMS'
_RNG_STATE_FILE = re.compile(r'^random_states_\d+\.pkl$')
_RNG_STATE_KEYS = ('random_state', 'numpy_random_seed', 'torch_manual_seed')
_CHECKPOINT_NAME = re.compile(r'^checkpoint_(\d+)$')
_RUN_FILES = (CONFIG_NAME, 'metrics.jsonl', 'summary.json')
_RUN_DIRS = ('checkpoints', 'export', 'export_ema')


class OutputDirError(FileExistsError):
    """``--output`` holds a run that this command would overwrite."""


class CheckpointError(ValueError):
    """A ``--resume`` checkpoint that is missing, incomplete, corrupt, unsafe, or from a different run."""


class NonFiniteError(ArithmeticError):
    """A non-finite training loss or weight: the run stops before it writes anything computed from it."""


def umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(directory: Path) -> None:
    """Give every file below ``directory`` the mode a plain ``open(..., 'w')`` would (``0o666 & ~umask``):
    safetensors writes through a private temporary file, mode 0600, which other users of a cluster cannot read."""
    mode = 0o666 & ~umask()
    for path in directory.rglob('*'):
        if path.is_file():
            path.chmod(mode)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2) + '\n')


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing an existing ``final`` (the old one is renamed
    away first and deleted last, so ``final`` is never a half-written directory)."""
    old = final.with_name(f'.{final.name}.old')
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_epoch(path: Path) -> int:
    """N of a ``checkpoint_N`` directory (the number of epochs it has completed)."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    if not match:
        raise CheckpointError(f'{path} is not a checkpoint directory (expected .../checkpoints/checkpoint_N)')
    return int(match.group(1))


class RunDirectory:
    """Paths and bookkeeping of one ``--output`` directory (writes are the caller's main process's job)."""

    def __init__(self, root: str):
        self.root = Path(root)
        self.config_path = self.root / CONFIG_NAME
        self.metrics_path = self.root / 'metrics.jsonl'
        self.summary_path = self.root / 'summary.json'
        self.checkpoints_dir = self.root / 'checkpoints'
        self.export_dir = self.root / 'export'
        self.export_ema_dir = self.root / 'export_ema'

    def holds_run(self) -> bool:
        """Whether a training run has already written anything here."""
        return any((self.root / name).exists() for name in _RUN_FILES + _RUN_DIRS)

    def checkpoints(self) -> List[Tuple[int, Path]]:
        """``(epoch, path)`` of every complete checkpoint, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints_dir.iterdir()
                 if p.is_dir() and (m := _CHECKPOINT_NAME.match(p.name))]
        return sorted(found)

    def latest_checkpoint(self) -> Optional[Path]:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def resolve_resume(self, resume: Optional[str], overwrite: bool) -> Optional[Path]:
        """The checkpoint to continue from, after checking that starting here loses nothing.

        Without ``resume`` the directory must hold no run, or ``overwrite`` must be set. ``resume`` is
        :data:`~odenet_timm.train.config.LATEST` (the latest checkpoint here), a ``checkpoint_N`` directory or a
        run directory (its latest checkpoint). Continuing from a checkpoint of this directory requires it to be the
        latest one (the next epochs would overwrite the later ones); a checkpoint from elsewhere requires this
        directory to hold no run, or ``overwrite``.
        """
        if resume is None:
            if self.holds_run() and not overwrite:
                raise OutputDirError(
                    f'{self.root} already holds a training run ({self._contents()}); pass --resume to continue it, '
                    f'--overwrite to discard it, or choose another --output')
            return None
        if resume == LATEST:
            checkpoint = self.latest_checkpoint()
            if checkpoint is None:
                raise CheckpointError(f'--resume: {self.root} has no checkpoint to continue from '
                                      f'(nothing in {self.checkpoints_dir}); start it again with --overwrite')
        else:
            path = Path(resume)
            if not path.is_dir():
                raise CheckpointError(f'--resume {resume}: no such directory')
            checkpoint = RunDirectory(path).latest_checkpoint() if (path / 'checkpoints').is_dir() else path
            if checkpoint is None:
                raise CheckpointError(f'--resume {resume}: the run directory has no checkpoint')
        epoch = checkpoint_epoch(checkpoint)
        if checkpoint.resolve().parent == self.checkpoints_dir.resolve():
            if overwrite:
                raise OutputDirError(f'--overwrite would delete {checkpoint}, the checkpoint --resume continues from')
            later = [e for e, _ in self.checkpoints() if e > epoch]
            if later:
                raise OutputDirError(
                    f'{self.root} holds checkpoints after epoch {epoch} ({", ".join(map(str, later))}) that '
                    f'continuing from {checkpoint.name} would overwrite; resume from the latest, delete them '
                    f'yourself, or continue into another --output')
        elif self.holds_run() and not overwrite:
            raise OutputDirError(
                f'{self.root} already holds a training run ({self._contents()}); to continue {checkpoint} there, '
                f'pass --overwrite to discard that run, or choose another --output')
        return checkpoint

    def _contents(self) -> str:
        return ', '.join(name for name in _RUN_FILES + _RUN_DIRS if (self.root / name).exists())

    def clear(self) -> None:
        """Delete what a previous run wrote here (only the run's own files; anything else stays)."""
        for name in _RUN_FILES:
            (self.root / name).unlink(missing_ok=True)
        for name in _RUN_DIRS:
            shutil.rmtree(self.root / name, ignore_errors=True)

    def read_metrics(self, up_to_epoch: int) -> List[Dict[str, Any]]:
        """The metrics of epochs 1..``up_to_epoch`` already recorded here (those of a resumed run)."""
        if not self.metrics_path.exists():
            return []
        records = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        return [r for r in records if r.get('epoch', 0) <= up_to_epoch]

    def write_metrics(self, records: List[Dict[str, Any]]) -> None:
        write_text_atomic(self.metrics_path, ''.join(json.dumps(r) + '\n' for r in records))

    def save_checkpoint(self, accelerator, epoch: int, config: Dict[str, Any], keep: int = 0) -> Path:
        """``accelerator.save_state`` into ``checkpoints/checkpoint_{epoch}`` (atomically), on every process.

        ``keep`` > 0 deletes all but the ``keep`` latest checkpoints afterwards.
        """
        final = self.checkpoints_dir / f'checkpoint_{epoch}'
        tmp = self.checkpoints_dir / f'.checkpoint_{epoch}.tmp'
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # every process writes its own random_states_R.pkl
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(tmp / CONFIG_NAME, config)
            apply_umask(tmp)
            write_manifest(tmp)
            replace_dir(tmp, final)
            if keep > 0:
                for _, old in self.checkpoints()[:-keep]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def export(self, directory: Path, model: torch.nn.Module, model_args: Dict[str, Any],
               label_names: List[str]) -> None:
        """``timm.models.save_for_hf(model, directory, safe_serialization=True)`` atomically, with the model
        kwargs (so that ``timm.create_model('local-dir:DIR', pretrained=True)`` rebuilds the same architecture)
        and the class names. Raises :class:`NonFiniteError` naming the tensors, writing nothing, when a weight
        or buffer is NaN or infinite."""
        from timm.models import save_for_hf
        check_finite(model.state_dict(), f'{directory.name} refused')
        tmp = directory.with_name(f'.{directory.name}.tmp')
        shutil.rmtree(tmp, ignore_errors=True)
        save_for_hf(model, str(tmp), model_config={'label_names': list(label_names)}, model_args=dict(model_args),
                    safe_serialization=True)
        apply_umask(tmp)
        replace_dir(tmp, directory)

    def check_writable(self) -> None:
        """Raise :class:`OutputDirError` unless the run directory is, or can be created as, a writable directory
        (probed with a temporary file that is deleted at once; nothing stays behind)."""
        existing = next(p for p in (self.root, *self.root.parents) if p.exists())
        if not existing.is_dir():
            what = 'is a file' if existing == self.root else f'lies below {existing}, which is a file'
            raise OutputDirError(f'--output {self.root} {what}, not a directory')
        try:
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as e:
            raise OutputDirError(f'--output {self.root}: cannot write in {existing} ({e.strerror})') from e


def non_finite_tensors(tensors: Dict[str, torch.Tensor]) -> List[str]:
    """The names of the floating-point tensors of ``tensors`` that hold a NaN or an infinity."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(tensors: Dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteError` (``what``: the tensors named ...) when a tensor of ``tensors`` is not finite."""
    bad = non_finite_tensors(tensors)
    if bad:
        shown = ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
        raise NonFiniteError(f'{what}: {len(bad)} of {len(tensors)} tensors hold NaN or infinite values ({shown})')


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(checkpoint: Path) -> List[str]:
    """The files of ``checkpoint`` (relative POSIX paths, sorted), its manifest excepted."""
    return sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob('*')
                  if p.is_file() and p.name != MANIFEST_NAME)


def write_manifest(checkpoint: Path) -> None:
    """Write ``checkpoint/SHA256SUMS``: the sha256 of every other file of ``checkpoint`` (``sha256sum`` format)."""
    write_text_atomic(checkpoint / MANIFEST_NAME,
                      ''.join(f'{_sha256(checkpoint / name)}  {name}\n' for name in _checkpoint_files(checkpoint)))


def verify_manifest(checkpoint: Path) -> bool:
    """Check every file of ``checkpoint`` against its ``SHA256SUMS``; False when it has none (a checkpoint
    written before manifests existed). Raises :class:`CheckpointError` naming the first file that changed, is
    missing, or is not listed."""
    manifest = checkpoint / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        lines = [line.split('  ', 1) for line in manifest.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{manifest} is unreadable: {e}') from e
    if any(len(fields) != 2 for fields in lines):
        raise CheckpointError(f'{manifest} is corrupt (expected lines of "SHA256  FILE")')
    listed = {name: digest for digest, name in lines}
    for name, digest in sorted(listed.items()):
        if not (checkpoint / name).is_file():
            raise CheckpointError(f'{checkpoint / name} is missing (listed in {MANIFEST_NAME}); the checkpoint '
                                  f'is incomplete')
        if _sha256(checkpoint / name) != digest:
            raise CheckpointError(f'{checkpoint / name} has changed since the checkpoint was written (its sha256 '
                                  f'differs from {MANIFEST_NAME}): the file is corrupt or was edited')
    unlisted = [name for name in _checkpoint_files(checkpoint) if name not in listed]
    if unlisted:
        raise CheckpointError(f'{checkpoint / unlisted[0]} is not part of the checkpoint (not in {MANIFEST_NAME})')
    return True


def _check_rng_states(checkpoint: Path) -> None:
    """Refuse a ``random_states_R.pkl`` that Accelerate would skip without a word (unreadable, or not an RNG
    state). A missing one is fine: a checkpoint of fewer processes has none for the others, and the training
    re-seeds every epoch."""
    for path in sorted(p for p in checkpoint.iterdir() if _RNG_STATE_FILE.match(p.name)):
        try:
            states = accelerate_load(path, map_location='cpu')  # as load_state reads it (weights_only)
        except Exception as e:  # garbled or unsafe
            first_line = (str(e).splitlines() or [''])[0]
            raise CheckpointError(f'{path} is not a readable RNG state ({type(e).__name__}: {first_line})') from e
        if not isinstance(states, dict) or not all(k in states for k in _RNG_STATE_KEYS):
            raise CheckpointError(f'{path} is not an RNG state (expected the keys {", ".join(_RNG_STATE_KEYS)})')


def check_checkpoint(checkpoint: Path, num_registered: int) -> Tuple[Dict[str, Any], bool]:
    """Check that ``checkpoint`` is a complete, unchanged checkpoint of this trainer that is safe to unpickle,
    and return the options of the run that wrote it and whether its manifest verified it (False: it has none).
    Reads nothing into any model.

    ``num_registered``: the number of objects registered with ``register_for_checkpointing``
    (``custom_checkpoint_0..num_registered-1.pkl``).
    """
    checkpoint_epoch(checkpoint)
    verified = verify_manifest(checkpoint)
    config_path = checkpoint / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f'{checkpoint} was not written by odenet_timm\'s train.py (it has no {CONFIG_NAME})')
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f'{config_path} is unreadable or corrupt: {e}') from e
    pickles = [f'custom_checkpoint_{i}.pkl' for i in range(num_registered)]
    missing = [name for name in ['model.safetensors', 'optimizer.bin', *pickles] if not (checkpoint / name).is_file()]
    if missing:
        raise CheckpointError(f'{checkpoint} is incomplete: {", ".join(missing)} missing')
    for name in pickles:
        try:
            torch.load(checkpoint / name, map_location='cpu', weights_only=True)
        except Exception as e:  # any failure: an unsafe object, a truncated or garbled file
            raise CheckpointError(
                f'{checkpoint / name} cannot be read as plain tensors and containers, so it is not unpickled '
                f'(Accelerate would load it with weights_only=False): {type(e).__name__}: {e}') from e
    _check_rng_states(checkpoint)
    return config, verified
