"""Helpers for the S3 integration tests: the moto server process, a cuttable TCP proxy, fake credentials.

Imported by ``conftest.py`` and the tests in this folder. Everything started here has a ``stop``/``close``
that always works and may be called again.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

# Distinctive fake credentials: tests assert that neither ever shows up in errors, logs or CLI output.
FAKE_KEY = "AKIATESTKEY123456789"
FAKE_SECRET = "s3cr3t-DO-NOT-PRINT-abc123"
MOTO_SERVER = os.path.join(os.path.dirname(sys.executable), "moto_server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def s3_options(endpoint: str) -> dict[str, Any]:
    """s3fs storage options for the local server (no region_name: bucket creation would then fail)."""
    return {"key": FAKE_KEY, "secret": FAKE_SECRET, "client_kwargs": {"endpoint_url": endpoint}}


@dataclass
class MotoServer:
    """A running ``moto_server``: its endpoint URL, port, request log (werkzeug writes one line per request)."""

    url: str
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the server process (terminate, wait, kill): always safe to call again."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy from the env


def _answers(url: str) -> bool:
    try:
        with _DIRECT.open(url + "/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False


def start_moto(log_path: Path, port: int | None = None, timeout_s: float = 20.0) -> MotoServer:
    """Start ``moto_server`` on ``port`` (a free one if None) and wait until it answers HTTP."""
    port = port or free_port()
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child; closed right after the spawn
    try:
        proc = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    finally:
        log.close()
    server = MotoServer(url=f"http://127.0.0.1:{port}", port=port, log_path=log_path, proc=proc)
    deadline = time.monotonic() + timeout_s
    while not _answers(server.url):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"moto_server on port {port} did not start (exit {proc.poll()}): "
                               f"{server.log_text()[-2000:]}")
        time.sleep(0.05)
    return server


def make_bucket(endpoint: str) -> str:
    bucket = f"it-{uuid.uuid4().hex[:20]}"
    fsspec.filesystem("s3", **s3_options(endpoint)).mkdir(bucket)
    return bucket



class TcpProxy:
    """A loopback TCP proxy to ``127.0.0.1:target_port`` that can be cut and restored on the same port.

    ``cut()`` closes the listener and every open connection (clients see resets and refused connects,
    as in a network outage); ``restore()`` listens again on the same port. Threads only; ``close()`` stops all.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.bytes_up = 0  # client -> server bytes forwarded so far (to cut in the middle of an upload)
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accepting = threading.Event()
        self._thread: threading.Thread | None = None
        self.restore()

    def restore(self) -> None:
        """Listen (again) on the proxy's port."""
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", self.port))
        lsock.listen(64)
        lsock.settimeout(0.1)
        self._listener = lsock
        self._accepting.set()
        self._thread = threading.Thread(target=self._accept_loop, args=(lsock,), name="proxy-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self, lsock: socket.socket) -> None:
        while self._accepting.is_set():
            try:
                client, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if not self._accepting.is_set():
                    client.close()
                    upstream.close()
                    return
                self._socks.update((client, upstream))
                self.connections += 1
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up), name="proxy-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
                if up:
                    self.bytes_up += len(data)
        except OSError:
            pass  # the other side (or cut()) closed the connection
        finally:
            self._drop(src)
            self._drop(dst)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._socks.discard(s)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()

    def cut(self) -> None:
        """Close the listener and every open connection: the endpoint is unreachable until restore()."""
        self._accepting.clear()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            self._drop(s)

    def close(self) -> None:
        self.cut()
