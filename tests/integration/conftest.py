"""Real local services for the integration tests: an S3 API server (moto in server mode) on 127.0.0.1,
reached through s3fs, and checkpoint roots on every backend (a local folder, ``memory://``, ``s3://``).

Every server a fixture starts is stopped afterwards, whatever happened (terminate, wait, kill).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from resumer.testing.s3 import MotoServer, TcpProxy, make_bucket, s3_options, start_moto

# Ray, for every cluster the tests start (in-process, the CLI's, deploy/local/up.sh's), which inherit this environment:
# no usage stats; Ray Train's controller polls its workers every 0.25 s instead of 2 s (most of a short run was that
# poll); and Ray Train's node-drain watcher, an extra actor process for each worker group that watches for drained
# nodes, is off: resumer does not use it (preemption reaches it as SIGTERM, resumer.jobs.preemption), and these tests
# drain no node. About 2 s per launch on these 2-core machines. Production runs with Ray's defaults.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def _s3_env() -> Iterator[None]:
    """Region, no instance-metadata probing and no proxy for botocore; restored after the session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for var in ("NO_PROXY", "no_proxy"):  # the local server is reached directly, whatever proxy is configured
            mp.setenv(var, ",".join(filter(None, [os.environ.get(var), "127.0.0.1", "localhost"])))
        yield


@pytest.fixture(scope="session")
def moto(_s3_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """The session's S3 API server (with its request log)."""
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    server = None
    for _ in range(3):  # a free port can be taken between the probe and the bind: try another
        try:
            server = start_moto(log_path)
            break
        except RuntimeError:
            continue
    if server is None:
        pytest.fail(f"could not start moto_server: {log_path.read_text(errors='replace')[-2000:]}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(moto: MotoServer) -> str:
    """The endpoint URL of the session's S3 API server on 127.0.0.1."""
    return moto.url


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[TcpProxy]:
    """A cuttable TCP proxy in front of the session's S3 server (``s3kit.TcpProxy``); closed afterwards."""
    p = TcpProxy(moto.port)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def s3_root(s3_server: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(root_uri, storage_options)`` in a fresh bucket; the bucket is emptied afterwards (moto holds it in RAM)."""
    bucket = make_bucket(s3_server)
    options = s3_options(s3_server)
    yield f"s3://{bucket}/run", options
    fs = fsspec.filesystem("s3", **options)
    with contextlib.suppress(OSError):  # best effort: the server goes away with the session anyway
        fs.rm(bucket, recursive=True)


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """``(root, storage_options)`` on each backend of the storage contract; the S3 server starts only when used."""
    if request.param == "local":
        yield str(tmp_path / "ckpts"), None
    elif request.param == "memory":
        uri = f"memory://resumer-it/{uuid.uuid4().hex}"
        yield uri, None
        fs = fsspec.filesystem("memory")
        if fs.exists(uri):
            fs.rm(uri, recursive=True)
    else:
        yield request.getfixturevalue("s3_root")
