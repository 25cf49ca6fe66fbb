"""The SIGTERM handler's decisions in a real process: defer while training runs, hand on otherwise.

Each test installs the handler on the main thread first (inside Ray Train that is done through the worker
actor's main thread), then ``install()`` from the training thread registers it as the one to wait for.
A signal sent to the test's own process would stop pytest, so every test runs in a fresh Python.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # every test starts a Python that imports resumer (and torch)


def _run(body: str, grace_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    code = f"GRACE = {grace_s}" + textwrap.dedent("""
        import os, signal, threading, time
        from resumer.jobs import preemption
        preemption.install_here(GRACE)
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_notice_while_training_is_deferred_to_the_next_step_boundary() -> None:
    done = _run("""
        seen = []
        def train():
            assert preemption.install()
            while preemption.noticed() is None:
                time.sleep(0.01)
            seen.append(preemption.noticed())
        t = threading.Thread(target=train)
        t.start()
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        t.join(10)
        print("noticed" if seen else "missed", "alive")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["noticed", "alive"]


def test_sigterm_after_training_ended_terminates_as_before() -> None:
    done = _run("""
        t = threading.Thread(target=preemption.install)
        t.start(); t.join()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("survived")
    """)
    assert done.returncode == preemption_exit_code(), (done.returncode, done.stdout, done.stderr)
    assert "survived" not in done.stdout


def test_no_step_boundary_within_the_grace_period_exits() -> None:
    done = _run("""
        def hung():
            preemption.install()
            time.sleep(30)  # a hung collective: never reaches save()
        t = threading.Thread(target=hung, daemon=True)
        t.start()
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        t.join(20)
        print("survived")
    """, grace_s=0.5)
    assert done.returncode == preemption_exit_code()
    assert "survived" not in done.stdout and "grace period" in done.stderr


def preemption_exit_code() -> int:
    from resumer.jobs.preemption import EXIT_CODE

    return EXIT_CODE


def test_sigterm_outside_training_is_handed_to_the_previous_python_handler() -> None:
    """Ray installs its own SIGTERM handler first: when training is not running, the signal is Ray's."""
    code = textwrap.dedent("""
        import os, signal, sys, threading, time
        def rays(signum, frame):
            print("previous handler ran", flush=True)
            os._exit(7)
        signal.signal(signal.SIGTERM, rays)
        from resumer.jobs import preemption
        preemption.install_here(30)
        t = threading.Thread(target=preemption.install)
        t.start(); t.join()  # training came and went
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("survived")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 7, (done.returncode, done.stdout, done.stderr)
    assert done.stdout.split("\n")[0] == "previous handler ran"
