"""SaliencyMonitor: cadence, loggers (W&B, TensorBoard, CSV/PNG), inference-mode validate, DDP = 1 process,
stream probes, the `training` method."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from torch.utils.data import DataLoader, IterableDataset

from harmonia.callbacks import SaliencyMonitor
from harmonia.callbacks.monitor import eval_mode
from harmonia.data import DecoyDigits, DecoyDigitsDataModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from monitors_run import Classifier  # noqa: E402

METHODS = {
    "saliency": {},
    "smoothgrad": {"nb_samples": 3},
    "ig": {"method": "integrated_gradients", "steps": 4},
    "sobol": {"grid_size": 4, "nb_design": 4},
}
METRICS = {
    "alignment": {},
    "deletion": {"steps": 4},
    "insertion": {"steps": 4},
    "mufidelity": {"nb_samples": 8},
    "stability": {"nb_samples": 2, "methods": ["saliency"]},
}


def _monitor(**kwargs) -> SaliencyMonitor:
    return SaliencyMonitor(**{"methods": METHODS, "metrics": METRICS, **kwargs})


def _module() -> Classifier:
    torch.manual_seed(0)
    return Classifier(arch="cnn", arch_args={"widths": [4, 4], "hidden": 8})


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=1, limit_train_batches=2, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kwargs})


def _saliency_values(results: dict) -> dict[str, float]:
    return {k: float(v) for k, v in results.items() if k.startswith("saliency/")}


def _png(folder: Path) -> np.ndarray:
    (path,) = sorted(folder.rglob("saliency_grid/*.png"))[-1:]
    return np.asarray(Image.open(path))


class _RecordProbe(pl.Callback):
    """Saves what each rank scored (probe rows, the model's logits on them, a weight checksum) to ``folder``."""

    def __init__(self, monitor: SaliencyMonitor, folder: Path) -> None:
        self.monitor, self.folder = monitor, folder

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probe = self.monitor.probe(trainer, pl_module)
        with torch.no_grad():
            logits = pl_module.model(probe.images)
            weights = sum(float(p.double().sum()) for p in pl_module.parameters())
        record = {"images": probe.images, "labels": probe.labels, "logits": logits, "weights": weights}
        torch.save(record, self.folder / f"rank{trainer.global_rank}.pt")


def _what_moved(one: Path, two: Path) -> str:
    """Which of the probe rows, their labels, the logits or the weights differ between the two runs' records."""
    single, ranks = torch.load(one / "rank0.pt"), [torch.load(two / f"rank{r}.pt") for r in range(2)]
    notes = [f"weights {single['weights']!r} vs {[r['weights'] for r in ranks]!r}"]
    for name in ("images", "labels", "logits"):
        for r, record in enumerate(ranks):
            mine, theirs = single[name][r::2], record[name]
            same = mine.shape == theirs.shape and torch.allclose(mine.float(), theirs.float(), rtol=1e-5, atol=1e-6)
            notes.append(f"{name} of rank {r}: {'same' if same else f'differ (max {float((mine.float() - theirs.float()).abs().max()):.3g})'}")
    return "; ".join(notes)


def test_ddp_two_processes_equal_one_process(tmp_path: Path) -> None:
    """Probe set split over 2 gloo processes (ddp_spawn): same metric values, same picture."""
    data = DecoyDigitsDataModule(batch_size=32)
    records = {name: tmp_path / f"probe_{name}" for name in ("one", "two")}
    for folder in records.values():
        folder.mkdir()
    monitor = _monitor()
    one = _trainer(logger=CSVLogger(tmp_path / "one"), callbacks=[monitor, _RecordProbe(monitor, records["one"])])
    single = _saliency_values(one.validate(_module(), datamodule=data, verbose=False)[0])
    monitor = _monitor()
    two = _trainer(logger=CSVLogger(tmp_path / "two"), callbacks=[monitor, _RecordProbe(monitor, records["two"])],
                   strategy="ddp_spawn", devices=2)
    double = _saliency_values(two.validate(_module(), datamodule=data, verbose=False)[0])
    assert len(single) == 4 * 2 + 4 * 3 + 1 + 1  # alignment ×2 keys, 3 fidelity metrics, stability, IG completeness
    assert single.keys() == double.keys()
    for key in single:
        assert double[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), f"{key}: {_what_moved(records['one'], records['two'])}"
    np.testing.assert_array_equal(_png(tmp_path / "two"), _png(tmp_path / "one"))


def test_grid_goes_to_wandb_tensorboard_and_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    wandb.finish()  # a run left open by an earlier test would be reused and write elsewhere
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    loggers = [CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb"), WandbLogger(save_dir=str(tmp_path), offline=True, project="t")]
    monitor = SaliencyMonitor(methods=["saliency"], metrics=["alignment"], grid_rows=4)
    trainer = _trainer(logger=loggers, callbacks=[monitor], max_epochs=1)
    trainer.fit(_module(), datamodule=DecoyDigitsDataModule(batch_size=32))
    wandb.finish()
    picture = _png(tmp_path / "csv")
    assert picture.shape[0] > 4 * 96 and picture.shape[2] == 3  # 4 rows of ≥96 px tiles, RGB
    metrics_csv = next((tmp_path / "csv").rglob("metrics.csv")).read_text()
    assert "saliency/saliency/alignment_spearman" in metrics_csv
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert "saliency/grid" in events.Tags()["images"]
    assert list(tmp_path.rglob("offline-run-*/files/media/images/saliency/grid_*.png"))


def test_standalone_validate_in_inference_mode_matches_fit(tmp_path: Path) -> None:
    """trainer.validate runs under torch.inference_mode; the monitor must still work."""
    module, data = _module(), DecoyDigitsDataModule(batch_size=32)
    monitor = _monitor(every_n_epochs=1)
    trainer = _trainer(callbacks=[monitor], max_epochs=1)
    trainer.fit(module, datamodule=data)
    after_fit = _saliency_values(trainer.callback_metrics)
    inference = _saliency_values(_trainer(callbacks=[monitor], inference_mode=True).validate(module, datamodule=data, verbose=False)[0])
    plain = _saliency_values(_trainer(callbacks=[monitor], inference_mode=False).validate(module, datamodule=data, verbose=False)[0])
    assert inference.keys() == after_fit.keys() and inference
    for key in inference:
        assert inference[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-7), key
        assert inference[key] == pytest.approx(after_fit[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize(("every", "epochs", "expected"), [(2, 3, [(1, "epoch"), (2, "last")]), (1, 2, [(0, "epoch"), (1, "last")]),
                                                      (0, 2, [(1, "last")])])
def test_cadence_by_epochs(every: int, epochs: int, expected: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monitor = SaliencyMonitor(methods=["saliency"], metrics=["alignment"], every_n_epochs=every)
    runs, modes, probes = [], [], []
    real = monitor.measure

    def spy(trainer: pl.Trainer, module: pl.LightningModule, probe) -> dict[str, float]:
        runs.append((trainer.current_epoch, monitor.reason))
        modes.append(module.training)  # inside the run: eval mode
        probes.append(probe)
        return real(trainer, module, probe)

    monkeypatch.setattr(monitor, "measure", spy)
    module = _module()
    trainer = _trainer(callbacks=[monitor], max_epochs=epochs)
    trainer.fit(module, datamodule=DecoyDigitsDataModule(batch_size=32))
    assert runs == expected
    assert not any(modes) and module.training  # each run in eval mode, the model handed back in train mode
    assert all(p is probes[0] for p in probes)
    assert probes[0].labels.tolist() == list(range(10))  # one probe image per class, chosen once
    assert "saliency/saliency/alignment_spearman" in trainer.callback_metrics


def test_eval_mode_restores_every_submodule() -> None:
    module = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Sequential(torch.nn.Dropout()))
    module.train()
    module[1].eval()
    with eval_mode(module):
        assert not any(m.training for m in module.modules())
    assert [m.training for m in module.modules()] == [True, True, False, False]


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="unknown attribution method 'gradcam'"):
        SaliencyMonitor(methods=["gradcam"])
    with pytest.raises(ValueError, match="names unknown methods \\['sobol'\\]"):
        SaliencyMonitor(methods=["saliency"], metrics={"deletion": {"methods": ["sobol"]}})
    with pytest.raises(ValueError, match="at least one method"):
        SaliencyMonitor(methods=[])
    monitor = SaliencyMonitor(methods={"a": {"method": "saliency", "reduction": "mean_abs"}, "b": {"method": "sobol", "nb_design": 4}},
                              metrics={"del": {"metric": "deletion", "methods": ["b"]}})
    assert list(monitor.metrics) == [("b", "del")]


class _Stream(IterableDataset):
    """Validation digits without random access (as tar shards are)."""

    def __init__(self) -> None:
        self.digits, self.num_classes = DecoyDigits("val"), 10

    def __iter__(self):
        return (self.digits[i] for i in range(len(self.digits)))


class _StreamData(pl.LightningDataModule):
    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Stream(), batch_size=16)


def test_probe_from_a_stream(tmp_path: Path) -> None:
    """Validation data without random access (tar shards): the first images of each class."""
    monitor = SaliencyMonitor(methods=["saliency"], metrics=["alignment"], per_class=2, grid_rows=3)
    result = _trainer(callbacks=[monitor], logger=CSVLogger(tmp_path)).validate(_module(), datamodule=_StreamData(), verbose=False)[0]
    assert "saliency/saliency/alignment_spearman" in result
    trainer = _trainer()
    probe = monitor.probe(trainer, _module())  # chosen once, kept
    labels = probe.labels.tolist()
    assert labels == sorted(list(range(10)) * 2)
    digits = DecoyDigits("val")
    first = [next(i for i in range(len(digits)) if int(digits.labels[i]) == c) for c in range(10)]
    assert torch.equal(probe.images[::2], digits.images[first])  # the first of each class, in class order
    assert _png(tmp_path).shape[0] > 3 * 96


def test_a_stream_probe_under_ddp_equals_one_process(tmp_path: Path) -> None:
    """Rank zero reads the stream and sends its choice; the two ranks score disjoint halves of it."""
    def values(folder: Path, **kwargs) -> dict[str, float]:
        folder.mkdir()
        monitor = SaliencyMonitor(methods=["saliency"], metrics=["alignment", "deletion"], per_class=2, grid_rows=0)
        trainer = _trainer(callbacks=[monitor, _RecordProbe(monitor, folder)], **kwargs)
        return _saliency_values(trainer.validate(_module(), datamodule=_StreamData(), verbose=False)[0])

    single, double = values(tmp_path / "one"), values(tmp_path / "two", strategy="ddp_spawn", devices=2)
    assert single and single.keys() == double.keys()
    for key in single:  # a mismatch seen once in CI (not reproduced): the message says what moved
        assert double[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), (
            f"{key}: one process {single}, two {double}; {_what_moved(tmp_path / 'one', tmp_path / 'two')}")


class _Penalty(torch.nn.Module):
    """Stands in for a training penalty: what the monitor reads is its ``saliency``."""

    def __init__(self, saliency: object | None = None) -> None:
        super().__init__()
        if saliency is not None:
            self.saliency = saliency


def _with_penalties(*penalties: torch.nn.Module) -> Classifier:
    module = _module()
    module.penalties = torch.nn.ModuleList(penalties)
    return module


def test_training_method_is_the_penalty_saliency_found_at_run_time() -> None:
    from harmonia.explain import Saliency

    first, second = Saliency(reduction="mean_abs", batch_size=7), Saliency(reduction="max_abs")
    module = _with_penalties(_Penalty(), _Penalty(first), _Penalty(second))
    monitor = SaliencyMonitor(methods={"loss": {"method": "training"}, "other": {"method": "training", "penalty": 2}}, metrics=[])
    resolved = monitor.resolved(module)
    assert resolved["loss"] is first and resolved["other"] is second  # the first penalty with a saliency; `penalty` picks
    x, y = torch.rand(5, 1, 32, 32), torch.arange(5)
    maps = monitor.explain(module, x, y)
    torch.testing.assert_close(maps["loss"], first.attribute(module.model, x, y), rtol=0, atol=0)
    torch.testing.assert_close(maps["other"], second.attribute(module.model, x, y), rtol=0, atol=0)
    module.penalties[1].saliency = second  # resolved at each run, not kept from the first one
    assert monitor.resolved(module)["loss"] is second


def test_training_method_scores_like_the_same_explicit_saliency(tmp_path: Path) -> None:
    from harmonia.explain import Saliency

    data = DecoyDigitsDataModule(batch_size=32)
    module = _with_penalties(_Penalty(Saliency(reduction="mean_abs")))
    results = []
    for method in ({"method": "training"}, {"method": "saliency", "reduction": "mean_abs"}):
        monitor = SaliencyMonitor(methods={"loss_map": method}, metrics=["alignment", "deletion"], grid_rows=0)
        results.append(_saliency_values(_trainer(callbacks=[monitor], inference_mode=True).validate(module, datamodule=data, verbose=False)[0]))
    assert results[0] and results[0] == results[1]


def test_training_method_errors_name_the_fix() -> None:
    from harmonia.explain import Saliency

    with pytest.raises(ValueError, match="takes only `penalty`"):
        SaliencyMonitor(methods={"m": {"method": "training", "reduction": "mean_abs"}})
    cases = [
        (_module(), {}, "has no `penalties`"),
        (_with_penalties(_Penalty()), {}, "no penalty of Classifier has a `saliency`"),
        (_with_penalties(_Penalty(), _Penalty(Saliency())), {"penalty": 0}, "penalty 0 \\(_Penalty\\) has no `saliency`"),
        (_with_penalties(_Penalty(Saliency())), {"penalty": 3}, "penalty 3 does not exist"),
    ]
    for module, options, message in cases:
        steps = []
        monitor = SaliencyMonitor(methods={"m": {"method": "training", **options}}, metrics=["alignment"])
        module.validation_step = lambda *args, steps=steps: steps.append(1)
        with pytest.raises(ValueError, match=message):  # before the first validation batch
            _trainer(callbacks=[monitor]).validate(module, datamodule=DecoyDigitsDataModule(batch_size=32), verbose=False)
        assert not steps


def test_training_saliency_equals_the_map_the_penalty_trains() -> None:
    """With the real module: the monitor's `training` map is the Harmonization penalty's own map."""
    from harmonia.explain import Saliency
    from harmonia.losses import Harmonization, RightReasons
    from harmonia.module import AlignedClassifier

    saliency = Saliency(reduction="mean_abs", score="log_prob")
    module = AlignedClassifier(arch="lipschitz_cnn", arch_args={"widths": [4, 4], "hidden": 8},
                               penalties=[RightReasons(0.1), Harmonization(0.1, saliency=saliency)]).eval()
    monitor = SaliencyMonitor(methods={"gradient": {"method": "training"}}, metrics=[])
    data = DecoyDigitsDataModule(batch_size=8)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    penalty = module.penalties[1]
    _, gradients, mapped = module.forward_with_gradients(batch.image, batch.label, batch.has_map, [penalty], create_graph=True)
    trained = penalty.saliency.reduce(gradients[penalty.gradient_key]).detach()
    shown = monitor.explain(module, batch.image[mapped], batch.label[mapped])["gradient"]
    torch.testing.assert_close(shown, trained, atol=1e-6, rtol=1e-5)
