"""``FinetuningSchedule``: freeze and unfreeze parts of the model by epoch, from YAML.

    trainer:
      callbacks:
        - class_path: harmonia.callbacks.FinetuningSchedule
          init_args:
            unfreeze: {0: [head], 2: [net.layer4], 4: [all]}   # epoch -> parts that start training
            train_bn: true

Parts are those of ``harmonia.models.parts`` (``head``, ``backbone``, ``all`` or a module name of
``AlignedClassifier.model``). Before the first listed epoch nothing may be frozen-only, so the
schedule must start at epoch 0.

A subclass of Lightning's ``BaseFinetuning`` (its ``freeze``/``make_trainable`` helpers, BatchNorm
handling included), which differs from Lightning's ``BackboneFinetuning`` on purpose:

- **Every parameter is in the optimizer from the start**, frozen ones included (they have no
  gradient, so SGD/Adam skip them and no weight decay touches them). ``BackboneFinetuning`` adds
  a param group on unfreezing: that group escapes the decay rule of ``decayed_parameters`` and
  the lr schedulers created before it (``base_lrs`` no longer covers it).
- **Freezing happens at the start of each epoch, after DDP wrapped the model.** DDP only
  synchronizes parameters that require gradients when it is built; ``BaseFinetuning`` freezes
  in ``setup``, before that, so a part unfrozen later would train unsynchronized on each rank.
  Toggling ``requires_grad`` after the wrap needs ``find_unused_parameters=True``
  (``strategy: ddp_find_unused_parameters_true``), which ``on_fit_start`` enforces.
- **The state is the epoch.** Which parts train is recomputed from ``current_epoch`` at every
  epoch start, so a resumed run (``--ckpt_path last``) freezes exactly as the original did;
  nothing is stored in the checkpoint.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BaseFinetuning
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from harmonia.models.parts import check_parts, modules_of, parameters_of


class FinetuningSchedule(BaseFinetuning):
    """Train only the listed parts of ``pl_module.model``, adding parts at the listed epochs.

    Args:
        unfreeze: ``{epoch: [parts]}``; at the start of ``epoch`` those parts become trainable
            (and stay so). Must contain epoch 0. Default ``{0: [head], 1: [all]}``: one epoch
            of head only, then everything.
        train_bn: BatchNorm layers of frozen parts keep training (parameters and running
            statistics), as Lightning's default. ``False`` freezes them too: their parameters
            stop and their running statistics stop updating (training batches are then
            normalized with their own statistics, Lightning's ``freeze`` semantics).
    """

    def __init__(self, unfreeze: dict[int, list[str]] | None = None, train_bn: bool = True) -> None:
        super().__init__()
        schedule = {0: ["head"], 1: ["all"]} if unfreeze is None else unfreeze
        schedule = {int(epoch): list(parts) for epoch, parts in schedule.items()}
        if not schedule or min(schedule) != 0 or any(not parts for parts in schedule.values()):
            raise ValueError(
                f"unfreeze must map epoch 0 (and later epochs) to non-empty lists of parts; got {unfreeze!r}: "
                "with nothing trainable the first epochs would not train at all"
            )
        self.unfreeze = dict(sorted(schedule.items()))
        self.train_bn = train_bn
        self._trainable: list[str] | None = None

    def parts_at(self, epoch: int) -> list[str]:
        """The parts trainable during ``epoch``."""
        return [part for start, parts in self.unfreeze.items() if start <= epoch for part in parts]

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        """Check the parts; freeze nothing yet (DDP must see every parameter, see module docstring)."""
        check_parts(_model(pl_module), {p for parts in self.unfreeze.values() for p in parts}, "FinetuningSchedule")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse DDP without ``find_unused_parameters`` when a part is ever frozen."""
        ddp = trainer.strategy.model
        model = _model(pl_module)
        first = {id(p) for part in self.parts_at(0) for _, p in parameters_of(model, part)}
        ever_frozen = any(id(p) not in first for p in model.parameters())
        if isinstance(ddp, DistributedDataParallel) and not ddp.find_unused_parameters and ever_frozen:
            raise ValueError(
                "FinetuningSchedule freezes parameters after DDP is built, which needs "
                "find_unused_parameters=True: use strategy: ddp_find_unused_parameters_true"
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Apply the schedule of ``current_epoch`` (no param groups are added, none stored)."""
        for optimizer in trainer.optimizers:
            self.finetune_function(pl_module, trainer.current_epoch, optimizer)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """Freeze the whole model, then make this epoch's parts trainable."""
        model = _model(pl_module)
        parts = self.parts_at(epoch)
        self.freeze(model, train_bn=self.train_bn)
        self.make_trainable([m for part in parts for m in modules_of(model, part)])
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
        if orphans:
            raise RuntimeError(
                f"FinetuningSchedule: {len(orphans)} trainable parameters are not in the optimizer ({orphans[0]}, ...); "
                "they were frozen when configure_optimizers ran"
            )
        if parts != self._trainable:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            rank_zero_info(f"FinetuningSchedule: epoch {epoch} trains {parts} ({trainable:,} of {total:,} parameters)")
            self._trainable = parts

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Leave the model fully trainable, so a later ``fit`` builds a complete optimizer."""
        self.make_trainable(_model(pl_module))
        self._trainable = None

    def state_dict(self) -> dict[str, Any]:
        """Nothing to store: the schedule is a function of the epoch."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore (``BaseFinetuning`` would re-add stored param groups)."""


def _model(pl_module: pl.LightningModule) -> nn.Module:
    model = getattr(pl_module, "model", None)
    if not isinstance(model, nn.Module):
        raise TypeError(f"FinetuningSchedule needs a LightningModule with a `model` attribute; got {type(pl_module).__name__}")
    return model
