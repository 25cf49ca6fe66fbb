"""Training points as pre-encoded JSON, and a lean ``runs/log-batch`` call that sends them.

Why this exists: the recorder's shipper thread shares the GIL with the training loop, so its CPU per point
is training time. Through ``MlflowClient.log_batch`` a point costs ~15x more: protobuf messages are built and
converted to JSON, and every request re-resolves MLflow's request-header plugins (failed Databricks/Spark
imports) and the proxy settings, ~7 ms of CPU per request. Here each training point is encoded to JSON once,
when it is batched, and the same text serves the attempt's run and later the parent's; requests go through
one kept-alive connection with the headers resolved once. This path is used only for a plain tracking server
reached directly (no proxy, auth plugin, SigV4, Databricks SDK, client certificate or workspace); any other
store gets the same ops through ``MlflowClient`` (``rows_of`` decodes the points back).
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import ssl
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

LOG_BATCH_ENDPOINT = "/api/2.0/mlflow/runs/log-batch"
MAX_TAG_LEN = 8000

Row = Sequence[Any]  # [key, value, timestamp_ms, step]
Encoded = Sequence[Any]  # [step, json_fragment, metric_count]: one training point, all its metrics


class HttpStatusError(RuntimeError):
    """The server answered with an error status and no MLflow error body."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status} from {LOG_BATCH_ENDPOINT}: {text[:300]}")
        self.status = status


def _nonfinite(v: float) -> str:
    """Protobuf JSON spells the non-finite doubles as strings (plain JSON has no NaN)."""
    return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def _number(v: float) -> str:
    return repr(v) if v - v == 0 else f'"{_nonfinite(v)}"'


class PointEncoder:
    """Encodes a training point (step, {key: value}, timestamp) as the JSON of its log-batch metrics.

    Most of the cost is ``repr(float)`` (the shortest round-tripping text, which JSON needs); a template per
    set of keys was measured no faster.
    """

    def __init__(self) -> None:
        self._heads: dict[str, str] = {}  # metric key -> '{"key":"<key>","value":'

    def head(self, k: str) -> str:
        h = self._heads.get(k)
        if h is None:
            h = self._heads[k] = f'{{"key":{json.dumps(str(k))},"value":'
        return h

    def encode(self, step: int, metrics: Mapping[str, Any], ts: int) -> tuple[str, int, list[str]]:
        """(fragment, metric count, keys that were not numbers and were left out)."""
        tail = f',"timestamp":{ts},"step":{step}}}'
        heads, parts, bad = self._heads, [], []
        for k, v in metrics.items():
            if type(v) is not float:
                try:
                    v = float(v)
                except (TypeError, ValueError):
                    bad.append(str(k))
                    continue
            parts.append((heads.get(k) or self.head(k)) + (repr(v) if v - v == 0 else f'"{_nonfinite(v)}"') + tail)
        return ",".join(parts), len(parts), bad

    def rows(self, rows: Iterable[Row]) -> list[str]:
        return [f'{self.head(k)}{_number(float(v))},"timestamp":{int(ts)},"step":{int(s)}}}' for k, v, ts, s in rows]


def rows_of(points: Iterable[Encoded]) -> list[list[Any]]:
    """Encoded points back to rows [key, value, timestamp, step] (for stores reached through MlflowClient)."""
    text = ",".join(frag for _, frag, n in points if n)
    return [[m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"])] for m in json.loads(f"[{text}]")]


def body(encoder: PointEncoder, run_id: str, rows: Iterable[Row], points: Iterable[Encoded],
         tags: Mapping[str, str]) -> str:
    metrics = encoder.rows(rows) + [frag for _, frag, n in points if n]
    tag_list = [{"key": k, "value": str(v)[:MAX_TAG_LEN]} for k, v in tags.items()]
    return f'{{"run_id":{json.dumps(run_id)},"metrics":[{",".join(metrics)}],"tags":{json.dumps(tag_list)}}}'


class BatchPoster:
    """``POST runs/log-batch`` on one kept-alive ``http.client`` connection; errors are raised for ``classify``.

    Timeouts are told apart: none while connecting means the server is away (retried as long as it takes);
    none while waiting for the answer is ``ReadTimeout`` (retried a bounded number of times).
    """

    def __init__(self, creds: Any, headers: dict[str, str], encoder: PointEncoder) -> None:
        url = urllib.parse.urlsplit(creds.host.rstrip("/") + LOG_BATCH_ENDPOINT)
        self.https = url.scheme == "https"
        self.host, self.port, self.path = url.hostname or "", url.port, url.path
        self.headers = headers
        self.encoder = encoder
        self.context: ssl.SSLContext | None = None
        if self.https:
            verify = creds.verify
            self.context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else _ca_bundle())
            if verify is False:
                self.context.check_hostname = False
                self.context.verify_mode = ssl.CERT_NONE
        self._conn: http.client.HTTPConnection | None = None

    @classmethod
    def for_client(cls, client: Any, encoder: PointEncoder) -> BatchPoster | None:
        from mlflow.store.tracking.rest_store import RestStore
        from mlflow.tracking.request_header.registry import resolve_request_headers
        from requests.utils import get_environ_proxies

        store = client._tracking_client.store
        if not isinstance(store, RestStore):
            return None
        creds = store.get_host_creds()
        if any(getattr(creds, a, None) for a in ("auth", "aws_sigv4", "use_databricks_sdk", "client_cert_path",
                                                   "client_secret", "workspace_id")) or _workspace():
            return None
        if get_environ_proxies(creds.host):  # through a proxy: MlflowClient knows how
            return None
        headers = {**resolve_request_headers(), "Content-Type": "application/json"}
        if creds.username and creds.password:
            token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        elif creds.token:
            headers["Authorization"] = f"Bearer {creds.token}"
        return cls(creds, headers, encoder)

    def post(self, run_id: str, rows: Iterable[Row], points: Iterable[Encoded], tags: Mapping[str, str]) -> None:
        data = body(self.encoder, run_id, rows, points, tags).encode()
        timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120"))
        reused = self._conn is not None
        try:
            try:
                status, text = self._send(data, timeout)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                self.close()  # the server dropped an idle kept-alive connection: once more, on a new one
                status, text = self._send(data, timeout)
        except BaseException:
            self.close()
            raise
        if status == 200:
            return
        try:
            payload = json.loads(text)
        except ValueError:
            payload = None
        if isinstance(payload, dict) and "error_code" in payload:
            from mlflow.exceptions import RestException

            raise RestException(payload)
        raise HttpStatusError(status, text)

    def _send(self, data: bytes, timeout: float) -> tuple[int, str]:
        if self._conn is None:
            conn = (http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.context)
                    if self.https else http.client.HTTPConnection(self.host, self.port, timeout=timeout))
            conn.connect()  # a timeout here means nobody answers: the server is away
            self._conn = conn
        self._conn.timeout = timeout
        self._conn.request("POST", self.path, body=data, headers=self.headers)
        try:
            response = self._conn.getresponse()
        except TimeoutError as exc:
            raise ReadTimeout(f"no answer from {self.host}:{self.port} within {timeout:.0f}s") from exc
        text = response.read().decode("utf-8", errors="replace")
        if response.will_close:
            self.close()
        return response.status, text

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class ReadTimeout(TimeoutError):
    """The server took the request but did not answer in time (classified as transient, not unreachable)."""


def _ca_bundle() -> str | None:
    try:
        import certifi
    except ImportError:
        return None
    return str(certifi.where())


def _workspace() -> str | None:
    try:
        from mlflow.utils.workspace_context import get_request_workspace
    except ImportError:
        return None
    return get_request_workspace()
