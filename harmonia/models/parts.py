"""Naming the parts of a model, for learning-rate groups and freeze schedules.

A *part* is a module name relative to the model (``net.layer4``, ``3``) or one of three words:
- ``head``: the classifier (``model.head_names`` on backbones; otherwise the last module
  that owns parameters, e.g. the final ``Linear`` of ``cnn``/``lipschitz_cnn``);
- ``backbone``: every parameter not in the head;
- ``all``: every parameter.
A parameter belongs to the most specific part that contains it: the longest module name
first, then ``head``, then ``backbone``/``all``.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

WORDS = ("head", "backbone", "all")


def head_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head of ``model``."""
    names = getattr(model, "head_names", None)
    if names:
        return tuple(names)
    owners = [name for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))]
    if not owners:
        raise ValueError(f"{type(model).__name__} has no parameters, hence no head")
    return (owners[-1],)


def _inside(param_name: str, module_name: str) -> bool:
    return param_name.startswith(module_name + ".")


def check_parts(model: nn.Module, parts: Iterable[str], what: str) -> None:
    """Raise if a part is neither a word nor a submodule owning parameters."""
    modules = dict(model.named_modules())
    for part in parts:
        if part in WORDS:
            continue
        if part not in modules or not any(True for _ in modules[part].parameters()):
            tops = sorted({n.split(".")[0] for n, _ in model.named_parameters()})
            raise ValueError(
                f"{what}: {part!r} is not a part of {type(model).__name__} with parameters; use one of "
                f"{WORDS} or a module name (top-level: {', '.join(tops)})"
            )


def part_of(param_name: str, parts: Iterable[str], heads: tuple[str, ...]) -> str | None:
    """The most specific of ``parts`` that contains the parameter ``param_name`` (or ``None``)."""
    parts = list(parts)
    named = [p for p in parts if p not in WORDS and _inside(param_name, p)]
    if named:
        return max(named, key=len)
    in_head = any(_inside(param_name, h) for h in heads)
    if "head" in parts and in_head:
        return "head"
    if "backbone" in parts and not in_head:
        return "backbone"
    return "all" if "all" in parts else None


def parameters_of(model: nn.Module, part: str) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs contained in one part (containment, not specificity)."""
    heads = head_names(model)
    if part == "all":
        return list(model.named_parameters())
    if part == "head":
        return [(n, p) for n, p in model.named_parameters() if any(_inside(n, h) for h in heads)]
    if part == "backbone":
        return [(n, p) for n, p in model.named_parameters() if not any(_inside(n, h) for h in heads)]
    return [(n, p) for n, p in model.named_parameters() if _inside(n, part)]


def modules_of(model: nn.Module, part: str) -> list[nn.Module]:
    """The modules that make up one part (for freezing: BatchNorm layers are found inside)."""
    if part == "all":
        return [model]
    heads = head_names(model)
    if part == "head":
        return [model.get_submodule(h) for h in heads]
    if part == "backbone":  # leaves and parameter owners outside the head
        return [m for n, m in model.named_modules()
                if n and not any(n == h or _inside(n, h) for h in heads)
                and (not any(True for _ in m.children()) or any(True for _ in m.parameters(recurse=False)))]
    return [model.get_submodule(part)]
