"""What every periodic diagnostic shares: when to run, which model to read, how to gather shards.

A monitor runs at the end of a validation epoch (the model is in eval mode there, and a
stand-alone ``validate`` reaches the same hook): during ``fit`` every ``every_n_epochs``
epochs and at the last epoch, never in the sanity check; during ``validate`` always.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn

from harmonia.models import cached_weights


def is_due(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    """Whether a monitor with this cadence runs at the current validation epoch end."""
    if trainer.sanity_checking:
        return False
    if trainer.state.fn != TrainerFn.FITTING:
        return True
    epoch = trainer.current_epoch + 1
    last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
    return epoch % every_n_epochs == 0 or last


def monitored_model(pl_module: pl.LightningModule, attr: str | None) -> nn.Module:
    """``pl_module.<attr>`` (the wrapped classifier: ``AlignedClassifier.model``) or the module itself."""
    if not attr:
        return pl_module
    model = getattr(pl_module, attr, None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{type(pl_module).__name__} has no submodule {attr!r} to monitor; set model_attr (None: the module itself)")
    return model


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own flag.

    Diagnostics describe the inference model (no dropout, BatchNorm running statistics), and
    a 1-Lipschitz layer in training mode would update its power-iteration state at every
    forward: a diagnostic must not change how the model trains.
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.train(flag)


@contextmanager
def evaluation(model: nn.Module, grad: bool) -> Iterator[None]:
    """Eval mode, weights orthonormalized once (``cached_weights``), and grad mode ``grad`` even inside ``inference_mode``.

    A stand-alone ``validate``/``test`` runs under ``torch.inference_mode``, which
    ``enable_grad`` alone cannot leave (SPEC §10); the model's mode is restored afterwards.
    """
    with eval_mode(model), torch.inference_mode(False), torch.set_grad_enabled(grad), cached_weights():
        yield


def gather_shards(pl_module: pl.LightningModule, local: Tensor, total: int) -> Tensor:
    """Every rank's strided shard (``rank_shard``) of ``total`` rows, reassembled in the original order.

    Shards differ in length by at most one, so each is padded to the longest before
    ``all_gather``; the result is the same tensor on every rank.
    """
    world = pl_module.trainer.world_size if pl_module._trainer is not None else 1
    if world == 1:
        return local
    longest = -(-total // world)
    padded = local.new_zeros(longest, *local.shape[1:])
    padded[: len(local)] = local
    gathered = pl_module.all_gather(padded)  # (world, longest, ...)
    full = local.new_empty(total, *local.shape[1:])
    for rank in range(world):
        count = len(range(rank, total, world))
        full[rank::world] = gathered[rank, :count].to(local.device)
    return full
