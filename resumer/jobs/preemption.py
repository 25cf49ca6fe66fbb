"""Preemption notices on a worker: SIGTERM -> an emergency checkpoint at the next step boundary, then exit.

A spot reclaim or a node drain sends SIGTERM to the worker processes and kills them after a grace period
(30 s on GCP, 2 min on AWS). A signal handler cannot save safely in the middle of a step (parameters may
be half-updated), so it only notes the notice. The training loop's next ``resumer.jobs.worker.save()`` — a
step boundary — writes an emergency checkpoint and raises ``Preempted``, which the controller classifies
as ``preempted`` and resumes from. If the loop reaches no step boundary within the grace period (a hung
collective, say), the process exits with 143, as it would have without the handler.

Ray Train runs the training function in a thread, and only a process's main thread may install a signal
handler: inside a Ray actor the handler is installed through the worker actor's ``execute`` method, which
runs on the actor's main thread. The handler defers only while the training thread that installed it is
alive and has not been notified yet; otherwise (Ray tearing down a finished or failed worker group, a
second SIGTERM) it hands the signal to the handler it replaced (Ray's: exit now).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM
_noticed_at: float | None = None
_installed = False
_training: threading.Thread | None = None  # the thread whose step boundaries end a notice
_previous: Any = signal.SIG_DFL


def noticed() -> float | None:
    """``time.time()`` of the SIGTERM this process received, or None."""
    return _noticed_at


def _exit_after(grace_s: float) -> None:
    time.sleep(grace_s)
    logger.error("[preemption] no step boundary within the %.0fs grace period: exiting", grace_s)
    os._exit(EXIT_CODE)


def _handler(grace_s: float) -> Any:
    def on_sigterm(signum: int, frame: Any) -> None:
        global _noticed_at
        if _noticed_at is not None or _training is None or not _training.is_alive():
            _hand_on(signum, frame)
            return
        _noticed_at = time.time()
        logger.warning("[preemption] SIGTERM: an emergency checkpoint at the next step boundary (grace %.0fs)",
                       grace_s)
        threading.Thread(target=_exit_after, args=(grace_s,), name="resumer-grace", daemon=True).start()

    return on_sigterm


def _hand_on(signum: int, frame: Any) -> None:
    """What SIGTERM did before ours: the replaced Python handler, or the default (terminate)."""
    if callable(_previous):
        _previous(signum, frame)
    elif _previous != signal.SIG_IGN:
        os._exit(EXIT_CODE)


def install_here(grace_s: float) -> bool:
    """Install the SIGTERM handler; must run on the main thread. True when installed (now or before)."""
    global _installed, _previous
    if not _installed:
        _previous = signal.signal(signal.SIGTERM, _handler(grace_s))
        _installed = True
    return True


def install(grace_s: float = 30.0) -> bool:
    """Install the handler from any thread of this process (a Ray Train worker's training thread included).

    Returns False (and logs why) when it cannot be installed: the worker then dies on SIGTERM as before
    and the job resumes from the last committed checkpoint instead of an emergency one.
    """
    global _training
    _training = threading.current_thread()
    if _installed:
        return True
    if _training is threading.main_thread():
        return install_here(grace_s)
    try:
        import ray

        actor = ray.get_runtime_context().current_actor  # the Ray Train worker this thread runs in
        return bool(ray.get(actor.execute.remote(install_here, grace_s), timeout=30))
    except Exception as exc:  # noqa: BLE001 - best effort: without it, preemption is recovered as a crash
        logger.warning("[preemption] could not install the SIGTERM handler (%s: %s): a preemption is "
                       "recovered from the last committed checkpoint", type(exc).__name__, exc)
        return False
