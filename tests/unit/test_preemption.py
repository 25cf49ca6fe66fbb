"""Preemption decisions that need no signal: the emergency step is claimed once.

The SIGTERM handler itself is tested in real processes in ``tests/integration/test_preemption_signals.py``.
"""

from __future__ import annotations


def test_the_first_notified_rank_claims_the_emergency_step() -> None:
    from resumer.jobs.board import ProgressBoard

    board = ProgressBoard()
    assert board.claim(12, 1) is True  # rank 1 was notified first
    assert board.claim(12, 0) is False  # rank 0, notified too, does not write a second checkpoint of step 12
    assert board.claim(13, 0) is True  # a later step is claimed anew
