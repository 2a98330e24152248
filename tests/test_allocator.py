"""harmonia.allocator: freed memory is kept (no page faults on reuse), and user choices are respected.

Each case runs in a fresh interpreter: mallopt settings are process-wide and cannot be undone.
Page faults are counted (getrusage), not timed, so the test is not at the mercy of machine noise.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's"
)

# Allocates, touches and frees a 48 MiB block (an activation of a large batch) a few times and
# reports the minor page faults once the heap has settled. Above glibc's 32 MiB ceiling for its dynamic mmap
# threshold, such a block is mapped and unmapped on every round unless memory is retained.
PROBE = """
import json, resource, sys, torch
from harmonia.allocator import retain_freed_memory, why_not_retained
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
torch.set_num_threads(1)
def round_():
    block = torch.ones(48 << 20 >> 2)  # touches every page
    del block
for _ in range(10):  # the heap settles after a few rounds (aligned requests outgrow the freed chunk)
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults, "why_not": why_not_retained()}))
"""


def _probe(mode: str, **env: str) -> dict:
    from harmonia.allocator import _USER_CHOICES

    # Whatever malloc settings the caller's environment carries would change what is measured.
    dropped = ("HARMONIA_MALLOC", "LD_PRELOAD", "GLIBC_TUNABLES", *_USER_CHOICES)
    environment = {k: v for k, v in os.environ.items() if k not in dropped}
    environment.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=environment, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_retained_memory_is_reused_without_page_faults() -> None:
    system = _probe("system")
    retained = _probe("retain")
    assert retained["applied"] is True
    # 10 rounds × 48 MiB = 122,880 pages of 4 KiB faulted anew when glibc unmaps the block (~240
    # with transparent huge pages set to "always"); retained, the block is reused without a fault.
    assert system["faults"] > 200, system
    assert retained["faults"] <= system["faults"] // 20, (retained, system)


@glibc_only
@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"HARMONIA_MALLOC": "system"}, "HARMONIA_MALLOC=system"),
        ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "MALLOC_TRIM_THRESHOLD_ is set by the user"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}, "GLIBC_TUNABLES sets glibc.malloc"),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "jemalloc is preloaded"),
    ],
)
def test_user_choices_are_left_alone(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], reason: str) -> None:
    from harmonia import allocator

    for name in ("HARMONIA_MALLOC", "LD_PRELOAD", "GLIBC_TUNABLES", *allocator._USER_CHOICES):
        monkeypatch.delenv(name, raising=False)
    assert allocator.why_not_retained() is None
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(allocator, "_applied", False)
    # Returns before mallopt is reached, so this process's malloc is untouched.
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: pytest.fail("mallopt must not be called"))
    assert allocator.retain_freed_memory() is False
    assert allocator.why_not_retained() == reason


@pytest.mark.parametrize("value", ["sytem", "1", ""])
def test_an_unknown_choice_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from harmonia import allocator

    monkeypatch.setenv("HARMONIA_MALLOC", value)
    monkeypatch.setattr(allocator, "_applied", False)
    with pytest.raises(ValueError, match="HARMONIA_MALLOC=.*'retain'.*'system'"):
        allocator.retain_freed_memory()


def test_threshold_must_fit_a_c_int(monkeypatch: pytest.MonkeyPatch) -> None:
    from harmonia import allocator

    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setattr(allocator, "why_not_retained", lambda: None)
    with pytest.raises(ValueError, match="C int"):
        allocator.retain_freed_memory(2**31)


def test_the_harmonia_command_retains_memory_before_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    from harmonia import train

    calls: list[str] = []
    monkeypatch.setattr(train, "retain_freed_memory", lambda: calls.append("retain") or True)
    monkeypatch.setattr(train, "cli_main", lambda: calls.append("cli"))
    monkeypatch.setattr(sys, "argv", ["harmonia", "fit", "--config", "configs/digits.yaml"])
    train.main()
    assert calls == ["retain", "cli"]
