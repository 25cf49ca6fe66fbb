"""The spool and its shipper without MLflow: order kept through an outage, durable records, poisonous records
set aside (kept), a torn last line, a spool left by a dead process, one owner per spool."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from resumer.core.errors import UsageError
from resumer.testing import connections_by_thread
from resumer.tracking.mlflow_ops import classify
from resumer.tracking.recorder import MlflowRecorder
from resumer.tracking.spool import Op, Shipper, Spool, SpoolLocked, new_op


class FakeServer:
    """Applies ops in memory; ``down`` makes every call fail like a refused connection."""

    def __init__(self) -> None:
        self.applied: list[int] = []
        self.down = False
        self.bad: set[int] = set()
        self.lock = threading.Lock()

    def apply(self, op: Op) -> None:
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        if op["n"] in self.bad:
            raise ValueError(f"bad record {op['n']}")
        with self.lock:
            self.applied.append(op["n"])


def _shipper(tmp_path: Path, server: FakeServer) -> Shipper:
    return Shipper(Spool(str(tmp_path / "spool")), server.apply, classify=classify, backoff=(0.05, 0.2))


def test_order_is_kept_through_an_outage_and_nothing_is_lost_or_duplicated(tmp_path: Path) -> None:
    server = FakeServer()
    shipper = _shipper(tmp_path, server)
    try:
        for n in range(5):
            shipper.submit(new_op("x", n=n))
        assert shipper.flush(5) and server.applied == [0, 1, 2, 3, 4]
        server.down = True
        tickets = [shipper.submit(new_op("x", n=n)) for n in range(5, 15)]
        assert all(t.durable.wait(5) for t in tickets) and not any(t.applied.is_set() for t in tickets)
        assert not shipper.online and len(shipper.spool) == 10
        lines = Path(shipper.spool.journal_path).read_text().splitlines()
        assert [json.loads(x)["n"] for x in lines] == list(range(5, 15))
        server.down = False
        for n in range(15, 18):  # submitted after the server is back, while the spool still holds older records
            shipper.submit(new_op("x", n=n))
        assert shipper.flush(5)
        assert server.applied == list(range(18)) and shipper.online
        assert not Path(shipper.spool.journal_path).exists()
    finally:
        shipper.close(1)


def test_a_poisonous_record_is_set_aside_and_kept(tmp_path: Path) -> None:
    server = FakeServer()
    server.bad = {1}
    shipper = _shipper(tmp_path, server)
    try:
        for n in range(3):
            shipper.submit(new_op("x", n=n))
        assert shipper.flush(5) and server.applied == [0, 2] and shipper.rejected == 1
        kept = [json.loads(x) for x in Path(shipper.spool.rejected_path).read_text().splitlines()]
        assert kept[0]["op"]["n"] == 1 and "bad record 1" in kept[0]["error"]
    finally:
        shipper.close(1)


def test_a_spool_left_behind_is_flushed_by_the_next_owner_and_a_torn_line_skipped(tmp_path: Path) -> None:
    server = FakeServer()
    server.down = True
    first = _shipper(tmp_path, server)
    for n in range(4):
        first.submit(new_op("x", n=n))
    first.close(0.3)  # the server never came back before the process ended
    journal = Path(first.spool.journal_path)
    with journal.open("a") as f:
        f.write('{"id": "torn", "op": "x", "n": 99')  # a crash in the middle of an append
    server.down = False
    second = _shipper(tmp_path, server)
    try:
        assert second.flush(5) and server.applied == [0, 1, 2, 3]
    finally:
        second.close(1)


def test_one_owner_per_spool(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    try:
        with pytest.raises(SpoolLocked):
            Spool(str(tmp_path / "spool"))
        with pytest.raises(UsageError, match="give each recorder its own spool_dir"):
            MlflowRecorder("http://127.0.0.1:9", "x", spool_dir=str(tmp_path / "spool"))
    finally:
        spool.close()


def test_training_calls_never_touch_the_network_and_never_raise(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Behaviour, not time (time is in bench/recorder_overhead.py): a training-side call only queues; the
    shipper thread alone talks to the tracking server."""
    rec = MlflowRecorder("http://127.0.0.1:9", "x", spool_dir=str(tmp_path / "spool"), durable_timeout_s=2)
    try:
        rec.log_training(1, {"loss": 1.0})  # before any decision: ignored with a warning, no exception
        rec.checkpoint_committed(1)
        from resumer.core.decision import Decision, Outcome

        rec.record_decision(Decision(job="j", attempt=1, outcome=Outcome.STARTED))  # nothing listens: spooled
        connects = connections_by_thread(monkeypatch)
        for step in range(10000):
            rec.log_training(step, {"loss": 0.5, "lr": 0.1})
            if step % 1000 == 0:
                rec.checkpoint_committed(step)
        assert threading.get_ident() not in connects
        metrics: Any = {"loss": "not a number"}
        rec.log_training(10001, metrics)  # dropped at batching with a warning
        assert rec.flush(0.3) is False  # nothing listens: it cannot be flushed, however long it is given
    finally:
        rec.close(0.2)


def test_past_the_cap_training_points_are_dropped_but_decisions_kept(tmp_path: Path) -> None:
    server = FakeServer()
    server.down = True
    shipper = Shipper(Spool(str(tmp_path / "spool"), max_bytes=200), server.apply, classify=classify,
                      backoff=(0.05, 0.2))
    try:
        tickets = [shipper.submit(new_op("log", n=n, bulk=True, pad="x" * 100)) for n in range(5)]
        tickets.append(shipper.submit(new_op("create_run", n=5)))
        assert all(t.durable.wait(5) for t in tickets)
        assert shipper.dropped == 3 and [op["n"] for op in shipper.spool._pending] == [0, 1, 5]
        server.down = False
        assert shipper.flush(5) and server.applied == [0, 1, 5]
    finally:
        shipper.close(1)


def test_points_encode_to_log_batch_json_and_back() -> None:
    import math

    import numpy as np
    import torch

    from resumer.tracking.mlflow_fast import PointEncoder, body, rows_of

    enc = PointEncoder()
    frag, n, bad = enc.encode(7, {"loss": 0.5, 'a"b%': np.float64(2.5), "t": torch.tensor(3.25), "x": "nan?"}, 123)
    assert (n, bad) == (3, ["x"])
    assert rows_of([[7, frag, n]]) == [["loss", 0.5, 123, 7], ['a"b%', 2.5, 123, 7], ["t", 3.25, 123, 7]]
    odd, n, _ = enc.encode(8, {"n": float("nan"), "p": float("inf"), "m": float("-inf")}, 124)
    text = body(enc, "run1", [["lr", 0.1, 125, 9]], [[8, odd, n]], {"tag": "v"})
    doc = json.loads(text)  # strict JSON: the non-finite values are the strings protobuf JSON reads
    assert [m["value"] for m in doc["metrics"]] == [0.1, "NaN", "Infinity", "-Infinity"]
    assert doc["run_id"] == "run1" and doc["tags"] == [{"key": "tag", "value": "v"}]
    back = rows_of([[8, odd, n]])
    assert math.isnan(back[0][1]) and back[1][1] == math.inf and back[2][1] == -math.inf


def test_failures_are_classified() -> None:
    from mlflow.exceptions import MlflowException, RestException

    from resumer.tracking.mlflow_fast import HttpStatusError, ReadTimeout
    from resumer.tracking.spool import PERMANENT, TRANSIENT, UNREACHABLE

    def wrapped(inner: BaseException) -> MlflowException:
        try:
            try:
                raise inner
            except OSError as exc:
                raise MlflowException(f"API request failed with exception {exc}") from exc
        except MlflowException as outer:
            return outer

    assert classify(ConnectionRefusedError(111, "Connection refused")) == UNREACHABLE
    assert classify(wrapped(ConnectionError("Max retries exceeded (Caused by NewConnectionError)"))) == UNREACHABLE
    assert classify(ReadTimeout("no answer")) == TRANSIENT
    assert classify(HttpStatusError(503, "busy")) == TRANSIENT and classify(HttpStatusError(404, "no")) == PERMANENT
    assert classify(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "later"})) == TRANSIENT
    assert classify(RestException({"error_code": "INVALID_PARAMETER_VALUE",
                                   "message": "Changing param values is not allowed"})) == PERMANENT
