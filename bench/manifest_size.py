"""Benchmark: the size of a checkpoint's manifest per tensor, and the time to plan a resume from it.

A 3,000-tensor model (250 blocks of six biased Linear layers, names like ``blocks.17.attn.q.weight``) with AdamW
state (``exp_avg``, ``exp_avg_sq`` and ``step`` for every parameter: 9,000 optimizer tensors) is saved with
``resumer.save_checkpoint``. Measured in the same run:

* the manifest's bytes per stored tensor (model and optimizer tensors: 12,000), and per entry as the format issue
  counted them (model tensors, ``exp_avg`` and ``exp_avg_sq``: 9,000), in the compact form (format v2) and in
  the long form format v1 wrote for the same checkpoint (indented JSON);
* ``resumer.plan(checkpoint, model, optimizer)`` (median of ``--runs``) against ``torch.load`` of the same state
  saved with ``torch.save`` plus ``model.load_state_dict`` and ``optimizer.load_state_dict``: the ratio.

Targets: at most 150 bytes per entry (either count), and planning at most 0.1x of torch.load + load_state_dict.
Run: ``python bench/manifest_size.py [--runs N] [--json] [--no-check]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import resumer
from resumer.formats.native.manifest import MANIFEST, long_form

TARGET_BYTES = 150
TARGET_RATIO = 0.1
BLOCKS, WIDTH = 250, 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({k: nn.Linear(WIDTH, WIDTH) for k in ("q", "k", "v", "o")})
        self.mlp = nn.ModuleDict({"up": nn.Linear(WIDTH, 2 * WIDTH), "down": nn.Linear(2 * WIDTH, WIDTH)})


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))


def trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return model, opt


def median_s(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()

    model, opt = trained()
    n_model = len(list(model.state_dict()))
    n_opt = sum(sum(isinstance(v, torch.Tensor) for v in st.values()) for st in opt.state.values())
    n_issue = n_model + 2 * len(opt.state)
    with tempfile.TemporaryDirectory() as tmp:
        uri = resumer.save_checkpoint(os.path.join(tmp, "ckpts"), 1, model, opt)
        data = Path(uri, MANIFEST).read_bytes()
        v1 = {**long_form(json.loads(data)), "version": 1}
        v1_bytes = len(json.dumps(v1, indent=1).encode())  # exactly what format v1's writer produced
        torch_file = os.path.join(tmp, "state.pt")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, torch_file)

        fresh, fresh_opt = trained()

        def torch_path() -> None:
            state = torch.load(torch_file, weights_only=True)
            fresh.load_state_dict(state["model"])
            fresh_opt.load_state_dict(state["optimizer"])

        def plan_path() -> None:
            assert resumer.plan(uri, fresh, fresh_opt).ok

        plan_path()  # warm both once: imports, page cache
        torch_path()
        plan_s = median_s(plan_path, args.runs)
        torch_s = median_s(torch_path, args.runs)
    out = {
        "model_tensors": n_model, "optimizer_tensors": n_opt,
        "manifest_bytes": len(data), "v1_manifest_bytes": v1_bytes,
        "bytes_per_tensor": round(len(data) / (n_model + n_opt), 1),
        "bytes_per_issue_entry": round(len(data) / n_issue, 1),
        "v1_bytes_per_tensor": round(v1_bytes / (n_model + n_opt), 1),
        "v1_bytes_per_issue_entry": round(v1_bytes / n_issue, 1),
        "plan_ms": round(plan_s * 1e3, 1), "torch_load_ms": round(torch_s * 1e3, 1),
        "plan_ratio": round(plan_s / torch_s, 3),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{n_model} model tensors, {n_opt} optimizer tensors (AdamW)")
        print(f"manifest: {len(data)} bytes = {out['bytes_per_tensor']} B per stored tensor, "
              f"{out['bytes_per_issue_entry']} B per entry (model + exp_avg + exp_avg_sq)")
        print(f"format v1 of the same checkpoint: {v1_bytes} bytes = {out['v1_bytes_per_tensor']} B per stored "
              f"tensor, {out['v1_bytes_per_issue_entry']} B per entry")
        print(f"plan from the manifest {out['plan_ms']} ms; torch.load + load_state_dict {out['torch_load_ms']} ms: "
              f"{out['plan_ratio']}x (target <= {TARGET_RATIO}x)")
    ok = out["bytes_per_issue_entry"] <= TARGET_BYTES and out["plan_ratio"] <= TARGET_RATIO
    return 0 if ok or args.no_check else 1


if __name__ == "__main__":
    sys.exit(main())
