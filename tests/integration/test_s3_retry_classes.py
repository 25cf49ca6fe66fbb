"""Retry classification against REAL S3 error responses (a proxy in front of the local S3 server answers them).

botocore's and s3fs's own retries are turned off here, so what is pinned is resumer's rule: 5xx, SlowDown and
throttling are transient and retried (the resume then succeeds), anything else is raised at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import s3fs
import torch
from faultproxy import Fault, FaultProxy

import resumer
import resumer.storage.retry
from resumer import examples as ex

pytestmark = pytest.mark.slow


@pytest.fixture
def proxied(s3_root: tuple[str, dict[str, Any]], moto: Any, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[tuple[str, dict[str, Any], FaultProxy, torch.nn.Module]]:
    root, options = s3_root
    torch.manual_seed(0)
    model = ex.mlp_v1()
    resumer.save_checkpoint(root, 3, model, storage_options=options)
    proxy = FaultProxy(upstream_port=moto.port).start()
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs retries SlowDown itself otherwise
    monkeypatch.setattr(resumer.storage.retry.RetryPolicy, "delay", lambda self, attempt: 0.0)
    through = {**options, "client_kwargs": {"endpoint_url": proxy.url},
               "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}, "skip_instance_cache": True}
    try:
        yield root, through, proxy, model
    finally:
        proxy.stop()


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable"),
                                              (400, "Throttling"), (400, "RequestLimitExceeded")])
def test_transient_answers_are_retried_and_the_resume_completes(
        proxied: tuple[str, dict[str, Any], FaultProxy, torch.nn.Module], status: int, code: str,
        caplog: pytest.LogCaptureFixture) -> None:
    root, options, proxy, saved = proxied
    fault = Fault(method="GET", suffix=".safetensors", status=status, code=code, times=2)
    proxy.faults.append(fault)
    model = ex.mlp_v1()
    with caplog.at_level(logging.WARNING, logger="resumer.storage.retry"):
        res = resumer.resume(root, model, storage_options=options)
    assert fault.served == 2  # the faults really were answered...
    retried = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[retry]")]
    assert len(retried) == 2  # ...and each was retried by resumer, not by the client
    assert res.step == 3 and all(torch.equal(a, b) for a, b in zip(model.parameters(), saved.parameters(),
                                                                    strict=True))


def test_access_denied_is_not_retried(proxied: tuple[str, dict[str, Any], FaultProxy, torch.nn.Module],
                                      caplog: pytest.LogCaptureFixture) -> None:
    root, options, proxy, _ = proxied
    fault = Fault(method="GET", suffix=".safetensors", status=403, code="AccessDenied", times=100)
    proxy.faults.append(fault)
    model = ex.mlp_v1()
    before = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level(logging.WARNING, logger="resumer.storage.retry"), pytest.raises(Exception) as err:  # noqa: PT011
        resumer.resume(root, model, storage_options=options)
    assert not isinstance(err.value, resumer.TransientStorageError)
    assert not [r for r in caplog.records if r.getMessage().startswith("[retry]")]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
