"""Name → constructor lookups shared by the registries (explainers, metrics).

A registry is a plain ``dict[str, Callable]``; these helpers give every one of them the same
errors (naming the kind of thing and the entry) and the same listing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def construct(registry: Mapping[str, Callable[..., T]], kind: str, name: str, kwargs: dict[str, Any]) -> T:
    """``registry[name](**kwargs)`` with errors that name the ``kind`` and the entry."""
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; registered: {', '.join(registry)}")
    try:
        return registry[name](**kwargs)
    except (TypeError, ValueError) as error:  # an unknown or bad argument (torchmetrics: ValueError)
        raise type(error)(f"{kind} {name!r}: {error}") from None


def describe(registry: Mapping[str, Callable[..., Any]]) -> dict[str, str]:
    """Each registered name with the first line of its constructor's docstring."""
    return {name: ((fn.__doc__ or "").strip().splitlines() or [""])[0] for name, fn in registry.items()}
