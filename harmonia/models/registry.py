"""One registry of model constructors: ``build_model(name, **kwargs)`` (timm style)."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(name: str) -> Callable[[F], F]:
    """Decorator: register a constructor under ``name``; its docstring's first line describes it."""

    def decorator(fn: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        return fn

    return decorator


def list_models() -> dict[str, str]:
    """Registered model names with a one-line description each, sorted by name."""
    return {name: _DESCRIPTIONS[name] for name in sorted(_REGISTRY)}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model: ``build_model("lipschitz_cnn", in_channels=1, num_classes=10)``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)
