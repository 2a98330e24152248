"""Split a classifier at a layer into ``g`` (input → activations) and ``h`` (activations → logits).

Two ways, chosen from the model and the layer:
- **slicing** when the model is an ``nn.Sequential`` (the registry's ``ConvNet``) and the layer
  is one of its children (by index or name): ``g = children[:i+1]``, ``h = children[i+1:]``;
  ``h`` costs only the layers after the split.
- **forward hooks** for any other module path (``"layer3"``, ``"backbone.stages.2"``): ``g``
  runs the model until the layer fires and stops there; ``h`` runs the whole model on the
  original input while a hook replaces the layer's output with the given activations. That is
  exact when every path from the input to the logits goes through the layer (a stage boundary
  of a ResNet, not the inside of a residual block), and it pays for the layers before the split
  again on every call.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class _Reached(Exception):
    """Raised by the capture hook to stop the forward once the split layer has produced output."""


class LayerSplit:
    """``activations(x)`` and ``logits(a, x)`` of ``model`` cut at ``layer`` (index or module name).

    Args:
        model: the classifier (its current train/eval mode is used as is).
        layer: an ``int`` (index of a child of an ``nn.Sequential``; negative counts from the end)
            or a module name as in ``model.named_modules()``.
    """

    def __init__(self, model: nn.Module, layer: int | str) -> None:
        self.model = model
        self.layer = layer
        children = list(model.named_children())
        names = [name for name, _ in children]
        self._index: int | None = None
        if isinstance(layer, bool) or not isinstance(layer, (int, str)):
            raise TypeError(f"layer must be an int index or a module name, got {layer!r}")
        if isinstance(layer, int):
            if not isinstance(model, nn.Sequential):
                raise ValueError(
                    f"an integer layer ({layer}) needs an nn.Sequential model; {type(model).__name__} is not: "
                    f"name the module instead (children: {', '.join(names)})"
                )
            if not -len(children) <= layer < len(children):
                raise ValueError(f"layer index {layer} is outside the model's {len(children)} children")
            self._index = layer % len(children)
        elif isinstance(model, nn.Sequential) and layer in names:
            self._index = names.index(layer)
        modules = dict(model.named_modules())
        if self._index is not None:
            self.module = children[self._index][1]
            self.name = names[self._index]
            self._g = nn.Sequential(*[m for _, m in children[: self._index + 1]])
            self._h = nn.Sequential(*[m for _, m in children[self._index + 1 :]])
        elif layer in modules and layer != "":
            self.module, self.name = modules[layer], layer
        else:
            raise ValueError(f"no module named {layer!r} in {type(model).__name__}; its children are: {', '.join(names)}")

    @property
    def needs_input(self) -> bool:
        """Whether :meth:`logits` needs the original input (the hook path)."""
        return self._index is None

    def activations(self, x: Tensor) -> Tensor:
        """``g(x)``: the split layer's output for inputs ``x``."""
        if self._index is not None:
            return self._g(x)
        captured: dict[str, Tensor] = {}

        def capture(module: nn.Module, args: Any, output: Tensor) -> None:
            captured["a"] = output
            raise _Reached  # nothing after the split is needed

        handle = self.module.register_forward_hook(capture)
        try:
            self.model(x)
        except _Reached:
            pass
        finally:
            handle.remove()
        if "a" not in captured:
            raise RuntimeError(f"layer {self.name!r} was not called in the forward of {type(self.model).__name__}")
        return captured["a"]

    def logits(self, activations: Tensor, x: Tensor | None = None) -> Tensor:
        """``h(a)``: logits from split-layer activations (``x``: the inputs they stand for, hook path only)."""
        if self._index is not None:
            return self._h(activations)
        if x is None or len(x) != len(activations):
            raise ValueError(f"layer {self.name!r} is split with hooks: logits() needs the inputs, one per activation row")

        def replace(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            return activations

        handle = self.module.register_forward_hook(replace)
        try:
            return self.model(x)
        finally:
            handle.remove()
