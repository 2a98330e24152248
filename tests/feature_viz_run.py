"""Run FeatureVizMonitor in a stand-alone ``validate`` and save what it drew.

    python tests/feature_viz_run.py OUT_DIR DEVICES

With ``DEVICES > 1`` it uses ``strategy="ddp"`` on CPU (gloo), which re-launches this script
once per extra rank (never inside pytest). test_visualize.py runs it with 1 and 2 devices and
compares the pictures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from harmonia.callbacks import FeatureVizMonitor
from harmonia.data import DecoyDigitsDataModule
from harmonia.module import AlignedClassifier


def run(out: Path, devices: int) -> None:
    """Validate a small seeded CNN with the monitor (5 classes: uneven shards); rank zero saves the results."""
    torch.manual_seed(0)
    module = AlignedClassifier(arch="cnn", arch_args={"widths": [4, 8], "hidden": 16})
    monitor = FeatureVizMonitor(classes=[0, 1, 2, 3, 4], maco={"steps": 6, "crops": 3}, spectrum_images=32,
                                spectrum=str(out / "maco_spectrum.pt"))
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, callbacks=[monitor])
    trainer.validate(module, datamodule=DecoyDigitsDataModule(batch_size=16), verbose=False)
    if trainer.global_rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        pictures = monitor.pictures
        torch.save({"classes": pictures.classes, "image": pictures.image, "alpha": pictures.alpha, "score": pictures.score,
                    "world_size": trainer.world_size}, out / "results.pt")


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]))
