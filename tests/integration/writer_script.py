"""A checkpoint writer for test_kill_writer.py, run as its own process and SIGKILLed at random points.

    python writer_script.py ROOT        (storage options as JSON in $RESUMER_IT_STORAGE_OPTIONS)

Prints ``ready`` once torch and resumer are imported and warm, then reads ``START COUNT`` from stdin and saves
steps START, START+1, ... (COUNT of them; 0 means until killed), printing ``begin STEP`` right before each
``save_checkpoint`` call and ``saved STEP URI`` right after its commit (so a kill between the two landed
mid-save). What step N holds is a pure function of N (``state_for``), so a reader can check any checkpoint
bit by bit without asking the writer.
"""

from __future__ import annotations

import json
import os
import sys

import fsspec
import torch
from torch import nn

import resumer

IN, HIDDEN = 1024, 1280  # 2.6 M float32 parameters: 10.5 MB of weights + 10.5 MB of momentum = ~21 MB


def state_for(step: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and optimizer the writer saves at ``step`` (deterministic in ``step``)."""
    torch.manual_seed(step)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, IN))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # fills every momentum buffer
    return model, opt


def main() -> None:
    root = sys.argv[1]
    options = json.loads(os.environ.get("RESUMER_IT_STORAGE_OPTIONS") or "null")
    # Warm up (lazy imports, first tensor ops, the storage client) so that the test's kill delays measure saving.
    model, opt = state_for(0)
    resumer.save_checkpoint("memory://writer-warmup", 0, model, opt)
    fsspec.core.url_to_fs(root, **(options or {}))[0].exists(root)
    print("ready", flush=True)
    start, count = (int(x) for x in sys.stdin.readline().split())
    step = start
    while count == 0 or step < start + count:
        model, opt = state_for(step)
        print(f"begin {step}", flush=True)
        uri = resumer.save_checkpoint(root, step, model, opt, storage_options=options)
        print(f"saved {step} {uri}", flush=True)
        step += 1


if __name__ == "__main__":
    main()
