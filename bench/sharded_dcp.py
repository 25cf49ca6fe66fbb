"""Benchmark: saving and resuming FSDP2-sharded state with resumer against torch DCP's own dcp.save / dcp.load.

Two ranks (real processes, gloo, CPU) each hold their FSDP2 shards of an MLP (``--mib`` of float32 weights in
all) and its AdamW state (twice that again), after one training step. In the same run, interleaved ``--repeat``
times, on a local folder:

* save: ``resumer.save_checkpoint(root, step, model, optimizer)`` (every rank writes its shards; a fail-closed
  commit by rank 0 after gathering every rank's sizes and checksums; data and manifest fsynced) against
  ``get_state_dict`` + ``dcp.save`` of the same state (DCP's FileSystemWriter, which fsyncs its files too);
* resume into the live, trained state ("warm"): ``resumer.resume(checkpoint, model, optimizer)`` (plan, each rank
  reads the chunks that overlap its shards, checks every piece's xxh3_64, every rank agrees, then the state is put
  back) against ``get_state_dict`` + ``dcp.load`` + ``set_state_dict`` (no checksums: DCP has none), which reads
  into the live tensors in place; ``verify=False`` too, for reference;
* resume after a restart ("restart"): the same calls into a freshly built sharded model and an AdamW that holds no
  state yet, as a relaunched job has them (for DCP, ``get_state_dict`` first makes the optimizer's state, as
  torchtitan's restart does). Freed memory is handed back to the OS (``malloc_trim``) before each, so neither
  reuses pages the other faulted in.

Each time is the slowest rank's (a collective call ends when its slowest rank does), with a barrier before each
call; the page cache is warm (the files were just written). Reports medians and the ratios resumer / DCP, and the
median of each round's own ratio (pairs measured next to each other, so drift over the run cancels).
Targets: save and resume at most 1.0x DCP's (both resume cases are reported).
Run: ``python bench/sharded_dcp.py [--mib 128] [--repeat 3] [--json] [--no-check]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

TARGET = 1.0
WORLD = 2
WIDTH = 1024  # each Linear: WIDTH x WIDTH weights + bias (4 MiB of float32)


def _model(mib: int) -> nn.Module:
    layers = max(1, mib // 4)
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(layers)))


def _fresh(mib: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A sharded model and an AdamW with no state yet: what a relaunched job builds before it resumes."""
    from torch.distributed.fsdp import fully_shard

    model = _model(mib)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _sharded(mib: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, opt = _fresh(mib)
    model(torch.randn(8, WIDTH)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _timed(fn: Any) -> float:
    """The slowest rank's wall time of the collective call ``fn``."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took.item())


def _rank(rank: int, port: int, mib: int, repeat: int, work: str, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=600))
    model, opt = _sharded(mib)
    times: dict[str, list[float]] = {k: [] for k in ("resumer_save", "dcp_save", "resumer_resume",
                                                       "resumer_resume_noverify", "dcp_load",
                                                       "resumer_restart", "dcp_restart")}
    sizes: dict[str, int] = {}
    for i in range(repeat):
        sizes = _round(i, rank, model, opt, work, times, mib)
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "bytes": sizes}))
    dist.barrier()
    dist.destroy_process_group()


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next call faults in fresh pages as a new process would."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the allocator keeps what it keeps
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _restart(name: str, mib: int, uri: str, dcp_dir: str) -> float:
    """One resume into a freshly built sharded model and an optimizer with no state: resumer's or DCP's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import resumer

    model, opt = _fresh(mib)
    _trim()

    def dcp_load() -> None:
        msd, osd = get_state_dict(model, opt)  # makes the optimizer's state, as a restarted job does
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=dcp_dir)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    return _timed(lambda: resumer.resume(uri, model, opt)) if name == "resumer_restart" else _timed(dcp_load)


def _round(i: int, rank: int, model: nn.Module, opt: torch.optim.Optimizer, work: str,
           times: dict[str, list[float]], mib: int) -> dict[str, int]:
    """One save and one resume of each kind, order alternating with ``i`` so drift falls on both."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import resumer

    root, dcp_dir = os.path.join(work, f"resumer-{i}"), os.path.join(work, f"dcp-{i}")
    uri: list[str] = []

    def dcp_save() -> None:
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=dcp_dir)

    def dcp_load() -> None:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=dcp_dir)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    saves = [("resumer_save", lambda: uri.append(resumer.save_checkpoint(root, 1, model, opt))),
             ("dcp_save", dcp_save)]
    for name, fn in saves if i % 2 == 0 else saves[::-1]:
        times[name].append(_timed(fn))
    loads = [("resumer_resume", lambda: resumer.resume(uri[0], model, opt)),
             ("resumer_resume_noverify", lambda: resumer.resume(uri[0], model, opt, verify=False)),
             ("dcp_load", dcp_load)]
    for name, fn in loads if i % 2 == 0 else loads[::-1]:
        times[name].append(_timed(fn))
    for name in ("resumer_restart", "dcp_restart") if i % 2 == 0 else ("dcp_restart", "resumer_restart"):
        times[name].append(_restart(name, mib, uri[0], dcp_dir))
        _trim()  # the model and optimizer just built are gone
    sizes = {"resumer": sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file()),
             "dcp": sum(p.stat().st_size for p in Path(dcp_dir).rglob("*") if p.is_file())}
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root)
        shutil.rmtree(dcp_dir)
    return sizes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=128, help="float32 weights in all (AdamW state is twice that)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tempfile.mkdtemp(prefix="resumer-bench-sharded-")
    try:
        out = os.path.join(work, "result.json")
        mp.spawn(_rank, args=(port, args.mib, args.repeat, work, out), nprocs=WORLD, join=True)
        raw = json.loads(Path(out).read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in raw["times"].items()}
    result = {
        "world_size": WORLD, "weights_mib": args.mib, "repeat": args.repeat, "bytes": raw["bytes"],
        "median_s": med, "all_s": raw["times"],
        "save_ratio": med["resumer_save"] / med["dcp_save"],
        "resume_ratio": med["resumer_resume"] / med["dcp_load"],
        "resume_noverify_ratio": med["resumer_resume_noverify"] / med["dcp_load"],
        "restart_ratio": med["resumer_restart"] / med["dcp_restart"],
        "target": TARGET,
    }
    # The same ratios round by round (each pair measured next to each other), then their median: drift over the run
    # cancels within a round. Reported beside the ratios of medians, which the target is judged on.
    times = raw["times"]
    result["paired_ratios"] = {
        name: statistics.median(a / b for a, b in zip(times[ours], times[theirs], strict=True))
        for name, ours, theirs in (("save", "resumer_save", "dcp_save"), ("resume", "resumer_resume", "dcp_load"),
                                   ("restart", "resumer_restart", "dcp_restart"))}
    result["met"] = all(result[k] <= TARGET for k in ("save_ratio", "resume_ratio", "restart_ratio"))
    if args.json:
        print(json.dumps(result))
    else:
        gib = sum(raw["bytes"].values()) / 2 / 2**30
        print(f"FSDP2 state on {WORLD} gloo ranks, about {gib:.2f} GiB per checkpoint (weights + AdamW), warm cache")
        print(f"  save:   resumer {med['resumer_save']:.2f} s   dcp.save {med['dcp_save']:.2f} s   "
              f"ratio {result['save_ratio']:.2f}x (target <= {TARGET}x)")
        print(f"  resume into the live state: resumer {med['resumer_resume']:.2f} s "
              f"(verify=False {med['resumer_resume_noverify']:.2f} s)"
              f"   dcp.load {med['dcp_load']:.2f} s   ratio {result['resume_ratio']:.2f}x "
              f"(verify=False {result['resume_noverify_ratio']:.2f}x; target <= {TARGET}x)")
        print(f"  resume after a restart (fresh model, optimizer without state): resumer {med['resumer_restart']:.2f} s"
              f"   dcp {med['dcp_restart']:.2f} s   ratio {result['restart_ratio']:.2f}x (target <= {TARGET}x)")
        paired = result["paired_ratios"]
        print(f"  round by round (median of each round's ratio): save {paired['save']:.2f}x, "
              f"resume {paired['resume']:.2f}x, restart {paired['restart']:.2f}x")
        print(f"  bytes on disk: resumer {raw['bytes']['resumer']:,}   dcp {raw['bytes']['dcp']:,}")
    return 0 if result["met"] or args.no_check else 1


if __name__ == "__main__":
    sys.exit(main())
