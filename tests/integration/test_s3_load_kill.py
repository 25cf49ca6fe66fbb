"""The S3 server killed (SIGKILL, a real process) while a resume reads: it completes, or nothing changed.

A dedicated moto server (not the session's), so killing it harms no other test.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import resumer
from resumer.testing.s3 import MotoServer, make_bucket, s3_options, start_moto


class Sixteen(nn.Module):
    """16 tensors of 1 MiB each (8 Linear layers of 512 x 512, biases folded into a buffer each)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(torch.randn(512, 512)) for _ in range(8))
        for i in range(8):
            self.register_buffer(f"s{i}", torch.randn(512, 512))


@pytest.fixture
def own_moto(_s3_env: None, tmp_path: Path) -> Iterator[MotoServer]:
    server = start_moto(tmp_path / "moto.log")
    try:
        yield server
    finally:
        server.stop()


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    return {k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("kill_at", ["first byte", "after one pass over every file"])
def test_killed_s3_server_completes_or_changes_nothing(own_moto: MotoServer, kill_at: str) -> None:
    # botocore tries once: with the server dead, its own retry loop (nested inside resumer's)
    # would only make this test wait minutes for the same outcome.
    options = {**s3_options(own_moto.url), "config_kwargs": {"retries": {"max_attempts": 1}}}
    root = f"s3://{make_bucket(own_moto.url)}/run"
    torch.manual_seed(0)
    saved = Sixteen()
    saved_opt = torch.optim.SGD(saved.parameters(), lr=0.1, momentum=0.9)
    for p in saved.parameters():
        p.grad = torch.randn_like(p)
    saved_opt.step()
    uri = resumer.save_checkpoint(root, 1, saved, saved_opt, storage_options=options)
    manifest = resumer.read_manifest(uri, options)
    assert len(manifest.tensors) == 16
    # "after one pass": where the reads that load tensors into place began before (a verification pass over
    # every file came first); now each file is read once, so a resume that gets this far has read everything.
    threshold = 1 if kill_at == "first byte" else manifest.total_bytes + 1
    seen = [0]

    def kill_when_reached(n: int) -> None:
        seen[0] += n
        if seen[0] >= threshold and own_moto.proc.poll() is None:
            own_moto.proc.kill()
            own_moto.proc.wait(timeout=10)

    torch.manual_seed(1)
    live = Sixteen()
    live_opt = torch.optim.SGD(live.parameters(), lr=0.1, momentum=0.9)
    for p in live.parameters():
        p.grad = torch.randn_like(p)
    live_opt.step()
    before, before_opt = _snapshot(live, live_opt)
    error: resumer.ResumerError | None = None
    try:
        resumer.resume(uri, live, live_opt, storage_options=options, progress=kill_when_reached)
    except resumer.ResumerError as exc:
        error = exc
    if error is None:
        for k, v in saved.state_dict().items():
            assert torch.equal(live.state_dict()[k], v), k
        assert kill_at != "first byte"
        return
    assert own_moto.proc.poll() is not None, f"failed before the server was killed: {error}"
    after, after_opt = _snapshot(live, live_opt)
    changed = [k for k, v in after.items() if not torch.equal(v, before[k])]
    assert changed == [], f"{len(changed)} of 16 tensors overwritten by a failed resume: {changed}"
    assert after_opt["state"].keys() == before_opt["state"].keys()
    for i, st in before_opt["state"].items():
        assert all(torch.equal(after_opt["state"][i][k], v) for k, v in st.items() if v is not None)
    assert kill_at == "first byte"  # one pass: nothing is read after everything was read
