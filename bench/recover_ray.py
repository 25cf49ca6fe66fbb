"""Benchmark: time to recover after a worker is SIGKILLed — resumer's controller vs Ray Train's own restart.

Both arms train the same DDP job (``resumer.examples`` MLP + Adam + StepLR, 2 CPU workers, gloo, one
global batch per step, a checkpoint every ``--every`` steps) on one local Ray cluster, and SIGKILL rank 0's
worker process at ``--kill-at`` (a step between two checkpoints). Time to recover = from the kill to the
first training step completed after the restart, read from a progress file rank 0 appends to each step.

* resumer: ``resumer.jobs.run.run_job`` with the example entrypoint; each attempt is a ``TorchTrainer.fit()``
  with Ray's restarts off; after the kill the controller classifies the failure, selects and verifies
  the newest checkpoint, plans it against the code on the meta device, records the decision in MLflow
  (embedded SQLite, durable before launch), launches, and every rank checks the plan, then applies it.
* Ray Train: the same loop written the usual way: ``FailureConfig(max_failures=1)``,
  ``ray.train.report(checkpoint=...)`` every N steps (``torch.save`` of the state dicts), and
  ``ray.train.get_checkpoint()`` + ``load_state_dict`` at start.

Also checked: zero committed steps lost — each arm restarts from the last checkpoint committed before the
kill. Target: resumer's time to recover at most 1.2x Ray Train's, medians over ``--repeat`` runs of
each, interleaved. Run: ``python bench/recover_ray.py [--repeat 3] [--json] [--no-check]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # both arms: the controller's poll

TARGET = 1.2


def progress(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def killer(path: str, kill_at: int, out: dict[str, Any]) -> threading.Thread:
    """SIGKILL rank 0's worker once it has finished step ``kill_at``; note when and what was committed."""

    def run() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            lines = progress(path)
            done = [ln for ln in lines if ln["event"] == "step" and ln["step"] >= kill_at]
            if done:
                out["t_kill"] = time.time()
                out["killed_pid"] = done[0]["pid"]
                out["killed_after_step"] = max(ln["step"] for ln in lines if ln["event"] == "step")
                os.kill(done[0]["pid"], signal.SIGKILL)
                return
            time.sleep(0.01)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def measure(path: str, out: dict[str, Any], every: int) -> dict[str, Any]:
    lines = progress(path)
    after = [ln for ln in lines if ln["t"] > out["t_kill"] and ln["pid"] != out["killed_pid"]]
    enter = next(ln for ln in after if ln["event"] == "enter")  # the restarted training function
    start = next(ln for ln in after if ln["event"] == "start" and ln["t"] >= enter["t"])
    first = next(ln for ln in after if ln["event"] == "step" and ln["t"] >= start["t"])
    committed = out["killed_after_step"] // every * every  # the newest checkpoint before the kill
    return {"recover_s": first["t"] - out["t_kill"], "until_train_fn_s": enter["t"] - out["t_kill"],
            "restore_s": start["t"] - enter["t"], "resumed_after": start["step"], "committed": committed,
            "stray_lines": [ln for ln in after if ln["t"] < enter["t"]],  # written after the kill by an old worker
            "lost_committed_steps": max(0, committed - start["step"]),
            "steps": sorted({ln["step"] for ln in lines if ln["event"] == "step"})}


def ray_train_loop(config: dict[str, Any]) -> None:
    """The baseline: the same training, checkpointed and restored through Ray Train's own API."""
    import ray.train
    import ray.train.torch
    import torch

    from resumer import examples as ex
    from resumer.examples.train import note_progress, shard_step

    note_progress(config, "enter", -1)
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(ex.mlp_v1())
    opt = ex.adam(model)
    sched = ex.step_lr(opt)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
        getattr(model, "module", model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["step"])
    note_progress(config, "start", start)
    world, rank = ray.train.get_context().get_world_size(), ray.train.get_context().get_world_rank()
    batch = int(config["batch_size"])
    for step in range(start + 1, int(config["total_steps"]) + 1):
        loss = shard_step(model, opt, sched, step, batch, world, rank)  # the same step as the resumer arm
        time.sleep(float(config["step_delay_s"]))
        note_progress(config, "step", step)
        if step % int(config["every"]) == 0:
            d = tempfile.mkdtemp()
            if rank == 0:
                torch.save({"model": getattr(model, "module", model).state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "step": step}, os.path.join(d, "state.pt"))
            ray.train.report({"loss": loss, "step": step},
                             checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def run_ray_train(work: str, config: dict[str, Any]) -> dict[str, Any]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    path = os.path.join(work, "progress.jsonl")
    out: dict[str, Any] = {}
    k = killer(path, config["kill_at"], out)
    trainer = TorchTrainer(ray_train_loop, train_loop_config={**config, "progress_file": path},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                           run_config=RunConfig(name=f"raytrain-{os.path.basename(work)}", storage_path=work,
                                                failure_config=FailureConfig(max_failures=1)))
    trainer.fit()
    k.join(1)
    return measure(path, out, config["every"])


def run_resumer(work: str, config: dict[str, Any]) -> dict[str, Any]:
    from resumer.jobs import spec as jobspec
    from resumer.jobs.run import run_job
    from resumer.tracking.recorder import MlflowRecorder

    path = os.path.join(work, "progress.jsonl")
    spec = jobspec.parse({
        "name": f"bench-{os.path.basename(work)}", "entrypoint": "resumer.examples_train:train_loop",
        "model": "resumer.examples:mlp_v1", "optimizer": "resumer.examples:adam",
        "scheduler": "resumer.examples:step_lr", "scaling": {"workers": 2},
        "config": {"total_steps": config["total_steps"], "batch_size": config["batch_size"],
                   "step_delay_s": config["step_delay_s"], "progress_file": path},
        "storage": {"root": os.path.join(work, "ckpt")}, "checkpoint": {"every": config["every"]},
        "retries": {"crashed": {"max": 1, "backoff_s": 0}}})
    out: dict[str, Any] = {}
    k = killer(path, config["kill_at"], out)
    recorder = MlflowRecorder(f"sqlite:///{work}/mlflow.db", "bench", spool_dir=os.path.join(work, "spool"))
    try:
        result = run_job(spec, recorder=recorder, timeout_s=300, poll_s=0.1)
    finally:
        recorder.close()
    k.join(1)
    if result.state.value != "succeeded":
        raise RuntimeError(f"resumer arm ended {result.state.value}: {result.message}")
    return measure(path, out, config["every"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--total-steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--kill-at", type=int, default=22)
    ap.add_argument("--step-delay", type=float, default=0.05)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    import ray

    config = {"total_steps": args.total_steps, "every": args.every, "kill_at": args.kill_at, "batch_size": 32,
              "step_delay_s": args.step_delay}
    ray.init(num_cpus=2, include_dashboard=False, namespace="resumer", logging_level="ERROR")
    runs: dict[str, list[dict[str, Any]]] = {"ray_train": [], "resumer": []}
    try:
        with tempfile.TemporaryDirectory(prefix="resumer-recover-") as tmp:
            for i in range(args.repeat):  # interleaved, so drift on this noisy machine hits both arms alike
                for arm, fn in (("ray_train", run_ray_train), ("resumer", run_resumer)):
                    work = os.path.join(tmp, f"{arm}-{i}")
                    os.makedirs(work)
                    r = fn(work, config)
                    runs[arm].append(r)
                    print(f"{arm} run {i + 1}: recovered in {r['recover_s']:.2f}s (train function entered after "
                          f"{r['until_train_fn_s']:.2f}s, restore {r['restore_s']:.2f}s), resumed after step "
                          f"{r['resumed_after']} (committed before the kill: {r['committed']})", file=sys.stderr)
    finally:
        ray.shutdown()
    med = {arm: statistics.median(r["recover_s"] for r in rs) for arm, rs in runs.items()}
    ratio = med["resumer"] / med["ray_train"]
    lost = {arm: max(r["lost_committed_steps"] for r in rs) for arm, rs in runs.items()}
    complete = all(r["steps"] == list(range(1, args.total_steps + 1)) for rs in runs.values() for r in rs)
    report = {"median_recover_s": med, "ratio": ratio, "target": TARGET, "max_lost_committed_steps": lost,
              "every_step_trained": complete,
              "runs": {arm: [{k: v for k, v in r.items() if k != "steps"} for r in rs] for arm, rs in runs.items()}}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"time to recover (median of {args.repeat}): resumer {med['resumer']:.2f}s, Ray Train "
              f"{med['ray_train']:.2f}s -> {ratio:.2f}x (target <= {TARGET}x); committed steps lost: "
              f"resumer {lost['resumer']}, Ray Train {lost['ray_train']}")
    ok = ratio <= TARGET and lost["resumer"] == 0 and complete
    return 0 if ok or args.no_check else 1


if __name__ == "__main__":
    sys.exit(main())
