"""Shared callback pieces: the ProbeMonitor base (probe, cadence, eval context, logging), rank sharding,
image logging, Jansen estimator."""

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from harmonia.callbacks import Probe, ProbeMonitor, balanced_indices, log_image, rank_shard
from harmonia.callbacks.probe import choose_probe
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


# ----- ProbeMonitor ----------------------------------------------------------------------------
class _Pairs(Dataset):
    """40 random 1×8×8 images, labels 0-3 in turn: (image, label) pairs."""

    def __init__(self, n: int = 40) -> None:
        self.images = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        self.labels = torch.arange(n) % 4

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class _Stream(IterableDataset):
    def __iter__(self):
        data = _Pairs()
        return (data[i] for i in range(len(data)))


class _Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.5), nn.Linear(16, 4))
        self.events: list[str] = []

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx: int) -> None:
        self.events.append("validation_step")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Recorder(ProbeMonitor):
    """Records every run; measures the input-gradient norm of the probe (needs grad, outside inference mode)."""

    needs_grad = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.runs: list[dict] = []

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe) -> None:
        pl_module.events.append("check")

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe) -> dict[str, float]:
        pl_module.events.append("measure")
        model = self.model(pl_module)
        x = self.inputs(model, probe.images).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x).sum(), x)
        self.runs.append({"reason": self.reason, "step": trainer.global_step, "epoch": trainer.current_epoch,
                          "sanity": trainer.sanity_checking, "training": model.training,
                          "inference": torch.is_inference_mode_enabled(), "probe": probe})
        return {"probe/grad_norm": float(grad.norm())}


def _fit(monitor: ProbeMonitor, tmp_path: Path | None = None, **trainer) -> _Net:
    torch.manual_seed(0)
    module = _Net()
    options = dict(accelerator="cpu", logger=CSVLogger(tmp_path) if tmp_path else False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1, max_epochs=10)
    # loaders handed to fit directly (no datamodule): the probe and the check wait for the first run
    pl.Trainer(callbacks=[monitor], **{**options, **trainer}).fit(
        module, DataLoader(_Pairs(), batch_size=10), DataLoader(_Pairs(), batch_size=10))
    return module


def _runs(monitor: _Recorder) -> list[tuple[str, int]]:
    return [(r["reason"], r["step"]) for r in monitor.runs]


def test_cadence_by_steps_ends_with_max_steps(tmp_path: Path) -> None:
    """4 steps per epoch; max_steps=7 stops mid-epoch: the end of training still runs, once per step."""
    monitor = _Recorder(every_n_epochs=0, every_n_steps=3, per_class=2)
    _fit(monitor, tmp_path, max_steps=7)
    assert _runs(monitor) == [("step", 3), ("step", 6), ("end", 7)]
    assert not any(r["sanity"] for r in monitor.runs)
    with open(next(tmp_path.rglob("metrics.csv"))) as handle:
        logged = [int(row["step"]) for row in csv.DictReader(handle) if row.get("probe/grad_norm")]
    assert logged == [3, 6, 7]  # straight to the logger, whatever log_every_n_steps is


def test_cadence_never_runs_twice_at_one_step() -> None:
    monitor = _Recorder(every_n_epochs=1, every_n_steps=2)
    _fit(monitor, max_epochs=2)
    assert _runs(monitor) == [("step", 2), ("step", 4), ("step", 6), ("step", 8)]  # epoch ends fall on step runs
    epochs = _Recorder(every_n_epochs=2)
    _fit(epochs, max_epochs=3)
    assert _runs(epochs) == [("epoch", 8), ("last", 12)]
    accumulated = _Recorder(every_n_epochs=0, every_n_steps=1)
    _fit(accumulated, max_epochs=1, accumulate_grad_batches=2)
    assert _runs(accumulated) == [("step", 1), ("step", 2)]  # optimizer steps, not micro-batches
    no_end = _Recorder(every_n_epochs=0, at_fit_end=False)
    _fit(no_end, max_steps=5)
    assert _runs(no_end) == []


def test_probe_is_chosen_once_balanced_and_the_model_handed_back() -> None:
    monitor = _Recorder(every_n_epochs=1, per_class=3, classes=[1, 3])
    module = _fit(monitor, max_epochs=3)
    assert [r["epoch"] for r in monitor.runs] == [0, 1, 2]
    probe = monitor.runs[0]["probe"]
    assert all(r["probe"] is probe for r in monitor.runs)  # the same images at every run
    assert probe.labels.tolist() == [1, 1, 1, 3, 3, 3] and probe.size == 6
    data = _Pairs()
    for image in probe.images:
        assert any(torch.equal(image, data.images[i]) for i in range(len(data)))
    assert not any(r["training"] for r in monitor.runs) and module.training  # eval inside, train mode restored
    assert module.model[2].training


@pytest.mark.parametrize("source", ["map", "stream"])
def test_probe_shards_are_disjoint_and_cover_the_probe(source: str) -> None:
    data = _Pairs() if source == "map" else DataLoader(_Stream(), batch_size=6)
    whole = choose_probe(data, [0, 1, 2, 3], per_class=3, seed=1, head_rows=5)
    assert whole.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    if source == "stream":  # the first images of each class, in stream order
        torch.testing.assert_close(whole.images[:3], _Pairs().images[[0, 4, 8]])
    chosen, sent = whole.images, _samples(whole)  # for a stream, rank zero's choice is sent to the others
    shards = [choose_probe(data, [0, 1, 2, 3], 3, seed=1, rank=r, world_size=5, head_rows=5, broadcast=lambda _: sent)
              for r in range(5)]
    positions = [s.positions.tolist() for s in shards]
    assert sorted(sum(positions, [])) == list(range(12)) and all(len(p) in (2, 3) for p in positions)
    for shard in shards:
        assert shard.size == 12
        assert torch.equal(shard.images, chosen[shard.positions]) and torch.equal(shard.labels, whole.labels[shard.positions])
        assert torch.equal(shard.head.images, chosen[:5])  # the picture rows, on every rank
    everything = choose_probe(data, [0, 1, 2, 3], 3, seed=1, rank=3, world_size=5, shard=False, broadcast=lambda _: sent)
    assert torch.equal(everything.images, chosen)


def test_a_stream_probe_keeps_and_sends_only_its_rows() -> None:
    """Rows picked from a stream own their memory: the batches they came from are not kept alive or broadcast."""
    import pickle

    from harmonia.callbacks.probe import first_of_each_class
    from harmonia.data.sample import Sample, collate_samples

    sent: list[bytes] = []

    def broadcast(samples: list) -> list:
        sent.append(pickle.dumps(samples))
        return samples

    class Wide(IterableDataset):  # rows of 12 kB, batches of 16 rows
        def __iter__(self):
            return (Sample(torch.full((3, 32, 32), float(i)), torch.zeros(1, 32, 32), torch.tensor(False), torch.tensor(i % 4)) for i in range(64))

    loader = DataLoader(Wide(), batch_size=16, collate_fn=collate_samples)
    picked = first_of_each_class(loader, per_class=1, classes=[0, 1, 2, 3])
    assert [int(s.label) for s in picked] == [0, 1, 2, 3]
    for sample in picked:
        assert sample.image.untyped_storage().nbytes() == sample.image.numel() * sample.image.element_size()
    choose_probe(loader, [0, 1, 2, 3], per_class=1, rank=0, world_size=2, broadcast=broadcast)
    rows = sum(s.image.numel() * s.image.element_size() for s in picked)
    assert len(sent[0]) < 2 * rows  # the four rows (and pickle's framing), not the batches that held them


def _samples(probe: Probe) -> list:
    from harmonia.data.sample import Sample

    return [Sample(probe.images[i], None, None, probe.labels[i]) for i in range(len(probe))]


@pytest.mark.parametrize("inference_mode", [True, False])
def test_standalone_validate_checks_first_then_measures_with_gradients(inference_mode: bool) -> None:
    monitor = _Recorder(per_class=2)
    module = _Net()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[monitor], inference_mode=inference_mode, limit_val_batches=2)
    result = trainer.validate(module, DataLoader(_Pairs(), batch_size=10), verbose=False)[0]
    assert module.events == ["check", "validation_step", "validation_step", "measure"]
    (run,) = monitor.runs
    assert run["reason"] == "validate" and not run["inference"] and not run["training"]
    assert result["probe/grad_norm"] == pytest.approx(monitor.results["probe/grad_norm"]) and result["probe/grad_norm"] > 0
    trainer.validate(module, DataLoader(_Pairs(), batch_size=10), verbose=False)
    assert len(monitor.runs) == 2  # always in a stand-alone validate, even at the same global step


def test_images_the_model_cannot_take_fail_before_the_first_step() -> None:
    class Wide(_Pairs):
        def __getitem__(self, i: int):
            return torch.rand(1, 9, 9), self.labels[i]

    class Data(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(_Pairs(), batch_size=10)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(Wide(), batch_size=10)

    module = _Net()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[_Recorder()], max_epochs=1, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match=r"_Recorder: Sequential cannot take the val data's images of shape \(1, 9, 9\)"):
        trainer.fit(module, datamodule=Data())
    assert module.events == []


def test_monitor_options_are_checked() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        _Recorder(every_n_steps=-1)
    with pytest.raises(ValueError, match="per_class"):
        _Recorder(per_class=0)
    with pytest.raises(ValueError, match="stage"):
        _Recorder(stage="test")


def test_a_rank_with_no_probe_row_keeps_the_shapes() -> None:
    """More ranks than probe rows: the empty share still has (0, C, H, W) images for the collective code."""
    empty = choose_probe(_Pairs(), [0], per_class=2, rank=2, world_size=3)
    assert empty.size == 2 and len(empty) == 0 and empty.images.shape == (0, 1, 8, 8) and empty.human_maps is None


def test_inputs_are_fresh_copies_of_the_probe() -> None:
    model = nn.Linear(2, 2).double()
    kept = torch.rand(3, 2)
    x = ProbeMonitor.inputs(model, kept).requires_grad_(True)
    assert x.dtype == torch.float64 and not kept.requires_grad
    same_dtype = ProbeMonitor.inputs(nn.Linear(2, 2), kept)
    assert same_dtype.data_ptr() != kept.data_ptr() and torch.equal(same_dtype, kept)


def test_a_clickme_probe_holds_finished_evaluation_samples(tmp_path: Path) -> None:
    """ClickMe records arrive as uint8 images with 64-px maps; the probe holds what the model sees."""
    from harmonia.data import ClickMeDataModule
    from data_files import records

    path, _ = records(tmp_path / "val.tfrecords", count=8, size=64, num_classes=4)
    data = ClickMeDataModule(train=None, val=str(path), num_classes=4, image_size=32, batch_size=4, num_workers=0)
    data.setup("validate")
    finish = lambda batch: data.finish_batch(batch, train=False)  # noqa: E731
    probe = choose_probe(data.val_dataloader(), [0, 1, 2, 3], per_class=2, finish=finish)
    assert probe.images.dtype == torch.float32 and probe.images.shape == (8, 3, 32, 32)
    assert 0 <= float(probe.images.min()) and float(probe.images.max()) <= 1
    assert probe.human_maps.shape == (8, 1, 32, 32) and bool(probe.has_map.all())
    reference = data.finish_batch(next(iter(DataLoader(data.datasets["val"], batch_size=8, collate_fn=_collate))), train=False)
    for image, label in zip(probe.images, probe.labels):  # each probe row is one record, finished as in evaluation
        assert any(torch.allclose(image, ref) for ref in reference.image[reference.label == label])


def _collate(items: list) -> object:
    from harmonia.data import collate_samples

    return collate_samples(items)
