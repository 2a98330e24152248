"""Checkpoint saving that never loses a run silently.

Lightning's default ``TorchCheckpointIO`` writes a local checkpoint through ``fsspec`` straight
onto its final name and ignores a ``PermissionError`` (pytorch-lightning 2.6): a read-only or
immutable checkpoint folder lets a whole fit run without one checkpoint, and a full disk leaves
a truncated file under the final name, replacing the previous good one. Here:

- :class:`SafeCheckpointIO` writes each local checkpoint to a temporary file in the *same*
  directory, flushes and fsyncs it, then renames it over the final name (atomic on POSIX), and
  fsyncs the directory. Any failure raises :class:`CheckpointSaveError` naming the file, at the
  step where it happens, and leaves the previous checkpoint of that name untouched.
- :class:`CheckpointDirectoryCheck` checks, when fit starts (before the sanity check and the
  first step), that every ``ModelCheckpoint`` directory can be created and written (a probe
  file is created, renamed and removed), and fails at once with the directory's path.

``harmonia fit`` installs both by default; with the Python API pass
``plugins=[SafeCheckpointIO()]`` and ``callbacks=[CheckpointDirectoryCheck(), ...]``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

__all__ = ["CheckpointDirectoryCheck", "CheckpointDirectoryError", "CheckpointSaveError", "SafeCheckpointIO",
           "check_writable_directory"]


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the previous file of that name is left as it was."""


class CheckpointDirectoryError(OSError):
    """A checkpoint directory cannot be created or written."""


# The process umask, read once at import (reading it means setting it): mkstemp creates files
# with mode 0600, but a checkpoint should get the permissions any other new file would get.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (network, FUSE) refuse fsync on a directory; the data is synced
    finally:
        os.close(fd)


def _write_atomically(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, rename it to ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and whose failures are errors.

    Remote paths (``s3://``, ``gs://``, ...) go through Lightning's own writer, whose object
    stores upload whole objects.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically; raise :class:`CheckpointSaveError` on any failure."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path)
            return
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, lambda file: torch.save(checkpoint, file))
        except Exception as error:  # torch.save turns a failed write into a RuntimeError of its zip writer
            cause = error.__context__ if isinstance(error.__context__, OSError) else error
            raise CheckpointSaveError(
                f"could not save checkpoint {path}: {cause}. The run stops here so that no further "
                f"training goes unsaved; an earlier {path.name} (if any) is unchanged."
            ) from error


def check_writable_directory(directory: str | os.PathLike) -> None:
    """Create ``directory`` if needed and prove that files can be created, renamed and removed in it.

    Raises :class:`CheckpointDirectoryError` naming the directory otherwise.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".harmonia-write-test-{os.getpid()}"
        _write_atomically(probe, lambda file: file.write(b"harmonia write test\n"))
        probe.unlink()
    except OSError as error:
        raise CheckpointDirectoryError(
            f"checkpoint directory {directory} is not writable ({error.strerror or error}); "
            "choose another one (ModelCheckpoint dirpath, or the run directory) before training"
        ) from error


class CheckpointDirectoryCheck(pl.Callback):
    """Fail when fit starts, before any step, if a ``ModelCheckpoint`` directory is not writable."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check every local ``ModelCheckpoint`` directory on rank zero; every rank raises the same error."""
        problem = None
        if trainer.is_global_zero:
            for callback in trainer.checkpoint_callbacks:
                dirpath = getattr(callback, "dirpath", None)
                if isinstance(callback, ModelCheckpoint) and dirpath and _is_local_file_protocol(dirpath):
                    try:
                        check_writable_directory(dirpath)
                    except CheckpointDirectoryError as error:
                        problem = str(error)
                        break
        problem = trainer.strategy.broadcast(problem)
        if problem is not None:
            raise CheckpointDirectoryError(problem)
