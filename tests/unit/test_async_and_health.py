"""Async save (host copy, background commit, failures surfaced) and the health gate."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import resumer
from resumer import examples as ex
from resumer.checkpoints.catalog import health_problem


def test_async_save_captures_the_state_at_save_time(tmp_path: pytest.TempPathFactory) -> None:
    torch.manual_seed(0)
    model = ex.mlp_v1()
    opt = ex.adam(model)
    ex.train_step(model, opt, 1)
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    with resumer.AsyncSaver(str(tmp_path)) as saver:
        saver.save(1, model, opt, extra={"loss": 0.5})
        for step in range(2, 5):  # training goes on while the save is written
            ex.train_step(model, opt, step)
        uri = saver.wait()
    assert uri is not None and uri.endswith("step-0000000001")
    fresh = ex.mlp_v1()
    res = resumer.resume(str(tmp_path), fresh, ex.adam(fresh))
    assert res.step == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, at_save[k]), k
    assert not torch.equal(fresh[0].weight, model[0].weight)  # the live model moved on


def test_async_save_failure_is_raised_at_the_next_save(tmp_path: pytest.TempPathFactory) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the root should be")
    saver = resumer.AsyncSaver(str(blocker))
    model = ex.mlp_v1()
    saver.save(1, model)
    with pytest.raises(NotADirectoryError, match="Not a directory"):
        saver.save(2, model)  # the first save's failure surfaces here, before a second starts
    saver.close()  # reported once, not again


def test_async_save_failure_is_logged_at_exit_when_nobody_waited(tmp_path: pytest.TempPathFactory) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = ("import logging, resumer; from resumer import examples as ex; logging.basicConfig(); "
            f"s = resumer.AsyncSaver({str(blocker)!r}); s.save(1, ex.mlp_v1())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "a background checkpoint save under" in r.stderr and "failed" in r.stderr


def test_health_gate_skips_non_finite_checkpoints(tmp_path: pytest.TempPathFactory) -> None:
    root = str(tmp_path)
    model = ex.mlp_v1()
    resumer.save_checkpoint(root, 1, model, extra={"loss": 0.3})
    resumer.save_checkpoint(root, 2, model, extra={"loss": float("nan")})
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    resumer.save_checkpoint(root, 3, model, extra={"loss": 0.2})
    assert resumer.latest_checkpoint(root).step == 3  # the gate is off by default
    sel = resumer.select(root, healthy=True)
    assert sel.chosen is not None and sel.chosen.step == 1
    reasons = {r.step: r.reason for r in sel.rejected}
    assert reasons[3] == "unhealthy: 1 tensor(s) hold NaN/Inf at save time, e.g. '0.weight'"
    assert reasons[2] == "unhealthy: the recorded loss is nan"
    assert sorted(os.listdir(tmp_path)) == ["step-0000000001", "step-0000000002", "step-0000000003"]


def test_the_health_gate_reads_the_loss_recorded_in_the_health_block_first(tmp_path: pytest.TempPathFactory) -> None:
    """The manifest's ``health`` block is the record the gate reads; ``extra["loss"]`` only stands in for a
    manifest whose health block has no loss."""
    m = resumer.read_manifest(resumer.save_checkpoint(str(tmp_path), 1, ex.mlp_v1(), extra={"loss": 0.3}))
    assert health_problem(m) is None
    nan = {"__resumer__": "float", "v": "nan"}
    assert health_problem(replace(m, raw={**m.raw, "health": {"nonfinite": [], "loss": nan}})) == (
        "the recorded loss is nan")  # over extra's finite 0.3
    assert health_problem(replace(m, raw={**m.raw, "health": {"nonfinite": [], "loss": float("inf")}})) == (
        "the recorded loss is inf")
    assert health_problem(replace(m, raw={**m.raw, "health": {"nonfinite": []}}, extra={"loss": nan})) == (
        "the recorded loss is nan")  # no loss in the health block: extra's


def test_latest_checkpoint_reports_the_bytes_it_verifies(tmp_path: pytest.TempPathFactory) -> None:
    root = str(tmp_path)
    resumer.save_checkpoint(root, 1, ex.mlp_v1())
    seen: list[int] = []
    chosen = resumer.latest_checkpoint(root, progress=seen.append)
    assert chosen is not None and chosen.step == 1
    assert seen and sum(seen) == chosen.manifest.total_bytes > 0  # every byte read for the checksums


def test_async_saves_in_a_row_reuse_host_buffers_without_mixing_states(tmp_path: pytest.TempPathFactory) -> None:
    torch.manual_seed(0)
    model = ex.mlp_v1()
    opt = ex.adam(model)
    expected = {}
    with resumer.AsyncSaver(str(tmp_path)) as saver:
        for step in range(1, 4):
            ex.train_step(model, opt, step)
            expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
            saver.save(step, model, opt)
    for step, want in expected.items():
        fresh = ex.mlp_v1()
        resumer.resume(f"{tmp_path}/step-{step:010d}", fresh, ex.adam(fresh))
        assert all(torch.equal(v, want[k]) for k, v in fresh.state_dict().items()), step


def test_async_save_keeps_every_dtype_of_the_state_it_copies(tmp_path: pytest.TempPathFactory) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3).double(), torch.nn.Linear(3, 3).to(torch.bfloat16))
    model.register_buffer("count", torch.tensor([7], dtype=torch.int64))
    with resumer.AsyncSaver(str(tmp_path)) as saver:
        saver.save(1, model)
        uri = saver.wait()
    assert uri is not None
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 3).double(), torch.nn.Linear(3, 3).to(torch.bfloat16))
    fresh.register_buffer("count", torch.tensor([0], dtype=torch.int64))
    resumer.resume(uri, fresh)
    for (name, want), got in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want), name


def test_nan_in_a_float8_tensor_is_noted_for_the_health_gate(tmp_path: pytest.TempPathFactory) -> None:
    """float8_e4m3fn has no isfinite kernel: the check widens one-byte floats first, so its NaN is still seen."""
    root = str(tmp_path)
    model = torch.nn.Linear(2, 2)
    model.register_buffer("scale", torch.tensor([1.0, 2.0]).to(torch.float8_e4m3fn))
    model.register_buffer("h16", torch.tensor([1.0, 2.0], dtype=torch.float16))
    resumer.save_checkpoint(root, 1, model)
    model.scale = torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)
    m = resumer.read_manifest(resumer.save_checkpoint(root, 2, model))
    assert m.raw["health"]["nonfinite"] == ["scale"]
    sel = resumer.select(root, healthy=True)
    assert sel.chosen is not None and sel.chosen.step == 1
    assert [r.reason for r in sel.rejected] == ["unhealthy: 1 tensor(s) hold NaN/Inf at save time, e.g. 'scale'"]
