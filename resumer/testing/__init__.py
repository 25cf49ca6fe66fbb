"""Helpers for tests, benchmarks and local deployments: a real S3 API server on loopback (moto).

``local_s3()`` starts ``moto_server`` on 127.0.0.1 on a free port and always stops it. The storage
options it yields reach the server through s3fs exactly as a user's AWS or MinIO bucket would.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
FAKE_KEY = "AKIATESTKEY123456789"
FAKE_SECRET = "s3cr3t-DO-NOT-PRINT-abc123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class LocalS3:
    """A running S3 API server: its endpoint and the options that reach it, plus its request log."""

    endpoint: str
    port: int
    log_path: str | None

    def storage_options(self) -> dict[str, Any]:
        return {"key": FAKE_KEY, "secret": FAKE_SECRET, "client_kwargs": {"endpoint_url": self.endpoint},
                "skip_instance_cache": True}

    def make_bucket(self, name: str) -> str:
        import s3fs

        fs = s3fs.S3FileSystem(**self.storage_options())
        fs.mkdir(name)
        return f"s3://{name}"

    def requests(self) -> list[str]:
        """Request lines the server logged so far (e.g. 'GET /bucket/key HTTP/1.1'), when logging to a file."""
        if not self.log_path or not os.path.exists(self.log_path):
            return []
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return [_ANSI.sub("", line.split('"')[1]) for line in f if line.count('"') >= 2]


def _moto_server() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    return exe if os.path.exists(exe) else (shutil.which("moto_server") or "moto_server")


@contextlib.contextmanager
def local_s3(port: int | None = None, *, log_path: str | None = None, ready_timeout_s: float = 20.0
             ) -> Iterator[LocalS3]:
    """Start moto's S3 server on 127.0.0.1 (a free port unless given); stop it on exit, whatever happens."""
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    port = port or free_port()
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen([_moto_server(), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()  # noqa: S310 - loopback only
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}") from None
                time.sleep(0.1)
        yield LocalS3(endpoint=endpoint, port=port, log_path=log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if log is not subprocess.DEVNULL:
            log.close()  # type: ignore[union-attr]


# --- fakes of the controller's protocols (resumer.core.controller), for driving it one step at a time -------------


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


class FakePlanner:
    """Returns the decisions it is given, one per attempt (the last one repeats); records what it was asked."""

    def __init__(self, *decisions: Any) -> None:
        self.decisions = list(decisions)
        self.asked: list[tuple[int, Any]] = []

    def decide(self, attempt: int, previous: Any) -> Any:
        import dataclasses

        self.asked.append((attempt, previous))
        d = self.decisions[min(attempt - 1, len(self.decisions) - 1)]
        return dataclasses.replace(d, attempt=attempt, previous_failure=previous)


class FakeRecorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def record_decision(self, decision: Any) -> None:
        self.events.append(("decision", decision))

    def end_attempt(self, attempt: int, status: str) -> None:
        self.events.append(("end", (attempt, status)))

    def log_attempt_metrics(self, metrics: dict[str, float]) -> None:
        attempt = self.of("decision")[-1].attempt if self.of("decision") else 0
        self.events.append(("metrics", (attempt, metrics)))

    def of(self, kind: str) -> list[Any]:
        return [v for k, v in self.events if k == kind]


class FakeLauncher:
    """Plays back scripted observations; ``launches`` and ``stops`` record what the controller did."""

    def __init__(self, *observations: Any) -> None:
        self.script = list(observations)
        self.launches: list[Any] = []
        self.stops: list[str] = []

    def launch(self, decision: Any) -> None:
        self.launches.append(decision)

    def poll(self) -> Any:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def stop(self, reason: str) -> None:
        self.stops.append(reason)


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
