"""Sound bounds of a network on input boxes: interval propagation (IBP) and CROWN.

A *box* is ``lower ≤ x ≤ upper`` per input coordinate, one per batch row; every bound holds for
every point of its box (up to floating-point rounding of the arithmetic itself).

- **Interval bounds** push the box through each layer (exact for one affine layer, loose
  after several).
- **CROWN** (Zhang et al., NeurIPS 2018) bounds a linear function of the output, here the logit
  differences ``f_k − f_c``, by one backward pass: each affine layer is transposed exactly and
  each nonlinear one replaced by a linear function above or below it (chosen by the sign of its
  coefficient) on the bounds of its input. Those *intermediate* bounds come from interval
  propagation, from CROWN run on the intermediate layer itself (one backward pass per neuron:
  tight, costly; ``crown_max_neurons`` picks the layers that get it), and, where the graph's
  Lipschitz constant to that layer is known, from ``|z(x+δ) − z(x)| ≤ L‖δ‖₂``; the tightest
  of the available bounds is kept for every neuron.
- **α-CROWN** (Xu et al., ICLR 2021; ``method="alpha-crown"``) optimizes the free choices of
  the final pass's relaxations (lower slopes of unstable neurons, L2-pooling tangent points)
  by projected gradient steps on the bound, per box and function; see
  :meth:`BoundedNetwork.optimized_backward`.
- A 1-Lipschitz model's certificate (its ``certificate`` attribute, see
  ``harmonia.metrics.model_certificate``) caps every logit-difference bound: ``f_k − f_c``
  moves at most ``c·‖δ‖₂`` (``c = 2`` for a per-logit certificate, ``√2`` for a vector one),
  and ``‖δ‖₂`` over a box is at most the L2 norm of its half-widths. The minimum of sound
  bounds is sound, so the cap never loosens a bound.

Everything is batched over boxes (rows) and over the bounded functions (classes), runs on the
device of the inputs, and holds no autograd graph.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.explain.base import gradients_on
from harmonia.metrics.certified import MARGIN_LIPSCHITZ
from harmonia.verify.graph import (
    AddOp,
    Affine,
    ConvOp,
    FunctionOp,
    Graph,
    GroupSort2Op,
    L2PoolOp,
    LinearOp,
    MaxPoolOp,
    NegateConcatOp,
    Node,
    Nonlinear,
    ReshapeOp,
    build_graph,
)

Intermediate = Literal["ibp", "crown"]
Method = Literal["ibp", "crown", "alpha-crown"]
METHODS = ("ibp", "crown", "alpha-crown")


@dataclass
class BoundState:
    """Bounds of every node of a graph on a batch of boxes (what CROWN's backward pass reads)."""

    lower: Tensor  # (B, *input_shape)
    upper: Tensor
    boxes: list[tuple[Tensor, Tensor]]  # per node, (B, *shape)
    pre: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # nonlinear node -> quantity bounds
    values: list[Tensor] = field(default_factory=list)  # every node at the box midpoint
    radius_l2: Tensor | None = None  # (B,) L2 norm of the box's half-widths

    @property
    def center(self) -> Tensor:
        return (self.upper + self.lower) / 2

    @property
    def radius(self) -> Tensor:
        return (self.upper - self.lower) / 2


def concretize(coef: Tensor, const: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """Largest value of ``coef · x + const`` on the box: ``(B, M)`` from ``coef (B, M, *in)``."""
    center, radius = (upper + lower) / 2, (upper - lower) / 2
    flat = coef.flatten(2)
    return (flat @ center.flatten(1).unsqueeze(2)).squeeze(2) + (flat.abs() @ radius.flatten(1).unsqueeze(2)).squeeze(2) + const


class BoundedNetwork:
    """A model read as a graph of boundable layers; computes bounds on batches of input boxes.

    Args:
        model: the classifier (Harmonia's ``cnn``/``lipschitz_cnn``, their exported forms,
            a ``Sequential`` of supported layers, a torchvision ResNet or Harmonia ``Backbone``).
            Read as it computes in its current mode; explain models in eval mode (BatchNorm in
            training mode and active dropout are refused).
        input_shape: per-sample input shape ``(C, H, W)``; default ``model.input_shape``.
        dtype: arithmetic of the bounds (float64 for exactness tests; float32 default).
        use_certificate: cap bounds with Lipschitz constants: the one ``model.certificate``
            declares (logit differences) and those computed from the weights (every layer);
            ``False`` gives the plain interval/CROWN bounds.

    Raises ``UnsupportedLayerError`` (a ``TypeError``) naming the first layer it cannot bound.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: tuple[int, ...] | None = None,
        dtype: torch.dtype = torch.float32,
        use_certificate: bool = True,
    ) -> None:
        input_shape = input_shape or getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError(f"{type(model).__name__} has no `input_shape`: pass input_shape=(C, H, W)")
        self.input_shape = tuple(input_shape)
        self.dtype = dtype
        self.graph: Graph = build_graph(model, self.input_shape, dtype)
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        # Cone layouts depend on the graph only: computed once per network.
        self._spacings: dict[tuple, int | None] = {}
        self._owner_cache: dict[tuple, tuple[dict[int, Tensor], int]] = {}
        self._windows: dict[int, tuple | None] = {}
        certificate = getattr(model, "certificate", None) if use_certificate else None
        # Lipschitz caps only for networks declared 1-Lipschitz: elsewhere they are loose, and
        # their singular values (an SVD per layer) cost more than they save.
        self.use_lipschitz = certificate is not None
        if certificate is not None and certificate not in MARGIN_LIPSCHITZ:
            raise ValueError(f"unknown certificate {certificate!r} on {type(model).__name__}; expected one of {sorted(MARGIN_LIPSCHITZ)}")
        self.certificate = certificate

    # ---------------------------------------------------------------------------------------
    def bound(
        self,
        lower: Tensor,
        upper: Tensor,
        intermediate: Intermediate = "crown",
        crown_max_neurons: int | None = 2048,
        memory: int = 2**25,
    ) -> BoundState:
        """Bounds of every node on the boxes ``[lower, upper]`` ``(B, *input_shape)``.

        ``intermediate="crown"``: a nonlinear layer needing at most ``crown_max_neurons``
        bounds per box (``None``: every layer) gets CROWN bounds on its input, the others
        interval bounds. ``memory``: the largest coefficient tensor (elements) held at once.
        """
        if intermediate not in ("ibp", "crown"):
            raise ValueError(f"intermediate must be 'ibp' or 'crown'; got {intermediate!r}")
        if lower.shape != upper.shape or tuple(lower.shape[1:]) != self.input_shape:
            raise ValueError(f"boxes must be (B, {self.input_shape}); got {tuple(lower.shape)} and {tuple(upper.shape)}")
        if bool((lower > upper).any()):
            raise ValueError("a box has lower > upper")
        lower, upper = lower.detach().to(self.dtype), upper.detach().to(self.dtype)
        with torch.no_grad():
            state = BoundState(lower, upper, [(lower, upper)])
            state.values = self.graph.forward(state.center)
            state.radius_l2 = state.radius.flatten(1).norm(dim=1)
            for index, node in enumerate(self.graph.nodes[1:], 1):
                boxes = [state.boxes[i] for i in node.inputs]
                if isinstance(node.op, AddOp):
                    box = (boxes[0][0] + boxes[1][0], boxes[0][1] + boxes[1][1])
                elif isinstance(node.op, Affine):
                    box = node.op.interval(*boxes[0])
                else:
                    op: Nonlinear = node.op
                    pre = self._quantity_bounds(state, index, intermediate, crown_max_neurons, memory)
                    state.pre[index] = pre
                    box = op.interval_from_pre(*boxes[0], pre)
                state.boxes.append(self._lipschitz_cap(state, index, box))
        return state

    def _lipschitz_cap(self, state: BoundState, index: int, box: tuple[Tensor, Tensor], value: Tensor | None = None,
                       lipschitz: float | None = None) -> tuple[Tensor, Tensor]:
        """Intersect ``box`` with ``value ± L·ρ``: ``L`` the Lipschitz constant from the input to node
        ``index`` (or ``lipschitz``), ``ρ`` the L2 norm of the box's half-widths over each coordinate's
        dependency cone (:meth:`_local_radius`)."""
        lipschitz = self.graph.lipschitz(index) if lipschitz is None else lipschitz
        if not math.isfinite(lipschitz) or not self.use_lipschitz:
            return box
        value = state.values[index] if value is None else value
        reach = lipschitz * self._local_radius(state, index, value.dim())
        lo, up = torch.maximum(box[0], value - reach), torch.minimum(box[1], value + reach)
        return lo, torch.maximum(up, lo)  # rounding must not cross them

    def _local_radius(self, state: BoundState, index: int, dims: int) -> Tensor:
        """L2 norm of the box's half-widths over each position's cone at node ``index``: ``(B, 1, H, W)``.

        A coordinate of a feature map depends only on the input pixels of its cone, so only their
        moves count. The cone of every position is bounded by the same window of the input
        shifted by the node's cumulative stride (measured once on the centre position);
        elsewhere (dense layers) the whole box's norm ``(B, 1…)``.
        """
        window = self._cone_window(index)
        radius = state.radius
        if window is None or dims != 4 or radius.dim() != 4:
            return state.radius_l2.view(-1, *([1] * (dims - 1)))
        (stride_h, stride_w), (top, left), (size_h, size_w) = window
        height, width = self.graph.nodes[index].shape[-2:]
        energy = (radius * radius).sum(1, keepdim=True)
        h0, w0 = energy.shape[-2:]
        pad_top, pad_left = max(0, -top), max(0, -left)
        need_h = (height - 1) * stride_h + top + size_h
        need_w = (width - 1) * stride_w + left + size_w
        padded = F.pad(energy, (pad_left, max(0, need_w - w0), pad_top, max(0, need_h - h0)))
        padded = padded[..., max(0, top) :, max(0, left) :]
        sums = F.avg_pool2d(padded, (size_h, size_w), (stride_h, stride_w)) * (size_h * size_w)
        return sums[..., :height, :width].clamp_min(0).sqrt()

    def _cone_window(self, index: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None:
        """``(stride, offset of the top-left input pixel at position (0, 0), window size)`` of node ``index``'s cones."""
        if index in self._windows:
            return self._windows[index]
        window = None
        shapes = [n.shape for n in self.graph.nodes[: index + 1]]
        if index > 0 and all(len(shape) == 3 for shape in shapes):
            channels, height, width = shapes[index]
            h0, w0 = shapes[0][-2:]
            if h0 % height == 0 and w0 % width == 0:
                ph, pw = height // 2, width // 2
                seed = torch.zeros((1, *shapes[index]), dtype=torch.float64, device=self.device)
                seed[..., ph, pw] = 1
                support = self._cone_maps(index, seed)[0][0].sum(0) > 0
                rows, cols = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
                if not len(rows):  # depends on no input pixel: no cone to measure
                    self._windows[index] = None
                    return None
                stride = (h0 // height, w0 // width)
                top, left = int(rows.min()) - stride[0] * ph, int(cols.min()) - stride[1] * pw
                size = (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1)
                # Positions near the border have clipped cones: the shifted window still covers them.
                window = (stride, (top, left), size)
        self._windows[index] = window
        return window

    def _quantity_bounds(self, state: BoundState, index: int, intermediate: Intermediate, crown_max_neurons: int | None,
                         memory: int) -> tuple[Tensor, Tensor]:
        node = self.graph.nodes[index]
        op: Nonlinear = node.op
        source = node.inputs[0]
        pre = op.quantity_interval(*state.boxes[source])
        parent = self.graph.nodes[source]
        if isinstance(op, GroupSort2Op) and isinstance(parent.op, (LinearOp, ConvOp)) and getattr(parent.op, "groups", 1) == 1:
            # Pair differences straight from the affine layer's input: one affine map, exact on its box.
            fused = parent.op.pair_differences().interval(*state.boxes[parent.inputs[0]])
            pre = (torch.maximum(pre[0], fused[0]), torch.minimum(pre[1], fused[1]))
        in_lipschitz = self.graph.lipschitz(source) * (math.sqrt(2.0) if isinstance(op, GroupSort2Op) else 1.0)
        pre = self._lipschitz_cap(state, source, pre, value=op.quantity_value(state.values[source]), lipschitz=in_lipschitz)
        size = op.quantity_size(parent.shape)
        affine_path = all(isinstance(n.op, (Affine, AddOp)) for n in self.graph.nodes[1 : source + 1])
        if affine_path and isinstance(op, GroupSort2Op) and not isinstance(parent.op, (LinearOp, ConvOp)):
            affine_path = False  # the fused pair differences above are exact only straight after the layer
        wanted = crown_max_neurons is None or size <= crown_max_neurons
        if intermediate == "crown" and wanted and not affine_path:  # on an affine path intervals are exact
            crown = self._crown_quantity(state, index, size, memory)
            pre = (torch.maximum(pre[0], crown[0]), torch.minimum(pre[1], crown[1]))
        return pre[0], torch.maximum(pre[1], pre[0])

    def _crown_quantity(self, state: BoundState, index: int, size: int, memory: int) -> tuple[Tensor, Tensor]:
        """CROWN bounds of a nonlinear node's quantities.

        On feature maps, quantities whose dependency cones (the coordinates of every earlier
        node they depend on) are disjoint share one backward pass: the coefficients of their
        sum split exactly by cone (each relaxation choice is per coordinate), and the constant
        terms are summed per cone (``owners``). Quantities are spaced ``D`` apart on the map,
        ``D`` the smallest spacing that keeps the cones apart, so a layer costs ``2·D²·q``
        backward rows (``q`` quantities per position) instead of two per quantity.
        """
        node = self.graph.nodes[index]
        source = node.inputs[0]
        shape = self.graph.nodes[source].shape
        qshape = tuple(node.op.quantity_value(state.values[source][:1]).shape[1:])
        batch = state.lower.shape[0]
        widest = max(math.prod(n.shape) for n in self.graph.nodes[: source + 1])
        chunk = max(1, memory // (2 * batch * widest))
        spacing = self._spacing(source, qshape) if len(qshape) == 3 else None
        if spacing is None:  # one backward row per quantity and sign
            lowers, uppers = [], []
            for start in range(0, size, chunk):
                stop = min(size, start + chunk)
                rows = node.op.quantity_rows(shape, start, stop, state.lower)
                lam = torch.cat((rows, -rows)).unsqueeze(0).expand(batch, -1, *shape)
                coef, const = self.backward(state, source, lam)
                value = concretize(coef, const, state.lower, state.upper)
                uppers.append(value[:, : stop - start])
                lowers.append(-value[:, stop - start :])
            return torch.cat(lowers, 1).view(batch, *qshape), torch.cat(uppers, 1).view(batch, *qshape)
        lower = torch.empty((batch, *qshape), dtype=self.dtype, device=state.lower.device)
        upper = torch.empty_like(lower)
        channels, height, width = qshape
        center, radius = state.center.unsqueeze(1), state.radius.unsqueeze(1)
        step = max(1, chunk // 2)
        for a in range(min(spacing, height)):
            for b in range(min(spacing, width)):
                owners, members = self._owners(source, qshape, spacing, (a, b))
                inside = owners[0].flatten()
                for c0 in range(0, channels, step):
                    c1 = min(channels, c0 + step)
                    rows = self._grouped_rows(node.op, shape, range(c0, c1), spacing, (a, b), state.lower)
                    lam = torch.cat((rows, -rows)).unsqueeze(0).expand(batch, -1, *shape)
                    coef, const = self.backward(state, source, lam, owners, members)  # const: (B, M, G)
                    terms = (coef * center + coef.abs() * radius).sum(2).flatten(2)  # input channels move together
                    per = const.index_add(2, inside.clamp_min(0), terms * (inside >= 0))
                    m = c1 - c0
                    grid = upper[0, 0, a::spacing, b::spacing].shape
                    upper[:, c0:c1, a::spacing, b::spacing] = per[:, :m].view(batch, m, *grid)
                    lower[:, c0:c1, a::spacing, b::spacing] = -per[:, m:].view(batch, m, *grid)
        return lower, upper

    def _grouped_rows(self, op: Nonlinear, shape: tuple[int, ...], channels: range, spacing: int,
                      offset: tuple[int, int], like: Tensor) -> Tensor:
        """Rows summing, for each quantity channel, its quantities at the positions ``offset (mod spacing)``."""
        rows = torch.zeros((len(channels), *shape), dtype=like.dtype, device=like.device)
        a, b = offset
        m = torch.arange(len(channels), device=like.device)
        ch = torch.arange(channels.start, channels.stop, device=like.device)
        if isinstance(op, GroupSort2Op):
            rows[m, 2 * ch, a::spacing, b::spacing] = 1
            rows[m, 2 * ch + 1, a::spacing, b::spacing] = -1
        else:
            rows[m, ch, a::spacing, b::spacing] = 1
        return rows

    def _cone_maps(self, source: int, seed: Tensor) -> dict[int, Tensor]:
        """Push non-negative maps on node ``source`` back to every earlier node through the ops' supports."""
        nodes = self.graph.nodes
        maps: dict[int, Tensor] = {source: seed}
        out: dict[int, Tensor] = {}
        for j in range(source, -1, -1):
            if j not in maps:
                continue
            m = maps.pop(j)
            out[j] = m
            if j == 0:
                break
            node = nodes[j]
            for i, back in zip(node.inputs, self._cone_transpose(node, m)):
                maps[i] = back if i not in maps else maps[i] + back
        return out

    def _cone_transpose(self, node: Node, m: Tensor) -> list[Tensor]:
        """Where each input coordinate can reach the marked outputs (a superset is fine), per input."""
        op = node.op
        in_shape = self.graph.nodes[node.inputs[0]].shape
        if isinstance(op, AddOp):
            return [m, m]
        if isinstance(op, ConvOp):
            ones = torch.ones_like(op.weight, dtype=m.dtype)
            return [torch.nn.grad.conv2d_input((m.shape[0], *in_shape), ones, m, op.stride, op.padding, op.dilation, op.groups)]
        if isinstance(op, LinearOp):
            return [m.flatten(1).sum(1).view(-1, *([1] * len(in_shape))).expand(-1, *in_shape).contiguous()]
        if isinstance(op, NegateConcatOp):
            first, second = m.chunk(2, dim=op.dim)
            return [first + second]
        if isinstance(op, (FunctionOp, ReshapeOp)):
            return [op.transpose(m, in_shape)]
        if isinstance(op, GroupSort2Op):
            pairs = m.reshape(m.shape[0], m.shape[1] // 2, 2, *m.shape[2:])
            return [pairs.sum(2, keepdim=True).expand_as(pairs).reshape(m.shape)]
        if isinstance(op, MaxPoolOp):
            with gradients_on():
                probe = torch.zeros((m.shape[0], *in_shape), dtype=m.dtype, device=m.device, requires_grad=True)
                pooled = F.avg_pool2d(probe, op.kernel, op.stride, op.padding, count_include_pad=True)
                (grad,) = torch.autograd.grad(pooled, probe, m)
            return [grad]
        if isinstance(op, L2PoolOp):
            spread = op._spread(m)
            return [F.pad(spread, (0, in_shape[-1] - spread.shape[-1], 0, in_shape[-2] - spread.shape[-2]))]
        return [m]  # channel-wise affine maps and elementwise activations keep positions

    def _spacing(self, source: int, qshape: tuple[int, ...]) -> int | None:
        """Smallest spacing ``D`` on the quantity map keeping the cones of its quantities disjoint at every node.

        None when no spacing helps (a dense layer on the way, or a single quantity per group).
        """
        key = (source, qshape)
        if key in self._spacings:
            return self._spacings[key]
        found = None
        if all(len(n.shape) == 3 for n in self.graph.nodes[: source + 1]):
            _, height, width = qshape
            for spacing in range(1, max(height, width)):
                if 4 * spacing * spacing > height * width:  # too few quantities share a pass to pay for the bookkeeping
                    break
                if self._owners(source, qshape, spacing, (0, 0), check=True) is not None:
                    found = spacing
                    break
        self._spacings[key] = found
        return found

    def _owners(self, source: int, qshape: tuple[int, ...], spacing: int, offset: tuple[int, int],
                check: bool = False) -> tuple[dict[int, Tensor], int] | None:
        """Per node, which quantity's cone holds each position (``(H, W)`` long, −1: none), and how many quantities.

        Found by pushing three maps back (marks, ids, ids²): where they mix, ``s2·s0 ≠ s1²``;
        with ``check`` that returns None, without it the caller trusts the spacing.
        """
        key = (source, qshape, spacing, offset)
        if key in self._owner_cache:
            return self._owner_cache[key]
        shape = self.graph.nodes[source].shape
        a, b = offset
        ids = torch.zeros(shape[-2:], dtype=torch.float64, device=self.device)
        grid = ids[a::spacing, b::spacing]
        members = grid.numel()
        ids[a::spacing, b::spacing] = torch.arange(1, members + 1, dtype=torch.float64, device=self.device).view(grid.shape)
        mark = (ids > 0).to(torch.float64)
        seed = torch.stack([mark, ids, ids * ids]).unsqueeze(1).expand(3, shape[0], *shape[-2:]).contiguous()
        owners: dict[int, Tensor] = {}
        for j, m in self._cone_maps(source, seed).items():
            s0, s1, s2 = m.sum(1)  # over channels → (H, W) each
            scale = s0.max().clamp_min(1e-300)  # counts grow by the kernel sizes; only ratios matter
            s0, s1, s2 = s0 / scale, s1 / scale, s2 / scale
            inside = s0 > 0
            mixed = inside & ((s2 * s0 - s1 * s1).abs() > 1e-9 * (s1 * s1))
            if check and bool(mixed.any()):
                return None
            owners[j] = torch.where(inside, (s1 / s0.clamp_min(1e-300)).round() - 1, torch.full_like(s0, -1)).long()
        result = (owners, members)
        self._owner_cache[key] = result
        return result

    # ---------------------------------------------------------------------------------------
    def backward(self, state: BoundState, start: int, lam: Tensor, owners: dict[int, Tensor] | None = None,
                 members: int = 0, alphas: dict[int, list[Tensor]] | None = None) -> tuple[Tensor, Tensor]:
        """CROWN: ``lam · node_start ≤ coef · x + const`` on every box; returns ``(coef (B, M, *in), const (B, M))``.

        With ``owners`` (see :meth:`_owners`) the constant is split by cone: ``(B, M, members)``.
        ``alphas``: per nonlinear node, the free parameters of its relaxation (α-CROWN; see
        ``Nonlinear.init_alpha``); the pass then keeps the autograd graph through them.
        """
        batch, rows = lam.shape[:2]
        lams: dict[int, Tensor] = {start: lam}
        const = lam.new_zeros(batch, rows, members) if owners is not None else lam.new_zeros(batch, rows)
        nodes = self.graph.nodes

        def accumulate(i: int, value: Tensor) -> None:
            lams[i] = value if i not in lams else lams[i] + value

        def add_terms(j: int, terms: Tensor) -> None:
            nonlocal const
            if owners is None:
                const = const + terms.flatten(2).sum(2)
                return
            owner = owners[j].flatten()
            spatial = terms.sum(2).flatten(2) if terms.dim() == 5 else terms.flatten(2)
            const = const.index_add(2, owner.clamp_min(0), spatial * (owner >= 0))

        with torch.no_grad() if alphas is None else contextlib.nullcontext():
            for j in range(start, 0, -1):
                if j not in lams:
                    continue
                lam_j = lams.pop(j)
                node = nodes[j]
                if isinstance(node.op, AddOp):
                    for i in node.inputs:
                        accumulate(i, lam_j)
                elif isinstance(node.op, Affine):
                    flat = lam_j.reshape(batch * rows, *node.shape)
                    if owners is None:
                        bias = node.op.bias_term(flat)
                        if bias is not None:
                            const = const + bias.view(batch, rows)
                    else:
                        terms = node.op.bias_map(flat)
                        if terms is not None:
                            add_terms(j, terms.reshape(batch, rows, *node.shape))
                    in_shape = nodes[node.inputs[0]].shape
                    accumulate(node.inputs[0], node.op.transpose(flat, in_shape).reshape(batch, rows, *in_shape))
                else:
                    coef, terms = node.op.relax(lam_j, state.pre[j], None if alphas is None else alphas.get(j))
                    add_terms(j, terms)
                    accumulate(node.inputs[0], coef)
        coef = lams.get(0)
        if coef is None:  # the function does not depend on the input
            coef = lam.new_zeros(batch, rows, *self.input_shape)
        return coef, const

    def optimized_backward(self, state: BoundState, start: int, lam: Tensor, steps: int = 20,
                           lr: float = 0.2) -> tuple[Tensor, Tensor]:
        """α-CROWN (Xu et al., ICLR 2021): :meth:`backward` with its relaxations' free parameters optimized.

        Every unstable ReLU / GroupSort2 neuron's lower-bound slope is a parameter in [0, 1]
        (CROWN fixes it at 0 or 1), every L2-norm pooling window's tangent points (below: the
        plane's point of contact, above: the square root's) are free; each bounded row (box ×
        function) has its own. Any value gives a sound bound, so ``steps`` projected Adam steps
        on the sum of the concretized bounds (rows are independent) only choose among sound
        bounds; each row keeps its best iterate (never worse than CROWN, the first iterate).
        Intermediate bounds are not re-optimized. Returns ``(coef, const)`` as :meth:`backward`.
        """
        if steps < 0 or lr <= 0:
            raise ValueError(f"alpha_steps must be >= 0 and alpha_lr > 0; got {steps}, {lr}")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("α-CROWN optimizes its relaxations by autograd: call it outside torch.inference_mode "
                               "(the explainers' attribute() does)")
        rows = lam.shape[1]
        nodes = self.graph.nodes
        alphas = {}
        for j, pre in state.pre.items():
            if j <= start:
                init = nodes[j].op.init_alpha(pre, rows)
                if init is not None:
                    alphas[j] = init
        params = [t.requires_grad_(True) for group in alphas.values() for t in group]
        best: tuple[Tensor, Tensor, Tensor] | None = None
        with gradients_on():
            optimizer = torch.optim.Adam(params, lr=lr) if params else None
            for step in range(steps + 1):
                coef, const = self.backward(state, start, lam, alphas=alphas)
                value = concretize(coef, const, state.lower, state.upper)  # (B, M)
                with torch.no_grad():
                    if best is None:
                        best = (value.detach().clone(), coef.detach().clone(), const.detach().clone())
                    else:
                        better = value.detach() < best[0]
                        view = better.view(*better.shape, *([1] * (coef.dim() - 2)))
                        best = (torch.where(better, value.detach(), best[0]), torch.where(view, coef.detach(), best[1]),
                                torch.where(better, const.detach(), best[2]))
                if step == steps or optimizer is None or not value.requires_grad:
                    break
                optimizer.zero_grad(set_to_none=True)
                value.sum().backward()
                optimizer.step()
                with torch.no_grad():
                    for j, group in alphas.items():
                        nodes[j].op.project_alpha(group)
        assert best is not None
        return best[1], best[2]

    # ---------------------------------------------------------------------------------------
    def margins(self, state: BoundState, target: Tensor, method: Method = "crown", alpha_steps: int = 20,
                alpha_lr: float = 0.2) -> MarginBound:
        """Upper bounds of ``f_k − f_target`` for every class ``k`` on the boxes of ``state``.

        ``method``: ``ibp`` (intervals), ``crown`` (one backward linear relaxation) or
        ``alpha-crown`` (the relaxation's free parameters optimized for each box and class:
        ``alpha_steps`` Adam steps of rate ``alpha_lr`` on the bound, the best iterate kept;
        see :meth:`optimized_backward`).
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        out = self.graph.output
        logits = state.values[out]
        if logits.dim() != 2:
            raise ValueError(f"the model's output must be logits (N, K); got per-sample shape {tuple(logits.shape[1:])}")
        batch, classes = logits.shape
        target = target.to(logits.device).long()
        if target.shape != (batch,) or int(target.max()) >= classes:
            raise ValueError(f"target must be ({batch},) class indices < {classes}; got {target.tolist()[:8]}")
        eye = torch.eye(classes, dtype=self.dtype, device=logits.device)
        spec = eye.unsqueeze(0) - eye[target].unsqueeze(1)  # (B, K, K): rows e_k − e_target
        margin = logits - logits.gather(1, target[:, None])  # at the center
        lipschitz = self._margin_lipschitz(target)
        lo, up = state.boxes[out]
        ibp = up - lo.gather(1, target[:, None])
        if method == "crown":
            coef, const = self.backward(state, out, spec)
        elif method == "alpha-crown":
            coef, const = self.optimized_backward(state, out, spec, alpha_steps, alpha_lr)
        else:
            coef, const = None, None
        return MarginBound(target, state.center, margin, ibp, lipschitz, coef, const)

    def _margin_lipschitz(self, target: Tensor) -> Tensor:
        """``(B, K)``: Lipschitz constant of ``f_k − f_target`` (graph and declared certificate; inf if none)."""
        nodes = self.graph.nodes
        out = nodes[-1]
        classes = out.shape[0]
        if isinstance(out.op, LinearOp):
            w = out.op.weight.double()
            pair = torch.cdist(w, w).to(self.dtype) * self.graph.lipschitz(out.inputs[0])  # ‖W_k − W_c‖ · L(prefix)
        else:
            pair = torch.full((classes, classes), math.sqrt(2.0) * self.graph.lipschitz(self.graph.output), dtype=self.dtype)
        pair = pair.to(target.device)
        if not self.use_lipschitz:
            return torch.full((len(target), classes), math.inf, dtype=self.dtype, device=target.device)
        if self.certificate is not None:
            pair = pair.clamp_max(MARGIN_LIPSCHITZ[self.certificate])
        pair = torch.nan_to_num(pair, nan=math.inf)
        return pair[target]


@dataclass
class MarginBound:
    """Linear and constant upper bounds of ``f_k − f_c`` valid on a box and on every box inside it with the same center.

    ``upper(radius)`` evaluates them on boxes ``center ± radius`` whose radius is at most the
    original box's (per coordinate): the linear bound (CROWN), the interval bound (only for
    the original box), the Lipschitz/certificate cap ``margin + L‖radius‖₂``; the minimum.
    """

    target: Tensor  # (B,)
    center: Tensor  # (B, *in)
    margin: Tensor  # (B, K) f_k − f_c at the center
    interval: Tensor  # (B, K) IBP bound on the original box
    lipschitz: Tensor  # (B, K) constant of f_k − f_c (inf if unknown)
    coef: Tensor | None  # (B, K, *in)
    const: Tensor | None  # (B, K)

    def linear_at_center(self) -> Tensor:
        """``coef · center + const`` ``(B, K)``."""
        assert self.coef is not None and self.const is not None
        return (self.coef.flatten(2) @ self.center.flatten(1).unsqueeze(2)).squeeze(2) + self.const

    def upper(self, radius: Tensor | None = None) -> Tensor:
        """``(B, K)`` bounds on the original box (``radius=None``) or ``(B, R, K)`` on ``R`` sub-boxes ``(B, R, *in)``."""
        if radius is None:
            raise ValueError("pass the box's radius (B, *in) or sub-box radii (B, R, *in)")
        single = radius.dim() == self.center.dim()
        radius = radius.unsqueeze(1) if single else radius
        r = radius.flatten(2).to(self.margin.dtype)
        cap = self.margin.unsqueeze(1) + lipschitz_reach(self.lipschitz.unsqueeze(1), r.norm(dim=2, keepdim=True))
        bound = cap
        if self.coef is not None:
            linear = self.linear_at_center().unsqueeze(1) + r @ self.coef.flatten(2).abs().transpose(1, 2)
            bound = torch.minimum(bound, linear)
        if single:
            bound = torch.minimum(bound, self.interval.unsqueeze(1))
        bound = bound.scatter(2, self.target.view(-1, 1, 1).expand(-1, bound.shape[1], 1), 0.0)
        return bound.squeeze(1) if single else bound


def lipschitz_reach(lipschitz: Tensor, norm: Tensor) -> Tensor:
    """``L · ‖δ‖₂`` with ``inf · 0 = 0`` (an unknown constant still allows no move when nothing moves)."""
    return torch.where(norm > 0, lipschitz * norm, torch.zeros_like(lipschitz * norm.clamp_min(1)))


def overlap(bounds: Tensor, target: Tensor) -> Tensor:
    """Adversarial overlap ``max_{k ≠ c} bound_k`` from ``(B, ..., K)`` bounds (``-inf`` with one class)."""
    mask = torch.nn.functional.one_hot(target, bounds.shape[-1]).bool()
    mask = mask.view(mask.shape[0], *([1] * (bounds.dim() - 2)), mask.shape[-1])
    return bounds.masked_fill(mask, -math.inf).amax(dim=-1)


def margin_bounds(
    model: nn.Module | BoundedNetwork,
    x: Tensor,
    target: Tensor,
    epsilon: float | Tensor,
    mask: Tensor | None = None,
    method: Method = "crown",
    intermediate: Intermediate = "crown",
    crown_max_neurons: int | None = 2048,
    alpha_steps: int = 20,
    alpha_lr: float = 0.2,
) -> Tensor:
    """Upper bounds ``(N, K)`` of ``f_k(x + δ) − f_target(x + δ)`` over ``|δ| ≤ ε`` (L∞), ``δ = 0`` where ``mask`` is 0.

    ``epsilon``: a number or ``(N,)``; ``mask``: ``(N, 1|C, H, W)`` in {0, 1} (the coordinates
    that may move; default all). The target's own column is 0. ``method``: ``ibp``, ``crown``
    or ``alpha-crown`` (``alpha_steps``, ``alpha_lr``: see :meth:`BoundedNetwork.margins`).
    """
    net = model if isinstance(model, BoundedNetwork) else BoundedNetwork(model, tuple(x.shape[1:]), dtype=x.dtype)
    radius = box_radius(x, epsilon, mask).to(net.dtype)
    xs = x.detach().to(net.dtype)
    state = net.bound(xs - radius, xs + radius, intermediate, crown_max_neurons)
    return net.margins(state, target, method, alpha_steps, alpha_lr).upper(radius)


def box_radius(x: Tensor, epsilon: float | Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-coordinate radius ``ε · mask`` broadcast to ``x``'s shape."""
    eps = torch.as_tensor(epsilon, dtype=x.dtype, device=x.device)
    if eps.dim() == 0:
        eps = eps.expand(len(x))
    if eps.shape != (len(x),) or bool((eps < 0).any()) or not bool(torch.isfinite(eps).all()):
        raise ValueError(f"epsilon must be a finite number >= 0 or ({len(x)},) of them; got {eps.tolist()}")
    radius = eps.view(-1, *([1] * (x.dim() - 1))).expand_as(x)
    if mask is not None:
        radius = radius * mask.to(x.dtype).expand_as(x)
    return radius.clone()
