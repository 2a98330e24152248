"""The ``harmonia`` command: LightningCLI (``fit``/``validate``/``test``/``predict``) + ``models``, ``convert``, ``atlas``.

    harmonia fit --config configs/digits.yaml [--trainer.max_epochs 5]   # a new run directory
    harmonia fit --config configs/digits.yaml --ckpt_path last           # resume the latest run
    harmonia test --config configs/digits.yaml --ckpt_path best          # best.ckpt of the latest run
    harmonia predict --config configs/digits.yaml --ckpt_path best       # predictions.csv
    harmonia models                                                      # registered architectures
    harmonia models 'timm/*vit*'                                         # ... matching a pattern
    harmonia convert SOURCE OUT                                          # folder / ClickMe records → tar shards
    harmonia atlas --ckpt_path runs/digits/latest/checkpoints/best.ckpt  # explanation atlas (static site)

Run directories. Every ``fit`` writes into a directory of its own,
``<trainer.default_root_dir>/<config name>/<YYYY-mm-dd_HH-MM-SS>/`` (default root ``runs``; config
name = the first ``--config`` file's stem), and points ``<root>/<config name>/latest`` at it. Inside:
``config.yaml`` (the full configuration), ``checkpoints/`` (every ``ModelCheckpoint`` without its own
``dirpath``) and the logger's files (a logger whose ``save_dir`` is left at ``runs`` writes there).
``--ckpt_path last`` resumes the latest run inside its own directory, and a ``--ckpt_path`` file under
``<run>/checkpoints/`` resumes that run. ``validate``/``test``/``predict`` write into a fresh
``<run>/<subcommand>-<time>/`` of the checkpoint's run (or a new directory for a checkpoint from
elsewhere); ``--ckpt_path best``/``last`` name the latest run's ``best.ckpt``/``last.ckpt``. Nothing
writes into a directory that already holds files of another run unless ``--overwrite true``;
``--run_dir`` picks the directory by hand.

Checkpoints are written atomically and a failed save stops the run at once
(:mod:`harmonia.checkpoint_io`); an unwritable checkpoint directory fails before the first step.

After ``fit`` the best (else last) checkpoint is tested (``--test_after_fit false`` skips it) and a
summary is printed: validation and test numbers of that same checkpoint, the epoch and step it was
saved at, and where the run's files are.

``--trainer.limit_{train,val,test,predict}_batches``, ``overfit_batches`` and ``val_check_interval``
read an integer as a number of batches and a value with a decimal point as a fraction
(``1`` = one batch, ``1.0`` = all), as Lightning's Python API does.

On glibc the command first makes malloc keep freed memory for reuse (``harmonia.allocator``:
no per-step page faults); ``HARMONIA_MALLOC=system`` leaves malloc alone.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import time
from pathlib import Path
from typing import IO, Any, NoReturn, Optional, Union

import pytorch_lightning as pl
import torch
from jsonargparse import DefaultHelpFormatter, Namespace
from pytorch_lightning.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.plugins.io import CheckpointIO
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from harmonia.allocator import retain_freed_memory
from harmonia.checkpoint_io import CheckpointDirectoryCheck, SafeCheckpointIO
from harmonia.models import list_models
from harmonia.module import AlignedClassifier

ROOT_DEFAULT = "runs"
DEFAULT_LOGGER = {
    "class_path": "pytorch_lightning.loggers.WandbLogger",
    # save_dir "runs" (the root) means "the run directory": the CLI puts it there.
    "init_args": {"offline": True, "save_dir": ROOT_DEFAULT, "project": "harmonia"},
}
# Trainer options where an int counts batches and a float is a fraction. Lightning's signature
# lists float first, so the parser would read "--trainer.limit_train_batches 1" as 1.0 (= all).
BATCH_COUNT_OPTIONS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                       "overfit_batches", "val_check_interval")
_RUN_DIR_ENV = "HARMONIA_RUN_DIR"  # hands rank zero's run directory to the DDP processes it launches
OTHER_COMMANDS = """other commands:
  models [PATTERN]      list the registered architectures (shell-style PATTERN, e.g. 'timm/*vit*')
  convert SOURCE OUT    convert a folder with index.csv or ClickMe TFRecords into tar shards
                        (harmonia convert --help)
  atlas --ckpt_path CKPT
                        the explanation atlas of a checkpoint, a static site (harmonia atlas --help)"""


# ----------------------------------------------------------------------------- config errors
_GENERIC_ERRORS = ("Not a valid subclass of", "Expected a <class 'NoneType'>", "Subclass types expect",
                   "- a class path", "- a dict ")


def config_error_headline(message: str) -> str:
    """The one line of a jsonargparse error that says what is wrong (option, class, reason)."""
    lines = [line.rstrip() for line in message.splitlines() if line.strip()]
    if not lines:
        return message
    key = ""
    match = re.match(r'\s*Parser key "([^"]+)":?\s*(.*)', lines[0])
    if match:
        key = match.group(1)
    for i, line in enumerate(lines):
        text = line.strip().lstrip("- ").strip()
        problem = re.match(r"Problem with given class_path '([^']+)':?\s*(.*)", text)
        if problem:
            reason = problem.group(2) or (lines[i + 1].strip().lstrip("- ") if i + 1 < len(lines) else "")
            return ": ".join(part for part in (key, problem.group(1), reason) if part)
    in_errors = False
    for line in lines:
        text = line.strip()
        if text.startswith("Errors:"):
            in_errors = True
            continue
        if in_errors and text.startswith("- ") and not any(g in text for g in _GENERIC_ERRORS):
            return ": ".join(part for part in (key, text[2:]) if part)
    first = lines[0].strip()
    if match and match.group(2):
        return f"{key}: {match.group(2)}"
    if match and len(lines) > 1:
        return f"{key}: {lines[1].strip()}"
    return first


def _shorten_values(message: str, limit: int = 300) -> str:
    """Cut the ``Given value: ...`` dumps (whole callback lists) of a jsonargparse error."""
    out = []
    for line in message.splitlines():
        if line.strip().startswith("Given value:") and len(line) > limit:
            line = line[:limit] + " …"
        out.append(line)
    return "\n".join(out)


class HarmoniaArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors start with the line that matters.

    jsonargparse prints the whole usage (several KB) and then a nested error; here the first line
    is ``error: <option>: <class>: <reason>``, followed by the details and a pointer to ``--help``.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print the headline, the (shortened) details and the help hint; exit with status 2."""
        if not self.exit_on_error:
            super().error(message, ex)
        headline = config_error_headline(message)
        sys.stderr.write(f"error: {headline}\n")
        if headline.strip() != message.strip():
            sys.stderr.write(f"\ndetails:\n{_shorten_values(message)}\n")
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        sys.stderr.write(f"\nfor the accepted options run: {prog} --help\n")
        sys.exit(2)


class _RawEpilogFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help formatter that keeps the epilog's line breaks (the ``models``/``convert`` list)."""


def _retype_batch_counts(parser: LightningArgumentParser) -> None:
    """Make the parser keep an integer batch count an int (see ``BATCH_COUNT_OPTIONS``)."""
    for name in BATCH_COUNT_OPTIONS:
        action = parser._option_string_actions.get(f"--trainer.{name}")  # noqa: SLF001 - no public setter
        if action is not None and hasattr(action, "_typehint"):
            action._typehint = Optional[Union[int, float]]  # noqa: SLF001


# ----------------------------------------------------------------------------- run directories
def _config_name(config: Namespace) -> str:
    """The stem of the first ``--config`` file (a run's own ``config.yaml``: that run's config name),
    or ``harmonia`` without one."""
    for path in config.get("config") or []:
        if path is not None:
            file = Path(str(getattr(path, "absolute", path)))
            if file.name == "config.yaml" and (file.parent / "checkpoints").is_dir():
                return file.resolve().parent.parent.name
            return file.stem or "harmonia"
    return "harmonia"


def _new_run_dir(parent: Path, suffix: str = "", create: bool = True) -> Path:
    """A new directory ``parent/<time stamp><suffix>`` (``_2``, ``_3``... on a clash), created atomically."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + suffix
    for attempt in range(1, 1000):
        candidate = parent / (stamp if attempt == 1 else f"{stamp}_{attempt}")
        if not create:
            if not candidate.exists():
                return candidate
            continue
        parent.mkdir(parents=True, exist_ok=True)
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run directory under {parent}")


def _point_latest(parent: Path, run_dir: Path) -> None:
    """Atomically point ``parent/latest`` at ``run_dir`` (a relative symlink)."""
    link = parent / "latest"
    tmp = parent / f".latest.{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError as error:  # e.g. no symlinks on this filesystem: runs still work, `last` does not
        rank_zero_warn(f"could not point {link} at {run_dir}: {error}; `--ckpt_path last` will not find this run")


def _latest_run(parent: Path) -> Path | None:
    """The run ``parent/latest`` points at, if any."""
    link = parent / "latest"
    return link.resolve() if link.is_dir() else None


def _run_of_checkpoint(ckpt: Path) -> Path | None:
    """``<run>`` for a checkpoint ``<run>/checkpoints/x.ckpt`` of a Harmonia run directory."""
    ckpt = ckpt.resolve()
    run = ckpt.parent.parent
    if ckpt.parent.name == "checkpoints" and (run / "config.yaml").is_file():
        return run
    return None


def _entries(value: Any) -> list:
    """A config value that may be one item, a list of items or None, as a list."""
    if value is None or value is False or value is True:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _is_subclass(class_path: str, base: type) -> bool:
    """Whether the class at ``class_path`` is ``base`` or a subclass of it."""
    from jsonargparse._util import import_object  # noqa: PLC0415 - jsonargparse's own resolver

    try:
        cls = import_object(class_path)
    except Exception:  # noqa: BLE001 - an unknown class is reported by the parser, not here
        return False
    return isinstance(cls, type) and issubclass(cls, base)


def _holds_files(directory: Path) -> list[str]:
    """Names of the non-hidden entries of ``directory`` (empty if it does not exist)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


class RunConfigSaver(SaveConfigCallback):
    """Save the full configuration into the run directory (``trainer.default_root_dir``), never over a file.

    A resumed fit (``config.yaml`` already there) writes ``config.resumed-<time>.yaml`` beside it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Write ``config.yaml`` (rank zero only; Lightning calls this on rank zero)."""
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / self.config_filename
        if path.exists():
            path = run_dir / f"config.resumed-{time.strftime('%Y-%m-%d_%H-%M-%S')}.yaml"
        self.parser.save(self.config, path, skip_none=False, overwrite=False, multifile=self.multifile)


# ----------------------------------------------------------------------------- predictions
class PredictionCSVWriter(BasePredictionWriter):
    """Write one CSV row per predicted sample: sample, label (if known), predicted class, probabilities.

    ``sample`` is the dataset's own description of the sample where it has one (file and line or
    record), else its index. Under several processes each writes ``<stem>.rank<r>.csv``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self.rows = 0
        self._file: IO[str] | None = None
        self._writer: Any = None
        self._dataset: Any = None
        self._next_index = 0

    def _output(self, trainer: pl.Trainer) -> Path:
        if trainer.world_size > 1:
            return self.path.with_name(f"{self.path.stem}.rank{trainer.global_rank}{self.path.suffix}")
        return self.path

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Open the output file and find the dataset (for sample descriptions)."""
        loaders = trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        self._dataset = getattr(loader, "dataset", None)
        out = self._output(trainer)
        out.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(out, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in on_predict_end
        self._writer = None
        self.rows = 0

    def _sample_name(self, index: int) -> str:
        where = getattr(self._dataset, "where", None)
        if callable(where):
            try:
                return str(where(index))
            except Exception:  # noqa: BLE001 - a dataset without a description for this index
                pass
        return str(index)

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        """Append the rows of one batch."""
        if isinstance(prediction, dict):
            probs = prediction.get("probs")
            if probs is None:
                probs = prediction["logits"].float().softmax(-1)
        else:
            probs = prediction.float().softmax(-1)
        probs = probs.detach().float().cpu()
        predicted = probs.argmax(-1)
        labels = getattr(batch, "label", None)
        if labels is None and isinstance(batch, (tuple, list)) and len(batch) == 4:
            labels = batch[3]
        labels = labels.detach().cpu().tolist() if isinstance(labels, torch.Tensor) else [None] * len(probs)
        indices = list(batch_indices) if batch_indices is not None and len(batch_indices) == len(probs) else \
            list(range(self._next_index, self._next_index + len(probs)))
        self._next_index += len(probs)
        if self._writer is None:
            self._writer = csv.writer(self._file)
            self._writer.writerow(["sample", "label", "predicted", *(f"prob_{k}" for k in range(probs.shape[1]))])
        for index, label, pred, row in zip(indices, labels, predicted.tolist(), probs.tolist()):
            known = label is not None and label >= 0
            self._writer.writerow([self._sample_name(int(index)), label if known else "", pred,
                                   *(f"{p:.6g}" for p in row)])
        self.rows += len(probs)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the file and say where it is."""
        if self._file is not None:
            self._file.close()
            self._file = None
        print(f"predictions of {self.rows} samples written to {self._output(trainer)}", flush=True)


# ----------------------------------------------------------------------------- the CLI
class _ValidationRecord(pl.Callback):
    """Validation metrics of every validation run during fit, keyed by the global step (the step a
    checkpoint saved at that validation records), so the summary reports the tested checkpoint's own."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, float]] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the ``val/*`` scalars of this validation run."""
        if not trainer.sanity_checking:
            self.by_step[trainer.global_step] = {k: v for k, v in _scalars(trainer.callback_metrics).items()
                                                 if k.startswith("val/")}


class HarmoniaCLI(LightningCLI):
    """LightningCLI with Harmonia's defaults, run directories, safe checkpoints and an end-of-fit summary."""

    run_dir: Path
    resumed: bool = False

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add Harmonia's run options and default to the embedded decoy-digits data."""
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="After fit, test the best checkpoint and print a summary table.",
        )
        parser.add_argument(
            "--run_dir", type=Optional[str], default=None,
            help="Directory of this run (config.yaml, checkpoints/, logs). Default: a new "
                 "<trainer.default_root_dir>/<config name>/<time>/ for fit, <run>/<subcommand>-<time>/ otherwise.",
        )
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="Allow writing into a run directory, checkpoint directory or --predict_output that already holds files.",
        )
        parser.add_argument(
            "--predict_output", type=Optional[str], default=None,
            help="predict: CSV file of the predictions (default <run dir>/predictions.csv).",
        )
        parser.set_defaults({"data": {"class_path": "harmonia.data.DecoyDigitsDataModule"}})
        if "--return_predictions" in parser._option_string_actions:  # noqa: SLF001 - predict only
            parser.set_defaults({"return_predictions": False})  # they go to the CSV, not into memory
        _retype_batch_counts(parser)

    # -- run directory -------------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        """Choose the run directory and point checkpoints, logs and the saved config into it."""
        sub = self.subcommand
        self._new_fit = False
        # config.yaml records the configuration as given (root "runs", no run paths), so that
        # `harmonia fit --config <run>/config.yaml` reproduces the run in a new directory.
        cfg = self.config[sub] if sub else self.config  # no subcommand: cli_main(run=False)
        self._given_config = cfg.clone()
        trainer = cfg.trainer
        root = Path(trainer.get("default_root_dir") or ROOT_DEFAULT)
        parent = root / _config_name(cfg)
        rank_zero = rank_zero_only.rank == 0
        ckpt_path = cfg.get("ckpt_path")
        self.resumed = False

        if not rank_zero and os.environ.get(_RUN_DIR_ENV):  # a process launched by rank zero's DDP
            run_dir = Path(os.environ[_RUN_DIR_ENV])
            self.resumed = sub == "fit" and ckpt_path is not None
        elif sub is None:  # built for the Python API: name the directory, create it only if used
            run_dir = Path(cfg.run_dir) if cfg.get("run_dir") else _new_run_dir(parent, create=False)
        elif sub == "fit":
            run_dir = self._fit_run_dir(cfg, parent, ckpt_path, rank_zero)
        else:
            run_dir = self._eval_run_dir(cfg, parent, ckpt_path, sub, rank_zero)
        self.run_dir = run_dir
        if rank_zero and sub is not None:
            os.environ[_RUN_DIR_ENV] = str(run_dir)
        trainer.default_root_dir = str(run_dir)

        for logger in _entries(trainer.get("logger")):
            init = logger.get("init_args") if isinstance(logger, Namespace) else None
            if init is not None and "save_dir" in init and (
                init.save_dir is None or os.path.normpath(str(init.save_dir)) in (ROOT_DEFAULT, os.path.normpath(str(root)))
            ):
                init.save_dir = str(run_dir)

        user_dirs = []
        for callback in _entries(trainer.get("callbacks")):
            if isinstance(callback, Namespace) and _is_subclass(callback.class_path, ModelCheckpoint):
                init = callback.get("init_args")
                if init is None:
                    callback.init_args = init = Namespace()
                if init.get("dirpath") is None:
                    init.dirpath = str(run_dir / "checkpoints")
                else:
                    user_dirs.append(Path(init.dirpath))
        if sub == "fit" and rank_zero and not self.resumed and not cfg.overwrite:
            for dirpath in user_dirs:
                old = [n for n in _holds_files(dirpath) if n.endswith(".ckpt")]
                if old:
                    self._refuse(f"ModelCheckpoint dirpath {dirpath} already holds checkpoints of another run "
                                 f"({', '.join(old[:4])}); give another dirpath, resume with --ckpt_path, "
                                 "or pass --overwrite true to replace them")

    def _refuse(self, message: str) -> NoReturn:
        """Stop with a one-line configuration error."""
        self.parser.error(message)

    def _fit_run_dir(self, cfg: Namespace, parent: Path, ckpt_path: str | None, rank_zero: bool) -> Path:
        """The run directory of a fit: resumed, given, or new (and made ``latest``)."""
        if cfg.run_dir:
            run_dir = Path(cfg.run_dir)
            self.resumed = ckpt_path is not None
            if rank_zero and not self.resumed and not cfg.overwrite and _holds_files(run_dir):
                self._refuse(f"--run_dir {run_dir} already holds files of another run "
                             f"({', '.join(_holds_files(run_dir)[:4])}); choose a new directory or pass --overwrite true")
            return run_dir
        if ckpt_path == "last":
            latest = _latest_run(parent)
            if latest is not None:
                self.resumed = True
                rank_zero_info(f"Resuming the latest run {latest}")
                return latest
            rank_zero_warn(f"--ckpt_path last: no earlier run under {parent}; starting a new run")
        elif ckpt_path is not None and Path(ckpt_path).is_file():
            run = _run_of_checkpoint(Path(ckpt_path))
            if run is not None:
                self.resumed = True
                rank_zero_info(f"Resuming run {run}")
                return run
        self._new_fit = True  # made `latest` in before_fit, once the configuration has instantiated
        return _new_run_dir(parent, create=rank_zero)

    def _eval_run_dir(self, cfg: Namespace, parent: Path, ckpt_path: str | None, sub: str, rank_zero: bool) -> Path:
        """The directory of a validate/test/predict: inside the checkpoint's run, never over its files."""
        if ckpt_path in ("best", "last"):
            latest = _latest_run(parent)
            candidate = latest / "checkpoints" / f"{ckpt_path}.ckpt" if latest is not None else None
            if candidate is None or not candidate.is_file():
                self._refuse(f"--ckpt_path {ckpt_path}: no {ckpt_path}.ckpt in the latest run under {parent} "
                             f"({latest or 'no run yet'}); give the checkpoint's path")
            cfg.ckpt_path = ckpt_path = str(candidate)
        if cfg.run_dir:
            run_dir = Path(cfg.run_dir)
            if rank_zero and not cfg.overwrite and _holds_files(run_dir):
                self._refuse(f"--run_dir {run_dir} already holds files ({', '.join(_holds_files(run_dir)[:4])}); "
                             "choose a new directory or pass --overwrite true")
            return run_dir
        run = _run_of_checkpoint(Path(ckpt_path)) if ckpt_path else None
        if run is not None:
            return run / f"{sub}-{self._stamp(run, sub, rank_zero)}"
        return _new_run_dir(parent, suffix=f"_{sub}", create=rank_zero)

    @staticmethod
    def _stamp(run: Path, sub: str, rank_zero: bool) -> str:
        """A fresh ``<time>`` (``_2``... on a clash) for ``run/<sub>-<time>``; created on rank zero."""
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        for attempt in range(1, 1000):
            name = stamp if attempt == 1 else f"{stamp}_{attempt}"
            try:
                if rank_zero:
                    (run / f"{sub}-{name}").mkdir()
                return name
            except FileExistsError:
                continue
        raise RuntimeError(f"could not create a new directory under {run}")

    # -- instantiation -------------------------------------------------------------------------
    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does; an argument a class rejects becomes a one-line error."""
        try:
            super().instantiate_classes()
        except BaseException as error:
            if rank_zero_only.rank == 0 and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()  # nothing ran: leave no empty run behind
            if isinstance(error, ValueError) and ("Subtypes:" in str(error) or "Problem with given class_path" in str(error)):
                self._refuse(str(error))
            raise

    def before_fit(self) -> None:
        """Point ``<root>/<config>/latest`` at a new run once it is about to start."""
        if self._new_fit and rank_zero_only.rank == 0:
            _point_latest(self.run_dir.parent, self.run_dir)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Add the safe checkpoint writer, the directory check, the predictions writer; drop
        ``LearningRateMonitor`` without a logger (it would refuse to start)."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        plugins = _entries(trainer_config.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())
        kwargs["plugins"] = plugins
        callbacks = _entries(trainer_config.get("callbacks"))
        if not trainer_config.get("logger"):
            dropped = [c for c in callbacks if isinstance(c, LearningRateMonitor)]
            if dropped:
                rank_zero_info("LearningRateMonitor left out: it needs a logger and this run has none")
                callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        callbacks.append(CheckpointDirectoryCheck())
        if self.subcommand == "fit":
            self._validation_record = _ValidationRecord()
            callbacks.append(self._validation_record)
        if self.subcommand == "predict":
            out = Path(self._get(self.config, "predict_output") or self.run_dir / "predictions.csv")
            if rank_zero_only.rank == 0 and out.exists() and not self._get(self.config, "overwrite"):
                self._refuse(f"--predict_output {out} already exists; choose another file or pass --overwrite true")
            callbacks.append(PredictionCSVWriter(out))
        kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.callbacks:
            if isinstance(callback, RunConfigSaver):
                callback.config = self._given_config
        return trainer

    # -- after fit -----------------------------------------------------------------------------
    def after_fit(self) -> None:
        """Validate (from the fit's own records when possible) and test the best (else last)
        checkpoint, then print the run summary."""
        if os.environ.get(_RUN_DIR_ENV) == str(self.run_dir) and rank_zero_only.rank == 0:
            os.environ.pop(_RUN_DIR_ENV, None)  # a later in-process fit must not reuse this run
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        if self.trainer.interrupted:
            return
        trainer = self.trainer
        ckpt, which = _best_or_last(trainer)
        fit_metrics = _scalars(trainer.callback_metrics)  # validate()/test() reset them
        steps, epochs = trainer.global_step, trainer.current_epoch
        saved = _checkpoint_position(ckpt)
        metrics = {k: v for k, v in fit_metrics.items() if k.startswith("train/")}
        record = getattr(self, "_validation_record", None)
        val = record.by_step.get(saved[1]) if record is not None and saved is not None else None
        if ckpt is None:  # weights in memory: the last validation is theirs
            val = {k: v for k, v in fit_metrics.items() if k.startswith("val/")}
        if val is None:
            results = trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=ckpt, verbose=False)
            val = _scalars(results[0] if results else {})
        metrics.update(val)
        results = trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, verbose=False)
        metrics.update(_scalars(results[0] if results else {}))
        print_summary(self.model, self.datamodule, metrics, steps, epochs, ckpt, which, saved,
                      str(self.run_dir), _log_location(trainer))


def _best_or_last(trainer: pl.Trainer) -> tuple[str | None, str]:
    """The checkpoint the summary tests, and why it was chosen."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.best_model_path:
            return callback.best_model_path, f"best by {callback.monitor}" if callback.monitor else "latest save"
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
            return callback.last_model_path, "last"
    return None, "weights in memory"


def _checkpoint_position(ckpt: str | None) -> tuple[int, int] | None:
    """``(epoch, global_step)`` stored in a checkpoint (memory-mapped: the weights are not read)."""
    if ckpt is None:
        return None
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - the summary then says the position is unknown
        return None
    return int(state.get("epoch", -1)), int(state.get("global_step", -1))


def _log_location(trainer: pl.Trainer) -> str:
    logger = trainer.logger
    if logger is None:
        return "(no logger)"
    for attr in ("log_dir", "save_dir"):
        value = getattr(logger, attr, None)
        if value:
            name = type(logger).__name__
            if name == "WandbLogger":
                try:  # the offline run folder, which `wandb sync` can upload later
                    return f"{logger.experiment.dir.rsplit('/files', 1)[0]} (W&B offline)"
                except Exception:  # noqa: BLE001 - disabled runs have no folder
                    pass
            return f"{value} ({name})"
    return type(logger).__name__


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def _describe_model(module: pl.LightningModule) -> str:
    """Architecture, objective and penalties (with their weights) in one line."""
    describe = getattr(module, "describe", None)
    return describe() if callable(describe) else type(module).__name__


@rank_zero_only
def print_summary(module: pl.LightningModule, datamodule: Any, metrics: dict[str, float], steps: int, epochs: int,
                  ckpt: str | None, which: str, saved: tuple[int, int] | None, run_dir: str, logs: str) -> None:
    """Print the end-of-run table (rank zero only): validation and test numbers of one checkpoint."""
    from harmonia.data import DecoyDigitsDataModule  # noqa: PLC0415 - harmonia.data imports are heavy

    def fmt(key: str, pct: bool = False) -> str:
        if key not in metrics:
            return "n/a"
        return f"{100 * metrics[key]:.2f}%" if pct else f"{metrics[key]:.5f}"

    def accuracy(stage: str) -> str:
        text = fmt(f"{stage}/acc", True)
        if f"{stage}/acc_macro" in metrics:
            text += f" (class-mean {fmt(f'{stage}/acc_macro', True)})"
        return text

    test_name = "test accuracy (decoy-free)" if isinstance(datamodule, DecoyDigitsDataModule) else "test accuracy"
    if ckpt is None:
        position = "(none: weights in memory)"
    else:
        where = f"epoch {saved[0] + 1} of {epochs}, step {saved[1]}" if saved else "epoch unknown"
        position = f"{ckpt} ({which}; saved in {where})"
    rows = [
        ("model", _describe_model(module)),
        ("epochs / optimizer steps", f"{epochs} / {steps}"),
        ("checkpoint evaluated", position),
        ("validation accuracy", accuracy("val")),
        (test_name, accuracy("test")),
    ]
    for key, label in (("harmonization", "harmonization loss"), ("rrr", "RRR penalty"), ("objective", "objective")):
        if f"test/{key}" in metrics:
            rows.append((f"val / test {label}", f"{fmt(f'val/{key}')} / {fmt(f'test/{key}')}"))
    train_key = "train/acc_epoch" if "train/acc_epoch" in metrics else "train/acc"
    rows += [
        ("train accuracy (last epoch)", fmt(train_key, True)),
        ("run directory", run_dir),
        ("logs", logs),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    print(f"\n{line}\nHarmonia run summary\n{line}")
    for key, value in rows:
        print(f"{key:<{width}} : {value}")
    print(line, flush=True)


def cli_main(args: list[str] | None = None, run: bool = True) -> HarmoniaCLI:
    """Build (and by default run) the Lightning CLI; ``args`` replaces ``sys.argv[1:]``."""
    return HarmoniaCLI(
        AlignedClassifier,
        pl.LightningDataModule,
        subclass_mode_data=True,
        parser_class=HarmoniaArgumentParser,
        parser_kwargs={"epilog": OTHER_COMMANDS, "formatter_class": _RawEpilogFormatter},
        trainer_defaults={"inference_mode": False, "logger": DEFAULT_LOGGER, "default_root_dir": ROOT_DEFAULT},
        save_config_callback=RunConfigSaver,
        auto_configure_optimizers=False,  # the optimizer is a model argument (param groups)
        args=args,
        run=run,
    )


def models_main(argv: list[str]) -> None:
    """``harmonia models [PATTERN]``: the registered architectures."""
    parser = argparse.ArgumentParser(prog="harmonia models", description="List the registered architectures.")
    parser.add_argument("pattern", nargs="?", default=None,
                        help="shell-style pattern, e.g. 'resnet*' or 'timm/*vit*' (default: every family)")
    args = parser.parse_args(argv)
    found = list_models(args.pattern)
    if not found:
        raise SystemExit(f"harmonia models: no registered model matches {args.pattern!r} "
                         "(`harmonia models` lists them all; timm names need the 'timm/' prefix)")
    for name, description in found.items():
        print(f"{name:<20} {description}")


def main() -> None:
    """Entry point of the ``harmonia`` console script."""
    if len(sys.argv) > 1 and sys.argv[1] == "models":
        models_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "convert":
        from harmonia.data.convert import main as convert_main

        convert_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "atlas":
        from harmonia.atlas.command import main as atlas_main

        retain_freed_memory()
        atlas_main(sys.argv[2:])
        return
    retain_freed_memory()  # before the first large allocation; see harmonia/allocator.py
    cli_main()


if __name__ == "__main__":
    main()
