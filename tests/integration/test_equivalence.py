"""The headline property: K steps straight == J steps, save, resume in a NEW process, K-J steps (bitwise)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "train_script.py")
K, J = 10, 4


def run(*args: str) -> None:
    subprocess.run([sys.executable, SCRIPT, *args], check=True, timeout=120)


def assert_same(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_resume_in_new_process_is_bitwise_identical(tmp_path: pytest.TempPathFactory, kind: str) -> None:
    root = str(tmp_path / "ckpt")
    straight, first, resumed = (str(tmp_path / f"{n}.pt") for n in ("straight", "first", "resumed"))
    run(kind, "straight", str(K), straight)
    run(kind, "first", str(J), root, first)
    run(kind, "resume", str(K), root, resumed)
    s, f, r = (torch.load(p, weights_only=True) for p in (straight, first, resumed))
    assert len(f["losses"]) == J and len(r["losses"]) == K - J
    assert s["losses"] == f["losses"] + r["losses"]  # exact float equality, every step
    assert_same(s["model"], r["model"], "model")
    assert_same(s["opt"], r["opt"], "optimizer")
    assert_same(s["sched"], r["sched"], "scheduler")
    # Not trivially equal: training moved the weights and the state holds real values.
    assert not torch.equal(s["model"][next(iter(s["model"]))], f["model"][next(iter(f["model"]))])
    assert s["opt"]["state"]
