"""A real S3 API server on loopback for tests and benchmarks: moto's server process, a cuttable TCP proxy.

``local_s3()`` starts ``moto_server`` on 127.0.0.1 on a free port and always stops it; the storage options it
gives reach the server through s3fs exactly as a user's AWS or MinIO bucket would. ``start_moto`` gives the
process to a test that kills and restarts it. Everything started here has a ``stop``/``close`` that always
works and may be called again. The credentials are fake and never valid anywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

# Distinctive fake credentials: tests assert that neither ever shows up in errors, logs or CLI output.
FAKE_KEY = "AKIATESTKEY123456789"
FAKE_SECRET = "s3cr3t-DO-NOT-PRINT-abc123"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _moto_server() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    return exe if os.path.exists(exe) else (shutil.which("moto_server") or "moto_server")


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

    @property
    def endpoint(self) -> str:
        return self.url

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def storage_options(self) -> dict[str, Any]:
        """Options that reach this server, with no s3fs instance shared with another test's options."""
        return {**s3_options(self.url), "skip_instance_cache": True}

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name``; returns ``s3://name``."""
        fsspec.filesystem("s3", **self.storage_options()).mkdir(name)
        return f"s3://{name}"

    def requests(self) -> list[str]:
        """Request lines the server logged so far (e.g. 'GET /bucket/key HTTP/1.1')."""
        if not self.log_path.exists():
            return []
        return [_ANSI.sub("", line.split('"')[1]) for line in self.log_text().splitlines() if line.count('"') >= 2]

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
        proc = subprocess.Popen([_moto_server(), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
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


@contextlib.contextmanager
def local_s3(port: int | None = None, *, log_path: str | Path | None = None, ready_timeout_s: float = 20.0
             ) -> Iterator[MotoServer]:
    """Start moto's S3 server on 127.0.0.1 (a free port unless given); stop it on exit, whatever happens."""
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="resumer-s3-"))) / "moto.log"
        server = start_moto(Path(log_path), port, ready_timeout_s)
        stack.callback(server.stop)
        yield server




_REQUEST_HEAD = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r\n(.*?)\r\n\r\n", re.DOTALL)
_RANGE = re.compile(rb"^range: *bytes=(\d+)-(\d*)", re.IGNORECASE | re.MULTILINE)


@dataclass
class ProxiedRequest:
    """One HTTP request seen going through the proxy: method, path, the Range it asked for (if any), and how
    much of its answer's body went back to the client; ``cut_at``: the proxy closes the connection once that
    many body bytes were delivered (``cut`` then says it did)."""

    method: str
    path: str
    range_start: int | None
    body: int = 0
    cut_at: int | None = None
    cut: bool = False
    _head_done: bool = False
    _head: bytes = b""

    def answer(self, data: bytes) -> tuple[int, bool]:
        """Account for answer bytes ``data``: how many of them to forward, and whether to cut after those."""
        new_body = len(data)
        if not self._head_done:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return len(data), False
            self._head_done = True
            new_body = len(self._head) - (end + 4)
            self._head = b""
        if self.cut_at is not None and self.body + new_body >= self.cut_at:
            keep = self.cut_at - self.body
            self.body, self.cut = self.cut_at, True
            return len(data) - new_body + keep, True
        self.body += new_body
        return len(data), False


@dataclass
class ProxiedConnection:
    """One client connection through the proxy and the requests sent on it (one at a time: no pipelining)."""

    ident: int
    requests: list[ProxiedRequest] = field(default_factory=list)
    _head: bytes = b""

    def feed_up(self, data: bytes) -> list[ProxiedRequest]:
        """Parse request heads out of client -> server bytes (bodies are small here, or never match a head)."""
        buf = self._head + data
        end = 0
        new = []
        for m in _REQUEST_HEAD.finditer(buf):
            rng = _RANGE.search(m.group(3))
            new.append(ProxiedRequest(method=m.group(1).decode(), path=m.group(2).decode(),
                                      range_start=int(rng.group(1)) if rng else None))
            end = m.end()
        self.requests += new
        self._head = buf[end:][-8192:]  # an unfinished head (or the tail of a body) for the next chunk
        return new


class TcpProxy:
    """A loopback TCP proxy to ``127.0.0.1:target_port`` that can be cut and restored on the same port.

    ``cut()`` closes the listener and every open connection (clients see resets and refused connects,
    as in a network outage); ``restore()`` listens again on the same port. ``cut_answer()`` closes just the
    connection of the next matching request, after an exact number of its answer's body bytes, while the
    listener goes on accepting. Every connection's requests (method, path, Range, body bytes delivered) are
    recorded in ``conns``. Threads only; ``close()`` stops all.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.bytes_up = 0  # client -> server bytes forwarded so far (to cut in the middle of an upload)
        self.conns: list[ProxiedConnection] = []
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._armed: tuple[Callable[[ProxiedRequest], bool], int] | None = None
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
                conn = ProxiedConnection(ident=self.connections)
                self.conns.append(conn)
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(conn, src, dst, up), name="proxy-pump",
                                 daemon=True).start()

    def _pump(self, conn: ProxiedConnection, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                keep, cut = len(data), False
                with self._lock:  # on record before it is sent: a request is known before its answer comes
                    if up:
                        self.bytes_up += len(data)
                        for req in conn.feed_up(data):
                            if self._armed is not None and self._armed[0](req):
                                req.cut_at, self._armed = self._armed[1], None
                    elif conn.requests:
                        keep, cut = conn.requests[-1].answer(data)
                dst.sendall(data[:keep])
                if cut:
                    break  # closed below: the client has exactly the bytes its answer got before the cut
        except OSError:
            pass  # the other side (or cut()) closed the connection
        finally:
            self._drop(src)
            self._drop(dst)

    def cut_answer(self, which: Callable[[ProxiedRequest], bool], body_bytes: int) -> None:
        """Close the connection of the next request ``which`` selects once ``body_bytes`` of its answer's body
        went to the client (who then sees its stream end early); other connections and the listener carry on."""
        with self._lock:
            self._armed = (which, body_bytes)

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
