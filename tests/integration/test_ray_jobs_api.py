"""The Ray Jobs API path against the real multi-process head that ``deploy/local/up.sh`` starts (not an embedded
Ray): ``resumer submit --address http://...`` hands the controller to the cluster, ``status`` and ``logs`` read it
back (through ``--address`` and through ``$RAY_ADDRESS`` as the env file sets it), ``stop`` ends it; ``submit`` with
``$RAY_ADDRESS`` alone runs the controller here against that cluster. ``down.sh`` always runs afterwards and stops
exactly what ``up.sh`` started (it never runs ``ray stop``, which would stop every Ray of this user).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

import resumer

pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "local"


def _env_file(path: Path) -> dict[str, str]:
    """The ``export NAME=VALUE`` lines up.sh writes."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            out[name] = value
    return out


@pytest.fixture
def cluster() -> Iterator[tuple[dict[str, str], Path]]:
    """up.sh on a state dir of this test's own (short: Ray's socket paths stay within their limit); down.sh always."""
    state = Path(tempfile.mkdtemp(prefix="rjt", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "MLFLOW_TRACK"))}
    env |= {"RESUMER_LOCAL_STATE": str(state), "RAY_USAGE_STATS_ENABLED": "0"}
    down_ok = False
    try:
        up = subprocess.run([str(DEPLOY / "up.sh")], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        yield env | _env_file(state / "env"), state
    finally:
        down = subprocess.run([str(DEPLOY / "down.sh")], env=env, capture_output=True, text=True, timeout=180)
        left = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
        down_ok = down.returncode == 0 and str(state) not in left
        if down_ok:
            shutil.rmtree(state, ignore_errors=True)
    assert down_ok, f"down.sh did not stop everything up.sh started:\n{down.stdout}{down.stderr}\n" + "\n".join(
        line for line in left.splitlines() if str(state) in line)


def _resumer(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "resumer", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _status(env: dict[str, str], job_id: str, *address: str) -> dict[str, str]:
    done = _resumer(env, "status", job_id, "--json", *address)
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout))


def _wait(what: str, ready: Callable[[], bool], timeout: float = 240) -> None:
    """Poll until ``ready()`` (a hang guard: the outcome is asserted, not the time it took)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(1)


def _job(tmp_path: Path, name: str, **config: object) -> tuple[Path, str]:
    root = tmp_path / name
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({
        "name": name, "entrypoint": "resumer.examples_train:train_loop", "model": "resumer.examples:mlp_v1",
        "optimizer": "resumer.examples:adam", "scheduler": "resumer.examples:step_lr", "config": config,
        "scaling": {"workers": 1}, "storage": {"root": str(root)}, "checkpoint": {"every": 5}}))
    return spec, str(root)


def test_jobs_api_submit_status_logs_stop_on_the_local_cluster(cluster: tuple[dict[str, str], Path],
                                                               tmp_path: Path) -> None:
    env, state = cluster
    api = env["RAY_API_SERVER_ADDRESS"]
    assert api.startswith("http://127.0.0.1:") and env["RAY_ADDRESS"].startswith("127.0.0.1:")
    no_ray_address = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}

    # submit --address: the controller goes to the cluster; this command returns at once with the submission id.
    spec, root = _job(tmp_path, "jobsapi", total_steps=2000, step_delay_s=0.2)
    done = _resumer(no_ray_address, "submit", str(spec), "--address", api, "--json", "--no-mlflow")
    assert done.returncode == 0, done.stderr[-3000:]
    submitted = json.loads(done.stdout)
    job_id = submitted["submission_id"]
    assert job_id.startswith("resumer-jobsapi-") and submitted["address"] == api

    # status: through --address, and through $RAY_ADDRESS as the env file sets it (the GCS address).
    _wait("the job trains and commits a checkpoint", lambda: resumer.latest_checkpoint(root) is not None)
    assert _status(no_ray_address, job_id, "--address", api)["status"] == "RUNNING"
    assert _status(env, job_id)["status"] == "RUNNING"

    # logs: the controller's log, with the worker's saves in it.
    logs = _resumer(env, "logs", job_id)
    assert logs.returncode == 0, logs.stderr[-2000:]
    assert f"[save] step=5 {root}/step-0000000005" in logs.stdout, logs.stdout[-3000:]

    # stop: the job ends as stopped, well before its 2000 steps; asking again says it already finished.
    stop = _resumer(env, "stop", job_id, "--address", api)
    assert (stop.returncode, stop.stdout.strip()) == (0, f"{job_id}: stop requested"), stop.stderr[-2000:]
    _wait("the job is stopped", lambda: _status(env, job_id)["status"] == "STOPPED")
    assert _status(env, job_id)["message"] == "Job was intentionally stopped."
    latest = resumer.latest_checkpoint(root)
    assert latest is not None and 5 <= latest.step < 2000
    again = _resumer(env, "stop", job_id)
    assert (again.returncode, again.stdout.strip()) == (0, f"{job_id}: already finished")

    # submit with $RAY_ADDRESS alone: the controller runs here, its workers on that cluster (their logs are in
    # the cluster's own temp dir), and the command returns with the result.
    spec2, root2 = _job(tmp_path, "viaenv", total_steps=6)
    done = _resumer(env, "submit", str(spec2), "--json", "--no-mlflow", "--timeout", "240", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["state"] == "succeeded" and result["attempts"] == 1
    assert resumer.latest_checkpoint(root2).step == 5  # type: ignore[union-attr]
    ray_tmp = next(line.split(" ", 1)[1] for line in (state / "ray.info").read_text().splitlines()
                   if line.startswith("tmp "))
    worker_logs = subprocess.run(["grep", "-rl", f"{root2}/step-0000000005", ray_tmp], capture_output=True,
                                 text=True).stdout
    assert worker_logs.strip(), f"no log of the cluster at {ray_tmp} shows the job's save"
