"""Recording in tests: a real MLflow tracking server on loopback, and an in-memory ``Recorder`` fake.

``local_mlflow(workdir)`` starts ``mlflow server`` with a SQLite backend and a local artifact root under
``workdir`` on 127.0.0.1 (a free port unless given) and always stops it. ``LocalMlflow.stop()`` and
``LocalMlflow.start()`` stop and restart the same server (same database, same port) in the middle of a
test, the way a shared tracking server goes away and comes back.

``MemoryRecorder`` implements ``resumer.tracking.base.Recorder`` in memory, for the controller's unit tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from resumer.core.decision import Decision
from resumer.testing import free_port
from resumer.tracking.base import RunStatus

# Without this the server starts a job runner: 13 processes, ~2.9 GB and a folder left in /dev/shm.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}


def _mlflow_exe() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    return exe if os.path.exists(exe) else (shutil.which("mlflow") or "mlflow")


class LocalMlflow:
    """One ``mlflow server`` process group (SQLite in ``workdir/mlflow.db``, artifacts in ``workdir/artifacts``)."""

    def __init__(self, workdir: str, port: int | None = None, *, ready_timeout_s: float = 60.0) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db_uri = f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"
        self.artifacts = os.path.join(workdir, "artifacts")
        self.log_path = os.path.join(workdir, "server.log")
        self.ready_timeout_s = ready_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and wait until ``/health`` answers (raises RuntimeError with the log tail if not)."""
        if self.running:
            return
        os.makedirs(self.artifacts, exist_ok=True)
        cmd = [_mlflow_exe(), "server", "--backend-store-uri", self.db_uri,
               "--artifacts-destination", self.artifacts, "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]
        with open(self.log_path, "ab") as log:
            # Own session: stop() signals the server and the workers it forks, and nothing else.
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                          env={**os.environ, **SERVER_ENV})
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._healthy():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start on {self.url}:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server's process group: SIGTERM, then SIGKILL after 10 s."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self._wait_port_free()

    def pids(self) -> list[int]:
        """The server's processes (its process group: the CLI and the uvicorn worker), e.g. to pin them to CPUs."""
        if self._proc is None:
            return []
        pgid, found = self._proc.pid, []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[2]) == pgid:
                            found.append(int(entry))
                except (OSError, ValueError, IndexError):
                    continue
        return found

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:  # noqa: S310 - loopback only
                return bool(r.status == 200)
        except OSError:
            return False

    def _wait_port_free(self, timeout_s: float = 10.0) -> None:
        """Workers may hold the socket a moment after the master exits; a restart on the same port needs it."""
        import socket

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", self.port))
                    return
                except OSError:
                    time.sleep(0.1)


@contextlib.contextmanager
def local_mlflow(workdir: str, port: int | None = None, *, ready_timeout_s: float = 60.0) -> Iterator[LocalMlflow]:
    """Start ``mlflow server`` (SQLite + local artifacts under ``workdir``); stop it on exit, whatever happens."""
    server = LocalMlflow(workdir, port, ready_timeout_s=ready_timeout_s)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class MemoryRecorder:
    """A ``Recorder`` that keeps every call in memory: ``calls`` in order, plus views for assertions."""

    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    training: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    commits: list[int] = field(default_factory=list)
    ended: dict[int, RunStatus] = field(default_factory=dict)
    job_status: RunStatus | None = None

    def _note(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))

    def start_job(self, job: str, params: Mapping[str, Any] | None = None) -> None:
        self._note("start_job", job, dict(params or {}))

    def record_decision(self, decision: Decision) -> None:
        self._note("record_decision", decision)
        self.decisions.append(decision)

    def log_attempt_metrics(self, metrics: Mapping[str, float], *, job: str | None = None) -> None:
        self._note("log_attempt_metrics", dict(metrics), job=job)

    def log_training(self, step: int, metrics: Mapping[str, float], *, job: str | None = None) -> None:
        self.training.append((step, dict(metrics)))

    def checkpoint_committed(self, step: int, *, job: str | None = None) -> None:
        self._note("checkpoint_committed", step, job=job)
        self.commits.append(step)

    def end_attempt(self, attempt: int, status: RunStatus | str, *, job: str | None = None) -> None:
        self._note("end_attempt", attempt, status, job=job)
        self.ended[attempt] = RunStatus.parse(status)

    def close_stale_attempts(self, job: str) -> None:
        self._note("close_stale_attempts", job)

    def end_job(self, status: RunStatus | str, *, job: str | None = None) -> None:
        self._note("end_job", status, job=job)
        self.job_status = RunStatus.parse(status)

    def flush(self, timeout_s: float = 30.0) -> bool:
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        self._note("close")
