"""Benchmark: how long the training loop stalls per checkpoint with AsyncSaver, against a synchronous save.

The same state (Linear layers + Adam state, ``--mib`` of model weights, so about 3x that in all) is saved
synchronously with ``resumer.save_checkpoint`` and asynchronously with ``resumer.AsyncSaver.save`` (which
returns after copying tensors to host memory; the write and commit run in the background). Measured on a
local folder and on a local S3 server (moto), in the same run.

Target: the stall per checkpoint is at most 0.2x the synchronous save. Run:
``python bench/async_save.py [--mib 256] [--repeat 3] [--json] [--no-check]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from torch import nn

import resumer
from resumer.testing import local_s3

TARGET = 0.2


def state(mib: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    width = 2048
    layers = max(1, mib * 2**20 // (width * width * 4))
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return model, opt


def run(root: str, so: dict[str, Any] | None, model: nn.Module, opt: torch.optim.Optimizer, repeat: int
        ) -> dict[str, Any]:
    sync, stall, total = [], [], []
    step = 0
    for _ in range(repeat):
        step += 1
        t = time.perf_counter()
        resumer.save_checkpoint(root, step, model, opt, storage_options=so)
        sync.append(time.perf_counter() - t)
    with resumer.AsyncSaver(root, storage_options=so) as saver:
        for _ in range(repeat):
            step += 1
            t = time.perf_counter()
            saver.save(step, model, opt)
            stall.append(time.perf_counter() - t)
            saver.wait()
            total.append(time.perf_counter() - t)
    s, a = statistics.median(sync), statistics.median(stall)
    return {"sync_s": round(s, 3), "async_stall_s": round(a, 3), "async_total_s": round(statistics.median(total), 3),
            "ratio": round(a / s, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)
    model, opt = state(args.mib)
    nbytes = sum(p.numel() * 4 for p in model.parameters()) * 3
    out: dict[str, Any] = {"checkpoint_mib": round(nbytes / 2**20)}
    out["local"] = run(tempfile.mkdtemp(prefix="resumer-bench-"), None, model, opt, args.repeat)
    with local_s3() as s3:
        out["s3"] = run(s3.make_bucket("async") + "/run", s3.storage_options(), model, opt, args.repeat)
    out["target"] = f"stall <= {TARGET}x synchronous save"
    out["met"] = all(out[k]["ratio"] <= TARGET for k in ("local", "s3"))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"checkpoint {out['checkpoint_mib']} MiB (model + Adam state)")
        for k in ("local", "s3"):
            r = out[k]
            print(f"{k:>5}: sync save {r['sync_s']:.2f}s, async stall {r['async_stall_s']:.3f}s "
                  f"(x{r['ratio']}), async save to commit {r['async_total_s']:.2f}s")
        print(f"target: {out['target']}: {'met' if out['met'] else 'NOT met'}")
    return 0 if out["met"] or args.no_check else 1


if __name__ == "__main__":
    sys.exit(main())
