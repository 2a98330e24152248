"""One registry of model constructors: ``build_model(name, **kwargs)`` (timm style).

Two kinds of entries:
- *models*, registered one by one with ``@register_model(name)`` (``lipschitz_cnn``,
  ``resnet50``, ...);
- *families*, a prefix resolved when a model is built (``timm/<name>`` stands for every timm
  architecture: registering 1,300 names one by one would only make ``harmonia models`` unreadable
  and importing timm slow).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterable, TypeVar

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class _Family:
    build: Callable[..., nn.Module]  # build(name_without_prefix, **kwargs)
    names: Callable[[], Iterable[str]]  # every name of the family, without the prefix
    description: str


_FAMILIES: dict[str, _Family] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator: register a constructor under ``name``; its docstring's first line describes it."""

    def decorator(fn: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        return fn

    return decorator


def register_family(
    prefix: str, build: Callable[..., nn.Module], names: Callable[[], Iterable[str]], description: str
) -> None:
    """Register every ``"{prefix}/<name>"``: ``build(name, **kwargs)`` makes one, ``names()`` lists them."""
    if prefix in _FAMILIES or "/" in prefix:
        raise ValueError(f"family prefix {prefix!r} is already registered or contains '/'")
    _FAMILIES[prefix] = _Family(build, names, description)


def list_models(pattern: str | None = None) -> dict[str, str]:
    """Registered model names with a one-line description each, sorted by name.

    Without ``pattern`` each family is one entry (``"timm/<name>"``); with a shell-style
    ``pattern`` (``"resnet*"``, ``"timm/*vit*"``) the matching names are listed, family
    members included.
    """
    out = {name: _DESCRIPTIONS[name] for name in _REGISTRY if pattern is None or fnmatchcase(name, pattern)}
    for prefix, family in _FAMILIES.items():
        if pattern is None:
            out[f"{prefix}/<name>"] = family.description
        elif pattern.startswith(f"{prefix}/"):
            for member in family.names():
                if fnmatchcase(f"{prefix}/{member}", pattern):
                    out[f"{prefix}/{member}"] = f"{prefix} {member}"
    return dict(sorted(out.items()))


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model: ``build_model("lipschitz_cnn", in_channels=1, num_classes=10)``."""
    if name in _REGISTRY:
        return _REGISTRY[name](**kwargs)
    prefix, _, member = name.partition("/")
    if member and prefix in _FAMILIES:
        return _FAMILIES[prefix].build(member, **kwargs)
    families = ", ".join(f"{p}/<name>" for p in sorted(_FAMILIES))
    raise ValueError(
        f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}"
        + (f"; families: {families}" if families else "")
    )
