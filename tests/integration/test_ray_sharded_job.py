"""The char-level transformer trained sharded (``scaling.sharding: fsdp``, FSDP2) on 2 Ray Train CPU workers
(gloo): a SIGKILLed worker resumes with every loss equal to an uninterrupted sharded run's, and the 2-worker
sharded checkpoint resumes on 1 worker, the plan and the record saying the layout changed."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import resumer
from resumer.core.controller import State
from resumer.core.decision import FailureClass, Outcome
from resumer.jobs import spec as jobspec
from resumer.jobs.run import LogRecorder, run_job

pytestmark = pytest.mark.slow

SHIPPED = Path(__file__).resolve().parents[2] / "jobs" / "charlm_fsdp.yaml"
STEPS = 12


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, namespace="resumer", logging_level="WARNING")
    yield
    ray.shutdown()


def raw_for(tmp: Path, **config: object) -> dict[str, Any]:
    """The shipped sharded job, shorter, its checkpoints under ``tmp``."""
    raw = yaml.safe_load(SHIPPED.read_text())
    assert raw["scaling"]["sharding"] == "fsdp"
    raw.update(name=f"s{abs(hash(str(tmp))) % 10**8}", storage={"root": str(tmp / "ckpt")},
               checkpoint={"every": 4}, config={**raw["config"], "total_steps": STEPS, "step_delay_s": 0.2, **config})
    return raw


def losses(result: Any) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for step, metrics in result.training_metrics:
        out.setdefault(step, []).append(metrics["loss"])
    return out


def signal_rank_1_at(launcher: Any, step: int, sig: signal.Signals) -> list[int]:
    """Send ``sig`` to rank 1's worker process once the job has reported ``step`` (from a thread, bounded in
    time); the returned list gets the step it was sent at."""
    sent: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            pids = launcher.worker_pids()
            if len(pids) == 2 and launcher.last_step() >= step:
                sent.append(launcher.last_step())
                os.kill(pids[1][1], sig)
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return sent


@pytest.fixture(scope="module")
def reference(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, list[float]], str]:
    spec = jobspec.parse(raw_for(tmp_path_factory.mktemp("reference")))
    assert spec.sharding == "fsdp"
    straight = run_job(spec, recorder=LogRecorder(), timeout_s=300)
    assert straight.state is State.SUCCEEDED and straight.attempts == 1, straight.message
    got = losses(straight)
    assert sorted(got) == list(range(1, STEPS + 1))
    m = resumer.read_manifest(resumer.latest_checkpoint(spec.root).uri)  # type: ignore[union-attr]
    assert m.sharded and m.signature.world_size == 2  # each worker wrote its own shards
    assert sorted({f.path.rsplit(".", 2)[1] for f in m.files}) == ["rank0", "rank1"]
    return got, spec.root


def test_a_sigkilled_sharded_worker_resumes_with_identical_losses(
        reference: tuple[dict[int, list[float]], str], tmp_path: Path) -> None:
    from resumer.jobs.launcher import RayLauncher

    spec = jobspec.parse(raw_for(tmp_path))
    launcher = RayLauncher(spec)
    killed = signal_rank_1_at(launcher, 6, signal.SIGKILL)  # a real worker process, holding half of every tensor
    result = run_job(spec, launcher=launcher, recorder=LogRecorder(), timeout_s=300)
    assert killed, "the worker was never killed"
    assert result.state is State.SUCCEEDED and result.attempts == 2, result.message
    second = result.decisions[1]
    assert second.outcome is Outcome.RESUMED and second.previous_failure is FailureClass.CRASHED
    assert second.step in (4, 8)
    got, want = losses(result), reference[0]
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, values in got.items():  # re-done steps too: the resumed run repeats them exactly
        assert all(v == want[step][0] for v in values), (step, values, want[step])
    assert any(len(v) > 1 for v in got.values())


def test_the_two_worker_sharded_checkpoint_resumes_on_one_worker(
        reference: tuple[dict[int, list[float]], str], tmp_path: Path) -> None:
    raw = raw_for(tmp_path, total_steps=STEPS + 4)
    raw["storage"] = {"root": reference[1]}
    raw["scaling"] = {"workers": 1, "sharding": "none"}  # one plain worker: no process group to shard over
    result = run_job(jobspec.parse(raw), recorder=LogRecorder(), timeout_s=300)
    assert result.state is State.SUCCEEDED, result.message
    d = result.decisions[0]
    assert d.outcome is Outcome.RESUMED and d.step == STEPS
    assert (d.world_size_before, d.world_size_after) == (2, 1)
    assert d.plan is not None and d.plan.ok
    assert ("world size 2 saved, 1 now: each of the 2 ranks' RNG state was saved, and every rank now restores "
            "rank 0's") in d.plan.notes
    assert sorted(losses(result)) == list(range(STEPS + 1, STEPS + 5))
    final = resumer.latest_checkpoint(reference[1])
    assert final is not None and final.step == STEPS + 4
    assert not resumer.read_manifest(final.uri).sharded  # one worker saves replicated state again


def test_sigterm_to_one_sharded_worker_commits_an_emergency_checkpoint_holding_every_shard(
        reference: tuple[dict[int, list[float]], str], tmp_path: Path) -> None:
    """A preemption notice (SIGTERM) reaches rank 1 only: at the next step boundary BOTH workers write their
    shards of the emergency checkpoint (no cadence save in this job, so it is the only checkpoint there is), and
    the job resumes from it with every loss equal to the uninterrupted run's."""
    from resumer.jobs.launcher import RayLauncher

    raw = raw_for(tmp_path)
    raw["checkpoint"] = {"every": 100}
    spec = jobspec.parse(raw)
    launcher = RayLauncher(spec)
    signalled = signal_rank_1_at(launcher, 5, signal.SIGTERM)  # rank 1 alone is notified
    result = run_job(spec, launcher=launcher, recorder=LogRecorder(), timeout_s=300)
    assert signalled, "the worker was never signalled"
    assert result.state is State.SUCCEEDED and result.attempts == 2, result.message
    second = result.decisions[1]
    assert second.outcome is Outcome.RESUMED and second.previous_failure is FailureClass.PREEMPTED
    assert second.step is not None and second.step >= signalled[0]
    assert [c.uri for c in resumer.list_checkpoints(spec.root)] == [second.checkpoint]  # the only one, ever
    m = resumer.read_manifest(second.checkpoint)  # type: ignore[arg-type]
    assert m.raw["extra"]["emergency"] is True and m.sharded
    assert sorted({f.path.rsplit(".", 2)[1] for f in m.files}) == ["rank0", "rank1"]  # both workers' shards
    got, want = losses(result), reference[0]
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(v == want[s][0] for s, vals in got.items() for v in vals)
