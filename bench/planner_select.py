"""Benchmark: what the job controller pays to choose the checkpoint of an attempt, by sizes or by checksums.

The job's controller (``resumer.jobs.planner.JobPlanner``) selects the newest valid checkpoint, plans it and
records the decision before every attempt, recovery included; then every rank reads the checkpoint once,
checking its checksums as it reads. Selecting by checksums too reads the whole checkpoint once more, in the
controller's process, before any rank starts. This measures, on a local folder and on a local S3 API server
(moto), for a checkpoint of about 200 MB (an MLP of ``--layers`` 2048x2048 float32 layers plus its Adam state):

  * ``select``: ``resumer.select(root, checksums=...)`` alone;
  * ``decide``: the controller's whole ``JobPlanner.decide`` (select, build the model on meta, plan);
  * ``rank``: one rank's ``resume`` of the chosen checkpoint (one read, checksums checked), for scale.

Medians of ``--repeat`` runs, the local folder warm in the page cache. On S3 the GET requests of data
files (``*.safetensors``) per call are counted from the server's log: none when selecting by sizes.
Run: ``python bench/planner_select.py [--layers 4] [--repeat 3] [--json]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LAYERS_ENV = "RESUMER_BENCH_LAYERS"
WIDTH = 2048


def model() -> nn.Module:
    """The job's model factory (``planner_select:model``); the planner builds it on the meta device."""
    layers = int(os.environ.get(LAYERS_ENV, "4"))
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])


def adam(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(m.parameters(), lr=1e-3)


def timed(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(root: str, so: dict[str, Any] | None, repeat: int, gets: Callable[[], int]) -> dict[str, Any]:
    import resumer
    from resumer.core.decision import FailureClass
    from resumer.jobs import spec as jobspec
    from resumer.jobs.factories import build
    from resumer.jobs.planner import JobPlanner

    m, opt, _ = build("planner_select:model", "planner_select:adam")
    for p in m.parameters():
        p.data.normal_()
    m(torch.randn(2, WIDTH)).sum().backward()
    opt.step()
    uri = resumer.save_checkpoint(root, 1, m, opt, storage_options=so)
    nbytes = sum(f.size for f in resumer.read_manifest(uri, so).files)
    spec = jobspec.parse({"name": "bench", "entrypoint": "planner_select:model", "model": "planner_select:model",
                          "optimizer": "planner_select:adam", "storage": {"root": root, "options": so or {}}})
    out: dict[str, Any] = {"checkpoint_mb": round(nbytes / 1e6, 1)}
    for checksums in (False, True):
        key = "checksums" if checksums else "sizes"
        before = gets()
        out[f"select_{key}_s"] = timed(functools.partial(resumer.select, root, storage_options=so,
                                                         checksums=checksums, mark=False), repeat)
        after = gets()
        out[f"select_{key}_data_gets"] = (after - before) // repeat
        planner = JobPlanner(spec, checksums=checksums)
        out[f"decide_{key}_s"] = timed(functools.partial(planner.decide, 2, FailureClass.PREEMPTED), repeat)
    decision = JobPlanner(spec).decide(2, FailureClass.PREEMPTED)
    assert decision.plan is not None, decision.message
    assert decision.checkpoint == uri, decision.checkpoint
    digest = decision.plan.digest()

    def rank() -> None:
        target, target_opt, _ = build("planner_select:model", "planner_select:adam")
        resumer.resume(uri, target, target_opt, storage_options=so, expect_plan=digest)

    out["rank_resume_s"] = timed(rank, max(1, repeat - 1))
    out["saved_per_attempt_s"] = out["decide_checksums_s"] - out["decide_sizes_s"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="2048x2048 float32 layers (4: ~67 MB model, ~200 MB "
                                                          "with Adam's state)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    os.environ[LAYERS_ENV] = str(args.layers)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the factories: planner_select:model
    torch.manual_seed(0)
    from resumer.testing import local_s3

    results: dict[str, Any] = {"local": measure(tempfile.mkdtemp(prefix="resumer-bench-"), None, args.repeat,
                                                lambda: 0)}
    log = os.path.join(tempfile.mkdtemp(prefix="resumer-bench-"), "moto.log")
    with local_s3(log_path=log) as s3:
        def gets() -> int:
            return sum(1 for r in s3.requests() if r.startswith("GET ") and ".safetensors" in r)

        results["s3"] = measure(s3.make_bucket("bench") + "/run", s3.storage_options(), args.repeat, gets)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for where, r in results.items():
        data = (f" ({r['select_sizes_data_gets']} vs {r['select_checksums_data_gets']} data GETs)"
                if where == "s3" else "")
        print(f"{where:>5}: checkpoint {r['checkpoint_mb']} MB; controller select by sizes {r['select_sizes_s']:.3f}s"
              f", by checksums {r['select_checksums_s']:.3f}s{data}; decide {r['decide_sizes_s']:.3f}s vs "
              f"{r['decide_checksums_s']:.3f}s (saved {r['saved_per_attempt_s']:.3f}s per attempt); "
              f"one rank's resume {r['rank_resume_s']:.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
