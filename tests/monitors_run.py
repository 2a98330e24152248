"""Run ConceptMonitor + LipschitzMonitor in a stand-alone ``validate`` and save what they found.

    python tests/monitors_run.py WEIGHTS OUT_DIR DEVICES

With ``DEVICES > 1`` it uses ``strategy="ddp"`` on CPU (gloo), which re-launches this script
once per extra rank (which cannot happen inside pytest). test_monitors.py runs it with 2 devices
in a subprocess and compares with the same function called in-process with 1 device.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from harmonia.callbacks import ConceptMonitor, LipschitzMonitor
from harmonia.data import DecoyDigitsDataModule
from harmonia.data.sample import Sample
from harmonia.models import build_model

SMALL = {"widths": [8, 16], "hidden": 32}


class Classifier(pl.LightningModule):
    """A plain classifier (cross-entropy, Adam) whose network is ``.model``, as the monitors expect.

    The monitors read only ``.model`` (and ``.penalties`` for the saliency method ``training``),
    so their tests do not depend on the training module's loss options.
    """

    def __init__(self, arch: str = "lipschitz_cnn", arch_args: dict | None = None, num_classes: int = 10, lr: float = 5e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(arch, num_classes=num_classes, **(arch_args or {}))

    def forward(self, x: Tensor) -> Tensor:
        """Logits."""
        return self.model(x)

    def training_step(self, batch: Sample, batch_idx: int) -> Tensor:
        """Cross-entropy."""
        return F.cross_entropy(self.model(batch.image), batch.label)

    def validation_step(self, batch: Sample, batch_idx: int) -> None:
        """Accuracy."""
        self.log("val/acc", (self.model(batch.image).argmax(-1) == batch.label).float().mean(), batch_size=len(batch.label))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def monitors(maco: dict | None = None) -> tuple[ConceptMonitor, LipschitzMonitor]:
    """Small settings: 2 classes × 5 images × 4 crops, 3 concepts; 3 probe images per class; no layer check."""
    concepts = ConceptMonitor(layer=5, classes=[0, 3], n_concepts=3, patch_size=16, per_class=5,
                              nb_design=8, top_crops=2, attribution_images=0, maco=maco)
    lipschitz = LipschitzMonitor(epsilons=[0.01, 0.05, 0.1], per_class=3, check_layers=False)
    return concepts, lipschitz


def run(weights: Path, out: Path, devices: int) -> None:
    """Validate the saved weights with both monitors; rank zero writes their results to ``out``."""
    module = Classifier(arch_args=SMALL)
    module.load_state_dict(torch.load(weights))
    concepts, lipschitz = monitors(maco={"steps": 2, "crops": 2})  # 3 concepts on 2 ranks: uneven MACO shards
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, callbacks=[concepts, lipschitz],
    )
    trainer.validate(module, datamodule=DecoyDigitsDataModule(batch_size=16), verbose=False)
    if trainer.global_rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        found = {f"class_{c}": {"components": r.bank.components.cpu(), "importance": r.importance, "maco": r.maco}
                 for c, r in concepts.concepts.items()}
        torch.save({"concepts": found, "lipschitz": lipschitz.results, "world_size": trainer.world_size}, out / "results.pt")


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
