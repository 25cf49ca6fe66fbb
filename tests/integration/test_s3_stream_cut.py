"""A resume's streaming read of a data file, cut on a real socket mid-answer by the proxy in front of the local S3
server, is reopened where it stopped (resumer.storage.transfer.StreamReader) and loads every byte exactly.

The proxy closes the connection after an exact number of the answer's body bytes. The reader has consumed at most
that many (its HTTP client drops what it had buffered when the connection breaks): the retry must ask for the rest
of the object from the byte it stopped at (a Range starting past 0, no later than the cut), or read through from
the object's start when that byte is within ``SKIP_BYTES`` of it (the reader's documented rule). Reopening
anywhere else would misplace bytes, which the bitwise comparison (and the checksum) catch.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn

import resumer
from resumer.storage import transfer
from resumer.testing.s3 import MotoServer, ProxiedRequest, TcpProxy, s3_options

MIB = 1024 * 1024
MODEL_FILE = re.compile(r"/model\.[0-9a-f]+\.safetensors$")


def _big_model(seed: int) -> nn.Module:
    """One weight of SKIP_BYTES + 8 MiB (float32), read as one region (in pieces of up to 16 MiB), so the cut
    lands inside a read call that already got part of its bytes."""
    torch.manual_seed(seed)
    return nn.Linear(1024, (transfer.SKIP_BYTES + 8 * MIB) // 4096, bias=False)


def _is_model_get(req: ProxiedRequest) -> bool:
    return req.method == "GET" and MODEL_FILE.search(req.path.split("?")[0]) is not None


@pytest.mark.slow
@pytest.mark.parametrize("cut_at", ["past SKIP_BYTES", "within SKIP_BYTES"])
def test_stream_cut_mid_read_is_reopened_where_it_stopped(s3_root: tuple[str, dict[str, Any]], moto: MotoServer,
                                                          proxy: TcpProxy, cut_at: str) -> None:
    root, _ = s3_root
    saved = _big_model(0)
    uri = resumer.save_checkpoint(root, 7, saved, storage_options=s3_options(moto.url))
    (size,) = (f.size for f in resumer.read_manifest(uri, s3_options(moto.url)).files if f.path.startswith("model."))
    stop = (transfer.SKIP_BYTES if cut_at == "past SKIP_BYTES" else 0) + 2 * MIB + 12345  # not on any boundary
    assert stop + 4 * MIB < size  # the cut lands with megabytes of the file still unread
    proxy.cut_answer(_is_model_get, stop)

    live = _big_model(1)
    assert not torch.equal(live.weight, saved.weight)
    res = resumer.resume(uri, live, storage_options=s3_options(proxy.url))

    assert res.step == 7
    assert torch.equal(live.weight, saved.weight)  # every byte where it belongs, across the reopened stream
    gets = [r for c in proxy.conns for r in c.requests if _is_model_get(r)]
    assert len(gets) == 2, gets  # the first stream, and one reopened after the cut
    first, second = gets
    # The cut really happened mid-read: the first answer delivered ``stop`` bytes of the file's ``size``, then its
    # connection was closed under the reader.
    assert first.range_start == 0 and first.cut and first.body == stop
    assert not second.cut
    if cut_at == "past SKIP_BYTES":
        # Reopened where it stopped: past the read-through window, and not past the bytes the cut let through.
        assert second.range_start is not None and transfer.SKIP_BYTES < second.range_start <= stop
    else:
        assert second.range_start == 0  # near the start: read through from byte 0 (transfer.StreamReader._open)
    assert second.body == size - second.range_start  # and read on to the end of the file
    # The server saw the same two GETs of the file (its own request log, not only the proxy's view).
    bucket = root.split("/")[2]
    logged = re.findall(rf"GET /{bucket}/\S*/model\.[0-9a-f]+\.safetensors HTTP", moto.log_text())
    assert len(logged) == 2, logged
