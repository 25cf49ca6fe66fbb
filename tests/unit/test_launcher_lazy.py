"""A job refused at submission (its plan refused before the first launch) never starts Ray: the launcher connects
Ray, and makes the job's progress board, on its first launch only. Starting a local Ray cluster costs seconds and
leaves processes behind, all for a job that was never going to run."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

import resumer
from resumer.core.controller import State
from resumer.core.decision import Outcome
from resumer.jobs import spec as jobspec
from resumer.jobs.factories import build
from resumer.jobs.launcher import RayLauncher
from resumer.jobs.run import LogRecorder, run_job


def test_a_job_refused_at_submission_never_starts_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, _ = build("resumer.examples:mlp_v1", "resumer.examples:adam")
    resumer.save_checkpoint(str(tmp_path / "ckpt"), 5, model, optimizer)
    spec = jobspec.parse({"name": "refused-at-submission", "entrypoint": "resumer.examples_train:train_loop",
                          "model": "resumer.examples:mlp_v2_wider_head", "optimizer": "resumer.examples:adam",
                          "storage": {"root": str(tmp_path / "ckpt")}})  # a head of another shape, under strict

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started for a job refused before its first launch")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_ray)
    launcher = RayLauncher(spec)
    result = run_job(spec, recorder=LogRecorder(), launcher=launcher)
    assert result.state is State.REFUSED and result.attempts == 1
    assert [d.outcome for d in result.decisions] == [Outcome.REFUSED]
    assert "shape differs" in result.message
