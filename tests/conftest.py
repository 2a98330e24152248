"""Shared test settings: never touch the network, keep runs small and deterministic."""

import os
import socket

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _own_rendezvous_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's DDP group meets on a port chosen for that test.

    Lightning writes the port of a session's first DDP launch to ``MASTER_PORT`` and every later
    launch reuses it, minutes later; on a shared CI host another process may hold that port by
    then, and the launch fails with EADDRINUSE.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_PORT", str(port))
