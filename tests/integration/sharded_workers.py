"""Rank processes for the sharded (FSDP2, gloo, CPU) tests: each scenario runs on every rank of a real process group
and writes what it saw to ``out/rank<r>.json`` (rank 0 also ``out/state.pt``).

The ranks are started by ``start_ranks``: fresh processes forked from a forkserver that imported torch and resumer
once (``multiprocessing``'s forkserver: a clean single-threaded process, never the test process), instead of each
rank importing torch again, which took about 3 s of CPU per rank on these 2-core machines. A forked rank has the
forkserver's environment, so the test process's environment at the call is handed over and set first."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def build(seed: int = 0) -> nn.Module:
    """A small MLP; ``SHARD_WIDTH`` in the environment widens its hidden layer (default 7)."""
    torch.manual_seed(seed)
    width = int(os.environ.get("SHARD_WIDTH", "7"))
    model = nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, 4))
    model.register_buffer("scale", torch.arange(4.0) + seed)
    return model


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    scale = model.module.scale if isinstance(model, nn.parallel.DistributedDataParallel) else model.scale
    loss = (model(torch.randn(4, 5, generator=g)) * scale).pow(2).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.item())


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole state as DTensor.full_tensor() gathers it (a collective): model, and optimizer state by name."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    def full(v: Any) -> Any:
        return (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()

    osd = get_optimizer_state_dict(model, opt)
    return {"model": full_model(model),
            "optimizer": {p: {k: full(v) for k, v in st.items()} for p, st in osd["state"].items()}}


def full_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as DTensor.full_tensor() gathers it (a collective). Unlike :func:`full_state` it leaves an
    optimizer with no state as it is (torch's get_optimizer_state_dict would make its state with a step)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in model.state_dict().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.checkpoint",
           "torch.distributed.checkpoint.state_dict", "resumer.runtime.api", "resumer.runtime.sharded_save",
           "sharded_workers"]


def start_ranks(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int, *, join: bool = True) -> Any:
    """``torch.multiprocessing.start_processes(fn, args, nprocs)`` from the forkserver (see the module's doc):
    ``fn(rank, *args)`` runs after the caller's environment is set in the rank."""
    multiprocessing.set_forkserver_preload(PRELOAD)  # taken when the forkserver starts (the first call)
    return mp.start_processes(_with_env, args=(dict(os.environ), fn, *args), nprocs=nprocs, join=join,
                              start_method="forkserver")


def _with_env(rank: int, env: dict[str, str], fn: Callable[..., None], *args: Any) -> None:
    os.environ.clear()
    os.environ.update(env)
    fn(rank, *args)


def run(world: int, root: str, scenario: str, out: str) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world`` ranks; returns each rank's report."""
    Path(out).mkdir(parents=True, exist_ok=True)
    start_ranks(_worker, (world, free_port(), root, scenario, out), world)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def _worker(rank: int, world: int, port: int, root: str, scenario: str, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    # A collective one rank never joins fails within a minute instead of hanging the test run.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        report = _scenario(rank, scenario, root, out)
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    except BaseException:
        dist.destroy_process_group()
        raise
    finish()


def finish() -> None:
    """End a rank whose scenario succeeded. FSDP2 modules sit in reference cycles that keep their device mesh,
    and so the gloo process group, alive past ``destroy_process_group``; freed later, during interpreter
    finalization, gloo's threads abort the process now and then ("terminate called without an active
    exception", SIGABRT, after the report was written). So: free them first, leave the group together, and
    skip finalization."""
    import gc
    import sys

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class OwnDecay(torch.optim.AdamW):
    """AdamW plus a decay of its own, applied at every step whatever the learning rate (as some optimizers' updates
    are): a step at learning rate 0 still moves every parameter."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(0.5)
        return loss


def _sharded(seed: int, renamed: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``renamed``: a parameterless layer inserted after the first (the second Linear becomes ``3``). The optimizer
    is AdamW, or :class:`OwnDecay` when the environment says ``OPTIMIZER=own-decay``. With ``EVALUATED=1`` in the
    environment the last Linear keeps its full parameters after a forward pass (``reshard_after_forward=False``),
    and :func:`evaluate` leaves them so."""
    from torch.distributed.fsdp import fully_shard

    model = build(seed)
    if renamed:
        model = nn.Sequential(model[0], nn.Identity(), model[1], model[2])
        model.register_buffer("scale", torch.arange(4.0) + seed)
    fully_shard(model[0])
    fully_shard(model[-1], reshard_after_forward=os.environ.get("EVALUATED") != "1")
    fully_shard(model)
    kind = OwnDecay if os.environ.get("OPTIMIZER") == "own-decay" else torch.optim.AdamW
    return model, kind(model.parameters(), lr=0.05)


def evaluate(model: nn.Module) -> None:
    """With ``EVALUATED=1``: a forward pass with no backward, as an evaluation between steps runs. FSDP2 then leaves
    the last Linear holding its full, unsharded parameters (not the DTensors its optimizer steps) until the next
    backward or reshard."""
    if os.environ.get("EVALUATED") == "1":
        with torch.no_grad():
            model(torch.ones(2, 5))
        assert not hasattr(model[-1].weight, "full_tensor"), "the evaluation left the last layer sharded"


def _replicated(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The same model replicated by DistributedDataParallel (gloo, CPU), its optimizer on the DDP parameters."""
    model = nn.parallel.DistributedDataParallel(build(seed))
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def _planned(report: dict[str, Any], uri: str, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """What ``resumer.plan`` says on this rank, before the resume: whether it is ok, and its digest."""
    import resumer

    plan = resumer.plan(uri, model, opt)
    report["plan_ok"], report["digest"] = plan.ok, plan.digest()


def _race_the_listing(rank: int, report: dict[str, Any]) -> None:
    """A commit that lands between two ranks' listings of the root: rank 0 chooses a checkpoint, then step 2's
    manifest (held aside by the test at ``$HELD_MANIFEST``) is put in place (``$COMMIT_TO``), and only then does rank
    1 list the root; so the ranks choose different checkpoints. Each rank's choices are counted in
    ``report["chose"]``."""
    from resumer.runtime import api

    real, chose = api._open, report.setdefault("chose", [])
    committed = Path(os.environ["COMMIT_TO"] + ".landed")

    def racing(*args: Any, **kwargs: Any) -> Any:
        first = not chose
        if rank == 1 and first:
            deadline = time.monotonic() + 60
            while not committed.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        source, from_root = real(*args, **kwargs)
        chose.append(source.uri.rstrip("/").rsplit("/", 1)[-1])
        if rank == 0 and first:
            os.replace(os.environ["HELD_MANIFEST"], os.environ["COMMIT_TO"])  # step 2 commits now
            committed.touch()
        return source, from_root

    api._open = racing  # type: ignore[assignment]


def _ddp(rank: int, scenario: str, root: str, out: str) -> dict[str, Any]:
    """DDP <-> FSDP2: ``ddp-save`` trains DDP ranks one step and rank 0 saves it (every rank reports the URI);
    ``ddp-resume`` resumes ``root`` into DDP ranks, ``fsdp2-resume-planned`` into FSDP2 ranks (both planned first);
    ``ddp-resume-one-rank-fails`` (rank 1's read fails) and ``ddp-resume-split-plan`` (rank 1 expects another plan)
    report whether each rank's model was left unchanged.
    Each rank writes its full state (of the unwrapped model) to ``out/state<r>.pt`` and reports the next two steps'
    losses."""
    import resumer

    report: dict[str, Any] = {"rank": rank}
    if scenario == "ddp-save":
        model, opt = _replicated(0)
        train_step(model, opt, 1)
        torch.manual_seed(100 + rank)
        # Replicated state is saved by rank 0 alone (as a job's workers do): save_checkpoint is collective only
        # for sharded state; called on every DDP rank, each would write the whole state and race to commit it.
        uri: list[Any] = [None]
        if rank == 0:
            try:
                uri[0] = resumer.save_checkpoint(root, 1, model, opt)
            except resumer.CheckpointError as exc:
                report["error"], report["error_type"] = str(exc), type(exc).__name__
        dist.broadcast_object_list(uri, src=0)  # every rank waits for the commit and learns its URI
        report["uri"] = uri[0]
        report["draws"] = torch.rand(3).tolist()
    else:
        model, opt = _replicated(7) if scenario.startswith("ddp-resume") else _sharded(7)
        _planned(report, root, model, opt)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        expect = None
        if scenario == "ddp-resume-one-rank-fails" and rank == 1:
            from resumer.formats.native.source import NativeSource

            def broken(self: Any, names: Any) -> None:
                raise resumer.CheckpointError("rank 1 could not read its bytes (injected)", uri=self.uri)

            NativeSource.load_model = broken  # type: ignore[method-assign]
        if scenario == "ddp-resume-split-plan":
            expect = report["digest"] if rank == 0 else "0" * 64  # rank 1 was told another plan
        try:
            result = resumer.resume(root, model, opt, expect_plan=expect)
            report["step"], report["bytes_read"] = result.step, result.bytes_read
        except resumer.CheckpointError as exc:
            report["error"], report["error_type"] = str(exc), type(exc).__name__
        report["unchanged"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        report["draws"] = torch.rand(3).tolist()
    state = full_state(getattr(model, "module", model), opt)
    report["losses"] = [train_step(model, opt, s) for s in (2, 3)]
    torch.save(state, os.path.join(out, f"state{rank}.pt"))  # each rank's own: DDP ranks could differ
    return report


def _scenario(rank: int, scenario: str, root: str, out: str) -> dict[str, Any]:  # noqa: C901 - one per scenario
    import resumer
    from resumer.runtime import sharded_save

    if scenario in ("ddp-save", "ddp-resume", "fsdp2-resume-planned", "ddp-resume-one-rank-fails",
                    "ddp-resume-split-plan"):
        return _ddp(rank, scenario, root, out)
    report: dict[str, Any] = {"rank": rank}
    if scenario.startswith("save"):
        model, opt = _sharded(0)
        train_step(model, opt, 1)
        if scenario == "save-write-fails" and rank == 1:
            def broken(*args: Any, **kwargs: Any) -> Any:
                raise OSError(5, "Input/output error (injected)")

            sharded_save.write_file = broken  # type: ignore[assignment]
        if scenario == "save-drops-a-shard" and rank == 1:
            real = sharded_save.local_pieces
            sharded_save.local_pieces = lambda key, t: [] if key == "0.weight" else real(key, t)  # type: ignore
        torch.manual_seed(100 + rank)  # each rank's own RNG stream
        evaluate(model)
        try:
            report["uri"] = resumer.save_checkpoint(root, int(os.environ.get("SAVE_STEP", "1")), model, opt)
        except resumer.CheckpointError as exc:
            report["error"], report["error_type"] = str(exc), type(exc).__name__
        report["draws"] = torch.rand(3).tolist()
        state = full_state(model, opt)
        report["losses"] = [train_step(model, opt, s) for s in (2, 3)]
    else:
        # other values than the saved ones; with "resume-models-differ", rank 1's model differs from rank 0's
        renamed = scenario == "resume-renamed" or (scenario == "resume-models-differ" and rank == 1)
        model, opt = _sharded(7, renamed=renamed)
        before = full_model(model)  # the optimizer has no state yet, as in a relaunched job
        if scenario == "resume-listing-race":
            _race_the_listing(rank, report)
        if scenario == "resume-one-rank-cannot-open" and rank == 1:
            from resumer.runtime import api

            def unreachable(*args: Any, **kwargs: Any) -> Any:
                raise resumer.TransientStorageError("the storage refused rank 1 (injected)", uri=root)

            api._open = unreachable  # type: ignore[assignment]
        if scenario == "resume-one-rank-fails" and rank == 1:
            from resumer.formats.native.source import NativeSource

            def broken(self: Any, names: Any) -> None:
                raise resumer.CheckpointError("rank 1 could not read its bytes (injected)", uri=self.uri)

            NativeSource.load_model = broken  # type: ignore[method-assign]
        if scenario == "resume-one-rank-cannot-place" and rank == 1:
            from resumer.runtime import sharded

            def unplaceable(*args: Any, **kwargs: Any) -> Any:
                raise resumer.ResumerError("rank 1 cannot place its shard (injected)")

            sharded.copy_target = unplaceable  # type: ignore[assignment]
        evaluate(model)
        try:
            result = resumer.resume(root, model, opt, renames="auto" if scenario == "resume-renamed" else None)
            report["step"], report["bytes_read"] = result.step, result.bytes_read
        except resumer.ResumerError as exc:
            report["error"], report["error_type"] = str(exc), type(exc).__name__
        report["draws"] = torch.rand(3).tolist()
        state = full_state(model, opt)
        if scenario in ("resume-models-differ", "resume-one-rank-cannot-open"):
            report["unchanged"] = all(torch.equal(before[k], v) for k, v in state["model"].items())
            return report  # no training step together (the two ranks' models may differ)
        report["unchanged"] = all(torch.equal(before[k], v) for k, v in state["model"].items())
        report["losses"] = [train_step(model, opt, s) for s in (2, 3)]
    if rank == 0:
        torch.save(state, os.path.join(out, "state.pt"))
    return report
