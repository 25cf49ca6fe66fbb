"""A training entrypoint for Ray Train workers, used by ``jobs/*.yaml``, the docs and the tests.

Data position is the GLOBAL step (and rank), so a resumed run sees exactly the batches the dead one
would have seen, whatever the world size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import resumer.train
from resumer import examples as ex


def train_loop(config: dict[str, Any]) -> None:
    torch.manual_seed(int(config.get("seed", 0)))
    model, optimizer, scheduler = resumer.train.build()
    start = resumer.train.restore(model, optimizer, scheduler)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = resumer.train.rank()
    for step in range(start + 1, int(config["total_steps"]) + 1):
        x, y = ex.batch(step * world + rank, batch_size=int(config.get("batch_size", 16)))
        loss = nn.functional.mse_loss(model(x)[:, : y.shape[1]], y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if step == config.get("crash_at"):
            raise RuntimeError(f"injected crash at step {step}")
        delay = float(config.get("step_delay_s", 0))
        if delay:
            import time

            time.sleep(delay)
        resumer.train.save(step, model, optimizer, scheduler, metrics={"loss": float(loss.detach())})
