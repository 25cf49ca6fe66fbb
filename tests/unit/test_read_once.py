"""A resume reads each byte for verification once, and planning reads no tensor bytes."""

from __future__ import annotations

import pytest

import resumer
import resumer.source
import resumer.store
from resumer import examples as ex


def test_resume_from_root_verifies_once(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    model = ex.mlp_v1()
    uri = resumer.save_checkpoint(str(tmp_path), 1, model, ex.adam(model))
    checksummed: list[int] = []
    real = resumer.store.checksum_stream

    def counting(f, size, uri, on_bytes=None):  # noqa: ANN001, ANN202
        checksummed.append(size)
        return real(f, size, uri, on_bytes)

    monkeypatch.setattr(resumer.store, "checksum_stream", counting)
    total = resumer.read_manifest(uri).total_bytes
    seen: list[int] = []
    res = resumer.resume(str(tmp_path), ex.mlp_v1(), progress=seen.append)
    assert sum(checksummed) == total  # selection verified it; apply did not read it all again
    model_bytes = sum(t.numel * 4 for t in resumer.read_manifest(uri).signature.tensors)
    assert res.bytes_read == model_bytes  # no optimizer given: its state is not read
    assert sum(seen) == total + res.bytes_read  # progress saw the verification pass and the load
    checksummed.clear()
    resumer.resume(uri, ex.mlp_v1())
    assert sum(checksummed) == total
