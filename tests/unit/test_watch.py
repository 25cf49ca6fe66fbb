"""The watcher, driven one poll at a time with a fake clock, on a local folder and on memory://."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import resumer
from resumer import examples as ex
from resumer.checkpoints import catalog
from resumer.checkpoints import watch as watch_mod
from resumer.checkpoints.catalog import quarantine
from resumer.checkpoints.watch import EventKind, Watcher, watch
from resumer.cli.watch import watch_command
from resumer.core.errors import TransientStorageError
from resumer.formats.native.manifest import MANIFEST, QUARANTINE
from resumer.storage.store import Store

FsOf = Callable[[str], tuple[Any, str]]


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return ex.mlp_v1()


def kinds(events: list[Any]) -> list[tuple[str, int | None]]:
    return [(e.kind.value, e.step) for e in events]


def model_file(fs_of: FsOf, uri: str) -> tuple[Any, str]:
    fs, path = fs_of(uri)
    name = next(n.rsplit("/", 1)[-1] for n in fs.ls(path, detail=False) if n.rsplit("/", 1)[-1].startswith("model."))
    return fs, f"{path}/{name}"


def test_new_checkpoints_are_reported_once_each_oldest_first(root: str, model: nn.Module) -> None:
    clock = FakeClock()
    resumer.save_checkpoint(root, 1, model)
    w = Watcher(root, clock=clock)
    first = w.poll()
    assert kinds(first) == [("new", 1)]
    assert first[0].uri.endswith("/step-0000000001") and "verified (sizes)" in first[0].reason
    assert w.poll() == []
    resumer.save_checkpoint(root, 3, model)
    resumer.save_checkpoint(root, 2, model)
    assert kinds(w.poll()) == [("new", 2), ("new", 3)]
    assert w.poll() == []
    assert w.latest_valid is not None and w.latest_valid.step == 3


def test_a_deleted_and_rewritten_step_is_judged_again(root: str, model: nn.Module, fs_of: FsOf) -> None:
    uri = resumer.save_checkpoint(root, 1, model)
    w = Watcher(root, clock=FakeClock())
    assert kinds(w.poll()) == [("new", 1)]
    fs, path = fs_of(uri)
    fs.rm(path, recursive=True)
    assert w.poll() == []
    resumer.save_checkpoint(root, 1, model)
    assert kinds(w.poll()) == [("new", 1)]


def test_event_to_dict_is_json_with_a_utc_time(root: str, model: nn.Module) -> None:
    resumer.save_checkpoint(root, 7, model)
    (event,) = Watcher(root, clock=FakeClock()).poll()
    d = json.loads(json.dumps(event.to_dict()))
    assert d["kind"] == "new" and d["step"] == 7 and d["uri"] == event.uri and event.kind == "new"
    assert dt.datetime.fromisoformat(d["at"]).utcoffset() == dt.timedelta(0)
    assert event.describe().startswith(f"new step=7 {event.uri}: committed at ")


def test_report_existing_false_makes_the_first_poll_a_baseline(root: str, model: nn.Module) -> None:
    resumer.save_checkpoint(root, 1, model)
    w = Watcher(root, report_existing=False, clock=FakeClock())
    assert w.poll() == []
    resumer.save_checkpoint(root, 2, model)
    assert kinds(w.poll()) == [("new", 2)]


def test_flipped_byte_is_invalid_with_checksums_and_not_quarantined(root: str, model: nn.Module,
                                                                   fs_of: FsOf) -> None:
    uri = resumer.save_checkpoint(root, 1, model)
    fs, path = model_file(fs_of, uri)
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0xFF  # same size, different bytes: only a checksum sees it
    fs.pipe_file(path, bytes(data))
    assert kinds(Watcher(root, clock=FakeClock()).poll()) == [("new", 1)]  # sizes only, by default
    (event,) = Watcher(root, checksums=True, clock=FakeClock()).poll()
    assert event.kind is EventKind.INVALID and event.step == 1
    assert "fails its checksum" in event.reason
    assert not fs_of(uri)[0].exists(f"{fs_of(uri)[1]}/{QUARANTINE}"), "the watcher must only report"


def test_truncated_file_is_invalid_by_size_once(root: str, model: nn.Module, fs_of: FsOf) -> None:
    resumer.save_checkpoint(root, 1, model)
    uri = resumer.save_checkpoint(root, 2, model)
    fs, path = model_file(fs_of, uri)
    fs.pipe_file(path, fs.cat_file(path)[:100])
    w = Watcher(root, clock=FakeClock())
    events = w.poll()
    assert kinds(events) == [("new", 1), ("invalid", 2)]
    assert "has 100 bytes, the manifest says" in events[1].reason
    assert w.poll() == []
    assert w.latest_valid is not None and w.latest_valid.step == 1


def test_torn_directory_reported_after_the_grace_period_once_then_new_when_committed(
        root: str, model: nn.Module, fs_of: FsOf) -> None:
    clock = FakeClock()
    fs, path = fs_of(root)
    fs.makedirs(f"{path}/step-0000000005", exist_ok=True)
    fs.pipe_file(f"{path}/step-0000000005/model.abc.safetensors", b"x" * 64)
    w = Watcher(root, torn_after_s=60, clock=clock)
    assert w.poll() == []
    clock.t = 60
    assert w.poll() == [], "still inside the grace period"
    clock.t = 61
    (event,) = w.poll()
    assert event.kind is EventKind.INVALID and event.step == 5
    assert event.reason.startswith("torn: no manifest after 61 s")
    clock.t = 500
    assert w.poll() == []
    resumer.save_checkpoint(root, 5, model)  # the writer comes back and commits
    assert kinds(w.poll()) == [("new", 5)]


def test_stall_once_then_resumed_progress_then_stall_again(root: str, model: nn.Module) -> None:
    clock = FakeClock()
    w = Watcher(root, stall_after_s=100, clock=clock)
    assert w.poll() == []
    clock.t = 100
    assert w.poll() == []
    clock.t = 101
    (stall,) = w.poll()
    assert stall.kind is EventKind.STALL and stall.uri == root and stall.step is None
    assert "no new valid checkpoint for 101 s" in stall.reason and "none seen" in stall.reason
    clock.t = 150
    assert w.poll() == [], "a stall is reported once"
    resumer.save_checkpoint(root, 1, model)
    clock.t = 160
    events = w.poll()
    assert kinds(events) == [("new", 1), ("resumed-progress", 1)]
    assert "after 160 s without one" in events[1].reason
    clock.t = 260
    assert w.poll() == []
    clock.t = 261
    (again,) = w.poll()
    assert again.kind is EventKind.STALL and again.step == 1 and "newest valid: step 1" in again.reason


def test_invalid_checkpoint_is_not_progress(root: str, model: nn.Module, fs_of: FsOf) -> None:
    clock = FakeClock()
    w = Watcher(root, stall_after_s=10, clock=clock)
    uri = resumer.save_checkpoint(root, 1, model)
    fs, path = fs_of(uri)
    fs.pipe_file(f"{path}/{MANIFEST}", b"{not json")
    clock.t = 11
    assert kinds(w.poll()) == [("invalid", 1), ("stall", None)]


def test_quarantined_reported_once_and_never_as_new(root: str, model: nn.Module) -> None:
    uri1 = resumer.save_checkpoint(root, 1, model)
    uri2 = resumer.save_checkpoint(root, 2, model)
    quarantine(uri1, "bad bytes found by a reader")
    w = Watcher(root, clock=FakeClock())
    events = w.poll()
    assert kinds(events) == [("quarantined", 1), ("new", 2)]
    assert events[0].reason == "bad bytes found by a reader"
    quarantine(uri2, "NaN in the loss")
    (event,) = w.poll()
    assert (event.kind, event.uri, event.reason) == (EventKind.QUARANTINED, uri2, "NaN in the loss")
    assert w.poll() == []


@pytest.mark.parametrize("mark", [b"[\"a list, not a record\"]", b"{\"reason\": 7}", b"{not json", b""])
def test_a_quarantine_mark_that_makes_no_sense_reads_as_unknown(root: str, model: nn.Module, fs_of: FsOf,
                                                                mark: bytes) -> None:
    """The mark lies in storage like everything else: whatever it holds, the checkpoint stays quarantined and
    its reason reads as "unknown" (never an error that stops the watcher or the listing)."""
    uri = resumer.save_checkpoint(root, 1, model)
    fs, path = fs_of(uri)
    fs.pipe_file(f"{path}/{QUARANTINE}", mark)
    assert catalog.quarantine_reason(Store.open(uri)) == "unknown"
    (event,) = Watcher(root, clock=FakeClock()).poll()
    assert (event.kind, event.uri, event.reason) == (EventKind.QUARANTINED, uri, "unknown")
    assert [(i.uri, i.quarantine) for i in resumer.list_checkpoints(root, include_quarantined=True)] == [
        (uri, "unknown")]
    assert resumer.list_checkpoints(root) == []


def test_transient_error_reading_a_manifest_is_retried_next_poll(root: str, model: nn.Module,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    resumer.save_checkpoint(root, 1, model)
    real = catalog.read_manifest
    calls: list[str] = []

    def flaky(checkpoint: Store, **kwargs: Any) -> Any:
        calls.append(checkpoint.uri)
        if len(calls) == 1:
            raise TransientStorageError("reading failed 6 times", uri=checkpoint.uri)
        return real(checkpoint, **kwargs)

    monkeypatch.setattr(catalog, "read_manifest", flaky)
    w = Watcher(root, clock=FakeClock())
    assert w.poll() == []
    assert kinds(w.poll()) == [("new", 1)]
    assert len(calls) == 2


def test_watch_loop_survives_a_failed_listing_and_stops_at_the_timeout(root: str, model: nn.Module,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    resumer.save_checkpoint(root, 1, model)
    real = watch_mod.scan
    listings: list[float] = []
    clock = FakeClock()

    def flaky(store: Store) -> Any:
        listings.append(clock.t)
        if len(listings) == 1:
            raise TransientStorageError("listing failed 6 times", uri=store.uri)
        return real(store)

    monkeypatch.setattr(watch_mod, "scan", flaky)
    events = list(watch(root, interval_s=4, timeout_s=10, clock=clock, sleep=clock.sleep))
    assert kinds(events) == [("new", 1)]
    assert listings == [0, 4, 8, 10], "polls every interval, the last one at the timeout"


def test_watch_stops_after_max_polls(root: str) -> None:
    clock = FakeClock()
    events = list(watch(root, interval_s=5, max_polls=3, stall_after_s=7, clock=clock, sleep=clock.sleep))
    assert kinds(events) == [("stall", None)]
    assert clock.t == 10


def test_bad_arguments_name_the_field(root: str) -> None:
    with pytest.raises(resumer.UsageError, match="stall_after_s must be a positive"):
        Watcher(root, stall_after_s=0)
    with pytest.raises(resumer.UsageError, match="interval_s must be a positive"):
        next(watch(root, interval_s=0))


def test_cli_once_json_prints_one_event_per_line_and_exit_code(root: str, model: nn.Module, fs_of: FsOf) -> None:
    resumer.save_checkpoint(root, 1, model)
    resumer.save_checkpoint(root, 2, model)
    runner = CliRunner()
    ok = runner.invoke(watch_command, [root, "--once", "--json"])
    assert ok.exit_code == 0, ok.output
    lines = [json.loads(line) for line in ok.stdout.splitlines()]
    assert [(d["kind"], d["step"]) for d in lines] == [("new", 1), ("new", 2)]
    uri3 = resumer.save_checkpoint(root, 3, model)
    fs, path = model_file(fs_of, uri3)
    fs.pipe_file(path, b"short")
    bad = runner.invoke(watch_command, [root, "--once", "--json"])
    assert bad.exit_code == 1
    assert [json.loads(line)["kind"] for line in bad.stdout.splitlines()] == ["new", "new", "invalid"]


def test_cli_text_mode_prints_readable_lines(root: str, model: nn.Module) -> None:
    resumer.save_checkpoint(root, 4, model)
    r = CliRunner().invoke(watch_command, [root, "--once"])
    assert r.exit_code == 0, r.output
    (line,) = r.stdout.splitlines()
    assert " new step=4 " in line and line.split()[0].endswith("+00:00")
