"""Fixtures of the unit tests: a one-rank gloo process group on loopback, and the ``resumer`` command run
in-process (click's ``CliRunner``): the same ``cli`` group the entry point runs, without starting a Python that
imports torch, ray and mlflow again for every command.

What only a real process can show (the installed console script, ``python -m resumer``, file descriptor 1
under ``--json``, the working directory on ``sys.path``) is tested in ``tests/integration/test_entry_points.py``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch.distributed as dist
from click.testing import CliRunner, Result
from fsspec.implementations.memory import MemoryFileSystem

from resumer.cli.main import cli

RunCli = Callable[..., Result]


class CredentialedMemoryFS(MemoryFileSystem):
    """memory:// that lists nothing without its credentials (``token="secret"``), like a private bucket; its own
    store, emptied after each test by ``credentialed_root``."""

    protocol = "credentialed-memory"
    store: dict[str, Any] = {}
    pseudo_dirs = [""]

    def __init__(self, *args: Any, token: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token = token

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        if self.token != "secret":
            raise PermissionError(13, "Permission denied: no credentials", path)
        return super().ls(path, detail=detail, **kwargs)


@pytest.fixture
def credentialed_root(monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, Any]]:
    """A fresh root on ``CredentialedMemoryFS`` and the storage options that open it."""
    fsspec.register_implementation(CredentialedMemoryFS.protocol, CredentialedMemoryFS, clobber=True)
    monkeypatch.setattr(CredentialedMemoryFS, "store", {})
    monkeypatch.setattr(CredentialedMemoryFS, "pseudo_dirs", [""])
    return f"{CredentialedMemoryFS.protocol}://r{uuid.uuid4().hex}", {"token": "secret"}


@pytest.fixture
def process_group() -> Iterator[None]:
    """A one-rank gloo process group on a free loopback port, destroyed after the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def resumer_cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[RunCli]:
    """``resumer_cli(*args, cwd=None)`` runs ``resumer ARGS`` in this process; ``cwd`` is the working directory.

    Modules the command imported from a ``cwd`` (user factories) are forgotten afterwards, so the next test
    imports its own files of the same name.
    """
    # An s3:// URI given to a command reaches no network here: botocore fails the first time instead of
    # retrying for seconds, and asks no instance-metadata service for credentials.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    level = logging.getLogger("resumer").level  # ``-v`` raises it for the rest of the process
    dirs: list[str] = []

    def run(*args: str, cwd: str | Path | None = None) -> Result:
        if cwd is not None:
            dirs.append(os.path.realpath(cwd))
            monkeypatch.chdir(cwd)
        return CliRunner().invoke(cli, list(args), prog_name="resumer")

    yield run
    logging.getLogger("resumer").setLevel(level)
    prefixes = tuple(d + os.sep for d in dirs)  # imported from os.getcwd(), which is a real path
    for name, module in list(sys.modules.items()) if dirs else ():
        if str(getattr(module, "__file__", None) or "").startswith(prefixes):
            del sys.modules[name]
