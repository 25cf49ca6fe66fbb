"""The example jobs' entrypoints train in-process, without Ray: ``build()`` falls back to the plain model
outside a Ray Train worker, ``restore()`` and ``save()`` work locally, and a second attempt resumes the first's
checkpoint. In integration because ``build()`` imports Ray Train (seconds); nothing here starts Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

import resumer
import resumer.jobs.worker
from resumer.jobs import spec as jobspec
from resumer.jobs.attempt import AttemptConfig
from resumer.jobs.factories import build

pytestmark = pytest.mark.slow

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def spec(name: str) -> jobspec.JobSpec:
    return jobspec.load(str(JOBS / f"{name}.yaml"))


def _attempt(s: jobspec.JobSpec, root: Path, every: int, checkpoint: str | None = None,
             plan_hash: str | None = None) -> str:
    """The attempt config, as the launcher hands it to a worker."""
    return AttemptConfig(job=s.name, attempt=1, root=str(root), checkpoint=checkpoint, policy=s.policy,
                         renames=s.renames, plan_hash=plan_hash, every=every, model=s.model, optimizer=s.optimizer,
                         scheduler=s.scheduler).to_json()


@pytest.mark.parametrize("name", ["cnn", "charlm"])
def test_entrypoints_run_in_process_without_ray(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """build() falls back to the plain model outside a Ray Train worker; restore() and save() work locally."""
    import ray

    from resumer.jobs.factories import resolve

    s = spec(name)
    entry = resolve(s.entrypoint, "entrypoint")
    monkeypatch.setenv(resumer.jobs.worker.ENV, _attempt(s, tmp_path, every=3))
    entry({**s.config, "total_steps": 3})
    first = resumer.latest_checkpoint(str(tmp_path))
    assert first is not None and first.step == 3
    # resume it (as the controller would: the checkpoint URI and the plan's hash), two more steps
    model, optimizer, scheduler = build(s.model, s.optimizer, s.scheduler)
    plan = resumer.plan(first.uri, model, optimizer, scheduler, policy=s.policy.value)
    monkeypatch.setenv(resumer.jobs.worker.ENV, _attempt(s, tmp_path, every=5, checkpoint=first.uri,
                                                   plan_hash=resumer.jobs.worker.plan_hash(plan)))
    entry({**s.config, "total_steps": 5})
    last = resumer.latest_checkpoint(str(tmp_path))
    assert last is not None and last.step == 5
    assert not ray.is_initialized()
