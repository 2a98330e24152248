"""Shared callback helpers: probe selection, rank sharding, image logging, Jansen estimator."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from harmonia.callbacks import balanced_indices, log_image, rank_shard
from harmonia.explain.sensitivity import jansen_total_order, qmc_design


def test_balanced_indices_are_balanced_and_deterministic() -> None:
    labels = [i % 3 for i in range(30)] + [0] * 20
    a = balanced_indices(len(labels), labels.__getitem__, per_class=4, num_classes=3, seed=1)
    b = balanced_indices(len(labels), labels.__getitem__, per_class=4, num_classes=3, seed=1)
    assert a == b and len(a) == 12 and len(set(a)) == 12
    assert [labels[i] for i in a] == [0] * 4 + [1] * 4 + [2] * 4
    assert balanced_indices(len(labels), labels.__getitem__, 4, 3, seed=2) != a
    short = balanced_indices(len(labels), labels.__getitem__, per_class=15, num_classes=3)
    assert sum(labels[i] == 1 for i in short) == 10  # a short class gives what it has


def test_rank_shards_partition_the_probe() -> None:
    idx = list(range(11))
    shards = [rank_shard(idx, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == idx
    with pytest.raises(ValueError, match="rank 3"):
        rank_shard(idx, 3, 3)


def test_qmc_design_layout() -> None:
    masks = qmc_design(8, 3, "sobol")
    assert masks.shape == (8 * 5, 3)
    a, b, c = masks[:8], masks[8:16], masks[16:].reshape(3, 8, 3)
    for i in range(3):
        expected = a.clone()
        expected[:, i] = b[:, i]
        assert torch.equal(c[i], expected)
    assert qmc_design(5, 2, "halton").shape == (20, 2)
    with pytest.raises(ValueError, match="power-of-two"):
        qmc_design(6, 2, "sobol")


def test_jansen_finds_the_only_input_that_matters() -> None:
    nb, d = 64, 4
    masks = qmc_design(nb, d)
    scores = torch.stack([3 * masks[:, 2], masks[:, 2] ** 2], dim=1)  # two "images"
    st = jansen_total_order(scores, nb)
    assert st.shape == (d, 2)
    assert torch.all(st[2] > 0.5) and torch.all(st[[0, 1, 3]] == 0)
    assert torch.equal(jansen_total_order(torch.ones(nb * (d + 2)), nb), torch.zeros(d))


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_log_image_per_logger(tmp_path: Path, kind: str) -> None:
    logger = CSVLogger(tmp_path) if kind == "csv" else TensorBoardLogger(tmp_path)
    trainer = pl.Trainer(logger=logger, accelerator="cpu", enable_progress_bar=False)
    image = torch.rand(3, 5, 7)
    where = log_image(trainer, "probe/grid", image)
    if kind == "csv":
        png = Path(where[0])
        assert png.exists() and png.parent.name == "probe_grid"
        got = torch.tensor(list(Image.open(png).getdata())).T.reshape(3, 5, 7).float() / 255
        assert torch.allclose(got, image, atol=1 / 255)
    else:
        logger.experiment.flush()
        assert where == ["tensorboard"] and list(Path(logger.log_dir).glob("events.out.tfevents*"))
