"""Checkpoints that cannot be lost silently: atomic saves, loud failures, directories checked before step 1."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.demos.boring_classes import BoringModel

from harmonia.checkpoint_io import (
    CheckpointDirectoryCheck,
    CheckpointDirectoryError,
    CheckpointSaveError,
    SafeCheckpointIO,
    check_writable_directory,
)


@contextlib.contextmanager
def file_size_limit(limit: int):
    """A full disk, as root and without mount privileges: the kernel refuses writes past ``limit``
    bytes (EFBIG; SIGXFSZ ignored) until the context ends."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def _state(seed: int) -> dict:
    return {"weights": torch.randn(64, 1024, generator=torch.Generator().manual_seed(seed)), "step": seed}


def test_full_disk_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_state(1), path)
    with file_size_limit(64 * 1024), pytest.raises(CheckpointSaveError, match="last.ckpt"):
        io.save_checkpoint(_state(2), path)
    loaded = io.load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["weights"], _state(1)["weights"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "the temporary file was left behind"


def test_a_permission_error_at_save_is_raised_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's writer ignores PermissionError; here it stops the run, old file intact."""
    io = SafeCheckpointIO()
    path = tmp_path / "best.ckpt"
    io.save_checkpoint(_state(1), path)

    renamed = []

    def refuse(src, dst):
        renamed.append(Path(src))
        raise PermissionError(errno.EPERM, "Operation not permitted", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(CheckpointSaveError, match="best.ckpt"):
        io.save_checkpoint(_state(2), path)
    monkeypatch.undo()
    # written next to the target, so the rename never crosses filesystems (a cross-device move
    # is a copy, which a full disk can leave half-done under the final name)
    assert renamed and renamed[0].parent == tmp_path
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["best.ckpt"]


def test_saved_checkpoint_gets_ordinary_file_permissions(tmp_path: Path) -> None:
    SafeCheckpointIO().save_checkpoint(_state(0), tmp_path / "a.ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.fixture
def immutable_dir(tmp_path: Path):
    """An existing directory nobody, root included, may write into (``chattr +i``: EPERM), or None
    where chattr or the capability is missing."""
    directory = tmp_path / "immutable"
    directory.mkdir()
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(directory)], capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield directory
    finally:
        subprocess.run([chattr, "-i", str(directory)], check=True)


def _unwritable(tmp_path: Path, immutable: Path | None) -> list[Path]:
    """Checkpoint directories that cannot be created or written, also when running as root."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    dirs = [blocker / "checkpoints"]  # ENOTDIR, for root too (chmod does not stop root)
    if immutable is not None:
        dirs.append(immutable)  # EPERM: the case Lightning's own writer ignores
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        dirs.append(locked / "checkpoints")
    return dirs


def test_check_writable_directory(tmp_path: Path, immutable_dir: Path | None) -> None:
    check_writable_directory(tmp_path / "new" / "checkpoints")
    assert (tmp_path / "new" / "checkpoints").is_dir() and not list((tmp_path / "new" / "checkpoints").iterdir())
    for directory in _unwritable(tmp_path, immutable_dir):
        with pytest.raises(CheckpointDirectoryError, match=str(directory)):
            check_writable_directory(directory)


class _NoStep(BoringModel):
    def training_step(self, batch, batch_idx):
        raise AssertionError("a training step ran before the checkpoint directory was checked")

    def validation_step(self, batch, batch_idx):
        raise AssertionError("the sanity check ran before the checkpoint directory was checked")


def test_unwritable_checkpoint_directory_fails_before_the_first_step(tmp_path: Path, immutable_dir: Path | None) -> None:
    for directory in _unwritable(tmp_path, immutable_dir):
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
            plugins=[SafeCheckpointIO()], default_root_dir=tmp_path,
            callbacks=[CheckpointDirectoryCheck(), ModelCheckpoint(dirpath=directory, save_last=True)],
        )
        with pytest.raises(CheckpointDirectoryError, match=str(directory)):
            trainer.fit(_NoStep())


class _ShrinkDiskAfter(pl.Callback):
    """After optimizer step ``step``, let no file grow past a few KB (the disk is full)."""

    def __init__(self, step: int, stack: contextlib.ExitStack) -> None:
        self.step, self.stack = step, stack

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            self.stack.enter_context(file_size_limit(4096))


def test_failed_save_stops_fit_at_that_step_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=0, save_last=True)
    with contextlib.ExitStack() as stack:
        # checkpoint callbacks run after the others: step 2's save is the first on a full disk
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=10, limit_val_batches=0, logger=False, enable_progress_bar=False,
            enable_model_summary=False, plugins=[SafeCheckpointIO()], callbacks=[_ShrinkDiskAfter(2, stack), ckpt],
        )
        with pytest.raises(CheckpointSaveError, match="last.ckpt"):
            trainer.fit(BoringModel())
    assert trainer.global_step == 2, "the failed save must stop the run at the step it happened"
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 1
