"""ConceptMonitor and LipschitzMonitor: loggers, stand-alone validate, cadence, drift, DDP, bf16 warning, early checks."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from harmonia.callbacks import ConceptMonitor, LipschitzMonitor
from harmonia.data import DecoyDigitsDataModule

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import monitors_run  # noqa: E402
from monitors_run import Classifier  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Lipschitz CNN trained for 12 steps (concepts of an untrained net are near-ties)."""
    torch.manual_seed(0)
    module = Classifier(arch_args=monitors_run.SMALL)
    pl.Trainer(accelerator="cpu", max_steps=12, limit_val_batches=0, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=DecoyDigitsDataModule(batch_size=64))
    path = tmp_path_factory.mktemp("weights") / "small.pt"
    torch.save(module.state_dict(), path)
    return path


def _module(weights: Path) -> Classifier:
    module = Classifier(arch_args=monitors_run.SMALL)
    module.load_state_dict(torch.load(weights))
    return module


@pytest.mark.parametrize("kind", ["csv", "tensorboard", "wandb"])
def test_standalone_validate_writes_scalars_and_pictures(kind: str, weights: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-alone validate runs under torch.inference_mode; pictures reach each logger."""
    if kind == "csv":
        logger = CSVLogger(tmp_path)
    elif kind == "tensorboard":
        logger = TensorBoardLogger(tmp_path)
    else:
        monkeypatch.setenv("WANDB_MODE", "offline")
        logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="harmonia-test")
    concepts, lipschitz = monitors_run.monitors()
    concepts.attribution_images = 2
    lipschitz.check_layers = kind == "csv"  # lipschitz_bound's power iterations: once is enough
    trainer = pl.Trainer(accelerator="cpu", logger=logger, callbacks=[concepts, lipschitz], inference_mode=True,
                         limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(_module(weights), datamodule=DecoyDigitsDataModule(batch_size=16), verbose=False)[0]
    for c in (0, 3):
        assert {f"concepts/class_{c}/importance/concept_{j}" for j in range(3)} <= metrics.keys()
        assert 0 <= metrics[f"concepts/class_{c}/reconstruction_error"] < 1
        assert concepts.concepts[c].importance.shape == (3,)
    accs = [metrics[f"lipschitz/certified_acc@{e:g}"] for e in (0.01, 0.05, 0.1)]
    assert accs == sorted(accs, reverse=True) and accs[0] > 0  # certified accuracy falls as ε grows
    assert 0 < metrics["lipschitz/empirical_lower_bound"] <= 1.001
    if kind == "csv":
        assert metrics["lipschitz/bound"] <= 1.001 and {"lipschitz/sigma/0", "lipschitz/sigma/9"} <= metrics.keys()
        pngs = sorted(p.parent.name for p in Path(logger.log_dir).glob("images/*/*.png"))
        assert pngs == sorted(f"concepts_class_{c}_{what}" for c in (0, 3) for what in ("attribution", "mosaic"))
    elif kind == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        logger.experiment.flush()
        tags = EventAccumulator(logger.log_dir).Reload().Tags()["images"]
        assert {"concepts/class_0/mosaic", "concepts/class_3/attribution"} <= set(tags)
    else:
        import wandb

        run_dir = Path(logger.experiment.dir).parent
        wandb.finish()
        media = {p.name.split("_")[0] for p in run_dir.glob("files/media/images/concepts/*/*.png")}
        assert media == {"mosaic", "attribution"}, list(run_dir.rglob("*.png"))


def test_fit_cadence_drift_and_checkpoint_state(weights: Path, tmp_path: Path) -> None:
    concepts = ConceptMonitor(layer=5, classes=[1], n_concepts=3, patch_size=16, per_class=5, nb_design=8,
                              top_crops=2, attribution_images=0, every_n_epochs=1, baseline=0.0)
    lipschitz = LipschitzMonitor(epsilons=[0.05], per_class=2, every_n_epochs=1, layers_every_n_epochs=2)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=1,
                         logger=CSVLogger(tmp_path), callbacks=[concepts, lipschitz], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_module(weights), datamodule=DecoyDigitsDataModule(batch_size=16))
    rows = [line.split(",") for line in (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()]
    header, values = rows[0], rows[1:]

    def logged(key: str) -> list[int]:
        column, epoch = header.index(key), header.index("epoch")
        return [int(float(row[epoch])) for row in values if row[column]]

    assert logged("lipschitz/certified_acc@0.05") == [0, 1]
    assert logged("lipschitz/bound") == [1]  # the layer check only every second epoch
    assert logged("concepts/class_1/importance/concept_0") == [0, 1]
    assert logged("concepts/class_1/drift") == [1]  # from the second run on
    drift = trainer.callback_metrics["concepts/class_1/drift"]
    assert 0 < drift <= 1 + 1e-6
    restored = ConceptMonitor(layer=5, classes=[1])
    restored.load_state_dict(concepts.state_dict())
    assert torch.equal(restored.previous[1], concepts.concepts[1].bank.components.cpu())


def test_ddp_two_processes_equal_one_process(weights: Path, tmp_path: Path) -> None:
    """strategy="ddp" (gloo, 2 ranks) in a subprocess vs the same run in-process on 1 device."""
    monitors_run.run(weights, tmp_path / "one", 1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "monitors_run.py"), str(weights), str(tmp_path / "two"), "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = (torch.load(tmp_path / name / "results.pt") for name in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for c in one["concepts"]:
        torch.testing.assert_close(two["concepts"][c]["components"], one["concepts"][c]["components"], atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(two["concepts"][c]["importance"], one["concepts"][c]["importance"], atol=1e-4, rtol=1e-3)
        assert one["concepts"][c]["maco"].shape == (3, 1, 16, 16)
        torch.testing.assert_close(two["concepts"][c]["maco"], one["concepts"][c]["maco"], atol=1e-4, rtol=1e-3)
    assert one["lipschitz"].keys() == two["lipschitz"].keys()
    for key, value in one["lipschitz"].items():
        assert two["lipschitz"][key] == pytest.approx(value, abs=1e-5), key


def test_maco_pictures_join_the_concept_mosaic_only_when_enabled(weights: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``maco`` each mosaic row starts with its concept's MACO picture; without it the mosaic is as before."""
    import harmonia.callbacks.concepts as concepts_module
    from PIL import Image

    from harmonia.visualize import Spectrum, concept_pictures, objective_seed

    drawn: list[torch.Tensor] = []
    real_mosaic = concepts_module.concept_mosaic
    monkeypatch.setattr(concepts_module, "concept_mosaic", lambda crops, *a, **k: drawn.append(crops) or real_mosaic(crops, *a, **k))
    runs = {}
    for name, maco in (("off", None), ("on", {"steps": 2, "crops": 2})):
        monitor = ConceptMonitor(layer=5, classes=[3], n_concepts=3, patch_size=16, per_class=4, nb_design=8, top_crops=2,
                                 attribution_images=0, maco=maco)
        trainer = pl.Trainer(accelerator="cpu", logger=CSVLogger(tmp_path / name), callbacks=[monitor], limit_val_batches=1,
                             enable_progress_bar=False, enable_model_summary=False)
        module = _module(weights)
        trainer.validate(module, datamodule=DecoyDigitsDataModule(batch_size=16), verbose=False)
        runs[name] = (monitor, trainer, module, drawn.pop())
    off, on = runs["off"][3], runs["on"][3]
    assert off.shape == (3, 2, 1, 16, 16) and on.shape == (3, 3, 1, 16, 16)
    torch.testing.assert_close(on[:, 1:], off)  # the crops are untouched: MACO runs after the bank
    monitor, trainer, module, _ = runs["on"]
    run = monitor.concepts[3]
    assert runs["off"][0].concepts[3].maco is None and run.maco.shape == (3, 1, 16, 16)
    ranked = run.importance.argsort(descending=True)
    torch.testing.assert_close(on[:, 0], run.maco[ranked])
    # each picture is its concept's MACO image, on the spectrum of the class's probe images, seeded as in one process
    images = monitor.probe(trainer, module).images
    images = images[monitor.probe(trainer, module).labels == 3]
    direct = concept_pictures(module.model, 5, run.bank, Spectrum.from_images(images), size=16,
                              seed=[objective_seed(monitor.seed, j) for j in range(3)], **monitor.maco)
    torch.testing.assert_close(run.maco, direct, atol=1e-4, rtol=1e-3)
    widths = {name: Image.open(runs[name][0].concepts[3].logged[0]).size[0] for name in runs}
    assert widths["on"] > widths["off"]


def test_maco_cadence_and_options() -> None:
    monitor = ConceptMonitor(layer=5, classes=[1], maco={}, maco_every_n_epochs=3)
    assert monitor.maco["steps"] == 64 and monitor.maco["crops"] == 8  # the monitors' defaults over the small preset
    at = lambda epoch: types.SimpleNamespace(current_epoch=epoch)  # noqa: E731
    due = []
    for reason, epoch in (("epoch", 0), ("epoch", 2), ("step", 2), ("last", 4), ("end", 4), ("validate", 0)):
        monitor.reason = reason
        due.append(monitor._maco_due(at(epoch)))
    assert due == [False, True, False, True, True, True]
    assert not ConceptMonitor(layer=5, classes=[1])._maco_due(at(0))  # off by default
    with pytest.raises(ValueError, match="unknown maco settings"):
        ConceptMonitor(layer=5, classes=[1], maco={"step": 3})
    with pytest.raises(ValueError, match="maco_every_n_epochs"):
        ConceptMonitor(layer=5, classes=[1], maco={}, maco_every_n_epochs=0)


class _CountSteps(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


@pytest.mark.parametrize("fn", ["fit", "validate"])
def test_models_without_a_certificate_are_refused_before_the_first_step(fn: str) -> None:
    module = Classifier(arch="cnn", arch_args=monitors_run.SMALL)
    steps = _CountSteps()
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[LipschitzMonitor(), steps], limit_val_batches=1,
                         max_epochs=1, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="carries no Lipschitz certificate"):
        getattr(trainer, fn)(module, datamodule=DecoyDigitsDataModule(batch_size=16))
    assert steps.steps == 0


def test_a_concept_layer_with_negative_activations_is_refused_before_the_first_step() -> None:
    """Layer 0 of lipschitz_cnn is a convolution (signed outputs): the error names the option before any step."""
    steps = _CountSteps()
    monitor = ConceptMonitor(layer=0, classes=[1], n_concepts=2, patch_size=16, per_class=2)
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[monitor, steps], max_epochs=1, limit_val_batches=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"ConceptMonitor\(layer=0\).*negative.*change `layer`"):
        trainer.fit(Classifier(arch_args=monitors_run.SMALL), datamodule=DecoyDigitsDataModule(batch_size=16))
    assert steps.steps == 0
    with pytest.raises(ValueError, match=r"ConceptMonitor\(layer='head'\).*change `layer`"):
        trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[ConceptMonitor(layer="head", classes=[1])],
                             limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False)
        trainer.validate(Classifier(arch_args=monitors_run.SMALL), datamodule=DecoyDigitsDataModule(batch_size=16), verbose=False)


def test_bf16_autocast_breaks_the_bound_and_the_monitor_warns() -> None:
    """deel-torchlip's Björck under bf16 autocast drifts above 1; the check says so.

    (Harmonia's own layers orthonormalize in float32 under autocast and keep the bound:
    tests/test_lipschitz_layers.py; the deel backend is the known-broken case the monitor must catch.)
    """
    torch.manual_seed(0)
    module = Classifier(arch_args={**monitors_run.SMALL, "backend": "deel"}, lr=1e-2)
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_epochs=1, limit_train_batches=3, limit_val_batches=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LipschitzMonitor(epsilons=[0.05], per_class=1)])
    with pytest.warns(UserWarning, match="bound is broken"):
        trainer.fit(module, datamodule=DecoyDigitsDataModule(batch_size=16))
    assert max(v for k, v in trainer.callback_metrics.items() if k.startswith("lipschitz/sigma/")) > 1.001
