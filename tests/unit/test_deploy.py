"""The examples in jobs/ and the manifests in deploy/: they parse, each v2 changes what it says it changes
(checked by planning it against a v1 checkpoint), the shell scripts parse. The entrypoints training in-process
(they import Ray Train: seconds) are tested in ``tests/integration/test_job_entrypoints.py``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import resumer
import resumer.jobs.worker
from resumer.jobs import spec as jobspec
from resumer.jobs.factories import build

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"
DEPLOY = REPO / "deploy"


def spec(name: str) -> jobspec.JobSpec:
    return jobspec.load(str(JOBS / f"{name}.yaml"))


def test_every_job_spec_parses() -> None:
    names = sorted(p.stem for p in JOBS.glob("*.yaml"))
    assert {"mlp", "cnn", "cnn_v2", "charlm", "charlm_v2", "charlm_sgd"} <= set(names)
    for name in names:
        s = spec(name)
        assert s.workers == 2 and not s.use_gpu, name
        assert s.root == str(REPO / "runs" / s.name / "checkpoints"), name
        build(s.model, s.optimizer, s.scheduler)  # every factory resolves and builds


def test_shipped_text_is_ascii_and_reproducible() -> None:
    import runpy

    from resumer.examples import jobs as ej
    text = (JOBS / "data" / "tiny.txt").read_text(encoding="ascii")
    assert 20_000 <= len(text) <= 50_000
    assert runpy.run_path(str(JOBS / "data" / "make_tiny.py"))["text"]() == text
    x, y = ej.charlm_batch(7, 4)
    assert x.shape == y.shape == (4, ej.CONTEXT) and torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize(("v1", "v2"), [("cnn", "cnn_v2"), ("charlm", "charlm_v2"), ("charlm", "charlm_sgd")])
def test_v2_resumes_its_v1(v1: str, v2: str) -> None:
    """Resubmitting a v2 finds its v1's checkpoints: same job name and storage root, more steps to go."""
    a, b = spec(v1), spec(v2)
    assert (b.name, b.root, b.every) == (a.name, a.root, a.every)
    assert b.config["total_steps"] > a.config["total_steps"]
    assert b.entrypoint == a.entrypoint


def _v1_checkpoint(s: jobspec.JobSpec, root: Path) -> str:
    """Build v1 from its factories, train two steps (so the optimizer has state), save a checkpoint."""
    torch.manual_seed(0)
    model, optimizer, scheduler = build(s.model, s.optimizer, s.scheduler)
    for _ in range(2):
        out = model(_input(s))
        loss = out.float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return resumer.save_checkpoint(str(root), 2, model, optimizer, scheduler)


def _input(s: jobspec.JobSpec) -> torch.Tensor:
    from resumer.examples import jobs as ej
    if "cnn" in s.model:
        return ej.cnn_batch(1, 4, 4)[0]
    return ej.charlm_batch(1, 2)[0]


def _plan(uri: str, s: jobspec.JobSpec, *, policy: str | None = None, renames: Any = "spec") -> Any:
    model, optimizer, scheduler = build(s.model, s.optimizer, s.scheduler)
    return resumer.plan(uri, model, optimizer, scheduler, policy=policy or s.policy.value,
                        renames=(list(s.renames) or None) if renames == "spec" else renames)


def test_cnn_v2_head_resized_refused_under_strict_resumed_under_partial(tmp_path: Path) -> None:
    uri = _v1_checkpoint(spec("cnn"), tmp_path)
    v2 = spec("cnn_v2")
    assert v2.policy.value == "partial"
    strict = _plan(uri, v2, policy="strict")
    assert not strict.ok
    refusals = [str(r) for r in strict.refusals]
    assert refusals == ["model 'head.weight': shape differs: saved float32[4, 8], now float32[6, 8]",
                        "model 'head.bias': shape differs: saved float32[4], now float32[6]"]
    partial = _plan(uri, v2)
    assert partial.ok
    entries = {(e["section"], e["name"]): e for e in partial.to_dict()["entries"]}
    assert entries[("model", "head.weight")]["action"] == "shape-mismatch"
    counts = partial.counts()
    assert counts["fresh"] == 2 and counts["loaded"] > 0 and counts["optimizer_carried"] > 0
    # BatchNorm's buffers (running stats, num_batches_tracked) load with the weights
    for name in ("features.1.running_mean", "features.1.running_var", "features.1.num_batches_tracked"):
        assert entries[("model", name)]["action"] == "load", name


def test_charlm_v2_inserted_layer_resumes_with_auto_renames_only(tmp_path: Path) -> None:
    uri = _v1_checkpoint(spec("charlm"), tmp_path)
    v2 = spec("charlm_v2")
    assert v2.policy.value == "strict" and v2.renames == ("auto",)
    ok = _plan(uri, v2)
    assert ok.ok
    moved = {(r.source, r.target) for r in ok.renames}
    assert moved == {(f"blocks.{b}.mlp.2.{p}", f"blocks.{b}.mlp.3.{p}") for b in (0, 1) for p in ("weight", "bias")}
    assert ok.counts()["optimizer_carried"] > 0 and ok.counts()["optimizer_fresh"] == 0
    refused = _plan(uri, v2, renames=None)
    assert not refused.ok
    assert any("blocks.0.mlp.2.weight" in str(r) and "index shift" in str(r) for r in refused.refusals)


def test_charlm_optimizer_switch_needs_reset_optimizer(tmp_path: Path) -> None:
    uri = _v1_checkpoint(spec("charlm"), tmp_path)
    sgd = spec("charlm_sgd")
    assert sgd.policy.value == "reset-optimizer" and sgd.optimizer == "resumer.examples:sgd"
    strict = _plan(uri, sgd, policy="strict")
    assert not strict.ok
    assert [str(r) for r in strict.refusals] == ["optimizer 'optimizer': Adam saved, SGD now"]
    reset = _plan(uri, sgd)
    assert reset.ok and reset.counts()["fresh"] == 0 and reset.counts()["dropped"] == 0


def test_charlm_sgd_also_follows_charlm_v2(tmp_path: Path) -> None:
    """After charlm_v2 ran, its checkpoints have the Dropout; charlm_sgd (v1 model) still resumes them."""
    uri = _v1_checkpoint(spec("charlm_v2"), tmp_path)
    assert _plan(uri, spec("charlm_sgd")).ok


# ------------------------------------------------------------------------------------------------- deploy/


def test_kuberay_rayjob() -> None:
    doc = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    job = doc["spec"]
    assert job["entrypoint"].split()[:2] == ["resumer", "submit"] and "--in-cluster" in job["entrypoint"]
    assert job["entrypoint"].split()[2] == "/app/jobs/mlp.yaml"
    cluster = job["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"]
    assert "gke-spot" not in json.dumps(head)  # the controller's node is not preemptible
    groups = cluster["workerGroupSpecs"]
    assert groups
    spot = groups[0]
    pod = spot["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert any(t["key"] == "cloud.google.com/gke-spot" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert spot["replicas"] >= spec("mlp").workers
    assert pod["containers"][0]["image"] == head["containers"][0]["image"]


def test_cluster_launcher_spot_config() -> None:
    doc = yaml.safe_load((DEPLOY / "cluster" / "spot.yaml").read_text())
    assert doc["provider"]["type"] == "aws"
    types = doc["available_node_types"]
    head = types[doc["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]
    spot = [t for t in types.values() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot and spot[0]["min_workers"] >= spec("mlp").workers
    setup = doc["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==2.13.0" in c)
    project_at = next(i for i, c in enumerate(setup) if "~/resumer" in c)
    assert torch_at < project_at  # the pinned torch first, then the project
    assert doc["file_mounts"]["~/resumer"] == "."


@pytest.mark.parametrize("script", ["local/up.sh", "local/down.sh", "local/lib.sh"])
def test_shell_scripts_parse(script: str) -> None:
    path = DEPLOY / script
    assert path.exists()
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_down_finds_its_processes_by_their_whole_command_line_whatever_columns_says(tmp_path: Path) -> None:
    """down.sh finds up.sh's processes by a path or port in their command lines. With COLUMNS=80 in the environment
    (pytest-xdist's workers have it) a plain ``ps`` cuts each line at 80 characters: down.sh found nothing past
    that, and left the Ray head and the servers running."""
    needle = str(tmp_path / "ray-tmp") + "/"
    proc = subprocess.Popen(["bash", "-c", "sleep 60; true", "x" * 120 + " --log_dir=" + needle + "session"])
    try:
        lib = Path(__file__).resolve().parents[2] / "deploy" / "local" / "lib.sh"
        env = {**os.environ, "COLUMNS": "80"}
        found = subprocess.run(["bash", "-c", f'source "{lib}"; rl_pids_matching "$1"; rl_args "$2"', "_", needle,
                                str(proc.pid)], env=env, capture_output=True, text=True, timeout=30)
        assert found.returncode == 0, found.stderr
        lines = found.stdout.splitlines()
        assert lines[0] == str(proc.pid) and needle in lines[1]
    finally:
        proc.kill()
        proc.wait()
