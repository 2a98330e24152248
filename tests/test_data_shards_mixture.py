"""Tar shards (conversion, rank/worker split), mixtures, ClickMeDataModule and its config."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from data_files import folder, records

from harmonia.data import ClickMeDataModule, ClickMeRecords, ClickMeSample, FolderDataset, ShardDataset
from harmonia.data.convert import convert
from harmonia.data.mixture import MixedBatch, MixtureDataset, MixtureSampler
from harmonia.data.shards import assign_shards

ROOT = Path(__file__).resolve().parents[1]


def test_converted_shards_read_like_the_records(tmp_path: Path) -> None:
    path, _ = records(tmp_path / "r.tfrecords", count=7, size=48)
    manifest = convert(str(path), str(tmp_path / "shards"), max_count=3)
    assert manifest["total"] == 7 and [s["count"] for s in manifest["shards"]] == [3, 3, 1]
    source = ClickMeRecords(path, num_classes=10)
    streamed = list(ShardDataset(str(tmp_path / "shards"), num_classes=10))
    assert len(streamed) == 7
    for i, sample in enumerate(streamed):  # same bytes, same decode: identical tensors
        expected = source[i]
        assert type(sample) is type(expected)
        assert all(torch.equal(a, b) for a, b in zip(sample, expected))


def _harmonia(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    from harmonia.train import main

    monkeypatch.setattr(sys, "argv", ["harmonia", *args])
    main()


def test_folder_converts_via_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    root = folder(tmp_path / "f", count=5, mapped=(0, 1, 3))
    _harmonia(monkeypatch, "convert", str(root), str(tmp_path / "s"), "--max-count", "2")
    assert "wrote 5 samples in 3 shard(s)" in capsys.readouterr().out
    streamed = list(ShardDataset(str(tmp_path / "s"), size=48))
    source = FolderDataset(str(root), size=48)
    assert [bool(s.has_map) for s in streamed] == [True, True, False, True, False]
    for sample, i in zip(streamed, range(5)):
        assert torch.equal(sample.image, source[i].image) and torch.equal(sample.human_map, source[i].human_map)
    (root / "maps" / "a" / "003.npy").unlink()  # bad input stops the conversion, naming the row
    with pytest.raises(SystemExit, match=r"index\.csv, line 5 .*does not exist"):
        _harmonia(monkeypatch, "convert", str(root), str(tmp_path / "s2"))
    assert not (tmp_path / "s2" / "shards.json").exists()


def test_shards_split_by_rank_and_worker_each_sample_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    count = 23  # 8 shards of ≤3: uneven on purpose
    root = folder(tmp_path / "f", count=count, mapped=(), labels=list(range(count)))
    convert(str(root), str(tmp_path / "s"), max_count=3)
    import harmonia.data.shards as shards

    for world, workers in [(1, 1), (2, 1), (2, 2), (3, 2)]:
        for epoch in (0, 1):
            seen, per_rank = [], []
            for rank in range(world):
                ds = ShardDataset(str(tmp_path / "s"), size=16, shuffle=True, shuffle_buffer=4, seed=5,
                                  rank=rank, world_size=world, num_workers=workers)
                ds.set_epoch(epoch)
                labels = []
                for worker in range(workers):
                    monkeypatch.setattr(shards, "get_worker_info", lambda w=worker: SimpleNamespace(id=w, num_workers=workers))
                    labels += [int(s.label) for s in ds]
                per_rank.append(len(labels))
                assert len(labels) == len(ds)
                seen += labels
            assert len(seen) == len(set(seen)), (world, workers, epoch)  # never twice in an epoch
            assert len(set(per_rank)) == 1  # equal work per rank (DDP)
            # drops at most the world-1 shards of an incomplete round, plus shard-size differences
            assert len(seen) >= count - (world - 1) * 3 - world * (3 - 2)
    plan, quota = assign_shards([3] * 7 + [2], 2, 2, epoch=0, seed=0)
    assert sorted(s for r in plan for w in r for s in w) == list(range(8))


def test_shards_with_a_real_two_worker_loader(tmp_path: Path) -> None:
    root = folder(tmp_path / "f", count=12, mapped=(0, 5), labels=list(range(12)))
    convert(str(root), str(tmp_path / "s"), max_count=3)
    dm = ClickMeDataModule(train=str(tmp_path / "s"), num_classes=12, image_size=16, batch_size=4, num_workers=2)
    dm.setup("fit")
    labels = torch.cat([b.label for b in dm.train_dataloader()]).tolist()
    assert sorted(labels) == list(range(12))


def _mixture(mapped: int, unmapped: int, batch: int, fraction: float, **kw) -> MixtureSampler:
    data = MixtureDataset(list(range(mapped)), list(range(unmapped)))
    return MixtureSampler(data, batch, fraction, **kw)


def test_mixture_share_determinism_and_ranks() -> None:
    sampler = _mixture(30, 200, batch=10, fraction=0.25, seed=1)
    batches = list(sampler)
    mapped_counts = [sum(i < 30 for i in b) for b in batches]
    assert set(mapped_counts) == {2, 3} and all(len(b) == 10 for b in batches)
    assert abs(sum(mapped_counts) - 0.25 * 10 * len(batches)) <= 1
    unmapped = [i for b in batches for i in b if i >= 30]
    assert len(unmapped) == len(set(unmapped)) and len(unmapped) > 200 - 10  # one epoch of the unmapped set
    assert batches == list(_mixture(30, 200, batch=10, fraction=0.25, seed=1))  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ranks = [list(_mixture(30, 200, batch=10, fraction=0.25, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    flat = [[i for b in r for i in b if i >= 30] for r in ranks]
    assert not set(flat[0]) & set(flat[1])  # each rank its own share


def test_datamodule_mixes_records_with_an_unmapped_folder(tmp_path: Path) -> None:
    path, _ = records(tmp_path / "r.tfrecords", count=8, size=32, num_classes=3)
    root = folder(tmp_path / "imagenet", count=24, size=32, mapped=(), map_column=False)
    dm = ClickMeDataModule(train=str(path), val=str(path), unmapped_train=str(root), mapped_fraction=0.2,
                           num_classes=3, image_size=16, batch_size=10, num_workers=0)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3  # 24 unmapped / 8 per batch
    assert all(isinstance(b, MixedBatch) for b in batches)
    # each part as its own source yields it: ClickMe records decoded, folder images cropped in the worker
    assert batches[0].mapped.image.shape == (2, 32, 32, 3) and batches[0].unmapped.image.shape == (8, 3, 16, 16)
    assert batches[0].unmapped.image.dtype == torch.uint8  # workers: 8 bits
    for batch in batches:
        on_device = dm.finish_batch(batch, train=True)  # the contract: float in [0, 1], mapped first
        assert on_device.image.shape == (10, 3, 16, 16) and on_device.image.dtype == torch.float32
        assert on_device.has_map.tolist() == [True] * 2 + [False] * 8
        assert 0 <= on_device.image.min() and on_device.image.max() <= 1
        torch.testing.assert_close(on_device.image[2:], batch.unmapped.image.float() / 255)
        assert on_device.human_map[2:].abs().sum() == 0


def test_datamodule_refuses_a_training_set_smaller_than_a_batch(tmp_path: Path) -> None:
    path, _ = records(tmp_path / "r.tfrecords", count=3, size=16)
    dm = ClickMeDataModule(train=str(path), num_classes=10, image_size=16, batch_size=4, num_workers=0)
    dm.setup("fit")
    with pytest.raises(ValueError, match="3 samples, fewer than batch_size 4"):
        dm.train_dataloader()


def test_datamodule_reports_skipped_samples(tmp_path: Path) -> None:
    root = folder(tmp_path / "f", count=6, mapped=(0, 1, 2))
    (root / "maps" / "a" / "001.npy").unlink()
    dm = ClickMeDataModule(train=str(root), val=str(root), num_classes=3, image_size=16, batch_size=3,
                           num_workers=1, skip_bad_samples=True)  # counted in a worker process
    dm.setup("fit")
    sizes = [len(b.label) for b in dm.val_dataloader()]
    assert sorted(sizes) == [2, 3] and dm.skipped == 1
    with pytest.warns(UserWarning, match=r"skipped 1 bad sample"):
        dm.report_skipped()


def test_clickme_config_trains_on_generated_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harmonia.train import cli_main

    # A worker process decodes the records; crop, flip and map blur run in on_after_batch_transfer.
    records(tmp_path / "train" / "a.tfrecords", count=16, size=128, num_classes=10)
    records(tmp_path / "val" / "a.tfrecords", count=6, size=128, num_classes=10, seed=1)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as printed:
        cli_main(["fit", "--config", str(ROOT / "configs" / "clickme_resnet50.yaml"), "--print_config"])
    assert printed.value.code == 0
    cli_main([
        "fit", "--config", str(ROOT / "configs" / "clickme_resnet50.yaml"),
        "--model.arch", "cnn", "--model.arch_args", json.dumps({"in_channels": 3, "input_size": 32, "widths": [8, 16], "hidden": 32}),
        "--model.num_classes", "10", "--data.num_classes", "10", "--data.image_size", "32",
        "--data.train", "train", "--data.val", "val", "--data.batch_size", "8", "--data.num_workers", "1",
        "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.enable_progress_bar", "false", "--test_after_fit", "false",
        "--trainer.callbacks", json.dumps([{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                                            "init_args": {"dirpath": "ckpt", "save_last": True}}]),
    ])
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_records_and_clickme_shards_are_finished_on_the_device(tmp_path: Path) -> None:
    path, _ = records(tmp_path / "r.tfrecords", count=6, size=48)
    convert(str(path), str(tmp_path / "s"), max_count=4)
    for source in (str(path), str(tmp_path / "s")):
        dm = ClickMeDataModule(train=source, val=source, num_classes=10, image_size=32, batch_size=3, num_workers=0,
                               map_normalization="minmax", color_jitter=[0.2, 0.2, 0.2, 0.05], normalize=True)
        dm.setup("fit")
        raw = next(iter(dm.train_dataloader()))
        assert isinstance(raw, ClickMeSample) and raw.image.shape == (3, 48, 48, 3)
        for train in (True, False):
            batch = dm.finish_batch(raw, train=train)
            assert batch.image.shape == (3, 3, 32, 32) and batch.human_map.shape == (3, 1, 32, 32)
            assert torch.allclose(batch.human_map.amax(dim=(1, 2, 3)), torch.ones(3))
            assert batch.image.min() < 0  # normalized
        evaluation = ClickMeDataModule(val=source, num_classes=10, image_size=32, batch_size=3, num_workers=0)
        evaluation.setup("validate")
        # evaluation is deterministic: the reference resize, the same twice
        first = [evaluation.finish_batch(b) for b in evaluation.val_dataloader()]
        second = [evaluation.finish_batch(b) for b in evaluation.val_dataloader()]
        assert all(torch.equal(a.image, b.image) and torch.equal(a.human_map, b.human_map) for a, b in zip(first, second))


def test_augmentation_runs_only_while_the_trainer_trains(tmp_path: Path) -> None:
    """on_after_batch_transfer crops and flips during training, resizes otherwise."""
    path, _ = records(tmp_path / "r.tfrecords", count=6, size=48)
    dm = ClickMeDataModule(train=str(path), num_classes=10, image_size=32, batch_size=6, num_workers=0)
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    reference = dm.finish_batch(raw, train=False)
    assert torch.equal(dm.on_after_batch_transfer(raw, 0).image, reference.image)  # no trainer: evaluation
    dm.trainer = SimpleNamespace(training=True, global_rank=0, world_size=1)
    assert not torch.equal(dm.on_after_batch_transfer(raw, 0).image, reference.image)
    dm.trainer = SimpleNamespace(training=False)
    assert torch.equal(dm.on_after_batch_transfer(raw, 0).image, reference.image)

    def crops(rank: int) -> torch.Tensor:  # a fresh module on DDP rank `rank`, same global seed
        torch.manual_seed(0)
        module = ClickMeDataModule(train=str(path), num_classes=10, image_size=32, batch_size=6, num_workers=0)
        module.trainer = SimpleNamespace(training=True, global_rank=rank, world_size=2)
        return module.on_after_batch_transfer(raw, 0).image

    assert torch.equal(crops(0), crops(0)) and not torch.equal(crops(0), crops(1))  # reproducible, per rank
    with pytest.raises(ValueError, match="map_normalization"):
        ClickMeDataModule(train=str(path), map_normalization="max")


def _all_bad_records(path: Path) -> Path:
    from harmonia.data.tfrecord import TFRecordWriter

    with TFRecordWriter(path) as writer:
        writer.write(b"not an example")
    return path


@pytest.mark.parametrize("case", ["empty file", "every sample bad", "empty folder"])
def test_converting_zero_samples_fails_and_leaves_nothing(tmp_path: Path, case: str) -> None:
    from harmonia.data.convert import main as convert_main

    args = []
    if case == "empty file":
        source = tmp_path / "empty.tfrecords"
        source.write_bytes(b"")
    elif case == "every sample bad":
        source = _all_bad_records(tmp_path / "bad.tfrecords")
        args = ["--skip-bad-samples"]
    else:
        source = folder(tmp_path / "f", count=1)
        (source / "index.csv").write_text("path,label,map\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=rf"{re.escape(str(source))}: no samples") as raised:
        convert_main([str(source), str(out), *args])
    assert raised.value.code not in (0, None)  # a non-zero exit status
    assert not out.exists()  # no manifest, no empty shard, no folder left behind


def _empty_shards(path: Path) -> Path:
    from harmonia.data.shards import ShardWriter

    ShardWriter(path).close()  # a manifest of zero samples, as older versions of convert wrote
    return path


@pytest.mark.parametrize("split", ["train", "val", "unmapped_train"])
@pytest.mark.parametrize("kind", ["records", "folder", "shards"])
def test_an_empty_split_is_refused_naming_the_split_and_path(tmp_path: Path, split: str, kind: str) -> None:
    if split == "unmapped_train" and kind == "shards":
        pytest.skip("mixtures take no shards")
    good, _ = records(tmp_path / "good.tfrecords", count=4, size=16)
    if kind == "records":
        empty = tmp_path / "empty.tfrecords"
        empty.write_bytes(b"")
    elif kind == "folder":
        empty = folder(tmp_path / "f", count=1)
        (empty / "index.csv").write_text("path,label,map\n")
    else:
        empty = _empty_shards(tmp_path / "s")
    sources = {"train": str(good), "val": str(good), split: str(empty)}
    dm = ClickMeDataModule(**sources, num_classes=10, image_size=16, batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match=rf"{split}.*{re.escape(str(empty))}.*no samples"):
        dm.setup("fit")


def test_shards_too_few_for_the_ranks_are_an_empty_split(tmp_path: Path) -> None:
    path, _ = records(tmp_path / "r.tfrecords", count=3, size=16)
    convert(str(path), str(tmp_path / "s"), max_count=3)  # one shard: the second rank gets nothing
    dm = ClickMeDataModule(train=str(tmp_path / "s"), num_classes=10, image_size=16, batch_size=1, num_workers=0)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"train.*3 samples in 1 shard.*--max-count"):
        dm.setup("fit")


def test_an_empty_split_stops_the_fit_before_the_first_step(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    from harmonia.module import AlignedClassifier

    good, _ = records(tmp_path / "good.tfrecords", count=4, size=16)
    empty = tmp_path / "empty.tfrecords"
    empty.write_bytes(b"")
    module = AlignedClassifier(arch="cnn", arch_args={"widths": [4], "hidden": 8, "input_size": 16, "in_channels": 3})
    steps = []
    module.on_train_batch_start = lambda *args: steps.append(1)
    dm = ClickMeDataModule(train=str(good), val=str(empty), num_classes=10, image_size=16, batch_size=2, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=rf"val.*{re.escape(str(empty))}"):
        trainer.fit(module, datamodule=dm)
    assert steps == []
