"""``harmonia atlas``: what a checkpoint sees, class by class, as a static site opened from disk.

    harmonia atlas --ckpt_path runs/digits/latest/checkpoints/best.ckpt           # → runs/digits/latest/atlas
    harmonia atlas --config configs/digits.yaml --ckpt_path best.ckpt --out atlas --classes 3 7
    harmonia atlas ... --compare runs/digits_baseline/latest/checkpoints/best.ckpt   # two models side by side
    harmonia atlas ... --timeline runs/digits/latest/checkpoints/                    # every checkpoint of a run
    harmonia atlas ... --trainer.accelerator cpu --trainer.devices 2 --trainer.strategy ddp

Steps:
1. the model and the data module are built from the run's configuration by the same parser as
   ``harmonia fit`` (:func:`harmonia.train.cli_main` without running; no run directory is made),
   and the checkpoint's weights are loaded into the model. The concept layer, crop size, baseline
   and number of concepts default to the configuration's ``ConceptMonitor``, the certified radii to
   its ``LipschitzMonitor``;
2. per class, the first ``--images-per-class`` images of that label in ``--split`` (default
   ``train``: the split a shortcut was learned from) in dataset order, those with a human map
   first, finished by the data module as in evaluation;
3. a Lightning ``predict`` over the class ids analyses one class per step
   (:func:`harmonia.atlas.analysis.analyze_class`); Lightning's distributed sampler spreads the
   classes over the ranks of ``--trainer.devices N``; each rank writes its classes' documents
   (``data/class/<id>.json``) and pictures;
4. rank zero writes the index document (``data/atlas.json``: model card, metrics, class grid,
   flags, training curves from ``--logs``) and the HTML (:func:`harmonia.atlas.render.render_site`).

Analyses are kept in ``<out>/cache/<key>.pt``; the key hashes the checkpoint's content, the
analysis settings, the class, its images and the document schema, so a re-run with the same
inputs (``--overwrite`` to rebuild an existing atlas) analyses nothing again.

Training curves come from TensorBoard event files, CSV loggers' ``metrics.csv`` and offline W&B
runs (``run-*.wandb``, :mod:`harmonia.atlas.wandb_log`) under ``--logs``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import hashlib
import importlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from harmonia.atlas.wandb_log import read_history
from harmonia.atlas.schema import SCHEMA_VERSION, validate
from harmonia.callbacks.probe import as_sample, first_of_each_class, is_stream
from harmonia.data.sample import Sample, collate_samples

CACHE_VERSION = 1  # bump when the cache's contents change meaning (with SCHEMA_VERSION, part of every key)
SPLITS = ("train", "val", "test")
# Keys a run's config.yaml carries for its subcommand (Trainer.fit's arguments), unknown to the
# subcommand-less parser that builds the model here.
_SUBCOMMAND_KEYS = ("ckpt_path", "weights_only", "verbose", "return_predictions")
# What an atlas folder holds besides its cache: removed by --overwrite before a rebuild.
_ATLAS_ENTRIES = ("index.html", "timeline.html", "class", "data", "img", "static")
_TRAINER_KEYS = ("accelerator", "devices", "strategy", "num_nodes")


class AtlasError(Exception):
    """Bad input to ``harmonia atlas``: printed as one line naming the file or class at fault."""


# ----------------------------------------------------------------------------- arguments
def _flag(value: str) -> bool:
    """``true``/``false`` (and yes/no/1/0) as a bool, for ``--maco false``/``--overwrite true``."""
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class _AtlasParser(argparse.ArgumentParser):
    """argparse with a one-line error and a pointer to ``--help`` (not the whole usage)."""

    def error(self, message: str) -> NoReturn:
        """Print ``error: harmonia atlas: <message>`` and exit with status 2."""
        sys.stderr.write(f"error: {self.prog}: {message}\n\nfor the accepted options run: {self.prog} --help\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``harmonia atlas`` (Lightning overrides ``--trainer.*``, ``--model.*`` and
    ``--data.*`` are passed on to the run's configuration)."""
    p = _AtlasParser(
        prog="harmonia atlas",
        description="Build the explanation atlas of a checkpoint: a static site (index.html) opened from disk.",
        epilog="Also accepted: --trainer.devices N, --trainer.accelerator A, --trainer.strategy S (e.g. ddp: the "
               "classes are shared over the processes) and other --trainer.*/--model.*/--data.* overrides of the "
               "configuration.",
    )
    p.add_argument("--ckpt_path", "--ckpt-path", required=True, help="Lightning checkpoint of the model to explain.")
    p.add_argument("--config", default=None,
                   help="The run's YAML (default: config.yaml of the checkpoint's run, <run>/checkpoints/../config.yaml).")
    p.add_argument("--out", default=None, help="Atlas folder (default: <run>/atlas, else atlas/ beside the checkpoint).")
    p.add_argument("--compare", default=None, metavar="CKPT",
                   help="A second checkpoint: the same classes and images, its concepts matched to this model's.")
    p.add_argument("--compare_label", "--compare-label", default=None,
                   help="Name of the compared model on the pages (default: from its path).")
    p.add_argument("--timeline", default=None, metavar="DIR",
                   help="A folder of checkpoints (every *.ckpt, ordered by the epoch and step saved in them): each "
                        "class's concepts followed across them.")
    p.add_argument("--logs", default=None, metavar="DIR",
                   help="Where the run's logs are (TensorBoard event files, CSV logger metrics.csv, offline W&B runs) "
                        "for the training curves; default: the checkpoint's run directory.")
    p.add_argument("--classes", nargs="+", type=int, default=None, metavar="ID", help="Class ids to analyse (default: every class).")
    p.add_argument("--images-per-class", "--images_per_class", dest="images_per_class", type=int, default=None, metavar="N",
                   help="Images analysed per class (default: the analysis settings' default).")
    p.add_argument("--concepts", "--n_concepts", dest="n_concepts", type=int, default=None, metavar="K",
                   help="Concepts per class (default: the config's ConceptMonitor n_concepts, else the analysis default).")
    p.add_argument("--split", choices=SPLITS, default="train",
                   help="Split the images come from (default: train, where a dataset's shortcuts live: a model that "
                        "learned one shows it on the images it was learned from).")
    p.add_argument("--layer", default=None,
                   help="Concept layer: child index or module name (default: the config's ConceptMonitor layer).")
    p.add_argument("--patch_size", "--patch-size", type=int, default=None,
                   help="Crop side in pixels (default: the config's ConceptMonitor patch_size).")
    p.add_argument("--maco", type=_flag, nargs="?", const=True, default=None,
                   help="MACO pictures of the concepts (default: on); --maco false or --no-maco: off (faster).")
    p.add_argument("--no-maco", "--no_maco", dest="maco", action="store_const", const=False, help=argparse.SUPPRESS)
    p.add_argument("--heldout_images", "--heldout-images", type=int, default=5000,
                   help="Images of the val split scored for the held-out accuracy (0: skip).")
    p.add_argument("--overwrite", type=_flag, nargs="?", const=True, default=False,
                   help="Rebuild an existing atlas folder (its cache/ is kept and reused).")
    return p


@dataclass
class AtlasArgs:
    """Parsed arguments: the atlas's own, and the overrides passed on to the configuration."""

    options: argparse.Namespace
    overrides: list[str]


def parse_args(argv: Sequence[str]) -> AtlasArgs:
    """Split ``argv`` into atlas options and ``--trainer.*``/``--model.*``/``--data.*`` overrides."""
    parser = build_parser()
    options, rest = parser.parse_known_args(list(argv))
    overrides, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith(("--trainer.", "--model.", "--data.", "--seed_everything")):
            parser.error(f"unrecognized argument {arg!r}")
        if "=" in arg:
            overrides.append(arg)
            i += 1
            continue
        if i + 1 >= len(rest):
            parser.error(f"{arg} needs a value")
        overrides += [arg, rest[i + 1]]
        i += 2
    if options.images_per_class is not None and options.images_per_class < 1:
        parser.error(f"--images-per-class must be >= 1, got {options.images_per_class}")
    if options.n_concepts is not None and options.n_concepts < 1:
        parser.error(f"--concepts must be >= 1, got {options.n_concepts}")
    if options.layer is not None and options.layer.lstrip("-").isdigit():
        options.layer = int(options.layer)
    return AtlasArgs(options, overrides)


# ----------------------------------------------------------------------------- checkpoints
def file_digest(path: Path) -> str:
    """SHA-256 of a file's content (the checkpoint's identity in cache keys)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_of_checkpoint(ckpt: Path) -> Path | None:
    """``<run>`` for ``<run>/checkpoints/x.ckpt`` of a Harmonia run directory (with ``config.yaml``)."""
    from harmonia.train import _run_of_checkpoint  # noqa: PLC0415 - harmonia.train imports this module lazily

    return _run_of_checkpoint(ckpt)


def checkpoint_label(path: Path) -> str:
    """``<run>/<stem>`` for a checkpoint of a run directory, else the file's stem."""
    run = run_of_checkpoint(path)
    return f"{run.name}/{path.stem}" if run is not None else path.stem


@dataclass
class Checkpoint:
    """A checkpoint file read once: its weights (memory-mapped), position and identity."""

    path: Path
    label: str
    epoch: int | None
    step: int | None
    digest: str
    hparams: dict[str, Any]
    weights: dict[str, Tensor]  # the inner network's state dict (``model.`` prefix removed)

    def info(self) -> dict[str, Any]:
        """``{label, epoch, step}`` as the timeline documents name a checkpoint."""
        return {"label": self.label, "epoch": self.epoch, "step": self.step}


def read_checkpoint(path: str | Path, label: str | None = None) -> Checkpoint:
    """Read a Lightning checkpoint of an ``AlignedClassifier``; ``AtlasError`` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"checkpoint {path} does not exist" if not path.exists() else f"checkpoint {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise AtlasError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise AtlasError(f"checkpoint {path} holds no 'state_dict': not a Lightning checkpoint")
    weights = {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
    if not weights:
        raise AtlasError(f"checkpoint {path} has no 'model.*' weights: not a checkpoint of harmonia's AlignedClassifier")
    epoch, step = state.get("epoch"), state.get("global_step")
    return Checkpoint(path, label or checkpoint_label(path), None if epoch is None else int(epoch),
                      None if step is None else int(step), file_digest(path),
                      dict(state.get("hyper_parameters") or {}), weights)


def load_weights(classifier: nn.Module, ckpt: Checkpoint, arch: str | None) -> None:
    """Load ``ckpt``'s weights into the classifier's network (strict); ``AtlasError`` naming the file when they do not fit."""
    trained = ckpt.hparams.get("arch")
    if arch is not None and trained is not None and trained != arch:
        raise AtlasError(f"checkpoint {ckpt.path} is a {trained} model; the configuration builds {arch}")
    model = _analysis_module().network(classifier)
    try:
        model.load_state_dict(ckpt.weights, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise AtlasError(f"checkpoint {ckpt.path} does not fit the configured {arch or type(model).__name__} "
                         f"(different architecture or arch_args): {detail[:300]}") from None


def timeline_checkpoints(folder: str | Path) -> list[Checkpoint]:
    """Every ``*.ckpt`` of ``folder``, ordered by the (epoch, step) saved in it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AtlasError(f"--timeline {folder} is not a folder")
    found = sorted(folder.glob("*.ckpt"))
    if not found:
        raise AtlasError(f"--timeline {folder} holds no *.ckpt file")
    ckpts = [read_checkpoint(p, p.stem) for p in found]
    return sorted(ckpts, key=lambda c: (c.epoch if c.epoch is not None else -1, c.step if c.step is not None else -1,
                                        c.label))


# ----------------------------------------------------------------------------- configuration
@dataclass
class Loaded:
    """What the run's configuration builds: the classifier, the data module, and defaults."""

    module: pl.LightningModule
    datamodule: pl.LightningDataModule
    config_path: Path
    config_text: str
    trainer: dict[str, Any]
    concept_defaults: dict[str, Any]


def _config_argument(path: Path) -> str:
    """``--config`` value for the subcommand-less parser: the file, or its YAML without the keys
    a run's ``config.yaml`` carries for its subcommand."""
    import yaml  # noqa: PLC0415

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise AtlasError(f"--config {path} cannot be read: {error}") from None
    if not isinstance(config, dict):
        raise AtlasError(f"--config {path} is not a YAML mapping")
    if not any(k in config for k in _SUBCOMMAND_KEYS):
        return str(path)
    return yaml.safe_dump({k: v for k, v in config.items() if k not in _SUBCOMMAND_KEYS}, sort_keys=False)


def concept_defaults(callbacks: Sequence[Any]) -> dict[str, Any]:
    """Analysis defaults from the configuration's monitors: the ``ConceptMonitor``'s layer, crop
    size, baseline and number of concepts, the ``LipschitzMonitor``'s epsilons."""
    from harmonia.callbacks import ConceptMonitor, LipschitzMonitor  # noqa: PLC0415

    found: dict[str, Any] = {}
    for callback in callbacks:
        if isinstance(callback, ConceptMonitor) and "layer" not in found:
            found.update(layer=callback.layer, n_concepts=callback.craft_args["n_concepts"],
                         patch_size=callback.craft_args["patch_size"], baseline=callback.craft_args["baseline"])
        if isinstance(callback, LipschitzMonitor) and "epsilons" not in found:
            found["epsilons"] = list(callback.epsilons)
    return found


def load_config(config: Path, overrides: Sequence[str]) -> Loaded:
    """Build the model and data module of ``config`` as ``harmonia fit`` does (nothing is run or created)."""
    from harmonia.train import cli_main  # noqa: PLC0415 - harmonia.train dispatches to this module

    if not config.is_file():
        raise AtlasError(f"--config {config} does not exist")
    # The run's own logger is of no use here and W&B's would only cost an import. LightningCLI
    # warns when it is given arguments while sys.argv holds others (here: `atlas ...`).
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = cli_main(["--config", _config_argument(config), *overrides, "--trainer.logger", "false"], run=False)
    finally:
        sys.argv = argv
    trainer_cfg = cli.config.get("trainer") or {}
    trainer = {k: trainer_cfg.get(k) for k in _TRAINER_KEYS if trainer_cfg.get(k) is not None}
    if not isinstance(trainer.get("strategy", "auto"), str):
        rank_zero_warn("harmonia atlas: the configuration's trainer.strategy is an object; using 'auto' "
                       "(give --trainer.strategy ddp to share the classes over processes)")
        trainer["strategy"] = "auto"
    return Loaded(cli.model, cli.datamodule, config, config.read_text(), trainer, concept_defaults(cli.trainer.callbacks))


# ----------------------------------------------------------------------------- images
@dataclass
class ClassImages:
    """The images of one class the atlas analyses (CPU tensors) and where they came from."""

    images: Tensor  # (N, C, H, W)
    labels: Tensor  # (N,)
    maps: Tensor | None  # (N, 1, H, W) human maps; None when the data gives none
    indices: list[int]  # positions in the split (stream: order of arrival)

    def digest(self) -> str:
        """SHA-256 of the images, labels and maps (the image selection's part of a cache key)."""
        h = hashlib.sha256()
        for t in (self.images, self.labels, self.maps):
            if t is None:
                h.update(b"none")
                continue
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        h.update(json.dumps(self.indices).encode())
        return h.hexdigest()


def _column(dataset: Any, name: str) -> Any:
    """A per-sample column the dataset keeps in memory (``labels``, ``has_map``), else None."""
    value = getattr(dataset, name, None)
    try:
        return value if value is not None and len(value) == len(dataset) else None
    except TypeError:
        return None


def _has_map(sample: Sample) -> bool:
    if sample.human_map is None:
        return False
    return True if sample.has_map is None else bool(torch.as_tensor(sample.has_map).reshape(-1)[0])


def _split_source(datamodule: pl.LightningDataModule, split: str) -> DataLoader:
    """The data module's loader of ``split`` (its dataset for map-style data)."""
    stage = {"train": "fit", "val": "validate", "test": "test"}[split]
    datamodule.setup(stage)
    loader_fn = getattr(datamodule, f"{split}_dataloader", None)
    try:
        loader = loader_fn() if callable(loader_fn) else None
    except (KeyError, NotImplementedError, AttributeError, TypeError) as error:
        raise AtlasError(f"{type(datamodule).__name__} has no {split} split ({type(error).__name__}: {error}); "
                         "choose another --split") from None
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    if loader is None:
        raise AtlasError(f"{type(datamodule).__name__} has no {split} split; choose another --split")
    return loader


def select_images(datamodule: pl.LightningDataModule, split: str, classes: Sequence[int], per_class: int) -> dict[int, ClassImages]:
    """The first ``per_class`` images of each class in ``split``, in dataset order, those with a
    human map first (a class with mapped images gets only mapped ones), finished by the data
    module's ``finish_batch`` as in evaluation; ``AtlasError`` for a class without images."""
    loader = _split_source(datamodule, split)
    dataset = loader.dataset
    name = f"the {split} split of {type(datamodule).__name__}"
    finish_batch = getattr(datamodule, "finish_batch", None)

    def finish(batch: Any) -> Sample:
        batch = finish_batch(batch, train=False) if callable(finish_batch) else batch
        return as_sample(batch, f"a batch of {name}")

    if is_stream(dataset):
        # No random access: the first images of each class in the loader's order.
        samples = first_of_each_class((finish(b) for b in loader), per_class, classes)
        arrived: dict[int, list[tuple[int, Sample]]] = {int(c): [] for c in classes}
        for i, s in enumerate(samples):
            arrived[int(s.label)].append((i, s))
        return {c: _stack_class(c, [s for _, s in arrived[c]], [i for i, _ in arrived[c]], per_class, name, mapped=None)
                for c in classes}

    labels, has_map = _column(dataset, "labels"), _column(dataset, "has_map")
    mapped: dict[int, list[int]] = {int(c): [] for c in classes}
    plain: dict[int, list[int]] = {int(c): [] for c in classes}
    for i in range(len(dataset)):
        if labels is not None:
            label = int(labels[i])
            if label not in mapped:
                continue
            with_map = bool(has_map[i]) if has_map is not None else _has_map(as_sample(dataset[i], f"sample {i} of {name}"))
        else:
            sample = as_sample(dataset[i], f"sample {i} of {name}")
            label, with_map = int(sample.label), _has_map(sample)
            if label not in mapped:
                continue
        bucket = mapped[label] if with_map else plain[label]
        if len(bucket) < per_class:
            bucket.append(i)
        if all(len(v) >= per_class for v in mapped.values()):
            break
    result = {}
    for c in classes:
        indices = mapped[c] or plain[c]
        rows: list[Sample] = []
        if indices:
            batch = finish(collate_samples([dataset[i] for i in indices]))
            rows = [Sample(*(None if t is None else t[j] for t in batch)) for j in range(len(indices))]
        result[c] = _stack_class(c, rows, indices, per_class, name, mapped=bool(mapped[c]))
    return result


def _stack_class(c: int, rows: list[Sample], indices: list[int], per_class: int, name: str,
                 mapped: bool | None) -> ClassImages:
    """One class's rows as CPU tensors; maps kept only when every row has one."""
    if not rows:
        raise AtlasError(f"class {c} has no images in {name}; leave it out of --classes or choose another --split")
    if len(rows) < per_class:
        rank_zero_warn(f"harmonia atlas: class {c} has only {len(rows)} "
                       f"{'mapped ' if mapped else ''}images in {name} (asked {per_class})")
    with torch.inference_mode(False):
        images = torch.stack([torch.as_tensor(r.image).detach().cpu().float() for r in rows]).contiguous()
        labels = torch.tensor([int(r.label) for r in rows], dtype=torch.long)
        keep = all(_has_map(r) for r in rows)
        maps = torch.stack([torch.as_tensor(r.human_map).detach().cpu().float() for r in rows]).contiguous() if keep else None
    return ClassImages(images, labels, maps, list(indices))


def class_names(datamodule: Any, dataset: Any, num_classes: int) -> list[str]:
    """The data's class names where it has them (``class_names``), else the ids as text."""
    for source in (datamodule, dataset):
        names = getattr(source, "class_names", None)
        if names is not None and len(names) == num_classes:
            return [str(n) for n in names]
    return [str(c) for c in range(num_classes)]


# ----------------------------------------------------------------------------- logs → curves
def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _tensorboard_points(path: Path) -> Iterator[tuple[str, Any, Any]]:
    """``(tag, step, value)`` of every scalar in one TensorBoard event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in acc.Tags().get("scalars", []):
        for event in acc.Scalars(tag):
            yield tag, event.step, event.value


def _csv_points(path: Path) -> Iterator[tuple[str, Any, Any]]:
    """``(column, step, value)`` of every filled cell of a CSV logger's ``metrics.csv``."""
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            for name, value in row.items():
                if name is not None and value not in (None, ""):
                    yield name, row.get("step"), value


def _wandb_points(path: Path) -> Iterator[tuple[str, Any, Any]]:
    """``(key, step, value)`` of every numeric scalar of an offline W&B run."""
    for name, points in read_history(path).items():
        for step, value in points:
            yield name, step, value


# (file pattern, reader, what a source is called, what the reader may raise on a torn or foreign file)
_LOG_READERS = (
    ("events.out.tfevents.*", _tensorboard_points, "TensorBoard", (Exception,)),  # its own errors vary by version
    ("metrics.csv", _csv_points, "CSV", (OSError, csv.Error, UnicodeDecodeError)),
    ("run-*.wandb", _wandb_points, "W&B", (OSError, ValueError)),
)


def read_curves(logs: Path) -> dict[str, Any] | None:
    """Scalar series ``{name: [[step, value], ...]}`` from TensorBoard event files, CSV loggers'
    ``metrics.csv`` and offline W&B runs under ``logs`` (``None`` if none is found). A file that
    cannot be read is skipped with a warning: a torn log must not stop the atlas."""
    if not logs.is_dir():
        return None
    series: dict[str, dict[float, float]] = {}
    sources: list[str] = []
    for pattern, reader, kind, failures in _LOG_READERS:
        for path in sorted(logs.rglob(pattern)):
            found = False
            try:
                for name, step, value in reader(path):
                    s, v = _finite(step), _finite(value)
                    if s is not None and v is not None and name not in ("epoch", "step"):
                        series.setdefault(name, {})[s] = v
                        found = True
            except failures as error:
                rank_zero_warn(f"harmonia atlas: cannot read {kind} log {path}: {error}")
                continue
            if found:
                sources.append(f"{kind} {path if kind == 'CSV' else path.parent}")
    if not series:
        return None
    return {"source": "; ".join(sources),
            "series": {name: [[s, v] for s, v in sorted(points.items())] for name, points in sorted(series.items())}}


# ----------------------------------------------------------------------------- cache
def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (tuples → lists, other objects → their text)."""
    return json.loads(json.dumps(value, default=str))


def settings_dict(settings: Any) -> dict[str, Any]:
    """The analysis settings as a JSON object."""
    return _jsonable(dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(vars(settings)))


def cache_key(checkpoint_digest: str, settings: Any, class_id: int, images_digest: str, model: str = "",
              names: Sequence[str] = ()) -> str:
    """The cache key of one class's analysis: checkpoint content, settings, class, images, versions,
    and the classifier's hyperparameters (``model``: its penalty's saliency is analysed) and class names."""
    payload = {"cache": CACHE_VERSION, "schema": SCHEMA_VERSION, "checkpoint": checkpoint_digest,
               "settings": settings_dict(settings), "class": int(class_id), "images": images_digest, "model": model,
               "names": list(names)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def hparams_digest(classifier: nn.Module) -> str:
    """SHA-256 of a classifier's hyperparameters (architecture, objective, penalties) as JSON."""
    hparams = {k: v for k, v in dict(getattr(classifier, "hparams", {}) or {}).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(_jsonable(hparams), sort_keys=True).encode()).hexdigest()


class AnalysisCache:
    """``<out>/cache/<key>.pt``: one ``ClassAnalysis`` per file, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        """Where the analysis of ``key`` is kept."""
        return self.root / f"{key}.pt"

    def load(self, key: str) -> Any | None:
        """The cached analysis of ``key``, or None (a damaged file is ignored and recomputed)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - a torn file is recomputed, not fatal
            warnings.warn(f"harmonia atlas: ignoring damaged cache file {path} ({error})", stacklevel=2)
            return None

    def save(self, key: str, analysis: Any) -> None:
        """Keep ``analysis`` under ``key`` (a partial file never takes the final name)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        torch.save(analysis, tmp)
        os.replace(tmp, self.path(key))


# ----------------------------------------------------------------------------- the runner
def _analysis_module() -> Any:
    return importlib.import_module("harmonia.atlas.analysis")


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` (strict JSON: no NaN) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(document, indent=1, allow_nan=False))
    os.replace(tmp, path)


class _ClassIds(Dataset):
    """The class ids, one per predict step (Lightning's sampler shares them over the ranks)."""

    def __init__(self, classes: Sequence[int]) -> None:
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int) -> int:
        return self.classes[i]


@dataclass
class Job:
    """The models one atlas explains: this checkpoint, an optional compared one, a timeline."""

    main: Checkpoint
    compare: Checkpoint | None = None
    compare_label: str | None = None
    timeline: list[Checkpoint] = field(default_factory=list)


class AtlasRunner(pl.LightningModule):
    """Analyses one class per ``predict_step`` and writes its CLASS document and pictures.

    Holds the explained classifier (``classifier``: the ``AlignedClassifier``, whose penalty
    gives the analysis the saliency it was trained with), the compared one and a working copy
    into which each timeline checkpoint's weights are loaded in turn. Gradients are on inside
    the step (explanations differentiate w.r.t. the input); the weights are frozen.
    """

    def __init__(self, classifier: nn.Module, job: Job, images: dict[int, ClassImages], settings: Any,
                 names: list[str], out: Path, heldout: Callable[[nn.Module, torch.device], float | None] | None = None,
                 compare: nn.Module | None = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.compare = compare
        self.work = copy.deepcopy(classifier) if job.timeline else None
        for module in (self.classifier, self.compare, self.work):
            if module is not None:
                module.requires_grad_(False)
        self.job, self.images, self.settings, self.names, self.out = job, images, settings, names, out
        self.cache = AnalysisCache(out / "cache")
        self.heldout_fn = heldout
        self.heldout: float | None = None
        self.seconds: dict[str, float] = {}
        self._digests: dict[int, str] = {}  # per class, computed once (hashing every image is not free)
        self.analysed = 0  # analyses computed (after predict: by every rank together)
        self.cached = 0  # analyses read from the cache (likewise)

    def _tick(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - start
        return now

    def _donor_classes(self, c: int) -> list[int]:
        return [k for k in sorted(self.images) if k != c and self.images[k].maps is not None]

    def donors(self, c: int) -> tuple[Tensor, Tensor] | None:
        """Backgrounds for class ``c``'s background swap: mapped images of the *other* analysed
        classes with their maps, at most ``images × background_donors`` of them drawn without
        replacement (seeded by ``c``), gathered without copying every class's images (an atlas
        of many classes holds them all). ``None`` when no other class has maps."""
        others = self._donor_classes(c)
        sizes = torch.tensor([len(self.images[k].images) for k in others], dtype=torch.long)
        total = int(sizes.sum())
        if total == 0:
            return None
        count = len(self.images[c].images) * max(1, int(getattr(self.settings, "background_donors", 4)))
        generator = torch.Generator().manual_seed(int(c))
        picks = torch.randperm(total, generator=generator)[:count].sort().values
        which = torch.bucketize(picks, sizes.cumsum(0), right=True)  # the class of each pick
        rows = picks - (sizes.cumsum(0) - sizes)[which]
        images = torch.stack([self.images[others[w]].images[r] for w, r in zip(which.tolist(), rows.tolist())])
        maps = torch.stack([self.images[others[w]].maps[r] for w, r in zip(which.tolist(), rows.tolist())])
        return images, maps

    def _digest(self, c: int) -> str:
        if c not in self._digests:
            self._digests[c] = self.images[c].digest()
        return self._digests[c]

    def images_digest(self, c: int) -> str:
        """The cache key's image part: the class's images and those its background swap draws from."""
        parts = [self._digest(c)] + [f"{k}:{self._digest(k)}" for k in self._donor_classes(c)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def analysis(self, classifier: nn.Module, ckpt: Checkpoint, c: int) -> Any:
        """The class's analysis under ``ckpt`` from the cache, else computed and cached."""
        data = self.images[c]
        key = cache_key(ckpt.digest, self.settings, c, self.images_digest(c), hparams_digest(classifier), self.names)
        start = time.perf_counter()
        found = self.cache.load(key)
        if found is not None:
            self.cached += 1
            self._tick("cache", start)
            return found
        if classifier is self.work:
            _analysis_module().network(classifier).load_state_dict(ckpt.weights)
        device = self.device
        maps = data.maps.to(device) if data.maps is not None else None
        with torch.enable_grad():
            result = _analysis_module().analyze_class(classifier, data.images.to(device), data.labels.to(device), maps, c,
                                                      self.names[c], self.settings, self.names, donors=self.donors(c))
        start = self._tick("analysis", start)
        self.cache.save(key, result)
        self.analysed += 1
        self._tick("cache", start)
        return result

    def predict_step(self, batch: Tensor, batch_idx: int) -> list[int]:
        """Analyse the class(es) of ``batch``, write their CLASS documents; return their ids."""
        analysis = _analysis_module()
        for c in torch.as_tensor(batch).reshape(-1).tolist():
            job = self.job
            a = self.analysis(self.classifier, job.main, c)
            start = time.perf_counter()
            document = analysis.class_document(a, self.out, f"img/class/{c}")
            self._tick("documents", start)
            if job.compare is not None:
                b = self.analysis(self.compare, job.compare, c)
                start = time.perf_counter()
                document["compare"] = analysis.compare_section(a, b, job.compare_label, self.out, f"img/compare/class/{c}")
                self._tick("documents", start)
            if job.timeline:
                runs = [a if ckpt.digest == job.main.digest else self.analysis(self.work, ckpt, c) for ckpt in job.timeline]
                start = time.perf_counter()
                document["timeline"] = analysis.timeline_section(runs, [ckpt.info() for ckpt in job.timeline])
                self._tick("documents", start)
            start = time.perf_counter()
            name = f"data/class/{c}.json"
            validate(document, name)
            write_json(self.out / name, document)
            self._tick("documents", start)
        return torch.as_tensor(batch).reshape(-1).tolist()

    def concept_vectors(self, classes: Sequence[int]) -> list[Tensor | None]:
        """Each class's concept bank ``(k, channels)`` in rank order, read back from the cache that
        every rank wrote (``None`` for a class whose analysis is not there)."""
        vectors: list[Tensor | None] = []
        for c in classes:
            key = cache_key(self.job.main.digest, self.settings, c, self.images_digest(c), hparams_digest(self.classifier),
                            self.names)
            found = self.cache.load(key)
            components = getattr(found, "components", None)  # None: not cached, or an analysis without a bank
            vectors.append(None if components is None else components.float())
        return vectors

    def on_predict_end(self) -> None:
        """Rank zero scores the held-out split; then the ranks add up their counts, which also
        makes every rank wait until all documents are written."""
        if self.heldout_fn is not None and self.trainer.is_global_zero:
            start = time.perf_counter()
            self.heldout = self.heldout_fn(self.classifier, self.device)
            self._tick("heldout", start)
        counts = torch.tensor([self.analysed, self.cached], dtype=torch.long, device=self.device)
        self.analysed, self.cached = (int(n) for n in self.trainer.strategy.reduce(counts, reduce_op="sum").tolist())
        self.trainer.strategy.barrier("harmonia-atlas-documents")


def add_similar_concepts(documents: list[dict[str, Any]], vectors: list[Tensor | None], top: int = 3) -> bool:
    """Give every concept its ``similar`` list: the ``top`` concepts of *other* classes whose vectors
    (same model, same layer, so the same channels) have the largest cosine with it (LENS's
    "similar concepts"). ``vectors[i]`` is document ``i``'s ``(k, channels)`` bank in rank order;
    ``False`` (nothing changed) when a bank is missing or there is a single class."""
    if len(documents) < 2 or any(v is None for v in vectors):
        return False
    owners = [(d["class"]["id"], j) for d, v in zip(documents, vectors) for j in range(len(v))]
    bank = torch.nn.functional.normalize(torch.cat([v.double() for v in vectors]), dim=1)
    cosine = bank @ bank.T
    row = 0
    for d, v in zip(documents, vectors):
        own = d["class"]["id"]
        for j in range(len(v)):
            others = [(float(cosine[row, i]), owners[i]) for i in range(len(owners)) if owners[i][0] != own]
            others.sort(key=lambda t: -t[0])
            d["concepts"][j]["similar"] = [{"class": c, "concept": k, "cosine": round(value, 4)} for value, (c, k) in others[:top]]
            row += 1
    return True


def heldout_accuracy(datamodule: pl.LightningDataModule, limit: int) -> Callable[[nn.Module, torch.device], float | None]:
    """A function scoring a network's accuracy on the first ``limit`` images of the val split."""

    def score(model: nn.Module, device: torch.device) -> float | None:
        if limit <= 0:
            return None
        try:
            loader = _split_source(datamodule, "val")
        except AtlasError:
            return None
        finish = getattr(datamodule, "finish_batch", None)
        correct = seen = 0
        with torch.no_grad():
            for batch in loader:
                sample = as_sample(finish(batch, train=False) if callable(finish) else batch, "a val batch")
                take = min(len(sample.label), limit - seen)
                logits = model(torch.as_tensor(sample.image[:take]).float().to(device))
                correct += int((logits.argmax(1).cpu() == torch.as_tensor(sample.label[:take]).cpu()).sum())
                seen += take
                if seen >= limit:
                    break
        return correct / seen if seen else None

    return score


# ----------------------------------------------------------------------------- the index
def _weighted(values: list[tuple[float | None, int]]) -> float | None:
    """Mean of the known values weighted by their image counts (None when none is known)."""
    known = [(v, n) for v, n in values if v is not None]
    total = sum(n for _, n in known)
    return sum(v * n for v, n in known) / total if total else None


def _flags(class_id: int, concepts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"class": class_id, "concept": c["id"], "importance": c["importance"], "off_map_share": c["off_map_share"]}
            for c in concepts if c.get("flagged") and c.get("off_map_share") is not None]


def _background_flags(class_id: int, background: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not background or not background.get("flagged"):
        return []
    carrier = background.get("carrier")
    share = background["concept_share"][carrier] if carrier is not None else None
    return [{"class": class_id, **{k: background[k] for k in ("drop", "drop_interval", "accuracy", "swapped_accuracy")},
             "concept": carrier, "concept_share": share}]


def _certified_metrics(documents: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Certified accuracy at each ε over every analysed image (from the classes' sections)."""
    certified = [(d["certified"], d["n_images"]) for d in documents if d.get("certified")]
    if not certified:
        return None
    epsilons = certified[0][0]["epsilons"]
    total = sum(n for _, n in certified)
    accuracy = [sum(c["accuracy"][i] * n for c, n in certified) / total for i in range(len(epsilons))]
    return {"epsilons": epsilons, "accuracy": accuracy}


def index_document(*, model: nn.Module, main: Checkpoint, loaded: Loaded, settings: Any, documents: list[dict[str, Any]],
                   split: str, data_line: str, heldout: float | None, curves: dict[str, Any] | None,
                   compare: Checkpoint | None, compare_label: str | None, timeline: list[Checkpoint]) -> dict[str, Any]:
    """The INDEX document from the CLASS documents and the model/run facts."""
    hp = main.hparams
    arch = str(hp.get("arch") or getattr(loaded.module, "hparams", {}).get("arch", type(model).__name__))
    arch_args = _jsonable(hp.get("arch_args") or getattr(loaded.module, "hparams", {}).get("arch_args") or {})
    num_classes = int(hp.get("num_classes") or getattr(loaded.module, "hparams", {}).get("num_classes") or 0)
    weights = [(d["accuracy"], d["n_images"]) for d in documents]
    classes, flags, background_flags = [], [], []
    for d in documents:
        c = d["class"]["id"]
        top = d["concepts"][0] if d["concepts"] else None
        picture = (top.get("picture") or (top["crops"][0] if top["crops"] else None)) if top else None
        classes.append({"id": c, "name": d["class"]["name"], "page": f"class/{c}.html", "picture": picture,
                        "n_concepts": len(d["concepts"]), "n_important": d["n_important"], "accuracy": d["accuracy"],
                        "alignment": d["alignment"], "flagged": list(d["flags"]),
                        "background_drop": d["background"]["drop"] if d.get("background") else None})
        flags += _flags(c, d["concepts"])
        background_flags += _background_flags(c, d.get("background"))
    compare_summary = None
    if compare is not None:
        sections = [(d["compare"], d["n_images"]) for d in documents if d.get("compare")]
        compare_summary = {
            "label": compare_label, "checkpoint": str(compare.path),
            "accuracy": _weighted([(s["accuracy"], n) for s, n in sections]) or 0.0,
            "alignment": _weighted([(s["alignment"], n) for s, n in sections]),
            "flags": [f for d in documents if d.get("compare") for f in _flags(d["class"]["id"], d["compare"]["concepts"])],
            "background_flags": [f for d in documents if d.get("compare")
                                 for f in _background_flags(d["class"]["id"], d["compare"].get("background"))],
        }
    return {
        "schema": SCHEMA_VERSION,
        "kind": "index",
        "title": f"Atlas of {main.label}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"label": main.label, "arch": arch, "arch_args": arch_args, "num_classes": num_classes,
                  "parameters": int(sum(p.numel() for p in model.parameters())),
                  "lipschitz": getattr(model, "certificate", None) is not None, "checkpoint": str(main.path),
                  "epoch": main.epoch, "global_step": main.step, "config": loaded.config_text, "data": data_line},
        "metrics": {"split": split, "images": int(sum(d["n_images"] for d in documents)),
                    "accuracy": _weighted(weights) or 0.0,
                    "alignment": _weighted([(d["alignment"], d["n_images"]) for d in documents]),
                    "heldout_accuracy": heldout, "certified": _certified_metrics(documents)},
        "settings": settings_dict(settings),
        "classes": classes,
        "flags": flags,
        "background_flags": background_flags,
        "curves": curves,
        "compare": compare_summary,
        "timeline": {"page": "timeline.html", "checkpoints": [c.info() | {"checkpoint": str(c.path)} for c in timeline]}
        if timeline else None,
    }


def _data_line(datamodule: Any, split: str, images: dict[int, ClassImages]) -> str:
    """One line on the data: the module, its settings, the split and the images analysed."""
    hp = getattr(datamodule, "hparams", {}) or {}
    shown = ", ".join(f"{k}={v}" for k, v in hp.items() if not k.startswith("_") and not isinstance(v, (dict, list)))
    n = sum(len(v.labels) for v in images.values())
    mapped = sum(len(v.labels) for v in images.values() if v.maps is not None)
    return (f"{type(datamodule).__name__}({shown}); {split} split: {n} images of {len(images)} classes "
            f"({mapped} with human maps)")


# ----------------------------------------------------------------------------- the command
@dataclass
class AtlasResult:
    """What a build did: the folder, the index (rank zero), stage times, analyses run and reused."""

    out: Path
    index: dict[str, Any] | None
    seconds: dict[str, float]
    analysed: int
    cached: int
    pages: list[Path] = field(default_factory=list)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an atlas folder that already holds files (its cache aside) unless ``overwrite``."""
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != "cache") if out.is_dir() else []
    if held and not overwrite:
        raise AtlasError(f"--out {out} already holds files ({', '.join(held[:4])}); pass --overwrite to rebuild "
                         "the atlas there (its cache/ is reused)")
    if out.exists() and not out.is_dir():
        raise AtlasError(f"--out {out} is a file, not a folder")


def _clear_out(out: Path) -> None:
    """Remove the pages, documents and pictures of an earlier atlas in ``out`` (not its cache, nor other files)."""
    for name in _ATLAS_ENTRIES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _make_settings(options: argparse.Namespace, defaults: dict[str, Any]) -> Any:
    """``AtlasSettings`` from the configuration's defaults and the command line (which wins)."""
    cls = _analysis_module().AtlasSettings
    known = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in defaults.items() if k in known}
    given = {"layer": options.layer, "patch_size": options.patch_size, "n_concepts": options.n_concepts,
             "images_per_class": options.images_per_class, "maco": options.maco, "split": options.split}
    values.update({k: v for k, v in given.items() if v is not None})
    return cls(**values)


def _classes(given: list[int] | None, num_classes: int, ckpt: Checkpoint) -> list[int]:
    """The classes to analyse (default: all), each checked against the model's classes."""
    classes = list(dict.fromkeys(given)) if given else list(range(num_classes))
    for c in classes:
        if not 0 <= c < num_classes:
            raise AtlasError(f"class {c} is not a class of {ckpt.path} (its classes are 0..{num_classes - 1})")
    return classes


def build_atlas(argv: Sequence[str]) -> AtlasResult:
    """Run ``harmonia atlas`` with ``argv`` (no program name); ``AtlasError`` on bad input."""
    start = time.perf_counter()
    seconds: dict[str, float] = {}

    def tick(stage: str) -> None:
        nonlocal start
        now = time.perf_counter()
        seconds[stage] = seconds.get(stage, 0.0) + now - start
        start = now

    args = parse_args(argv)
    o = args.options
    rank_zero = rank_zero_only.rank == 0
    ckpt_path = Path(o.ckpt_path)
    main_ckpt = read_checkpoint(ckpt_path)
    run = run_of_checkpoint(ckpt_path)
    if o.config is not None:
        config = Path(o.config)
    elif run is not None:
        config = run / "config.yaml"
    else:
        raise AtlasError(f"no --config given and checkpoint {ckpt_path} is not in a run directory "
                         "(<run>/checkpoints/*.ckpt beside <run>/config.yaml); pass --config")
    out = Path(o.out) if o.out else (run / "atlas" if run is not None else ckpt_path.parent / "atlas")
    if rank_zero:
        _check_out(out, bool(o.overwrite))
    if main_ckpt.hparams.get("num_classes"):  # fail before the configuration is built
        _classes(o.classes, int(main_ckpt.hparams["num_classes"]), main_ckpt)
    loaded = load_config(config, args.overrides)
    module = loaded.module
    arch = getattr(module, "hparams", {}).get("arch")
    load_weights(module, main_ckpt, arch)
    module.eval()
    compare, compare_label = None, None
    if o.compare:
        compare_ckpt = read_checkpoint(o.compare)
        compare_label = o.compare_label or compare_ckpt.label
        compare = _classifier_for(compare_ckpt, module)
    else:
        compare_ckpt = None
    timeline = timeline_checkpoints(o.timeline) if o.timeline else []
    for ckpt in timeline:  # fail now on a checkpoint of another model, not after hours of analysis
        load_weights(copy.deepcopy(_analysis_module().network(module)), ckpt, arch)
    settings = _make_settings(o, loaded.concept_defaults)
    tick("load")

    num_classes = int(getattr(module, "hparams", {}).get("num_classes") or main_ckpt.hparams.get("num_classes") or 0)
    classes = _classes(o.classes, num_classes, main_ckpt)
    split = getattr(settings, "split", o.split)
    per_class = int(getattr(settings, "images_per_class", o.images_per_class or 20))
    images = select_images(loaded.datamodule, split, classes, per_class)
    names = class_names(loaded.datamodule, getattr(_split_source(loaded.datamodule, split), "dataset", None), num_classes)
    tick("images")

    job = Job(main_ckpt, compare_ckpt, compare_label, timeline)
    runner = AtlasRunner(module, job, images, settings, names, out, heldout_accuracy(loaded.datamodule, o.heldout_images),
                         compare)
    if rank_zero:  # before predict starts the other ranks, which write into it
        _clear_out(out)
    trainer = pl.Trainer(**loaded.trainer, logger=False, enable_checkpointing=False, enable_model_summary=False,
                         inference_mode=False, default_root_dir=str(out), use_distributed_sampler=True)
    trainer.predict(runner, DataLoader(_ClassIds(classes), batch_size=1), return_predictions=False)
    tick("predict")
    seconds.update({f"predict/{stage}": t for stage, t in runner.seconds.items()})  # parts of "predict"
    if not trainer.is_global_zero:
        return AtlasResult(out, None, seconds, runner.analysed, runner.cached)

    documents = [json.loads((out / "data" / "class" / f"{c}.json").read_text()) for c in classes]
    start = time.perf_counter()
    if add_similar_concepts(documents, runner.concept_vectors(classes)):
        for c, document in zip(classes, documents):
            validate(document, f"data/class/{c}.json")
            write_json(out / "data" / "class" / f"{c}.json", document)
    seconds["similar"] = time.perf_counter() - start
    logs = Path(o.logs) if o.logs else run
    curves = read_curves(logs) if logs is not None else None
    index = index_document(model=_analysis_module().network(module), main=main_ckpt, loaded=loaded, settings=settings,
                           documents=documents, split=split, data_line=_data_line(loaded.datamodule, split, images), heldout=runner.heldout,
                           curves=curves, compare=compare_ckpt, compare_label=compare_label, timeline=timeline)
    validate(index, "data/atlas.json")
    write_json(out / "data" / "atlas.json", index)
    tick("index")
    pages = importlib.import_module("harmonia.atlas.render").render_site(out)
    tick("render")
    return AtlasResult(out, index, seconds, runner.analysed, runner.cached, list(pages or []))


def _classifier_for(ckpt: Checkpoint, module: nn.Module) -> nn.Module:
    """The classifier of a compared checkpoint as it was trained (Lightning rebuilds it from its
    hyperparameters: its own penalty gives its training saliency); when that fails (e.g. weights
    it would download) and the architecture is ``module``'s, a copy of ``module`` with its weights."""
    hp = getattr(module, "hparams", {})
    try:
        return type(module).load_from_checkpoint(str(ckpt.path), map_location="cpu", weights_only=False).eval()
    except Exception as error:  # noqa: BLE001 - any failure to rebuild is the checkpoint's problem
        if not all(ckpt.hparams.get(k, hp.get(k)) == hp.get(k) for k in ("arch", "arch_args", "num_classes")):
            raise AtlasError(f"checkpoint {ckpt.path}: cannot rebuild its {ckpt.hparams.get('arch')!r} model: "
                             f"{type(error).__name__}: {' '.join(str(error).split())[:300]}") from None
    classifier = copy.deepcopy(module)
    load_weights(classifier, ckpt, hp.get("arch"))
    return classifier.eval()


def main(argv: Sequence[str] | None = None) -> None:
    """``harmonia atlas ...``: build the atlas; bad input exits with a one-line error (status 2)."""
    try:
        result = build_atlas(sys.argv[1:] if argv is None else argv)
    except AtlasError as error:
        sys.stderr.write(f"error: harmonia atlas: {error}\n")
        sys.exit(2)
    if result.index is not None:
        print(f"atlas of {len(result.index['classes'])} classes ({result.analysed} analysed, {result.cached} from "
              f"the cache, {len(result.index['flags'])} flagged concepts, {len(result.index['background_flags'])} "
              f"background-reliant classes): {result.out / 'index.html'}", flush=True)
