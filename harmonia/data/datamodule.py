"""LightningDataModules that yield ``Sample`` batches."""

from __future__ import annotations

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from harmonia.data.digits import DecoyDigits, DecoyMode
from harmonia.data.sample import Sample


class DecoyDigitsDataModule(pl.LightningDataModule):
    """Decoy digits (train: decoy shade follows the label; val/test: random shade).

    Args:
        batch_size: per-process batch size.
        seed: data seed (split, placement, decoys), independent of the training seed.
        train_decoy: ``"label"`` (the shortcut), ``"random"`` (oracle) or ``"none"``.
        channels: 1 or 3.
        map_fraction: fraction of training samples that carry a human map.
        num_workers: DataLoader workers; the data lives in memory, 0 is fastest here.
    """

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        train_decoy: DecoyMode = "label",
        channels: int = 1,
        map_fraction: float = 1.0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.datasets: dict[str, DecoyDigits] = {}

    def setup(self, stage: str | None = None) -> None:
        """Build the three splits (cheap: a few hundred milliseconds)."""
        hp = self.hparams
        if not self.datasets:
            self.datasets = {
                "train": DecoyDigits("train", hp.seed, hp.train_decoy, hp.channels, hp.map_fraction),
                "val": DecoyDigits("val", hp.seed, "random", hp.channels),
                "test": DecoyDigits("test", hp.seed, "random", hp.channels),
            }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (the sampler is seeded by Lightning's global seed)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (random-shade decoys)."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches (random-shade decoys: accuracy here is decoy-free accuracy)."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split, for ``harmonia predict``."""
        return self._loader("test", shuffle=False)

    def finish_batch(self, batch: Sample, train: bool = False) -> Sample:
        """The batch the module trains on, from a batch of this module's datasets: the same
        (decoy digits are ready in memory); here so that code reading datasets directly can
        call ``datamodule.finish_batch`` on any Harmonia DataModule."""
        return batch
