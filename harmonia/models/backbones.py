"""Pretrained torchvision and timm classifiers in the registry, with weights from local files only.

    build_model("resnet50", num_classes=1000, weights="resnet50-11ad3fa6.pth")    # torchvision
    build_model("timm/convnext_tiny.fb_in1k", num_classes=10, weights="model.safetensors")
    build_model("resnet18", num_classes=10, weights="runs/x/checkpoints/best.ckpt")  # Harmonia

Names: every torchvision classification model under its own name (``torchvision.models.
list_models(module=torchvision.models)``), every timm model as ``timm/<name>`` (a pretrained tag
such as ``.fb_in1k`` selects that weight's normalization and input size).

**No download, ever.** torchvision builders get ``weights=None`` and timm ``pretrained=False``;
``weights`` is a path to a file on disk, read by ``load_weights``:
- a torchvision state dict (``.pth``), a timm checkpoint (``state_dict``/``model``/EMA keys,
  ``module.`` prefixes) or ``.safetensors``;
- a Harmonia / Lightning checkpoint (``.ckpt``): the ``model.`` prefix of ``AlignedClassifier``
  is stripped, and the normalization saved with the weights must equal the one configured.
The head is built for ``num_classes``; head weights of another size are dropped with a warning.
Any other mismatch is an error listing the missing, unexpected and mis-shaped keys.

**Normalization lives in the model** (``Backbone``): batches stay in [0, 1] and the saliency is
taken with respect to the image. Default: ImageNet mean/std for torchvision, the weight's own
``pretrained_cfg`` mean/std for timm (0.5/0.5 for many ViTs, CLIP values for CLIP towers).

Memory options: ``channels_last`` (weights and inputs in NHWC) and ``checkpointing`` (``true``:
every repeated block; or a list of module names; see ``harmonia.models.checkpointing``).
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torchvision
from torch import Tensor, nn

from harmonia.models.checkpointing import checkpoint_segments
from harmonia.models.registry import register_family, register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Auxiliary heads that torchvision's files carry but Harmonia builds without (their training-mode
# output is a tuple, and the harmonization saliency is of the main logits).
_AUX_PREFIXES = {"inception_v3": ("AuxLogits.",), "googlenet": ("aux1.", "aux2.")}
# torchvision's DenseNet files predate its module names ("norm.1" for "norm1"); torchvision
# renames them when it loads its own weights, so a local copy needs the same renaming.
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


class Backbone(nn.Module):
    """A torchvision/timm classifier behind its own input normalization.

    ``forward(x)`` takes images in [0, 1], ``(N, C, H, W)``; it normalizes with ``mean``/``std``
    (buffers, saved with the weights) and runs ``net``. Attributes shared with every registry
    model: ``input_shape`` and ``certificate`` (``None``: no Lipschitz certificate);
    ``head_names``: the classifier modules (``net.fc``, ...), for lr groups and freeze schedules.
    """

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        input_shape: tuple[int, int, int],
        head_names: Sequence[str],
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need one value per channel and std > 0")
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.input_shape = tuple(input_shape)
        self.certificate = None
        self.head_names = tuple(f"net.{name}" for name in head_names)
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of images in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"expected images (N, {self.mean.shape[1]}, H, W) in [0, 1]; got shape {tuple(x.shape)}")
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


class HardsigmoidTwice(nn.Module):
    """``nn.Hardsigmoid`` as ``relu6(x + 3) / 6``: equal values, but with a double backward.

    torch has no derivative for ``hardsigmoid_backward``, so the harmonization loss fails on
    MobileNetV3's squeeze-excitation; ReLU6 is twice differentiable (almost everywhere).
    """

    def forward(self, x: Tensor) -> Tensor:
        """``relu6(x + 3) / 6``."""
        return nn.functional.relu6(x + 3.0) / 6.0


def _twice_differentiable(net: nn.Module) -> None:
    """Replace layers without a double backward (``nn.Hardsigmoid``) by equal ones that have it."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Hardsigmoid:
                setattr(parent, name, HardsigmoidTwice())


def _finish(
    net: nn.Module, label: str, weights: str | Path | None, mean: Sequence[float], std: Sequence[float],
    input_size: int, head_names: Sequence[str], channels_last: bool, checkpointing: bool | Sequence[str],
    drop_prefixes: Sequence[str] = (),
) -> Backbone:
    """Load weights, wrap, and apply the memory options (in that order: names stay plain)."""
    _twice_differentiable(net)
    if weights is not None:
        load_weights(net, weights, label=label, head_names=head_names, mean=mean, std=std, drop_prefixes=drop_prefixes)
    model = Backbone(net, mean, std, (len(mean), input_size, input_size), head_names, channels_last)
    if checkpointing:
        checkpoint_segments(net, None if checkpointing is True else list(checkpointing))
    return model


def build_torchvision(
    name: str,
    num_classes: int = 1000,
    weights: str | Path | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    input_size: int | None = None,
    channels_last: bool = False,
    checkpointing: bool | Sequence[str] = False,
    **model_args: Any,
) -> Backbone:
    """A torchvision classifier ``name`` with a ``num_classes`` head and weights from a local file.

    ``input_size`` (default 224, 299 for Inception v3) is passed to the models whose size is
    fixed (ViT ``image_size``, MaxViT ``input_size``); other keyword arguments go to the
    torchvision constructor.
    """
    if name in _AUX_PREFIXES:
        model_args.setdefault("aux_logits", False)
    size = input_size or (299 if name == "inception_v3" else 224)
    if name.startswith("vit_"):
        model_args.setdefault("image_size", size)
    elif name.startswith("maxvit"):
        model_args.setdefault("input_size", (size, size))
    # weights=None: torchvision builds a randomly initialized model and never downloads.
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **model_args)
    return _finish(net, f"torchvision {name}", weights, mean, std, size, _torchvision_head(net, num_classes),
                   channels_last, checkpointing, drop_prefixes=_AUX_PREFIXES.get(name, ()))


def build_timm(
    name: str,
    num_classes: int = 1000,
    weights: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: int | None = None,
    channels_last: bool = False,
    checkpointing: bool | Sequence[str] = False,
    **model_args: Any,
) -> Backbone:
    """A timm model ``name`` (``timm/<name>`` in the registry) with weights from a local file.

    ``mean``/``std``/``input_size`` default to the model's ``pretrained_cfg``; models with a
    fixed input size get ``img_size=input_size``. Other keyword arguments go to
    ``timm.create_model``.
    """
    import timm  # lazily: importing timm costs a second that torchvision-only users need not pay

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0]}*")[:10]
        raise ValueError(f"unknown timm model {name!r}; similar names: {', '.join(close) or 'none'}")
    cfg = timm.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    if input_size is not None and cfg.get("fixed_input_size"):
        model_args.setdefault("img_size", input_size)
    # pretrained=False: timm builds a randomly initialized model and never contacts the hub.
    net = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_args)
    cfg = {**cfg, **getattr(net, "pretrained_cfg", {})}
    size = input_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    mean = tuple(mean if mean is not None else cfg.get("mean", IMAGENET_MEAN))
    std = tuple(std if std is not None else cfg.get("std", IMAGENET_STD))
    return _finish(net, f"timm {name}", weights, mean, std, size, _timm_head(net, num_classes),
                   channels_last, checkpointing)


def _torchvision_head(net: nn.Module, num_classes: int) -> list[str]:
    """The last Linear/Conv with ``num_classes`` outputs: every torchvision classifier defines it last."""
    heads = [name for name, m in net.named_modules()
             if (isinstance(m, nn.Linear) and m.out_features == num_classes)
             or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)]
    if not heads:
        raise ValueError(f"{type(net).__name__}: no layer with {num_classes} outputs found for the head")
    return heads[-1:]


def _timm_head(net: nn.Module, num_classes: int) -> list[str]:
    """timm names its classifier(s) in ``pretrained_cfg["classifier"]``."""
    names = getattr(net, "pretrained_cfg", {}).get("classifier")
    names = [names] if isinstance(names, str) else list(names or ())
    modules = dict(net.named_modules())
    found = [n for n in names if n in modules and any(True for _ in modules[n].parameters())]
    return found or _torchvision_head(net, num_classes)


def read_state_dict(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """Read a weight file and unwrap it to a flat ``{name: tensor}``; also say what it was.

    Accepts ``.safetensors``, torch state dicts, timm training checkpoints (EMA weights
    first, as timm does) and Lightning checkpoints (``state_dict``; ``model.`` stripped).
    Loads with ``weights_only=True``: a file needing arbitrary unpickling is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} does not exist. Harmonia loads weights only from local files and "
            "never downloads: fetch the file yourself (e.g. torchvision's or timm's release URL) and pass its path"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw: Any = load_file(str(path), device="cpu")
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling errors have many types
            raise ValueError(f"{path}: not a weights file torch can load safely (weights_only=True): {err}") from err
    kind = "state dict"
    if isinstance(raw, dict) and "pytorch-lightning_version" in raw:
        state = raw.get("state_dict", {})
        model_keys = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        if not model_keys:
            raise ValueError(f"{path}: Lightning checkpoint without 'model.' weights (not a Harmonia AlignedClassifier?); "
                             f"first keys: {list(state)[:5]}")
        raw, kind = model_keys, "Harmonia/Lightning checkpoint"
    elif isinstance(raw, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(raw.get(key), dict):
                raw, kind = raw[key], f"checkpoint ['{key}']"
                break
    if not isinstance(raw, dict) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise ValueError(f"{path}: expected a state dict of tensors; got {type(raw).__name__}")
    state = {}
    for key, value in raw.items():  # wrappers' prefixes: DDP, torch.compile (either order)
        for prefix in ("_orig_mod.", "module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        state[key] = value
    return state, kind


def load_weights(
    net: nn.Module,
    path: str | Path,
    label: str = "model",
    head_names: Sequence[str] = (),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    drop_prefixes: Sequence[str] = (),
) -> None:
    """Load a local weight file into ``net`` (the bare torchvision/timm model).

    Head weights (under ``head_names``) of another shape are dropped with a warning, as are
    keys under ``drop_prefixes`` (auxiliary heads); anything else that does not match raises
    a ``ValueError`` listing missing, unexpected and mis-shaped keys.
    """
    state, kind = read_state_dict(path)
    if any(k.startswith("net.") for k in state):  # a Harmonia Backbone: normalization + net
        _check_normalization(state, path, mean, std)
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    if isinstance(net, torchvision.models.DenseNet):
        state = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    filter_fn = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    if type(net).__module__.startswith("timm.") and filter_fn is not None:
        state = filter_fn(state, net)  # timm's own converter (original formats, resized embeddings)

    expected = net.state_dict()
    in_head = lambda key: any(key == h or key.startswith(h + ".") for h in head_names)  # noqa: E731
    dropped = [k for k in state if k.startswith(tuple(drop_prefixes)) and k not in expected]
    reshaped = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
                if k in expected and v.shape != expected[k].shape}
    head_reshaped = {k: s for k, s in reshaped.items() if in_head(k)}
    state = {k: v for k, v in state.items() if k not in head_reshaped and k not in dropped}
    missing = [k for k in expected if k not in state and not in_head(k)]
    head_missing = [k for k in expected if k not in state and in_head(k)]
    unexpected = [k for k in state if k not in expected]
    bad_shapes = {k: s for k, s in reshaped.items() if k not in head_reshaped}
    if missing or unexpected or bad_shapes:
        raise ValueError(_mismatch_message(path, kind, label, missing, unexpected, bad_shapes, list(state), list(expected)))
    net.load_state_dict(state, strict=False)
    if head_reshaped:
        shapes = ", ".join(f"{k} {f} -> {m}" for k, (f, m) in head_reshaped.items())
        warnings.warn(f"{path}: head weights of another size dropped ({shapes}); the new head starts from random init",
                      stacklevel=2)
    if head_missing and not head_reshaped:
        warnings.warn(f"{path}: no head weights in the file ({', '.join(head_missing)}); the head starts from random init",
                      stacklevel=2)
    if dropped:
        warnings.warn(f"{path}: {len(dropped)} auxiliary-head tensors ignored ({dropped[0]}, ...)", stacklevel=2)


def _check_normalization(state: dict[str, Tensor], path: str | Path, mean: Sequence[float] | None,
                         std: Sequence[float] | None) -> None:
    """A Harmonia file carries the normalization its weights were trained with: it must match."""
    for key, want in (("mean", mean), ("std", std)):
        if key in state and want is not None:
            saved = state[key].flatten().tolist()
            if len(saved) != len(want) or any(abs(a - b) > 1e-6 for a, b in zip(saved, want)):
                raise ValueError(
                    f"{path}: these weights were trained with input {key} {tuple(round(v, 4) for v in saved)}, "
                    f"but the model is configured with {tuple(want)}; set {key} to the saved values"
                )


def _mismatch_message(path: str | Path, kind: str, label: str, missing: list[str], unexpected: list[str],
                      bad_shapes: dict[str, tuple], file_keys: list[str], model_keys: list[str]) -> str:
    """One readable error: what is missing, unexpected, mis-shaped; a hint if a prefix explains it."""

    def some(keys: Sequence[str]) -> str:
        return ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")

    parts = [f"{path} ({kind}) does not match {label}:"]
    if missing:
        parts.append(f"{len(missing)} missing keys (in the model, not in the file): {some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (in the file, not in the model): {some(unexpected)}")
    if bad_shapes:
        parts.append(f"{len(bad_shapes)} shape mismatches (file -> model): "
                     + some([f"{k} {f} -> {m}" for k, (f, m) in bad_shapes.items()]))
    first = file_keys[0].split(".")[0] + "." if file_keys else ""
    if first and all(k.startswith(first) for k in file_keys) and not any(k.startswith(first) for k in model_keys):
        parts.append(f"hint: every key in the file starts with {first!r}; it may wrap the model in another module")
    return "\n  ".join(parts)


def _register_torchvision() -> None:
    """Register every torchvision classification model under its own name."""
    for name in torchvision.models.list_models(module=torchvision.models):

        def build(name: str = name, **kwargs: Any) -> Backbone:
            return build_torchvision(name, **kwargs)

        build.__doc__ = f"torchvision {name} (weights: a local file; input normalized inside the model)"
        register_model(name)(build)


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


_register_torchvision()
register_family(
    "timm", build_timm, _timm_names,
    "any timm model, e.g. timm/resnet50.a1_in1k (`harmonia models 'timm/*vit*'` lists them)",
)
