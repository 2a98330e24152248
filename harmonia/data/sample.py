"""The batch contract shared by every dataset, ``Sample(image, human_map, has_map, label)``, and
the collate function that batches samples while leaving out skipped (bad) ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from torch import Tensor
from torch.utils.data import default_collate

from harmonia.data.errors import BadSampleError


class Sample(NamedTuple):
    """One sample, or a batch of them after ``default_collate`` (which keeps the NamedTuple).

    - ``image``: ``(C,H,W)`` float in [0, 1], before any model normalization;
    - ``human_map``: ``(1,H,W)`` float >= 0 (zeros when ``has_map`` is False);
    - ``has_map``: bool, whether ``human_map`` is a real human map;
    - ``label``: int64 class index.

    This is what ``training_step`` receives. Readers may hand the DataLoader an intermediate
    form (``uint8`` images, ClickMe's 64-px maps); their DataModule turns it into ``Sample`` on
    the training device (``on_after_batch_transfer``).
    """

    image: Tensor
    human_map: Tensor
    has_map: Tensor
    label: Tensor


def collate_samples(batch: Sequence[Any]) -> Any:
    """``default_collate`` over the samples that are not None.

    Datasets built with ``skip_bad_samples=True`` return None for a bad sample (already counted
    and logged); dropping it here makes that batch one sample smaller rather than padding it
    with a fake or a repeated sample. A batch in which *every* sample was bad is an error, and
    so is a batch whose images differ in size (said plainly, not as ``torch.stack``'s error).
    """
    kept = [s for s in batch if s is not None]
    if not kept:
        raise BadSampleError("batch", f"all {len(batch)} samples were bad (skip_bad_samples): check the data")
    try:
        return default_collate(kept)
    except RuntimeError as err:
        if "stack expects each tensor to be equal size" not in str(err):
            raise
        sizes = sorted({tuple(getattr(s, "image", s[0]).shape) for s in kept})
        raise ValueError(f"the samples of one batch must have one image size; got {sizes}: ClickMe records are "
                         "batched at their own size (resize them to one size, or read them as an image folder)") from None
