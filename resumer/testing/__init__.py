"""Helpers for tests, benchmarks and local deployments: real servers on loopback and fakes of resumer's protocols.

- ``resumer.testing.s3``: ``local_s3()`` (moto's S3 API server), ``start_moto``, a cuttable ``TcpProxy``;
- ``resumer.testing.mlflow``: ``local_mlflow()`` (an ``mlflow server`` on SQLite);
- ``resumer.testing.fakes``: the controller's fakes and ``MemoryRecorder``, the one recorder fake.
"""

from __future__ import annotations

from typing import Any

from resumer.testing.fakes import FakeClock, FakeLauncher, FakePlanner, MemoryRecorder
from resumer.testing.s3 import FAKE_KEY, FAKE_SECRET, MotoServer, free_port, local_s3

__all__ = ["FAKE_KEY", "FAKE_SECRET", "FakeClock", "FakeLauncher", "FakePlanner", "MemoryRecorder", "MotoServer",
           "connections_by_thread", "defined_commands", "free_port", "local_s3"]


def connections_by_thread(monkeypatch: Any) -> list[int]:
    """Thread idents of every socket connect from now on (pytest's ``monkeypatch`` undoes it): a test asserts
    that a call never waits on the network by finding its thread absent, instead of timing it."""
    import socket
    import threading

    seen: list[int] = []
    real = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        seen.append(threading.get_ident())
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


def defined_commands() -> set[str]:
    """Names of every click command defined in the CLI's modules (to check each is registered on the group)."""
    import importlib
    import pkgutil

    import click

    import resumer.cli

    names: set[str] = set()
    for mod in pkgutil.iter_modules(resumer.cli.__path__, "resumer.cli."):
        for value in vars(importlib.import_module(mod.name)).values():
            if isinstance(value, click.Command) and not isinstance(value, click.Group):
                names.add(value.name or "")
    return names
