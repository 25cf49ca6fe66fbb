"""Jobs on a real local Ray cluster with 2 CPU workers (gloo): kill, crash loop, refused resubmission."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import resumer
import resumer.jobs.worker
from resumer import examples as ex
from resumer.core.controller import State
from resumer.core.decision import FailureClass, Outcome
from resumer.jobs import spec as jobspec
from resumer.jobs.run import LogRecorder, run_job
from resumer.testing.fakes import FakeLauncher

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, namespace="resumer", logging_level="WARNING")
    yield
    ray.shutdown()


def spec_for(tmp: str, **config: object) -> jobspec.JobSpec:
    return jobspec.parse(raw_for(tmp, **config))


def raw_for(tmp: str, **config: object) -> dict[str, object]:
    return {"name": f"t{abs(hash(tmp)) % 10**8}", "entrypoint": "resumer.examples_train:train_loop",
           "model": "resumer.examples:mlp_v1", "optimizer": "resumer.examples:adam",
           "scheduler": "resumer.examples:step_lr", "config": {"total_steps": 24, "step_delay_s": 0.1, **config},
           "scaling": {"workers": 2}, "storage": {"root": f"{tmp}/ckpt"}, "checkpoint": {"every": 5},
           "retries": {"crashed": {"max": 5, "backoff_s": 0.5}}}


@pytest.fixture(scope="module")
def reference_run(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, list[float]], str]:
    """The losses of one uninterrupted run of ``spec_for``'s job, which the kill and preemption tests repeat
    exactly (checkpoint cadence and retention consume no randomness), and its checkpoint root."""
    spec = spec_for(str(tmp_path_factory.mktemp("reference")))
    straight = run_job(spec, timeout_s=300)
    assert straight.state is State.SUCCEEDED and straight.attempts == 1, straight.message
    got = losses(straight)
    assert sorted(got) == list(range(1, 25)) and all(len(v) == 1 for v in got.values())
    return got, spec.root


@pytest.fixture(scope="module")
def reference(reference_run: tuple[dict[int, list[float]], str]) -> dict[int, list[float]]:
    return reference_run[0]


def losses(result: object) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for step, metrics in result.training_metrics:  # type: ignore[attr-defined]
        out.setdefault(step, []).append(metrics["loss"])
    return out


def test_sigkill_worker_resumes_with_identical_losses(reference: dict[int, list[float]],
                                                      tmp_path: pytest.TempPathFactory) -> None:
    from resumer.jobs.launcher import RayLauncher

    # keep_last 3: rank 0 prunes after each commit (5, 10, [15,] 15 or 20, 20), so step 5 goes while training.
    spec = jobspec.parse({**raw_for(str(tmp_path / "b")), "checkpoint": {"every": 5, "keep_last": 3}})
    assert spec.keep_last == 3
    launcher = RayLauncher(spec)
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            pids = launcher.worker_pids()
            if len(pids) == 2 and launcher.last_step() >= 12:
                os.kill(pids[1][1], signal.SIGKILL)  # a real worker process, mid-run
                killed.append(pids[1][1])
                return
            time.sleep(0.2)

    threading.Thread(target=killer, daemon=True).start()
    recorder = LogRecorder()
    result = run_job(spec, launcher=launcher, recorder=recorder, timeout_s=300)
    assert killed, "the worker was never killed"
    assert result.state is State.SUCCEEDED and result.attempts == 2
    first, second = result.decisions
    assert first.outcome is Outcome.STARTED
    assert second.outcome is Outcome.RESUMED and second.previous_failure is FailureClass.CRASHED
    assert second.step is not None and 10 <= second.step < 24
    assert recorder.ends == [(1, "FAILED"), (2, "FINISHED")]
    assert any("time_to_recover_s" in m for _, m in recorder.metrics)
    got = losses(result)
    assert sorted(got) == list(range(1, 25))
    for step, values in got.items():  # re-done steps too: the resumed run repeats them exactly
        assert all(v == reference[step][0] for v in values), step
    assert any(len(v) > 1 for v in got.values())  # some steps ran twice (after the last commit, before the kill)
    final = resumer.latest_checkpoint(spec.root)
    assert final is not None and final.step == 20
    # Retention ran during training: only the workers touched this root, and step 5 is gone, while the newest
    # (20) and the one the second attempt resumed from (10 or 15) are kept.
    assert second.step in (10, 15)
    assert [c.step for c in resumer.list_checkpoints(spec.root)] == [20, 15, 10]
    assert not os.path.exists(os.path.join(spec.root, "step-0000000005"))


def test_crash_at_the_same_step_is_a_crash_loop(ray_cluster: None, tmp_path: pytest.TempPathFactory) -> None:
    # One worker: the loop is recognised from the steps the attempts crash at, whatever the number of workers.
    spec = jobspec.parse({**raw_for(str(tmp_path), crash_at=7), "scaling": {"workers": 1}})
    result = run_job(spec, timeout_s=300)
    assert result.state is State.FAILED
    assert result.attempts == 3  # not the budget of 5: the loop is recognised
    assert result.message.startswith("crash loop: crashed at step")
    assert "injected crash at step 7" in result.message
    assert [d.outcome for d in result.decisions] == [Outcome.STARTED, Outcome.RESUMED, Outcome.RESUMED]


def record_only(step: int) -> FakeLauncher:
    """A launcher that keeps each decision it is given and reports the attempt done at ``step``: no workers."""
    from resumer.core.controller import Observation, Observed

    return FakeLauncher(Observation(status=Observed.SUCCEEDED, step=step))


def test_resubmission_with_changed_code_is_planned(tmp_path: pytest.TempPathFactory) -> None:
    """A v2 (head resized) under strict stops with the plan before anything launches; under partial it resumes."""
    spec = spec_for(str(tmp_path))
    model = ex.mlp_v1()
    opt = ex.adam(model)
    resumer.save_checkpoint(spec.root, 10, model, opt, ex.step_lr(opt))
    v2 = jobspec.parse({"name": spec.name, "entrypoint": spec.entrypoint,
                        "model": "resumer.examples:mlp_v2_wider_head", "optimizer": spec.optimizer,
                        "scheduler": spec.scheduler, "storage": {"root": spec.root}})
    launcher = record_only(step=24)
    refused = run_job(v2, launcher=launcher, timeout_s=60)
    assert refused.state is State.REFUSED and launcher.launches == []
    assert "model '4.weight': shape differs: saved float32[4, 64], now float32[8, 64]" in refused.message
    assert refused.decisions[0].code_changed and refused.decisions[0].previous_failure is FailureClass.CODE_CHANGED
    partial = jobspec.parse({"name": spec.name, "entrypoint": spec.entrypoint,
                             "model": "resumer.examples:mlp_v2_wider_head", "optimizer": spec.optimizer,
                             "scheduler": spec.scheduler, "storage": {"root": spec.root},
                             "resume": {"policy": "partial"}})
    ok = run_job(partial, launcher=launcher, timeout_s=60)
    assert ok.state is State.SUCCEEDED and ok.decisions[0].outcome is Outcome.RESUMED
    assert launcher.launches == [ok.decisions[0]] and launcher.stops == []
    assert ok.decisions[0].plan is not None and ok.decisions[0].plan.counts()["fresh"] == 2


def test_a_step_that_hangs_once_is_detected_killed_and_resumed(ray_cluster: None,
                                                               tmp_path: pytest.TempPathFactory) -> None:
    raw = {"name": "hang", "entrypoint": "resumer.examples_train:train_loop", "model": "resumer.examples:mlp_v1",
           "optimizer": "resumer.examples:adam", "config": {"total_steps": 14, "hang_at": 8},
           "storage": {"root": str(tmp_path / "ckpt")}, "checkpoint": {"every": 5},
           "retries": {"hung": {"max": 1, "backoff_s": 0.5, "timeout_s": 8}}}
    recorder = LogRecorder()
    result = run_job(jobspec.parse(raw), recorder=recorder, timeout_s=300)
    assert result.state is State.SUCCEEDED and result.attempts == 2
    assert result.decisions[1].previous_failure is FailureClass.HUNG and result.decisions[1].step == 5
    assert recorder.ends == [(1, "KILLED"), (2, "FINISHED")]


def test_newest_checkpoint_torn_uses_the_previous_one(tmp_path: pytest.TempPathFactory) -> None:
    """The planner picks the newest VALID checkpoint and records what it passed over (no Ray needed)."""
    from resumer.jobs.planner import JobPlanner

    spec = spec_for(str(tmp_path))
    model = ex.mlp_v1()
    opt = ex.adam(model)
    sched = ex.step_lr(opt)
    resumer.save_checkpoint(spec.root, 5, model, opt, sched)
    torn = resumer.save_checkpoint(spec.root, 10, model, opt, sched)
    os.remove(f"{torn}/manifest.json")  # the writer was killed before committing
    decision = JobPlanner(spec).decide(2, FailureClass.CRASHED)
    assert decision.outcome is Outcome.RESUMED and decision.step == 5
    assert [r["step"] for r in decision.rejected] == [10]
    assert "torn" in decision.rejected[0]["reason"]


def test_submit_cli_runs_a_job_and_refuses_a_changed_one(tmp_path: pytest.TempPathFactory) -> None:
    import json
    import subprocess
    import sys

    import yaml

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "mlp.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["config"] = {"total_steps": 12}
    raw["checkpoint"] = {"every": 5}
    raw["storage"] = {"root": str(tmp_path / "ckpt")}
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RESUMER_HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)

    def submit(path: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "resumer", "submit", path, "--json", "--timeout", "240"],
                              capture_output=True, text=True, timeout=300, env=env)

    done = submit(str(spec))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["state"] == "succeeded" and result["decisions"][0]["outcome"] == "started"
    assert resumer.latest_checkpoint(str(tmp_path / "ckpt")).step == 10  # type: ignore[union-attr]
    raw["model"] = "resumer.examples:mlp_v2_wider_head"
    spec.write_text(yaml.safe_dump(raw))
    refused = submit(str(spec))
    assert refused.returncode == 3
    out = json.loads(refused.stdout)
    assert out["state"] == "refused" and "shape differs" in out["message"]
    # Both submissions are on record in the embedded MLflow store (SQLite under RESUMER_HOME), no server.
    from resumer.tracking.history import read_history

    assert out["tracking_uri"] == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    history = read_history(raw["name"], tracking_uri=out["tracking_uri"])
    assert [(a.outcome, a.status) for a in history.attempts] == [("started", "FINISHED"), ("refused", "FAILED")]
    assert "shape differs" in history.attempts[1].message and history.status == "FAILED"


def test_sigterm_writes_an_emergency_checkpoint_resumed_from_and_recorded_in_mlflow(
        reference: dict[int, list[float]], tmp_path: pytest.TempPathFactory) -> None:
    """SIGTERM (a preemption notice) to a real worker (rank 1, which never saves on the cadence): it saves an
    emergency checkpoint at the next step boundary, and the job resumes from THAT checkpoint; every decision and
    the training curve land on a real MLflow server (parent curve one line, resume marker at the emergency step);
    killed attempts do not stay RUNNING."""
    from mlflow.tracking import MlflowClient

    from resumer.formats.native.verify import read_manifest
    from resumer.jobs.launcher import RayLauncher
    from resumer.testing.mlflow import local_mlflow
    from resumer.tracking.history import read_history
    from resumer.tracking.recorder import MlflowRecorder

    first_loss = {s: v[0] for s, v in reference.items()}
    # No cadence save in this job (every 100 > 24 steps): the only checkpoint there can be is the emergency one, so
    # it is always written off the cadence by the notified rank (rank 0 never races it for the step), and resumed.
    spec = jobspec.parse({**raw_for(str(tmp_path / "b")), "checkpoint": {"every": 100}})
    launcher = RayLauncher(spec)
    signalled: list[int] = []

    def preempt() -> None:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            pids = launcher.worker_pids()
            if len(pids) == 2 and launcher.last_step() >= 11:
                signalled.append(launcher.last_step())
                os.kill(pids[1][1], signal.SIGTERM)  # rank 1: the rank that does NOT write on the cadence
                return
            time.sleep(0.05)

    with local_mlflow(str(tmp_path / "mlflow")) as server:
        recorder = MlflowRecorder(server.url, "ray-it", spool_dir=str(tmp_path / "spool"))
        recorder.start_job(spec.name, params={"workers": 2})
        threading.Thread(target=preempt, daemon=True).start()
        result = run_job(spec, launcher=launcher, recorder=recorder, timeout_s=300)
        assert recorder.flush(30)
        recorder.close()
        history = read_history(spec.name, tracking_uri=server.url, experiment="ray-it")
        client = MlflowClient(tracking_uri=server.url)
        parent_loss = {m.step: m.value for m in client.get_metric_history(history.run_id, "loss")}
        markers = [(m.step, m.value) for m in client.get_metric_history(history.run_id, "resume_marker")]
        parent_points = len(client.get_metric_history(history.run_id, "loss"))

    assert signalled, "the worker was never signalled"
    assert result.state is State.SUCCEEDED and result.attempts == 2, result.message
    first, second = result.decisions
    assert second.outcome is Outcome.RESUMED and second.previous_failure is FailureClass.PREEMPTED
    emergency = second.step
    assert emergency is not None and emergency >= signalled[0]
    extra = read_manifest(second.checkpoint).raw["extra"]  # type: ignore[arg-type]
    assert extra["emergency"] is True and extra["rank"] == 1 and extra["attempt"] == 1
    assert [c.uri for c in resumer.list_checkpoints(spec.root)] == [second.checkpoint]  # the only one, ever
    got = losses(result)
    assert sorted(got) == list(range(1, 25))
    assert all(v == first_loss[s] for s, vals in got.items() for v in vals)  # bitwise, the redone steps too
    # The record: outcomes, failure classes and how each run ended.
    assert [(a.attempt, a.outcome, a.previous_failure, a.status) for a in history.attempts] == [
        (1, "started", "none", "KILLED"), (2, "resumed", "preempted", "FINISHED")]
    assert history.attempts[1].step == emergency and history.status == "FINISHED"
    assert parent_points == 24 and sorted(parent_loss) == list(range(1, 25))  # one line, no duplicates
    assert all(parent_loss[s] == first_loss[s] for s in parent_loss)
    assert markers == [(emergency, 2.0)]


def test_resume_on_a_different_number_of_workers(reference_run: tuple[dict[int, list[float]], str],
                                                 tmp_path: pytest.TempPathFactory) -> None:
    """Written by 2 workers, resumed on 1: replicated DDP state loads whole, the data position follows the
    global step (the same samples per step), and the plan and the record show the world-size change. The 2-worker
    checkpoint and the uninterrupted run to compare with are the module's reference run's (the step count only
    ends the loop, so its steps are those of any longer or shorter run of the same job)."""
    import shutil

    from safetensors.torch import load_file

    reference_root = reference_run[1]
    raw = raw_for(str(tmp_path / "b"), total_steps=16)
    shutil.copytree(f"{reference_root}/step-0000000010", tmp_path / "b" / "ckpt" / "step-0000000010")
    one = jobspec.parse({**raw, "scaling": {"workers": 1}})
    result = run_job(one, recorder=LogRecorder(), timeout_s=300)
    assert result.state is State.SUCCEEDED, result.message
    d = result.decisions[0]
    assert d.outcome is Outcome.RESUMED and d.step == 10
    assert (d.world_size_before, d.world_size_after) == (2, 1)
    assert d.plan is not None and "world size 2 saved, 1 now" in d.plan.notes
    assert sorted(losses(result)) == list(range(11, 17))
    # Step 15's weights and Adam state: one worker averages the same global batch in another order than
    # two (the loss each reports is its own shard's), so they agree up to rounding, not bitwise.
    for name in ("model", "optimizer"):
        want, have = (load_file(str(next((Path(root) / "step-0000000015").glob(f"{name}.*.safetensors"))))
                      for root in (reference_root, tmp_path / "b" / "ckpt"))
        assert want.keys() == have.keys() and len(want) >= 6
        for key in want:
            assert torch.allclose(want[key].float(), have[key].float(), rtol=1e-4, atol=1e-6), (name, key)


EXPECTED = {  # (v1, v2) -> policy -> resumed? (the unit tests in test_deploy.py pin each plan's content)
    ("cnn", "cnn_v2"): {"strict": False, "partial": True, "reset-optimizer": False},
    ("charlm", "charlm_v2"): {"strict": True, "partial": True, "reset-optimizer": True},
    ("charlm", "charlm_sgd"): {"strict": False, "partial": True, "reset-optimizer": True},  # partial: optimizer reset
}
# The one resumed case of each pair that trains on the Ray workers; the pair's other resumed cases go through the
# same job run (planner, controller, decision) with a launcher that records the decision and trains nothing. One
# launch per pair covers each kind of plan a worker applies: fresh tensors (cnn_v2, partial), renames with the
# optimizer reset (charlm_v2), an optimizer of another type reset under partial (charlm_sgd).
ON_RAY = {("cnn", "cnn_v2"): "partial", ("charlm", "charlm_v2"): "reset-optimizer",
          ("charlm", "charlm_sgd"): "partial"}


@pytest.mark.parametrize(("v1", "v2"), list(EXPECTED))
def test_each_v2_resubmitted_under_each_policy_is_resumed_or_refused_as_planned(
        ray_cluster: None, tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, v1: str, v2: str) -> None:
    """The shipped jobs/ examples: a v1 checkpoint at step 4, then its v2 resubmitted under each policy (each from
    a copy of the same v1 root): refused before anything launches, or resumed with exactly the plan an offline
    ``resumer.plan`` makes; the pair's ``ON_RAY`` case trains on from step 5 on 2 Ray workers."""
    import shutil

    from resumer.jobs.attempt import ENV, AttemptConfig
    from resumer.jobs.factories import build, resolve

    jobs = os.path.join(os.path.dirname(__file__), "..", "..", "jobs")
    base = jobspec.load(os.path.join(jobs, f"{v1}.yaml"))
    monkeypatch.setenv(ENV, AttemptConfig(  # the v1 checkpoint, trained in-process (no Ray needed)
        job=base.name, attempt=1, root=str(tmp_path / "v1"), every=4, model=base.model,
        optimizer=base.optimizer, scheduler=base.scheduler).to_json())
    resolve(base.entrypoint, "entrypoint")({**base.config, "total_steps": 4})
    monkeypatch.delenv(ENV)
    v1_uri = resumer.latest_checkpoint(str(tmp_path / "v1")).uri  # type: ignore[union-attr]
    with open(os.path.join(jobs, f"{v2}.yaml")) as f:
        import yaml

        raw = yaml.safe_load(f)
    assert EXPECTED[(v1, v2)][ON_RAY[(v1, v2)]], "the case trained on Ray resumes"
    for policy, resumes in EXPECTED[(v1, v2)].items():
        root = tmp_path / policy
        shutil.copytree(tmp_path / "v1", root)
        spec = jobspec.parse({**raw, "name": f"{v2}-{policy}-{abs(hash(str(tmp_path))) % 10**6}",
                              "storage": {"root": str(root)}, "config": {**raw["config"], "total_steps": 6},
                              "checkpoint": {"every": 2}, "resume": {**raw.get("resume", {}), "policy": policy}},
                             base_dir=jobs)
        model, optimizer, scheduler = build(spec.model, spec.optimizer, spec.scheduler)
        offline = resumer.plan(str(root), model, optimizer, scheduler, policy=policy,
                               renames=list(spec.renames) or None)
        assert offline.ok is resumes, (policy, offline.describe())
        on_ray = policy == ON_RAY[(v1, v2)]
        recorded = record_only(step=6)
        result = run_job(spec, recorder=LogRecorder(), timeout_s=300, launcher=None if on_ray else recorded)
        decision = result.decisions[0]
        assert decision.checkpoint == v1_uri.replace("/v1/", f"/{policy}/") and decision.step == 4
        assert decision.plan is not None
        assert resumer.jobs.worker.plan_hash(decision.plan) == resumer.jobs.worker.plan_hash(offline), policy
        if resumes:
            assert result.state is State.SUCCEEDED and decision.outcome is Outcome.RESUMED, (policy, result.message)
            if on_ray:
                assert sorted(losses(result)) == [5, 6], policy
                assert resumer.latest_checkpoint(str(root)).step == 6  # type: ignore[union-attr]
            else:
                assert recorded.launches == [decision] and recorded.stops == [], policy
        else:
            assert result.state is State.REFUSED and decision.outcome is Outcome.REFUSED, policy
            assert result.message == offline.describe_refusal() and result.training_metrics == []
            assert recorded.launches == [], policy  # refused before any launch
            assert resumer.latest_checkpoint(str(root)).step == 4  # type: ignore[union-attr]  # nothing ran


def test_newest_checkpoint_torn_the_job_resumes_from_the_previous_one(ray_cluster: None,
                                                                       tmp_path: pytest.TempPathFactory) -> None:
    """On Ray: the newest checkpoint lost its manifest (the writer died before the commit; the kill-writer
    tests show that is what a killed writer leaves), so the job resumes from the one before and says why."""
    spec = spec_for(str(tmp_path), total_steps=12)
    torch.manual_seed(0)
    model = ex.mlp_v1()
    opt = ex.adam(model)
    sched = ex.step_lr(opt)
    for step in range(1, 11):
        ex.train_step(model, opt, step, sched)
        if step in (5, 10):
            uri = resumer.save_checkpoint(spec.root, step, model, opt, sched)
    os.remove(f"{uri}/manifest.json")
    result = run_job(spec, recorder=LogRecorder(), timeout_s=300)
    assert result.state is State.SUCCEEDED, result.message
    d = result.decisions[0]
    assert d.outcome is Outcome.RESUMED and d.step == 5
    assert [(r["step"], "torn" in r["reason"]) for r in d.rejected] == [(10, True)]
    assert sorted(losses(result)) == list(range(6, 13))
    assert os.path.isdir(uri) and resumer.latest_checkpoint(spec.root).step == 10  # type: ignore[union-attr]


def test_a_job_starts_from_a_torch_save_file_and_continues_as_if_never_interrupted(
        reference_run: tuple[dict[int, list[float]], str], tmp_path: pytest.TempPathFactory) -> None:
    """``resume.from``: a checkpoint of another tool (here a plain torch.save file, written by torch from the
    reference run's step-10 state) starts the job, planned and recorded like any other; the job then
    continues with the uninterrupted run's losses exactly, and writes its own checkpoints."""
    reference, root = reference_run
    model, optimizer, scheduler = ex.mlp_v1(), None, None
    optimizer = ex.adam(model)
    scheduler = ex.step_lr(optimizer)
    assert resumer.resume(f"{root}/step-0000000010", model, optimizer, scheduler).step == 10
    path = f"{tmp_path}/from-another-tool.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": 10}, path)
    raw = raw_for(str(tmp_path))
    result = run_job(jobspec.parse({**raw, "resume": {"from": path}}), recorder=LogRecorder(), timeout_s=300)
    assert result.state is State.SUCCEEDED, result.message
    first = result.decisions[0]
    assert (first.outcome, first.checkpoint, first.step) == (Outcome.RESUMED, path, 10)
    assert first.plan is not None and first.plan.ok and "resume.from (torch-save)" in first.message
    got = losses(result)
    assert sorted(got) == list(range(11, 25))
    assert got == {step: reference[step] for step in range(11, 25)}
    assert [c.step for c in resumer.list_checkpoints(f"{tmp_path}/ckpt")] == [20, 15]  # its own, every 5 steps
