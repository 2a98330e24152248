"""Activation checkpointing that also checkpoints the double backward of the harmonization loss.

Why not ``torch.utils.checkpoint`` around each block: it saves only a block's input in the
forward, but the harmonization loss then takes the input gradient with ``create_graph=True``.
That first backward re-runs each block and records a *gradient graph* which keeps every
recomputed activation and every backward intermediate alive until the final backward, so on a
harmonized step it saves little of the peak.

Here each checkpointed block is one autograd node, a *segment*:

- forward: the block runs under ``no_grad``; only its input is saved;
- ordinary backward (the objective's path, or a λ = 0 step): recompute the block, return
  ``vjp(grad_out)`` for the input and the parameters (classic checkpointing);
- backward with ``create_graph=True`` (the input gradient of the harmonization term): return
  the same vector-Jacobian product through a second node, ``_SegmentVJP``, which saves only
  ``(input, grad_out)``, not a graph;
- backward of ``_SegmentVJP`` (the final backward through the saliency): recompute the block,
  take the vjp with ``create_graph=True`` and differentiate it, one block at a time.

So a block's activations and gradient intermediates exist only while that block is being
(re)computed. The price is recomputation: a block runs up to four times per harmonized step.

Every recomputation replays the forward's RNG state (dropout masks match) and autocast state
(``bf16-mixed`` recomputes in bf16); each vjp runs under the autocast state of the backward that
first asked for it (Lightning takes the input gradient inside autocast, the final backward
outside), and BatchNorm layers inside a segment do not update their
running statistics while recomputing, so the statistics equal those of a run without
checkpointing. Recomputation uses batch statistics exactly as the forward did.

BatchNorm layers left outside every segment (a ResNet's stem ``bn1`` at 112×112) run channel
chunk by channel chunk (``_ChunkedBatchNorm``): BatchNorm is per channel, so the result is the
same, but the double backward of a training-mode BatchNorm holds about eight input-sized
temporaries at once, and chunking divides them by the number of chunks. Measured on ResNet-18,
batch 16, 224 px (CPU profiler): the stem BatchNorm's double backward held 392 MB of a 725 MB
harmonized step peak; with 4 chunks the peak is 554 MB (benchmarks/finetune_memory.py).

Gradients match the un-checkpointed graph to rounding (tests/test_finetune.py). Third-order
gradients through a segment are refused. Segments apply in training mode only; in ``eval()``
the block runs as usual.
"""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import get_device_states, set_device_states

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# The attention kernels the forward was allowed to use (AlignedClassifier restricts them to
# MATH for the harmonization forward: the fused kernels have no double backward).
_SDPA_FLAGS = (
    (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled),
    (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled),
    (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled),
    (SDPBackend.CUDNN_ATTENTION, torch.backends.cuda.cudnn_sdp_enabled),
)


def _autocast_state(devices: set[str]) -> tuple[dict[str, tuple[bool, torch.dtype]], bool]:
    """The autocast settings in force now, per device type, and whether casts are cached."""
    return {dev: (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) for dev in devices}, \
        torch.is_autocast_cache_enabled()


@contextmanager
def _autocast(state: tuple[dict[str, tuple[bool, torch.dtype]], bool]) -> Iterator[None]:
    """Re-enter autocast settings captured by ``_autocast_state``."""
    per_device, cache = state
    with ExitStack() as stack:
        for dev, (enabled, dtype) in per_device.items():
            stack.enter_context(torch.autocast(dev, dtype=dtype, enabled=enabled, cache_enabled=cache))
        yield


class _Replay:
    """What recomputing a block needs: the block, the forward's RNG, autocast and attention-kernel state."""

    def __init__(self, block: nn.Module, x: Tensor) -> None:
        self.block = block
        self.device_type = x.device.type
        self.cpu_rng = torch.get_rng_state()
        self.devices, self.device_rng = get_device_states(x)
        self.autocast = _autocast_state({"cpu", self.device_type})
        self.sdpa = [backend for backend, enabled in _SDPA_FLAGS if enabled()]

    def run(self, x: Tensor) -> Tensor:
        """The block's own forward (not the segmented one installed on the instance)."""
        return type(self.block).forward(self.block, x)

    @contextmanager
    def context(self) -> Iterator[None]:
        """Replay RNG, autocast and attention kernels; freeze BatchNorm running statistics; restore all after."""
        norms = [m for m in self.block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        tracked = [m.track_running_stats for m in norms]
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=self.devices, device_type=self.device_type))
            torch.set_rng_state(self.cpu_rng)
            if self.devices:
                set_device_states(self.devices, self.device_rng, device_type=self.device_type)
            stack.enter_context(sdpa_kernel(self.sdpa))
            stack.enter_context(_autocast(self.autocast))
            try:
                for m in norms:  # training mode + no tracking = batch statistics, no update
                    m.track_running_stats = False
                yield
            finally:
                for m, flag in zip(norms, tracked):
                    m.track_running_stats = flag


def _wanted(tensor: Tensor, needed: bool) -> bool:
    """Whether the running backward will use this input's gradient.

    ``autograd.grad(score, image)`` never reaches the parameters' accumulators; asking the
    engine (a private but stable hook, also used by torch's multi-grad hooks) lets the input
    gradient skip the weight-gradient products, as torch's built-in layers do.
    """
    if not needed:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(get_gradient_edge(tensor).node))
    except (AttributeError, RuntimeError):  # no engine information: compute it
        return True


def _vjp(replay: _Replay, wants: Sequence[bool], x: Tensor, grad_y: Tensor, params: Sequence[Tensor],
         create_graph: bool, x_differentiable: bool = False,
         backward_autocast: tuple | None = None) -> tuple[tuple[Tensor | None, ...], Tensor]:
    """Recompute the block; return the gradients of ``(x, *params)`` where ``wants``, and the x leaf.

    ``x_differentiable`` keeps the input differentiable even when its gradient is not
    returned (the double backward may still need d/dx of the parameter gradients).
    ``backward_autocast``: the autocast settings the vjp itself ran under the first time
    (``_autocast_state``); default: the caller's.
    """
    with torch.enable_grad():
        with replay.context():
            x_leaf = x.detach().requires_grad_(wants[0] or x_differentiable)
            y = replay.run(x_leaf)
        # The vjp runs in the state of the backward that asked for it, not the forward's: under
        # bf16-mixed Lightning takes the input gradient inside autocast, the final backward outside.
        targets = [t for t, w in zip((x_leaf, *params), wants) if w]
        with _autocast(backward_autocast) if backward_autocast is not None else nullcontext():
            found = iter(torch.autograd.grad(y, targets, grad_y, create_graph=create_graph, allow_unused=True))
    return tuple(next(found) if w else None for w in wants), x_leaf


class _Segment(torch.autograd.Function):
    """One checkpointed block: saves its input; backward recomputes (see module docstring)."""

    @staticmethod
    def forward(ctx, replay: _Replay, x: Tensor, *params: Tensor) -> Tensor:  # type: ignore[override]
        ctx.replay, ctx.params = replay, params
        ctx.save_for_backward(x)
        with torch.no_grad():
            return replay.run(x)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        inputs = (x, *ctx.params)
        wants = [_wanted(t, n) for t, n in zip(inputs, ctx.needs_input_grad[1:])]
        if not any(wants):
            return (None,) * (1 + len(inputs))
        if torch.is_grad_enabled():  # create_graph=True: the result must stay differentiable
            flat = _SegmentVJP.apply(ctx.replay, tuple(wants), x, grad_y, *ctx.params)
            it = iter(flat)
            grads = tuple(next(it) if w else None for w in wants)
        else:
            grads, _ = _vjp(ctx.replay, wants, x, grad_y, ctx.params, create_graph=False)
        return (None, *grads)


class _SegmentVJP(torch.autograd.Function):
    """``vjp`` of a segment, differentiable w.r.t. input, incoming gradient and parameters."""

    @staticmethod
    def forward(ctx, replay: _Replay, wants: tuple[bool, ...], x: Tensor, grad_y: Tensor,  # type: ignore[override]
                *params: Tensor) -> tuple[Tensor, ...]:
        ctx.replay, ctx.wants, ctx.params = replay, wants, params
        ctx.autocast = _autocast_state({"cpu", replay.device_type})  # that of the first backward
        ctx.save_for_backward(x, grad_y)
        ctx.set_materialize_grads(False)
        grads, _ = _vjp(replay, wants, x, grad_y, params, create_graph=False)
        # One output per wanted gradient; an unused input's gradient is zero, as autograd's.
        return tuple(g if g is not None else torch.zeros_like(t)
                     for g, t, w in zip(grads, (x, *params), wants) if w)

    @staticmethod
    def backward(ctx, *grad_grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError("third-order gradients through a checkpointed segment are not supported")
        x, grad_y = ctx.saved_tensors
        need_x, need_gy, *need_p = ctx.needs_input_grad[2:]
        none = (None,) * (4 + len(ctx.params))
        with torch.enable_grad():
            gy_leaf = grad_y.detach().requires_grad_(True)
            grads, x_leaf = _vjp(ctx.replay, ctx.wants, x, gy_leaf, ctx.params, create_graph=True,
                                 x_differentiable=need_x, backward_autocast=ctx.autocast)
            outputs = [g for g, w in zip(grads, ctx.wants) if w]  # aligned with grad_grads
            pairs = [(g, gg) for g, gg in zip(outputs, grad_grads)
                     if g is not None and gg is not None and g.requires_grad]
            if not pairs:
                return none
            targets = [(x_leaf, need_x), (gy_leaf, need_gy), *zip(ctx.params, need_p)]
            wrt = [t for t, n in targets if n]
            found = iter(torch.autograd.grad([g for g, _ in pairs], wrt, [gg for _, gg in pairs], allow_unused=True))
        result = [next(found) if n else None for _, n in targets]
        return (None, None, *result)


class _SegmentedForward:
    """Installed as ``block.forward``: the block runs as one segment in training, as usual otherwise.

    A callable object rather than a closure, so models stay picklable (``ddp_spawn``) and
    ``copy.deepcopy`` rebinds it to the copied block. Parameter and buffer names are unchanged,
    so weights, checkpoints, parameter groups and freeze schedules see the same model.
    """

    def __init__(self, block: nn.Module, name: str) -> None:
        self.block, self.name = block, name

    def __call__(self, *args: object, **kwargs: object) -> Tensor:
        block = self.block
        if not (block.training and torch.is_grad_enabled()):
            return type(block).forward(block, *args, **kwargs)
        if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
            raise TypeError(
                f"checkpointed block {self.name!r} ({type(block).__name__}) must be called with one tensor; "
                f"got {len(args)} positional and {sorted(kwargs)} keyword arguments. Name other modules "
                "in `checkpointing: [...]` (or turn it off) for this architecture."
            )
        x = args[0]
        return _Segment.apply(_Replay(block, x), x, *block.parameters())


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # exact types: not SyncBatchNorm


class _ChunkedBatchNorm:
    """Installed as a BatchNorm's ``forward`` outside segments: normalize ``chunks`` channel groups apart.

    Same statistics, output and gradients as one call (BatchNorm is per channel); the double
    backward then runs one chunk at a time, so its temporaries are a fraction of the input's
    size. Outside training with grad enabled the layer runs as usual. A callable object, not
    a closure, for pickling and ``deepcopy`` (as ``_SegmentedForward``).
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, chunks: int) -> None:
        self.norm, self.chunks = norm, chunks

    def __call__(self, x: Tensor) -> Tensor:
        norm = self.norm
        if not (norm.training and torch.is_grad_enabled()) or x.dim() < 2 or x.shape[1] < 2:
            return type(norm).forward(norm, x)
        norm._check_input_dim(x)
        # The momentum bookkeeping of _BatchNorm.forward, done once for all chunks.
        factor = 0.0 if norm.momentum is None else norm.momentum
        if norm.track_running_stats and norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)
            if norm.momentum is None:  # cumulative moving average
                factor = 1.0 / float(norm.num_batches_tracked)

        size = -(-x.shape[1] // self.chunks)  # ceil: at most `chunks` groups
        xs = x.split(size, 1)

        def split(t: Tensor | None) -> Sequence[Tensor | None]:
            return [None] * len(xs) if t is None else t.split(size, 0)

        # Training without tracked statistics normalizes with batch statistics only (as _BatchNorm).
        track = norm.track_running_stats
        means, variances = split(norm.running_mean if track else None), split(norm.running_var if track else None)
        outs = [torch.nn.functional.batch_norm(xc, rm, rv, w, b, True, factor, norm.eps)
                for xc, rm, rv, w, b in zip(xs, means, variances, split(norm.weight), split(norm.bias))]
        return torch.cat(outs, 1)


def chunk_batchnorms(model: nn.Module, segments: Sequence[str], chunks: int = 4) -> list[str]:
    """Run the BatchNorm layers of ``model`` that lie outside every named segment channel-chunked.

    Returns their names. See the module docstring for why (memory of the double backward).
    """
    chosen = []
    for name, module in model.named_modules():
        inside = any(name == seg or name.startswith(seg + ".") for seg in segments)
        if type(module) in _BATCHNORMS and not inside and "forward" not in module.__dict__:
            module.forward = _ChunkedBatchNorm(module, chunks)
            chosen.append(name)
    return chosen


def _is_block(module: nn.Module) -> bool:
    """A composite module with its own forward and parameters (not a bare container or layer)."""
    own_forward = type(module).forward not in (nn.Sequential.forward, nn.Module.forward)
    return own_forward and any(True for _ in module.children()) and any(True for _ in module.parameters())


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the repeated blocks of ``model``: what ``checkpointing: true`` segments.

    A block is a composite module (own forward, parameters) that sits in a container
    (``Sequential``/``ModuleList``/``ModuleDict``) next to at least one sibling of the same
    class: residual blocks of ResNets, encoder blocks of ViTs, MBConv of EfficientNets, Swin and
    ConvNeXt blocks, in torchvision and timm alike. Where blocks nest (a timm stage of blocks),
    the innermost are chosen, so each segment's recomputation stays small.
    """
    found: list[str] = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, _CONTAINERS):
            continue
        children = list(parent.named_children())
        counts = Counter(type(child) for _, child in children)
        for name, child in children:
            if counts[type(child)] >= 2 and _is_block(child):
                found.append(f"{parent_name}.{name}" if parent_name else name)
    return [name for name in found if not any(other.startswith(name + ".") for other in found)]


def checkpoint_segments(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Run the named submodules (default: ``find_blocks(model)``) as checkpointed segments.

    BatchNorm layers outside the segments run channel-chunked (``chunk_batchnorms``).
    Returns the segmented names. Raises if none is found or a name is not a submodule.
    """
    chosen = list(names) if names is not None else find_blocks(model)
    if not chosen:
        raise ValueError(
            f"no repeated blocks found to checkpoint in {type(model).__name__}; "
            "name the modules to checkpoint, e.g. checkpointing: [layer1, layer2]"
        )
    modules = dict(model.named_modules())
    for name in chosen:
        if name not in modules or name == "":
            raise ValueError(f"checkpointing: {name!r} is not a submodule of {type(model).__name__}")
        if isinstance(modules[name].__dict__.get("forward"), _SegmentedForward):
            continue
        modules[name].forward = _SegmentedForward(modules[name], name)
    chunk_batchnorms(model, chosen)
    return chosen
