"""The decision as people see it: the MLflow UI (the real SPA served by a real ``mlflow server``) rendered by
headless Chromium. A job is recorded with ``MlflowRecorder`` (attempt 1 started, attempt 2 resumed from step 20
with a real plan: mlp_v1 -> mlp_v2_dropout, renames="auto"); the test opens the attempts' run pages and asserts
on what the browser rendered: the decision's tags and metrics on the overview, the plan artifacts in the
artifact tree, and plan.md rendered in the preview after a click on it.

The browser is Debian's ``chromium`` (CI installs it in ``.ci/run``), driven over the Chrome DevTools Protocol
on ``--remote-debugging-pipe`` (fds 3 and 4): no websocket library, no browser download, no port. Without
Chromium the test fails and says how to install it; ``RESUMER_SKIP_BROWSER_TESTS=1`` skips it on purpose.
``RESUMER_CHROMIUM`` names another binary. ``RESUMER_SCREENSHOT_DIR=docs`` writes the screenshots there
(``mlflow-run.png``: the resumed attempt's overview; ``mlflow-run-plan.png``: plan.md in its artifact view);
otherwise they go to the test's tmp folder.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import resumer
from resumer import examples as ex
from resumer.core.decision import Decision, FailureClass, Outcome
from resumer.testing.mlflow import LocalMlflow, local_mlflow

pytestmark = pytest.mark.slow  # starts an mlflow server and a browser

WIDTH, HEIGHT = 1400, 1000
# As root Chromium needs --no-sandbox; the rest keeps it off the network (only loopback here) and quiet.
# --disable-dev-shm-usage: Debian's wrapper adds it only when /dev/shm is small, and its check can misfire.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
                  f"--window-size={WIDTH},{HEIGHT}", "--remote-debugging-pipe"]
INSTALL_HINT = ("Chromium is needed for the MLflow UI test: `apt-get install -y chromium` (Debian; CI does this "
                "in .ci/run), or set RESUMER_CHROMIUM=/path/to/chromium, or RESUMER_SKIP_BROWSER_TESTS=1 to skip "
                "this test on purpose.")
PAGE_TIMEOUT_S = 30.0
JOB = "ui-job"

# Tag chips on the run overview: each is a key element followed by ": value" in one chip.
JS_TAGS = r"""(() => {
  const out = {};
  for (const el of document.querySelectorAll('body *')) {
    const key = el.textContent.trim();
    if (el.children.length || !/^resumer\.[\w.]+$/.test(key)) continue;
    const chip = el.parentElement.textContent.trim();
    if (chip.startsWith(key) && chip.slice(key.length).trim().startsWith(':'))
      out[key] = chip.slice(key.length).trim().slice(1).trim();
  }
  return out;
})()"""
# The artifact tree's entries (their visible names), and a click on one of them.
JS_ARTIFACTS = """[...document.querySelectorAll('[data-testid="artifact-tree-node"]')].map(e => e.textContent.trim())"""
JS_CLICK_ARTIFACT = r"""((name) => {
  const node = [...document.querySelectorAll('[data-testid="artifact-tree-node"]')]
    .find(e => e.textContent.trim() === name);
  if (node) node.click();
  return Boolean(node);
})"""
JS_CLOSE_ASSISTANT = r"""(() => {  // the "MLflow Assistant" side panel opens by default; for the screenshots only
  const close = [...document.querySelectorAll('button[aria-label="Close"]')].find(b => {
    for (let e = b, i = 0; e && i < 6; e = e.parentElement, i++)
      if (e.textContent.includes('MLflow Assistant')) return true;
    return false;
  });
  if (close) close.click();
  return Boolean(close);
})()"""


def _chromium() -> str:
    if os.environ.get("RESUMER_SKIP_BROWSER_TESTS") == "1":
        pytest.skip("RESUMER_SKIP_BROWSER_TESTS=1")
    exe = os.environ.get("RESUMER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe or not os.access(exe, os.X_OK):
        where = f"RESUMER_CHROMIUM={exe!r} is not an executable" if exe else "no chromium on PATH"
        pytest.fail(f"No Chromium ({where}). {INSTALL_HINT}", pytrace=False)
    return exe


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe: JSON messages ended by NUL, requests on
    the browser's fd 3, replies and events on its fd 4. One page (a flat session), used from one thread."""

    def __init__(self, exe: str, workdir: Path) -> None:
        self.log_path = workdir / "chromium.log"
        profile = workdir / "chromium-profile"  # fresh and empty: no first-run state, no leftovers
        profile.mkdir()
        to_child, self._to_w = os.pipe()
        self._from_r, from_child = os.pipe()
        # Moved to fds >= 10 so that the shell's "3<&N 4>&M" never clobbers one with the other.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]
        for fd in (to_child, from_child):
            os.close(fd)
        # bash puts them on 3 and 4 and execs the browser (no preexec_fn: this process has threads).
        script = f'exec 3<&{high[0]} 4>&{high[1]} {high[0]}<&- {high[1]}>&-; exec "$0" "$@"'
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(["bash", "-c", script, exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                          "about:blank"], pass_fds=high, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        for fd in high:
            os.close(fd)
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._eof = False
        self._cond = threading.Condition()
        threading.Thread(target=self._read, name="cdp-reader", daemon=True).start()
        self.session = ""
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.send("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": HEIGHT,
                                                             "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._from_r, 1 << 20):
            *messages, buf = (buf + chunk).split(b"\0")
            with self._cond:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:  # events (no id) are not needed
                        self._replies[msg["id"]] = msg
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def send(self, method: str, params: dict[str, Any] | None = None, *, timeout_s: float = 30.0) -> dict[str, Any]:
        self._next_id += 1
        msg_id = self._next_id
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        try:
            os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        except BrokenPipeError:
            raise RuntimeError(f"Chromium exited before {method}:\n{self.log_tail()}") from None
        with self._cond:
            self._cond.wait_for(lambda: msg_id in self._replies or self._eof, timeout_s)
            reply = self._replies.pop(msg_id, None)
        if reply is None:
            why = "exited" if self._eof else f"did not answer within {timeout_s:.0f}s"
            raise RuntimeError(f"Chromium {why} ({method}):\n{self.log_tail()}")
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return dict(reply["result"])

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def text(self) -> str:
        return str(self.evaluate("document.body ? document.body.innerText : ''"))

    def wait_for(self, what: str, probe: Callable[[], Any], timeout_s: float = PAGE_TIMEOUT_S, *,
                 fail: bool = True) -> Any:
        """Poll ``probe`` (it reads the page) until it returns something truthy; fail with the page's text."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                if not fail:
                    return value
                pytest.fail(f"the MLflow UI did not show {what} within {timeout_s:.0f}s; the page says:\n"
                            f"{self.text()[-3000:]}", pytrace=False)
            time.sleep(0.25)

    def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        path.write_bytes(png)
        return png

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, OSError):
                self.session = ""
                self.send("Browser.close", timeout_s=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # the browser's helpers (zygote, renderers), if any remain
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for fd in (self._to_w, self._from_r):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    exe = _chromium()  # before anything is started: a missing browser fails in a second
    chromium = Chromium(exe, tmp_path)
    try:
        yield chromium
    finally:
        chromium.close()


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR", "not a PNG"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def _record_job(server: LocalMlflow, tmp_path: Path) -> tuple[str, str, str, resumer.Plan]:
    """Attempt 1 started (trains to 25, checkpoint at 20), preempted; attempt 2 resumes from 20 with the code
    changed (a Dropout inserted: the later layers' indices shift) -> (experiment id, run id 1, run id 2, plan)."""
    from mlflow import MlflowClient

    torch.manual_seed(0)
    model, ckpt = ex.mlp_v1(), str(tmp_path / "ckpt")
    opt = ex.adam(model)
    for step in range(1, 21):
        ex.train_step(model, opt, step)
    resumer.save_checkpoint(ckpt, 20, model, opt)
    changed = ex.mlp_v2_dropout()
    plan = resumer.plan(ckpt, changed, ex.adam(changed), renames="auto")
    assert plan.ok and plan.counts()["renamed"] == 4, plan.summary()

    rec = resumer.MlflowRecorder(server.url, "ui-check", spool_dir=str(tmp_path / "spool"), flush_interval_s=0.2,
                                 backoff=(0.2, 1.0))
    try:
        rec.start_job(JOB, {"model": "resumer.examples:mlp_v1", "lr": 0.001})
        rec.record_decision(Decision(job=JOB, attempt=1, outcome=Outcome.STARTED, code_fingerprint="v1"))
        for step in range(1, 26):
            rec.log_training(step, {"loss": 1.0 / step})
            if step % 10 == 0:
                rec.checkpoint_committed(step)
        rec.record_decision(Decision(job=JOB, attempt=2, outcome=Outcome.RESUMED,
                                     previous_failure=FailureClass.PREEMPTED, policy="strict",
                                     checkpoint=plan.checkpoint, step=20, code_fingerprint="v2", code_changed=True,
                                     world_size_before=1, world_size_after=1, plan=plan,
                                     metrics={"plan_seconds": 0.04, "bytes_read": 23456.0, "load_seconds": 0.1}))
        for step in range(21, 31):
            rec.log_training(step, {"loss": 1.0 / step})
        rec.checkpoint_committed(30)
        rec.end_job("FINISHED")
        assert rec.flush(30), "the records did not all reach the server"
    finally:
        rec.close(timeout_s=5)
    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name("ui-check")
    assert exp is not None
    exp_id = exp.experiment_id
    attempts = {str(r.data.tags.get("resumer.attempt")): r.info.run_id for r in client.search_runs([exp_id])
                if r.data.tags.get("resumer.kind") == "attempt"}
    assert sorted(attempts) == ["1", "2"], attempts
    return exp_id, attempts["1"], attempts["2"], plan


def test_mlflow_ui_shows_the_decision_outcome_and_plan(browser: Chromium, tmp_path: Path) -> None:
    shots = Path(os.environ.get("RESUMER_SCREENSHOT_DIR") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    with local_mlflow(str(tmp_path / "mlflow")) as server:
        exp_id, first, resumed, plan = _record_job(server, tmp_path)

        def run_page(run_id: str, tab: str = "") -> str:
            # workflowType: the UI opens in its GenAI mode otherwise ("Evaluations" breadcrumbs).
            return f"{server.url}/#/experiments/{exp_id}/runs/{run_id}{tab}?workflowType=machine_learning"

        def shoot(name: str) -> bytes:
            if browser.evaluate(JS_CLOSE_ASSISTANT):
                time.sleep(0.5)  # the layout settles after the panel closes
            return browser.screenshot(shots / name)

        # The resumed attempt's overview: the decision's tags and metrics, as rendered.
        browser.goto(run_page(resumed))
        tags = browser.wait_for("the resumed attempt's tags",
                                lambda: (t := browser.evaluate(JS_TAGS)) and "resumer.outcome" in t and t)
        assert tags["resumer.outcome"] == "resumed", tags
        assert tags["resumer.previous_failure"] == "preempted" and tags["resumer.step"] == "20", tags
        assert tags["resumer.code_changed"] == "true" and tags["resumer.checkpoint"] == plan.checkpoint, tags
        assert tags["resumer.plan_summary"] == plan.summary(), tags
        assert "resumer.message" not in tags, "a message tag shows although only refusals record one"
        text = browser.text()
        assert f"{JOB} attempt 2" in text and "Finished" in text, text[-3000:]
        assert "resumed from" in text and "previous attempt: preempted" in text, text[:3000]  # the Description
        lines = [line.strip() for line in text.splitlines()]
        for metric, value in (("plan_renamed", "4"), ("plan_loaded", "2"), ("bytes_read", "23456")):
            assert metric in lines and lines[lines.index(metric) + 1] == value, (metric, text[-3000:])
        overview_png = shoot("mlflow-run.png")

        # Its artifacts: the plan files are listed; a click on plan.md renders it.
        browser.goto(run_page(resumed, "/artifacts"))
        listed = browser.wait_for("the artifact tree", lambda: browser.evaluate(JS_ARTIFACTS))
        assert sorted(listed) == ["decision.json", "plan.html", "plan.json", "plan.md", "rejected.json"], listed

        def click_plan_md() -> bool:  # clicked again until the preview shows (a click before hydration is lost)
            assert browser.evaluate(f"{JS_CLICK_ARTIFACT}('plan.md')"), "no plan.md entry to click"
            return browser.wait_for("plan.md rendered", lambda: "Resume plan: ok" in browser.text(), 2.0, fail=False)

        browser.wait_for("plan.md rendered after a click on it", click_plan_md)
        preview = browser.text()
        assert "training continues after step 20" in preview and "auto: index shift" in preview, preview[-3000:]
        assert f"checkpoint: {plan.checkpoint}" in preview and "Path: mlflow-artifacts:" in preview, preview[-3000:]
        plan_png = shoot("mlflow-run-plan.png")

        # The first attempt: started, killed by the preemption, and no plan among its artifacts.
        browser.goto(run_page(first))
        tags = browser.wait_for("the first attempt's tags",
                                lambda: (t := browser.evaluate(JS_TAGS)) and t.get("resumer.attempt") == "1" and t)
        assert tags["resumer.outcome"] == "started" and "resumer.step" not in tags, tags
        assert "resumer.plan_summary" not in tags and "Killed" in browser.text(), tags
        browser.goto(run_page(first, "/artifacts"))
        listed = browser.wait_for("the first attempt's artifact tree", lambda: browser.evaluate(JS_ARTIFACTS))
        assert sorted(listed) == ["decision.json", "rejected.json"], listed

    for png in (overview_png, plan_png):
        assert _png_size(png) == (WIDTH, HEIGHT)
