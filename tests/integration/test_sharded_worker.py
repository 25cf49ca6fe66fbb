"""The job worker's calls with FSDP2-sharded state (``scaling.sharding: fsdp``), on two real gloo processes:
``build`` shards the model, every rank writes its shards at the cadence, and a preemption notice that reaches
ONE rank makes every rank write the emergency checkpoint together (never one missing the other's shards)."""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import resumer
from resumer import examples as ex

pytestmark = pytest.mark.slow

MODEL, OPTIMIZER, SCHEDULER = "resumer.examples:mlp_v1", "resumer.examples:adam", "resumer.examples:step_lr"
NOTIFIED = 1  # the rank the notice reaches


def _rank(rank: int, root: str, port: int, out: str) -> None:
    import torch.distributed as dist
    from sharded_workers import finish
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.fsdp import fully_shard

    from resumer.core.errors import Preempted
    from resumer.examples.train import shard_step
    from resumer.jobs import preemption, worker
    from resumer.jobs.attempt import ENV, AttemptConfig

    # A collective one rank never joins fails within a minute instead of hanging the test run.
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        os.environ[ENV] = AttemptConfig(
            job="sharded",
            attempt=1,
            root=root,
            model=MODEL,
            optimizer=OPTIMIZER,
            scheduler=SCHEDULER,
            every=2,
            sharding="fsdp",
        ).to_json()
        torch.manual_seed(0)
        model, optimizer, scheduler = worker.build()
        assert worker.sharded(model)
        # A model a loop shards as one unit, right after an evaluation pass: FSDP2 leaves the root holding full,
        # unsharded parameters. Still sharded: every rank must save it (rank 0 alone would wait in the collective).
        whole = torch.nn.Linear(3, 2)
        fully_shard(whole)
        with torch.no_grad():
            whole(torch.ones(1, 3))
        assert worker.sharded(whole)
        uris = []
        for step in (1, 2, 3):
            shard_step(model, optimizer, scheduler, step, 32, 2, rank)
            uris.append(worker.save(step, model, optimizer, scheduler))
        shard_step(model, optimizer, scheduler, 4, 32, 2, rank)
        if rank == NOTIFIED:
            preemption._noticed_at = time.time()  # what the SIGTERM handler sets, on this rank only
        try:
            worker.save(4, model, optimizer, scheduler)
            preempted: Any = None
        except Preempted as exc:
            preempted = (exc.step, exc.uri)
        full = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        torch.save(
            {"uris": uris, "preempted": preempted, "model": full[0], "optimizer": full[1]},
            os.path.join(out, f"rank{rank}.pt"),
        )
    except BaseException:
        dist.destroy_process_group()
        raise
    finish()


def test_every_rank_writes_its_shards_and_a_notice_to_one_rank_checkpoints_all(tmp_path: Path) -> None:
    from sharded_workers import start_ranks

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "root"
    ctx = start_ranks(_rank, (str(root), port, str(tmp_path)), 2, join=False)
    deadline = time.monotonic() + 300  # a rank left waiting in a collective would hang: bounded
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "the ranks did not finish: one waits in a collective the other skipped"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    step2 = str(root / "step-0000000002")
    step4 = str(root / "step-0000000004")
    for got in ranks:  # the same URI on every rank, at the cadence and for the emergency
        assert got["uris"] == [None, step2, None]
        assert got["preempted"] == (4, step4)
    assert [c.step for c in resumer.list_checkpoints(str(root))] == [4, 2]
    # One process, no process group: the emergency checkpoint holds both ranks' shards, exactly.
    model, optimizer, scheduler = ex.mlp_v1(), None, None
    optimizer = ex.adam(model)
    scheduler = ex.step_lr(optimizer)
    assert resumer.resume(step4, model, optimizer, scheduler).step == 4
    for name, value in ranks[0]["model"].items():
        assert torch.equal(model.state_dict()[name], value), name
    saved_state = ranks[0]["optimizer"]["state"]
    names = [n for n, _ in model.named_parameters()]
    for index, name in enumerate(names):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state_dict()["state"][index][key], saved_state[name][key]), (name, key)
