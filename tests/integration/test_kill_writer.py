"""A writer SIGKILLed at random points never leaves a checkpoint that a reader would take: on a local folder
and on S3 (moto on 127.0.0.1), ``latest_checkpoint`` always returns a committed checkpoint that verifies
and resumes bit-exactly, and the next writer saves the step its predecessor left torn.
"""

from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from writer_script import state_for

import resumer

WRITER = os.path.join(os.path.dirname(__file__), "writer_script.py")
TRIALS = 3  # kills at random points; more (up to MAX_TRIALS) until one has landed inside a save
MAX_TRIALS = 20
MAX_DELAY_S = 0.6


class Writer:
    """writer_script.py in its own process, started ahead (imports take ~2 s) and told when to begin."""

    def __init__(self, root: str, options: dict[str, Any] | None, err_path: Path) -> None:
        env = {**os.environ, "RESUMER_IT_STORAGE_OPTIONS": json.dumps(options)}
        self.err_path = err_path
        with open(err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, WRITER, root], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.saved: list[int] = []
        self.begun: list[int] = []
        self.ended = False  # its output has been read to the end
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def _next(self, timeout: float) -> str | None:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"writer said nothing for {timeout}s; stderr:\n{self.err_path.read_text()[-3000:]}")
        if line is None:
            self.ended = True
        elif line.startswith("saved "):
            self.saved.append(int(line.split()[1]))
        elif line.startswith("begin "):
            self.begun.append(int(line.split()[1]))
        return line

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        while True:
            line = self._next(timeout)
            if line is None:
                pytest.fail(f"writer exited ({self.proc.wait()}) before '{prefix}'; stderr:\n"
                            f"{self.err_path.read_text()[-3000:]}")
            if line.startswith(prefix):
                return line

    def start(self, step: int, count: int = 0) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{step} {count}\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL (no cleanup of any kind in the writer), then collect what it reported."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        while not self.ended:
            self._next(10)

    @property
    def killed_mid_save(self) -> bool:
        """After kill(): whether the kill landed inside a ``save_checkpoint`` call (begun, never reported saved)."""
        return bool(self.begun) and self.begun[-1] not in self.saved


def _check(root: str, options: dict[str, Any] | None, saved: list[int],
           assert_same_tree: Callable[..., None]) -> tuple[int, int]:
    """After a kill: the newest selectable checkpoint is committed, verifies and holds exactly state_for(step).

    Returns (step, how many torn step directories selection passed over).
    """
    # A reader starting afresh after the crash, as a restarted job would: no listing cached from an earlier look
    # (a long-lived reader on S3 trips over a stale s3fs listing: see test_storage_contract.py::
    # test_a_step_committed_by_another_writer_is_seen).
    fsspec.filesystem(fsspec.core.split_protocol(root)[0] or "file", **(options or {})).invalidate_cache()
    sel = resumer.select(root, storage_options=options)
    latest = sel.chosen
    assert latest is not None, sel.rejected
    # Every reported save is visible; at most one more committed after the last report, before the kill.
    assert latest.step in (max(saved), max(saved) + 1), (latest.step, saved)
    # A kill leaves only uncommitted leftovers, never a committed checkpoint that fails verification.
    assert all(r.reason == "torn: no manifest.json (never committed)" for r in sel.rejected), sel.rejected

    model, opt = state_for(10**6)  # different weights: loading nothing would fail the comparison
    res = resumer.resume(latest.uri, model, opt, storage_options=options, verify=False)  # select just verified
    assert (res.step, res.checkpoint) == (latest.step, latest.uri)
    want_model, want_opt = state_for(latest.step)
    assert_same_tree(dict(want_model.state_dict()), dict(model.state_dict()), f"model@{latest.step}")
    assert_same_tree(want_opt.state_dict(), opt.state_dict(), f"optimizer@{latest.step}")
    assert all(torch.count_nonzero(s["momentum_buffer"]) > 0 for s in opt.state_dict()["state"].values())
    return latest.step, len(sel.rejected)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_sigkilled_writer_never_leaves_a_torn_checkpoint(where: str, request: pytest.FixtureRequest, tmp_path: Path,
                                                        assert_same_tree: Callable[..., None]) -> None:
    if where == "local":
        root, options = str(tmp_path / "ckpts"), None
    else:
        root, options = request.getfixturevalue("s3_root")
    rng = random.Random(20261124)
    started = time.monotonic()
    writer = spare = Writer(root, options, tmp_path / "writer-0.err")
    report = []
    next_step = 1
    mid_save = 0
    try:
        for trial in range(MAX_TRIALS):
            if trial >= TRIALS and mid_save:
                break
            writer.wait_for("ready")
            spare = writer
            writer = Writer(root, options, tmp_path / f"writer-{trial + 1}.err")  # imports while this trial runs
            spare.start(next_step)
            # The new writer commits the very step its killed predecessor left torn (leftovers do not block it).
            assert spare.wait_for("saved ").split()[1] == str(next_step)
            delay = rng.uniform(0, MAX_DELAY_S)
            time.sleep(delay)
            spare.kill()
            mid_save += spare.killed_mid_save
            step, torn = _check(root, options, spare.saved, assert_same_tree)
            when = "mid-save" if spare.killed_mid_save else "between saves"
            report.append(f"kill {delay:.2f}s after the first save ({when}): saved {spare.saved}, latest {step}, "
                          f"torn dirs passed over {torn}")
            next_step = step + 1
        # A last writer, after the last kill, saves the next step and exits cleanly.
        writer.wait_for("ready")
        writer.start(next_step, 1)
        assert writer.wait_for("saved ").split()[1] == str(next_step)
        assert writer.proc.wait(timeout=60) == 0
        assert _check(root, options, [next_step], assert_same_tree)[0] == next_step
    finally:
        writer.kill()
        spare.kill()
    # The property was tested where it matters: at least one kill landed while a save was in progress.
    assert mid_save >= 1, "no kill landed inside a save:\n  " + "\n  ".join(report)
    # Kills that landed mid-save left leftovers behind, yet every selection above ignored them.
    leftovers = sum(1 for c in resumer.checkpoints.catalog.scan(root, options)
                    for f in c.sizes if f.endswith(".safetensors")) \
        - 2 * len(resumer.list_checkpoints(root, storage_options=options))
    print(f"\n[kill-writer {where}] {time.monotonic() - started:.1f}s, leftover data files {leftovers}\n  "
          + "\n  ".join(report))
