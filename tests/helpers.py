"""Callbacks used by the subprocess tests (importable as ``helpers`` with tests/ on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch


class KillAtStep(pl.Callback):
    """SIGKILL this process right after optimizer step ``step``: a crash nothing can clean up."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordRun(pl.Callback):
    """At the end of fit, each rank writes its weights and step count under ``out_dir``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, self.out_dir / f"weights_rank{rank}.pt")
        (self.out_dir / f"run_rank{rank}.json").write_text(
            json.dumps({"global_step": trainer.global_step, "epoch": trainer.current_epoch, "world_size": trainer.world_size})
        )
