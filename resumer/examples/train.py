"""A training entrypoint for Ray Train workers, used by ``jobs/mlp.yaml``, the docs and the tests.

Data position is the GLOBAL step: each step consumes one global batch and rank r trains on its slice,
so a resumed run sees exactly the samples the dead one would have, whatever the world size.
Fault injection for tests: ``crash_at`` (every attempt raises at that step) and ``hang_at`` (the
first attempt sleeps forever at that step). ``progress_file``: rank 0 appends one JSON line per step
(wall time, step, pid), one on entry and one after restore (the step it continues after), for benchmarks.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from torch import nn

import resumer.train
from resumer import examples as ex


def _inject(config: dict[str, Any], step: int) -> None:
    if step == config.get("crash_at"):
        raise RuntimeError(f"injected crash at step {step}")
    cfg = resumer.train.attempt_config()
    attempt = cfg.attempt if cfg is not None else 1
    if step == config.get("hang_at") and attempt == 1:
        time.sleep(3600)  # a hung collective, a stuck data loader...


def note_progress(config: dict[str, Any], event: str, step: int) -> None:
    """Append ``{"t", "event", "step", "pid"}`` to ``config["progress_file"]`` (rank 0 only), if set."""
    path = config.get("progress_file")
    if path and resumer.train.rank() == 0:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"t": time.time(), "event": event, "step": step, "pid": os.getpid()}) + "\n")


def shard_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int, global_batch: int,
               world: int, rank: int) -> float:
    """One step on this rank's slice of the GLOBAL batch of ``step``; returns this rank's loss."""
    x, y = ex.batch(step, batch_size=global_batch)
    shard = slice(rank * global_batch // world, (rank + 1) * global_batch // world)
    return ex.optimizer_step(optimizer, scheduler, nn.functional.mse_loss(model(x[shard])[:, : y.shape[1]], y[shard]))


def train_loop(config: dict[str, Any]) -> None:
    note_progress(config, "enter", -1)
    torch.manual_seed(int(config.get("seed", 0)))
    model, optimizer, scheduler = resumer.train.build()
    start = resumer.train.restore(model, optimizer, scheduler)
    note_progress(config, "start", start)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = resumer.train.rank()
    global_batch = int(config.get("batch_size", 32))  # GLOBAL: the same samples per step on any world size
    if global_batch % world:
        raise ValueError(f"batch_size {global_batch} (the global batch) does not divide into {world} workers")
    for step in range(start + 1, int(config["total_steps"]) + 1):
        loss = shard_step(model, optimizer, scheduler, step, global_batch, world, rank)
        _inject(config, step)
        delay = float(config.get("step_delay_s", 0))
        if delay:
            time.sleep(delay)
        note_progress(config, "step", step)
        resumer.train.save(step, model, optimizer, scheduler, metrics={"loss": loss})
