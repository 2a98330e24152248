"""The one place that knows how each logger takes a picture.

W&B gets ``log_image``, TensorBoard ``add_image``, and a CSV logger (or any logger with a
``log_dir`` but no image call) gets a PNG file under ``<log_dir>/images/<key>/``. Only global
rank zero logs: ``logger.experiment`` is a dummy on the other ranks.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from torch import Tensor

from harmonia.visualize.figure import save_figure


def _as_chw(image: Tensor | np.ndarray) -> Tensor:
    """A float ``(3,H,W)`` tensor in [0, 1] from CHW/HWC/HW, float [0,1] or uint8 input."""
    t = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image).detach().cpu()
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    t = t.float()
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"an image must be HW, CHW or HWC; got shape {tuple(t.shape)}")
    if t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        t = t.permute(2, 0, 1)
    if t.shape[0] == 4:
        t = t[:3]
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t.clamp(0, 1).contiguous()


def save_png(image: Tensor | np.ndarray, path: str | Path) -> Path:
    """Write ``image`` as a PNG atomically (a temporary file, then a rename); return the path."""
    return save_figure(_as_chw(image), path)


def log_image(trainer: pl.Trainer, key: str, image: Tensor | np.ndarray, caption: str | None = None) -> list[str]:
    """Log one picture to every logger of ``trainer`` at its current global step.

    ``image`` is CHW or HWC (float in [0, 1] or uint8). Returns where it went (``"wandb"``,
    ``"tensorboard"`` or a PNG path) so callers and tests can tell; empty on ranks other than 0.
    """
    if not trainer.is_global_zero:
        return []
    chw = _as_chw(image)
    step = trainer.global_step
    written: list[str] = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            hwc = (chw.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            # Lightning's WandbLogger wants every extra kwarg as a list: pass caption only if set.
            extra = {"caption": [caption]} if caption else {}
            logger.log_image(key=key, images=[hwc], step=step, **extra)
            written.append("wandb")
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, chw, global_step=step)
            written.append("tensorboard")
        elif isinstance(logger, CSVLogger) or getattr(logger, "log_dir", None):
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
            path = save_png(chw, Path(logger.log_dir) / "images" / safe / f"step_{step:07d}.png")
            written.append(str(path))
    return written
