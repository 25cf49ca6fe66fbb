"""A real MLflow tracking server on loopback, for tests and benchmarks.

``local_mlflow(workdir)`` starts ``mlflow server`` with a SQLite backend and a local artifact root under
``workdir`` on 127.0.0.1 (a free port unless given) and always stops it. ``LocalMlflow.stop()`` and
``LocalMlflow.start()`` stop and restart the same server (same database, same port) in the middle of a
test, the way a shared tracking server goes away and comes back.
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
from collections.abc import Iterator

from resumer.testing.s3 import free_port

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
