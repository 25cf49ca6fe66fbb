"""The decision recorder against a REAL ``mlflow server`` (SQLite + local artifacts, 127.0.0.1, free port):
run lineage and tags, params that never change, artifacts, the parent's one-line training curve with resume
markers, runs of killed attempts ended, a server stopped and restarted mid-run (nothing lost, nothing
duplicated), the embedded SQLite default, and ``resumer history``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import resumer
from resumer import examples as ex
from resumer.cli.history import history_command
from resumer.core.decision import Decision, FailureClass, Outcome
from resumer.core.plan import Plan
from resumer.testing import MemoryRecorder, connections_by_thread, free_port
from resumer.testing.mlflow import LocalMlflow
from resumer.tracking.base import Recorder
from resumer.tracking.history import read_history
from resumer.tracking.mlflow_fast import PointEncoder
from resumer.tracking.recorder import MlflowRecorder
from resumer.tracking.spool import new_op

pytestmark = pytest.mark.slow  # every test here talks to a real MLflow store; most start a server process

REJECTED = ({"uri": "/ckpt/step-00000030", "step": 30, "reason": "torn: manifest missing"},)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMlflow]:
    srv = LocalMlflow(str(tmp_path_factory.mktemp("mlflow")))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, Plan]:
    """A real ok plan (same code) and a real refused one (a wider head under strict), for step 20."""
    torch.manual_seed(0)
    model, root = ex.mlp_v1(), str(tmp_path_factory.mktemp("ckpt"))
    opt = ex.adam(model)
    ex.train_step(model, opt, 1)
    resumer.save_checkpoint(root, 20, model, opt)
    same = ex.mlp_v1()
    ok = resumer.plan(root, same, ex.adam(same))
    wider = ex.mlp_v2_wider_head()
    refused = resumer.plan(root, wider, ex.adam(wider))
    assert ok.ok and not refused.ok
    return ok, refused


@pytest.fixture
def make_recorder(server: LocalMlflow, tmp_path: Path) -> Iterator[Callable[..., MlflowRecorder]]:
    """``make_recorder(experiment, spool=...)``: recorders on the module's server, closed afterwards."""
    made: list[MlflowRecorder] = []

    def make(experiment: str, *, spool: str = "spool", uri: str | None = None) -> MlflowRecorder:
        rec = MlflowRecorder(uri or server.url, experiment, spool_dir=str(tmp_path / spool), flush_interval_s=0.2,
                             backoff=(0.2, 1.0))
        made.append(rec)
        return rec

    yield make
    for rec in made:
        rec.close(timeout_s=5)


@pytest.fixture
def experiment() -> str:
    return f"it-{uuid.uuid4().hex[:8]}"


def _client(server: LocalMlflow) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(server.url)


def _runs(server: LocalMlflow, experiment: str) -> tuple[Any, list[Any]]:
    """(the parent run, the attempt runs oldest first) of the one job in ``experiment``."""
    c = _client(server)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("resumer.kind") == "job"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    children = sorted((r for r in runs if r.data.tags.get("resumer.kind") == "attempt"),
                      key=lambda r: int(r.data.tags["resumer.attempt"]))
    return parents[0], children


def _history(server: LocalMlflow, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(_client(server).get_metric_history(run_id, key),
                                               key=lambda m: (m.step, m.timestamp))]


def _artifact(server: LocalMlflow, run_id: str, name: str, tmp: Path) -> str:
    path = _client(server).download_artifacts(run_id, name, str(tmp))
    return Path(path).read_text(encoding="utf-8")


def _loss(attempt: int, step: int) -> float:
    return attempt * 1000 + step  # which attempt wrote a point is readable from its value


def _train(rec: Recorder, attempt: int, steps: range, *, commit_every: int = 10) -> None:
    for step in steps:
        rec.log_training(step, {"loss": _loss(attempt, step), "lr": 0.01})
        if step % commit_every == 0:
            rec.checkpoint_committed(step)


def _three_attempts(rec: MlflowRecorder, job: str, plans: tuple[Plan, Plan]) -> None:
    """started (steps 1-30, committed to 20) -> crash -> resumed from 20 (21-40) -> code change -> refused."""
    ok, refused = plans
    rec.start_job(job, {"model": "resumer.examples:mlp_v1", "lr": 0.01})
    rec.record_decision(Decision(job=job, attempt=1, outcome=Outcome.STARTED, code_fingerprint="abc", plan=None))
    _train(rec, 1, range(1, 31), commit_every=20)  # steps 21-30 are never committed: the crash supersedes them
    rec.record_decision(Decision(job=job, attempt=2, outcome=Outcome.RESUMED, previous_failure=FailureClass.CRASHED,
                                 checkpoint="/ckpt/step-00000020", step=20, code_fingerprint="abc", plan=ok,
                                 world_size_before=2, world_size_after=2, rejected=REJECTED,
                                 metrics={"plan_seconds": 0.05, "bytes_read": 12345.0, "load_seconds": 0.2}))
    rec.log_attempt_metrics({"time_to_recover_s": 7.5})
    _train(rec, 2, range(21, 41))
    rec.record_decision(Decision(job=job, attempt=3, outcome=Outcome.REFUSED, step=40, code_changed=True,
                                 previous_failure=FailureClass.CODE_CHANGED, checkpoint="/ckpt/step-00000040",
                                 code_fingerprint="def", plan=refused, message=refused.describe_refusal()))
    assert rec.flush(60), "the records did not all reach the server"


def test_lineage_tags_and_metrics_of_started_resumed_refused(
        server: LocalMlflow, make_recorder: Callable[..., MlflowRecorder], experiment: str,
        plans: tuple[Plan, Plan]) -> None:
    rec = make_recorder(experiment)
    _three_attempts(rec, "lineage", plans)
    parent, children = _runs(server, experiment)
    assert parent.data.tags["resumer.jobs.run"] == "lineage" and parent.info.status == "RUNNING"
    assert parent.data.params == {"model": "resumer.examples:mlp_v1", "lr": "0.01"}
    assert parent.data.tags["resumer.last_outcome"] == "refused" and parent.data.tags["resumer.last_attempt"] == "3"
    assert [c.data.tags["mlflow.parentRunId"] for c in children] == [parent.info.run_id] * 3
    tags = [c.data.tags for c in children]
    assert [t["resumer.outcome"] for t in tags] == ["started", "resumed", "refused"]
    assert [t["resumer.previous_failure"] for t in tags] == ["none", "crashed", "code-changed"]
    assert [t.get("resumer.step") for t in tags] == [None, "20", "40"]
    assert [t.get("resumer.checkpoint") for t in tags] == [None, "/ckpt/step-00000020", "/ckpt/step-00000040"]
    assert [t["resumer.code_changed"] for t in tags] == ["false", "false", "true"]
    assert tags[1]["resumer.world_size_before"] == "2" and tags[1]["resumer.policy"] == "strict"
    assert tags[2]["resumer.message"].startswith("Cannot resume") and "shape" in tags[2]["resumer.message"]
    notes = [t["mlflow.note.content"] for t in tags]  # the run description in the UI: the decision at a glance
    assert notes[0].startswith("**started** under policy `strict`") and "plan.md" not in notes[0]
    assert notes[1].startswith("**resumed** from `/ckpt/step-00000020` (step 20)") and plans[0].summary() in notes[1]
    assert "previous attempt: crashed" in notes[1] and tags[2]["resumer.message"].rstrip() in notes[2]
    # Crashed -> FAILED, ended by the next decision; code-changed -> KILLED; refused -> FAILED at once.
    assert [c.info.status for c in children] == ["FAILED", "KILLED", "FAILED"]
    m = children[1].data.metrics
    counts = plans[0].counts()
    assert m["attempt"] == 2 and m["plan_seconds"] == 0.05 and m["bytes_read"] == 12345 and m["load_seconds"] == 0.2
    assert m["time_to_recover_s"] == 7.5
    assert m["plan_loaded"] == counts["loaded"] == 6 and m["plan_optimizer_carried"] == counts["optimizer_carried"]
    assert children[2].data.metrics["plan_fresh"] == plans[1].counts()["fresh"]
    assert children[1].data.params == {} and children[2].data.params == {}  # attempt values are tags, not params


def test_parent_curve_is_one_line_with_resume_markers(
        server: LocalMlflow, make_recorder: Callable[..., MlflowRecorder], experiment: str,
        plans: tuple[Plan, Plan]) -> None:
    rec = make_recorder(experiment)
    _three_attempts(rec, "curve", plans)
    parent, children = _runs(server, experiment)
    loss = _history(server, parent.info.run_id, "loss")
    steps = [s for s, _ in loss]
    assert steps == list(range(1, 41)), "every step exactly once on the parent"
    # 1-20 from attempt 1; 21-30 of attempt 1 were superseded by attempt 2's resume from step 20.
    assert loss[19] == (20, _loss(1, 20)) and loss[20] == (21, _loss(2, 21)) and loss[-1] == (40, _loss(2, 40))
    assert _history(server, parent.info.run_id, "resume_marker") == [(20, 2.0)]
    # The raw curves stay on the attempts' runs, superseded steps included.
    assert [s for s, _ in _history(server, children[0].info.run_id, "loss")] == list(range(1, 31))
    assert [s for s, _ in _history(server, children[1].info.run_id, "loss")] == list(range(21, 41))
    assert children[1].data.tags["resumer.committed_step"] == "40"


def test_fallback_to_an_older_checkpoint_keeps_the_parent_free_of_duplicates(
        server: LocalMlflow, make_recorder: Callable[..., MlflowRecorder], experiment: str) -> None:
    """Steps 21-30 were committed by attempt 1, but its step-30 checkpoint turned out corrupt: attempt 2 resumes
    from 20. The parent keeps attempt 1's 21-30 (already drawn) and continues with attempt 2 after 30."""
    rec = make_recorder(experiment)
    rec.record_decision(Decision(job="fallback", attempt=1, outcome=Outcome.STARTED))
    _train(rec, 1, range(1, 31))
    rec.record_decision(Decision(job="fallback", attempt=2, outcome=Outcome.RESUMED, step=20,
                                 previous_failure=FailureClass.CRASHED, rejected=REJECTED))
    _train(rec, 2, range(21, 41))
    rec.end_job("FINISHED")
    assert rec.flush(30)
    parent, children = _runs(server, experiment)
    loss = _history(server, parent.info.run_id, "loss")
    assert [s for s, _ in loss] == list(range(1, 41))
    assert loss[29] == (30, _loss(1, 30)) and loss[30] == (31, _loss(2, 31))
    assert _history(server, parent.info.run_id, "resume_marker") == [(20, 2.0)]
    assert [s for s, _ in _history(server, children[1].info.run_id, "loss")] == list(range(21, 41))


def test_artifacts_are_present_and_parse(
        server: LocalMlflow, make_recorder: Callable[..., MlflowRecorder], experiment: str,
        plans: tuple[Plan, Plan], tmp_path: Path) -> None:
    rec = make_recorder(experiment)
    _three_attempts(rec, "artifacts", plans)
    _, children = _runs(server, experiment)
    c = _client(server)
    names = [sorted(f.path for f in c.list_artifacts(r.info.run_id)) for r in children]
    assert names[0] == ["decision.json", "rejected.json"]
    assert names[1] == ["decision.json", "plan.html", "plan.json", "plan.md", "rejected.json"]
    assert names[2] == ["decision.json", "message.txt", "plan.html", "plan.json", "plan.md", "rejected.json"]
    resumed, refused = children[1].info.run_id, children[2].info.run_id
    assert Plan.from_dict(json.loads(_artifact(server, resumed, "plan.json", tmp_path))) == plans[0]
    assert json.loads(_artifact(server, resumed, "rejected.json", tmp_path)) == list(REJECTED)
    decision = json.loads(_artifact(server, resumed, "decision.json", tmp_path))
    assert decision["outcome"] == "resumed" and decision["step"] == 20 and decision["plan"] == plans[0].summary()
    assert _artifact(server, resumed, "plan.md", tmp_path).startswith("# Resume plan: ok")
    html = _artifact(server, refused, "plan.html", tmp_path)
    assert "Resume plan: REFUSED" in html and "<table>" in html and "shape-mismatch" in html
    assert _artifact(server, refused, "message.txt", tmp_path).strip() == plans[1].describe_refusal().strip()
    assert Plan.from_dict(json.loads(_artifact(server, refused, "plan.json", tmp_path))).refusals == plans[1].refusals


def test_resubmission_never_changes_a_param(
        server: LocalMlflow, make_recorder: Callable[..., MlflowRecorder], experiment: str) -> None:
    first = make_recorder(experiment, spool="spool-1")
    first.start_job("resub", {"lr": 0.01, "model": "mlp_v1"})
    first.record_decision(Decision(job="resub", attempt=1, outcome=Outcome.STARTED))
    first.end_job("FAILED")
    assert first.flush(30)
    first.close()
    again = make_recorder(experiment, spool="spool-2")  # resubmitted with another lr and a new param
    again.start_job("resub", {"lr": 0.02, "model": "mlp_v1", "batch": 32})
    again.record_decision(Decision(job="resub", attempt=1, outcome=Outcome.RESUMED, step=0, policy="partial",
                                   previous_failure=FailureClass.CODE_CHANGED))
    again.start_job("resub", {"lr": 0.01, "model": "mlp_v1"})  # and once more, in the same process, lr back
    again.record_decision(Decision(job="resub", attempt=1, outcome=Outcome.RESUMED, step=0, policy="reset-optimizer"))
    assert again.flush(30)
    assert again._shipper.rejected == 0 and not os.path.exists(again.spool.rejected_path)
    parent, children = _runs(server, experiment)  # the same parent run, reopened
    assert parent.info.status == "RUNNING"
    assert parent.data.params == {"lr": "0.01", "model": "mlp_v1", "batch": "32"}
    assert "resumer.param_changed.lr" not in parent.data.tags  # it was 0.02 in between, back to the logged value
    assert not any(k.startswith("resumer.param_changed.") for k in parent.data.tags)
    by_start = sorted(children, key=lambda r: r.info.start_time)
    assert [c.data.tags["resumer.policy"] for c in by_start] == ["strict", "partial", "reset-optimizer"]
    assert [c.info.status for c in by_start] == ["FAILED", "KILLED", "RUNNING"]
    assert len({c.data.tags["resumer.submission"] for c in by_start}) == 3


def test_a_changed_param_is_kept_as_a_tag(
        server: LocalMlflow, make_recorder: Callable[..., MlflowRecorder], experiment: str) -> None:
    rec = make_recorder(experiment)
    rec.start_job("changed", {"lr": 0.01})
    rec.start_job("changed", {"lr": 0.02, "batch": 32})
    assert rec.flush(30) and rec._shipper.rejected == 0
    parent, _ = _runs(server, experiment)
    assert parent.data.params == {"lr": "0.01", "batch": "32"}
    assert parent.data.tags["resumer.param_changed.lr"] == "0.02"


def test_killed_attempts_do_not_stay_running(
        server: LocalMlflow, make_recorder: Callable[..., MlflowRecorder], experiment: str) -> None:
    dead = make_recorder(experiment, spool="spool-dead")
    dead.record_decision(Decision(job="kill", attempt=1, outcome=Outcome.STARTED))
    assert dead.flush(30)
    dead.close()  # the controller died: attempt 1 is left RUNNING on the server
    _, children = _runs(server, experiment)
    assert [c.info.status for c in children] == ["RUNNING"]
    rec = make_recorder(experiment, spool="spool-new")
    rec.record_decision(Decision(job="kill", attempt=2, outcome=Outcome.RESUMED, step=0,
                                 previous_failure=FailureClass.PREEMPTED))
    rec.end_attempt(2, "KILLED")
    rec.record_decision(Decision(job="kill", attempt=3, outcome=Outcome.FRESH_START,
                                 previous_failure=FailureClass.HUNG))
    rec.close_stale_attempts("kill")  # the live attempt 3 is kept
    rec.end_attempt(3, "FAILED")
    assert rec.flush(30)
    _, children = _runs(server, experiment)
    assert [c.info.status for c in children] == ["KILLED", "KILLED", "FAILED"]
    assert all(c.info.end_time for c in children)


def test_ops_are_idempotent_when_replayed(
        server: LocalMlflow, make_recorder: Callable[..., MlflowRecorder], experiment: str) -> None:
    """What a crash between applying an op and writing the watermark replays must not duplicate anything."""
    rec = make_recorder(experiment)
    apply = rec._applier.apply
    enc = PointEncoder()
    points = [[step, *enc.encode(step, {"loss": value}, 1000 + step)[:2]] for step, value in ((1, 0.5), (2, 0.25))]
    ops = [new_op("create_run", key="job:idem", name="idem", tags={"resumer.kind": "job", "resumer.jobs.run": "idem"}),
           new_op("params", key="job:idem", params={"lr": "0.1"}),
           new_op("create_run", key="job:idem#s#1", parent_key="job:idem", tags={"resumer.kind": "attempt",
                                                                                "resumer.attempt": "1"}),
           new_op("log", key="job:idem#s#1", points=points, metrics=[["lr", 0.1, 1000, 1]]),
           new_op("parent_points", key="job:idem", points=points),
           new_op("terminate", key="job:idem#s#1", status="KILLED", end_ms=2000)]
    for op in ops:
        apply(op)
        apply(op)
    rec._applier._run_ids.clear()  # a fresh process finds the runs by key
    rec._applier._parent_step.clear()
    for op in ops:
        apply(op)
    parent, children = _runs(server, experiment)
    assert len(children) == 1 and children[0].info.status == "KILLED"
    assert _history(server, children[0].info.run_id, "loss") == [(1, 0.5), (2, 0.25)]
    assert _history(server, parent.info.run_id, "loss") == [(1, 0.5), (2, 0.25)]
    assert _history(server, children[0].info.run_id, "lr") == [(1, 0.1)]
    assert parent.data.params == {"lr": "0.1"}


def test_server_down_mid_run_then_back_nothing_lost_nothing_duplicated(
        server: LocalMlflow, make_recorder: Callable[..., MlflowRecorder], experiment: str,
        plans: tuple[Plan, Plan], monkeypatch: pytest.MonkeyPatch) -> None:
    rec = make_recorder(experiment)
    rec.start_job("outage", {"lr": 0.01})
    rec.record_decision(Decision(job="outage", attempt=1, outcome=Outcome.STARTED))
    _train(rec, 1, range(1, 51))
    assert rec.flush(30)
    server.stop()
    try:
        connects = connections_by_thread(monkeypatch)
        for step in range(51, 306):  # training goes on while the server is away; 301-305 are never committed
            rec.log_training(step, {"loss": _loss(1, step), "lr": 0.01})
            if step % 10 == 0:
                rec.checkpoint_committed(step)
            if step % 50 == 0:
                time.sleep(0.3)  # let the shipper try (and fail) in between
        assert threading.get_ident() not in connects  # training-side calls never waited on the network
        rec.record_decision(Decision(job="outage", attempt=2, outcome=Outcome.RESUMED, step=300, plan=plans[0],
                                     previous_failure=FailureClass.PREEMPTED, checkpoint="/ckpt/step-00000300"))
        _train(rec, 2, range(301, 321))
        rec.end_job("FINISHED")
        assert not rec.online and not rec.flush(0.5)
        journal = Path(rec.spool.journal_path).read_text().splitlines()
        assert len(journal) >= 5 and [json.loads(x)["seq"] for x in journal] == sorted(
            json.loads(x)["seq"] for x in journal)
    finally:
        server.start()  # same database, same port
    assert rec.flush(60), f"spool not flushed after restart: {len(rec.spool)} left"
    assert rec.online and not os.path.exists(rec.spool.journal_path) and not os.listdir(rec.spool.blob_root)
    parent, children = _runs(server, experiment)
    assert [c.data.tags["resumer.outcome"] for c in children] == ["started", "resumed"]
    assert [c.info.status for c in children] == ["KILLED", "FINISHED"] and parent.info.status == "FINISHED"
    loss = _history(server, parent.info.run_id, "loss")
    assert [s for s, _ in loss] == list(range(1, 321))
    assert loss[299] == (300, _loss(1, 300)) and loss[300] == (301, _loss(2, 301))
    assert [s for s, _ in _history(server, children[0].info.run_id, "loss")] == list(range(1, 306))
    assert [s for s, _ in _history(server, children[1].info.run_id, "lr")] == list(range(301, 321))
    assert _history(server, parent.info.run_id, "resume_marker") == [(300, 2.0)]
    assert _history(server, children[1].info.run_id, "attempt") == [(300, 2.0)]
    names = sorted(f.path for f in _client(server).list_artifacts(children[1].info.run_id))
    assert names == ["decision.json", "plan.html", "plan.json", "plan.md", "rejected.json"]


def test_a_spool_left_by_a_dead_recorder_is_flushed_by_the_next(
        server: LocalMlflow, make_recorder: Callable[..., MlflowRecorder], experiment: str) -> None:
    down = make_recorder(experiment, spool="shared", uri=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    down.start_job("left", {"lr": 0.5})
    down.record_decision(Decision(job="left", attempt=1, outcome=Outcome.STARTED))
    _train(down, 1, range(1, 21))
    down.end_attempt(1, "FINISHED")
    down.close(timeout_s=0.5)  # the process ends: everything stays in the spool
    journal = [json.loads(line) for line in Path(down.spool.journal_path).read_text().splitlines()]
    assert [op["op"] for op in journal[:2]] == ["create_run", "params"] and journal[-1]["op"] == "terminate"
    nxt = make_recorder(experiment, spool="shared")
    assert nxt.flush(30) and not os.path.exists(nxt.spool.journal_path)
    parent, children = _runs(server, experiment)
    assert parent.data.params == {"lr": "0.5"} and [c.info.status for c in children] == ["FINISHED"]
    assert [s for s, _ in _history(server, parent.info.run_id, "loss")] == list(range(1, 21))
    assert [s for s, _ in _history(server, children[0].info.run_id, "loss")] == list(range(1, 21))


def test_embedded_sqlite_default_needs_no_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 plans: tuple[Plan, Plan]) -> None:
    monkeypatch.setenv("RESUMER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with MlflowRecorder() as rec:
        assert rec.tracking_uri == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
        assert rec.spool.dir.startswith(str(tmp_path / "home" / "spool"))
        rec.start_job("local", {"lr": 0.1})
        rec.record_decision(Decision(job="local", attempt=1, outcome=Outcome.RESUMED, step=20, plan=plans[0]))
        _train(rec, 1, range(21, 31))
        rec.end_job("FINISHED")
        assert rec.flush(60)
    history = read_history("local")
    assert [(a.outcome, a.step, a.status) for a in history.attempts] == [("resumed", 20, "FINISHED")]
    assert history.attempts[0].counts["loaded"] == 6 and history.params == {"lr": "0.1"}
    stored = sorted(p.name for p in (tmp_path / "home" / "mlartifacts").rglob("*") if p.is_file())
    assert stored == ["decision.json", "plan.html", "plan.json", "plan.md", "rejected.json"]


def test_history_cli_table_json_and_errors(
        server: LocalMlflow, make_recorder: Callable[..., MlflowRecorder], experiment: str,
        plans: tuple[Plan, Plan]) -> None:
    rec = make_recorder(experiment)
    _three_attempts(rec, "hist", plans)
    runner = CliRunner()
    args = ["--tracking-uri", server.url, "--experiment", experiment]
    table = runner.invoke(history_command, ["hist", *args])
    assert table.exit_code == 0, table.output
    rows = [line for line in table.output.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 3
    assert "started" in rows[0] and "resumed" in rows[1] and "crashed" in rows[1] and "refused" in rows[2]
    assert "6/0/0/0" in rows[1] and "KILLED" in rows[1]
    assert "attempt 3 refused: Cannot resume" in table.output
    out = runner.invoke(history_command, ["hist", *args, "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["job"] == "hist" and data["params"]["lr"] == "0.01"
    assert [(a["attempt"], a["outcome"], a["status"]) for a in data["attempts"]] == [
        (1, "started", "FAILED"), (2, "resumed", "KILLED"), (3, "refused", "FAILED")]
    assert data["attempts"][1]["counts"]["loaded"] == 6 and data["attempts"][1]["step"] == 20
    assert data["attempts"][2]["message"].startswith("Cannot resume")
    unknown = runner.invoke(history_command, ["nope", *args])
    assert unknown.exit_code == 2
    assert "No job 'nope' recorded" in unknown.output and "Jobs recorded there: hist." in unknown.output
    down = runner.invoke(history_command, ["hist", "--tracking-uri", f"http://127.0.0.1:{free_port()}"])
    assert down.exit_code == 1
    assert "did not answer" in down.output and "--tracking-uri" in down.output


def test_memory_recorder_is_a_recorder() -> None:
    fake = MemoryRecorder()
    assert isinstance(fake, Recorder)
    fake.record_decision(Decision(job="j", attempt=1, outcome=Outcome.STARTED))
    _train(fake, 1, range(1, 21))
    fake.end_attempt(1, "killed")
    assert [d.attempt for d in fake.decisions] == [1] and fake.commits == [10, 20] and len(fake.training) == 20
    assert fake.ended[1].value == "KILLED"
