"""Keep freed host memory inside the process, so CPU training steps stop page-faulting.

Why this exists: glibc's malloc serves large blocks (the activations of a training step, a
few MB each) with ``mmap`` or from the top of the heap, and gives them back to the operating
system when they are freed: ``munmap``, or trimming the heap once more than
``M_TRIM_THRESHOLD`` is free at its top. The next step asks for the same sizes again and
touches every page afresh: a minor page fault and a zeroed page per 4 KiB, thousands per step.
With the two thresholds raised, the same steps fault about once (``tests/test_allocator.py``
checks it; the speed-ups per step kind are in benchmarks/README.md, ``lipschitz_cost.py`` and
``step_cost.py``).

This is what PyTorch's CPU performance guide obtains by preloading jemalloc or tcmalloc,
done with glibc's own ``mallopt`` so nothing is installed. The cost: a process keeps its
peak heap (it does not shrink after a large step), which is what a training loop needs,
since every step reaches the same peak again.

Raising ``M_TRIM_THRESHOLD`` alone is worse than nothing: setting either threshold
switches off glibc's dynamic mmap threshold, so every block above 128 KiB would then be
mapped and unmapped, which is slower than the default. Both are set together.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 30  # blocks below 1 GiB come from (and return to) the heap
ENV = "HARMONIA_MALLOC"  # "retain" (default) or "system" (leave malloc as it is)
# Signs that the user already chose an allocator or malloc settings: then we do nothing.
_USER_CHOICES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_applied = False


def why_not_retained() -> str | None:
    """The reason :func:`retain_freed_memory` would leave malloc alone here, else ``None``.

    Raises ``ValueError`` when ``HARMONIA_MALLOC`` is set to anything but ``retain`` or ``system``
    (a typo must not silently mean the default).
    """
    choice = os.environ.get(ENV, "retain").strip().lower()
    if choice not in ("retain", "system"):
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected 'retain' (the default) or 'system'")
    if choice == "system":
        return f"{ENV}={os.environ[ENV]}"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc (its malloc has no mallopt thresholds)"
    for name in _USER_CHOICES:
        if name in os.environ:
            return f"{name} is set by the user"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    preload = os.environ.get("LD_PRELOAD", "")
    for allocator in _OTHER_ALLOCATORS:
        if allocator in preload:
            return f"{allocator} is preloaded"
    return None


def retain_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Make glibc's malloc keep freed blocks below ``threshold`` bytes for reuse.

    Sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to ``threshold`` (see the module
    docstring for why both). Returns ``True`` when the settings are in force (also on a
    repeated call), ``False`` when left alone: ``HARMONIA_MALLOC=system``, a C library other
    than glibc, or an allocator / malloc setting the user chose (:func:`why_not_retained`).
    Process-wide and not undone: call it at a program's start (the ``harmonia`` command does),
    not from library code that runs inside someone else's program.
    """
    global _applied
    if _applied:
        return True
    if why_not_retained() is not None:
        return False
    if not 0 < threshold < 2**31:
        raise ValueError(f"threshold must be in (0, 2**31) bytes (a C int); got {threshold}")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold))
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(threshold))
    _applied = bool(mmap_ok and trim_ok)
    return _applied
