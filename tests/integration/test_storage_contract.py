"""The storage contract, run against every backend: a local folder, ``memory://`` and ``s3://`` on a real
S3 API server (moto on 127.0.0.1, reached through s3fs).

Each test saves two real checkpoints (steps 3 and 6 of ``mlp_v1`` + Adam), then checks one promise:
round trips are bit-exact; every kind of damage to the newest checkpoint is detected with a clear
CheckpointError, selection falls back to step 3, and nothing is deleted (the bad one only gains a
``quarantine.json``); credentials never show up in errors, logs or CLI output; and reading a large
checkpoint from S3 costs one streaming GET per file per pass (resumer.storage.transfer.StreamReader).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import pytest
import torch
import xxhash
from torch import nn

import resumer
from resumer import examples
from resumer.checkpoints import lease
from resumer.checkpoints.retention import RetentionPolicy, prune
from resumer.formats.native.manifest import long_form
from resumer.storage.fs import basename
from resumer.storage.store import Store
from resumer.testing.s3 import FAKE_KEY, FAKE_SECRET, MotoServer

Backend = tuple[str, "dict[str, Any] | None"]


@dataclass
class State:
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


@dataclass
class Saved:
    """Two committed checkpoints under ``root``: step 3 (older) and step 6 (newest), with what each holds."""

    root: str
    options: dict[str, Any] | None
    uri3: str
    uri6: str
    state3: State
    state6: State

    def fs(self) -> tuple[Any, str]:
        """The filesystem as resumer opens it (on S3: no listing cache), to read or damage files directly."""
        return resumer.storage.fs.get_fs(self.root, self.options)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> State:
    return State(model={k: v.detach().clone() for k, v in model.state_dict().items()},
                 optimizer=copy.deepcopy(optimizer.state_dict()))


@pytest.fixture
def saved(backend: Backend) -> Saved:
    root, options = backend
    torch.manual_seed(0)
    model = examples.mlp_v1()
    opt = examples.adam(model)
    for s in range(3):
        examples.train_step(model, opt, s)
    uri3 = resumer.save_checkpoint(root, 3, model, opt, storage_options=options)
    state3 = _state(model, opt)
    for s in range(3, 6):
        examples.train_step(model, opt, s)
    uri6 = resumer.save_checkpoint(root, 6, model, opt, storage_options=options)
    return Saved(root=root, options=options, uri3=uri3, uri6=uri6, state3=state3, state6=_state(model, opt))


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(12345)  # a different init: a resume that loads nothing cannot pass
    model = examples.mlp_v1()
    return model, examples.adam(model)


def _assert_holds(model: nn.Module, opt: torch.optim.Optimizer, want: State,
                  assert_same_tree: Callable[..., None]) -> None:
    assert_same_tree(want.model, dict(model.state_dict()), "model")
    assert_same_tree(want.optimizer, opt.state_dict(), "optimizer")


def _files(s: Saved) -> dict[str, bytes]:
    """Every file under the root (relative path -> bytes)."""
    fs, base = s.fs()
    base = base.rstrip("/")
    return {p[len(base):].lstrip("/"): fs.cat_file(p) for p in fs.find(base)}


def _no_credentials(text: str) -> None:
    assert FAKE_SECRET not in text
    assert FAKE_KEY not in text


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact(saved: Saved, assert_same_tree: Callable[..., None]) -> None:
    infos = resumer.list_checkpoints(saved.root, storage_options=saved.options)
    assert [(i.step, i.uri) for i in infos] == [(6, saved.uri6), (3, saved.uri3)]
    assert all(i.quarantine is None for i in infos)
    latest = resumer.latest_checkpoint(saved.root, storage_options=saved.options)
    assert latest is not None and (latest.step, latest.uri) == (6, saved.uri6)

    model, opt = _fresh()
    res = resumer.resume(saved.root, model, opt, storage_options=saved.options)
    assert res.step == 6 and res.checkpoint == saved.uri6 and res.plan.ok
    _assert_holds(model, opt, saved.state6, assert_same_tree)

    model, opt = _fresh()
    res = resumer.resume(saved.uri3, model, opt, storage_options=saved.options)
    assert res.step == 3
    _assert_holds(model, opt, saved.state3, assert_same_tree)
    # the optimizer really carried Adam's moments (not a fresh optimizer that happens to compare equal)
    assert len(opt.state_dict()["state"]) == len(list(model.parameters()))
    # Nothing was marked or changed by reading.
    assert not any(p.endswith("quarantine.json") for p in _files(saved))


# ------------------------------------------------------------------------------------------------- damage


def _manifest(fs: Any, d: str) -> dict[str, Any]:
    return long_form(json.loads(fs.cat_file(f"{d}/manifest.json")))


def _data_file(manifest: dict[str, Any], kind: str) -> str:
    return next(f["path"] for f in manifest["files"] if f["path"].startswith(f"{kind}."))


def _flip_byte(fs: Any, d: str, m: dict[str, Any]) -> None:
    path = f"{d}/{_data_file(m, 'model')}"
    data = bytearray(fs.cat_file(path))
    data[len(data) - 100] ^= 0xFF  # a tensor byte, well past the header
    fs.pipe_file(path, bytes(data))


def _truncate(fs: Any, d: str, m: dict[str, Any]) -> None:
    path = f"{d}/{_data_file(m, 'optimizer')}"
    fs.pipe_file(path, fs.cat_file(path)[:-1000])


def _delete(fs: Any, d: str, m: dict[str, Any]) -> None:
    fs.rm(f"{d}/{_data_file(m, 'model')}")


def _manifest_not_json(fs: Any, d: str, m: dict[str, Any]) -> None:
    fs.pipe_file(f"{d}/manifest.json", b'{"format": "resumer-checkpoint", "version": 1, "files": [')


def _key_outside(fs: Any, d: str, m: dict[str, Any]) -> None:
    # The escaped-to file really exists (a copy of the model data): only the name check can refuse it.
    name = _data_file(m, "model")
    fs.pipe_file(f"{d.rsplit('/', 1)[0]}/x.safetensors", fs.cat_file(f"{d}/{name}"))
    for f in m["files"]:
        if f["path"] == name:
            f["path"] = "../x.safetensors"
    for loc in m["tensors"].values():
        if loc["file"] == name:
            loc["file"] = "../x.safetensors"
    fs.pipe_file(f"{d}/manifest.json", json.dumps(m).encode())


def _not_safetensors(fs: Any, d: str, m: dict[str, Any]) -> None:
    # Random bytes with the manifest's size and checksum fixed to match: only the header check can catch it.
    name = _data_file(m, "model")
    junk = bytes(torch.randint(0, 256, (len(fs.cat_file(f"{d}/{name}")),), generator=torch.Generator().manual_seed(7),
                               dtype=torch.uint8).tolist())
    fs.pipe_file(f"{d}/{name}", junk)
    for f in m["files"]:
        if f["path"] == name:
            f["size"] = len(junk)
            f["checksum"] = f"xxh3_128:{xxhash.xxh3_128(junk).hexdigest()}"
    fs.pipe_file(f"{d}/manifest.json", json.dumps(m).encode())


DAMAGE: dict[str, tuple[Callable[[Any, str, dict[str, Any]], None], str]] = {
    # case: (how to damage step 6, what the error and the rejection reason must say)
    "flipped-byte": (_flip_byte, r"model\.[0-9a-f]+\.safetensors fails its checksum \(xxh3_128:"),
    "truncated": (_truncate, r"optimizer\.[0-9a-f]+\.safetensors has \d+ bytes, the manifest says \d+: the file is "
                             r"truncated"),
    "missing-object": (_delete, r"model\.[0-9a-f]+\.safetensors is missing: the checkpoint is incomplete"),
    "manifest-not-json": (_manifest_not_json, r"manifest\.json is malformed: not JSON"),
    "manifest-key-outside": (_key_outside, r"manifest\.json is malformed: file name '\.\./x\.safetensors' is not a "
                                           r"plain name inside the checkpoint \(path traversal refused\)"),
    "not-safetensors": (_not_safetensors, r"model\.[0-9a-f]+\.safetensors is not a valid safetensors file: header "
                                          r"length \d+ does not fit the file"),
}


def _damage(s: Saved, case: str) -> None:
    fs, base = s.fs()
    d = f"{base.rstrip('/')}/{s.uri6.rsplit('/', 1)[-1]}"
    DAMAGE[case][0](fs, d, _manifest(fs, d))


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_detected_and_selection_falls_back(saved: Saved, case: str, caplog: pytest.LogCaptureFixture,
                                                    assert_same_tree: Callable[..., None]) -> None:
    caplog.set_level(logging.DEBUG)
    _damage(saved, case)
    before = _files(saved)
    pattern = DAMAGE[case][1]

    # Asked for directly: a clear CheckpointError, and the model and optimizer are left as they were.
    model, opt = _fresh()
    untouched = _state(model, opt)
    with pytest.raises(resumer.CheckpointError, match=pattern) as err:
        resumer.resume(saved.uri6, model, opt, storage_options=saved.options)
    assert saved.uri6 in str(err.value)
    _assert_holds(model, opt, untouched, assert_same_tree)

    # Selection passes over it, says why, and falls back to step 3.
    sel = resumer.select(saved.root, storage_options=saved.options)
    assert sel.chosen is not None and (sel.chosen.step, sel.chosen.uri) == (3, saved.uri3)
    assert [(r.uri, r.step) for r in sel.rejected] == [(saved.uri6, 6)]
    assert re.search(pattern, sel.rejected[0].reason), sel.rejected[0].reason
    latest = resumer.latest_checkpoint(saved.root, storage_options=saved.options)
    assert latest is not None and latest.uri == saved.uri3
    model, opt = _fresh()
    assert resumer.resume(saved.root, model, opt, storage_options=saved.options).step == 3
    _assert_holds(model, opt, saved.state3, assert_same_tree)
    assert [i.step for i in resumer.list_checkpoints(saved.root, storage_options=saved.options)] == [3]

    # Nothing deleted or changed; the bad checkpoint gained only its quarantine mark, with the reason.
    after = _files(saved)
    step6 = saved.uri6.rsplit("/", 1)[-1]
    assert set(after) - set(before) == {f"{step6}/quarantine.json"}
    assert all(after[p] == b for p, b in before.items())
    assert re.search(pattern, json.loads(after[f"{step6}/quarantine.json"])["reason"])

    for text in (str(err.value), *(r.reason for r in sel.rejected), caplog.text):
        assert FAKE_SECRET not in text
    for rec in caplog.records:
        if rec.name.startswith("resumer"):
            _no_credentials(rec.getMessage())


@pytest.mark.parametrize("case", list(DAMAGE))
def test_quarantined_checkpoint_is_listed_with_its_reason(saved: Saved, case: str) -> None:
    _damage(saved, case)
    assert resumer.latest_checkpoint(saved.root, storage_options=saved.options).uri == saved.uri3  # type: ignore[union-attr]
    infos = resumer.list_checkpoints(saved.root, storage_options=saved.options, include_quarantined=True)
    assert [i.uri for i in infos] == [saved.uri6, saved.uri3]
    assert infos[0].quarantine is not None and re.search(DAMAGE[case][1], infos[0].quarantine)
    assert infos[1].quarantine is None
    # Later selections skip it without reading it again, and still say why.
    sel = resumer.select(saved.root, storage_options=saved.options)
    assert sel.chosen is not None and sel.chosen.uri == saved.uri3
    assert [(r.uri, r.reason) for r in sel.rejected] == [(saved.uri6, "quarantined earlier")]


def test_torn_checkpoint_is_passed_over_and_not_marked(saved: Saved) -> None:
    """Data files without a manifest (a writer died before its commit): never selected, never quarantined."""
    fs, base = saved.fs()
    src = f"{base.rstrip('/')}/{saved.uri6.rsplit('/', 1)[-1]}"
    torn = f"{base.rstrip('/')}/step-0000000009"
    name = _data_file(_manifest(fs, src), "model")
    fs.makedirs(torn, exist_ok=True)
    fs.pipe_file(f"{torn}/{name}", fs.cat_file(f"{src}/{name}"))
    before = _files(saved)
    sel = resumer.select(saved.root, storage_options=saved.options)
    assert sel.chosen is not None and sel.chosen.uri == saved.uri6
    assert [(r.step, r.reason) for r in sel.rejected] == [(9, "torn: no manifest.json (never committed)")]
    assert [i.step for i in resumer.list_checkpoints(saved.root, storage_options=saved.options)] == [6, 3]
    with pytest.raises(resumer.CheckpointError, match="holds data files but no manifest.json: a torn checkpoint"):
        resumer.resume(saved.root.rstrip("/") + "/step-0000000009", *_fresh(), storage_options=saved.options)
    assert _files(saved) == before


def test_a_step_committed_by_another_writer_is_seen(backend: Backend, request: pytest.FixtureRequest,
                                                   assert_same_tree: Callable[..., None]) -> None:
    """A long-lived reader (a watcher, an orchestrator) sees a checkpoint another process committed after the
    reader last looked, even in a step directory the reader first saw torn."""
    root, options = backend
    writer = {**(options or {}), "skip_instance_cache": True}  # its own filesystem object: another process
    torch.manual_seed(0)
    model = examples.mlp_v1()
    opt = examples.adam(model)
    examples.train_step(model, opt, 0)
    resumer.save_checkpoint(root, 1, model, opt, storage_options=writer)
    # The writer died while saving step 2: a data file and no manifest.
    fs, base = fsspec.core.url_to_fs(root, **writer)
    fs.makedirs(f"{base}/step-0000000002", exist_ok=True)
    fs.pipe_file(f"{base}/step-0000000002/model.0123456789ab.safetensors", b"torn")
    sel = resumer.select(root, storage_options=options)
    assert sel.chosen is not None and sel.chosen.step == 1 and [r.step for r in sel.rejected] == [2]

    examples.train_step(model, opt, 1)  # a new writer saves step 2
    uri2 = resumer.save_checkpoint(root, 2, model, opt, storage_options=writer)
    latest = resumer.latest_checkpoint(root, storage_options=options)
    assert latest is not None and latest.uri == uri2
    for target in (root, uri2):
        fresh, fresh_opt = _fresh()
        assert resumer.resume(target, fresh, fresh_opt, storage_options=options).checkpoint == uri2
        _assert_holds(fresh, fresh_opt, _state(model, opt), assert_same_tree)


# ------------------------------------------------------------------------------------------------ the Store


def test_store_primitives_behave_alike_on_every_backend(backend: Backend) -> None:
    """What the checkpoint modules rely on from a Store, the same on a local folder, memory:// and S3."""
    root, options = backend
    store = Store.open(root, options)
    step = store.child("step-0000000001")
    assert (step.uri, step.name, step.parent().uri, step.parent().path) == (
        f"{root.rstrip('/')}/step-0000000001", "step-0000000001", store.uri, store.path.rstrip("/"))
    step.makedirs()
    step.write_atomic("a.bin", data=b"abc")
    step.commit("manifest.json", data=b"{}")
    step.commit("manifest.json", data=b"{}")  # the same bytes again: a retried PUT that had landed
    with pytest.raises(FileExistsError):
        step.commit("manifest.json", data=b"{ }")  # exclusive: another writer's commit is never replaced
    assert step.read("manifest.json") == b"{}" and step.read("a.bin", limit=2) == b"ab"
    assert step.size("a.bin") == 3 and step.exists("a.bin") and step.isfile("a.bin") and step.isdir()
    assert not step.exists("b.bin")
    step.move("a.bin", "b.bin", what="renaming")
    assert sorted(basename(n) for n in step.ls()) == ["b.bin", "manifest.json"]
    found = {p[len(store.path.rstrip("/")):]: info["size"] for p, info in store.find().items()}
    assert found == {"/step-0000000001/b.bin": 3, "/step-0000000001/manifest.json": 2}
    step.rm("a.bin", missing_ok=True)  # gone already (S3 never says so; the others raise FileNotFoundError)
    assert not step.rmdir_if_empty()  # not empty: kept
    step.fsync_dir()  # a no-op off local disks
    step.rm("b.bin")
    step.rm("manifest.json")
    step.rmdir_if_empty()
    store.invalidate_cache()
    assert store.find() == {} and not step.exists("manifest.json")


def test_a_store_serves_where_a_uri_and_options_do(backend: Backend) -> None:
    """Every checkpoint call takes a Store in place of ``(uri, storage_options)``, with the same results."""
    root, options = backend
    store = Store.open(root, options)
    torch.manual_seed(0)
    model = examples.mlp_v1()
    opt = examples.adam(model)
    examples.train_step(model, opt, 0)
    uri = resumer.save_checkpoint(store, 1, model, opt)
    assert uri == f"{root.rstrip('/')}/step-0000000001"
    resumer.save_checkpoint(root, 2, model, opt, storage_options=options)
    assert [i.uri for i in resumer.list_checkpoints(store)] == [
        i.uri for i in resumer.list_checkpoints(root, storage_options=options)]
    latest = resumer.latest_checkpoint(store)
    assert latest is not None and latest.uri == f"{root.rstrip('/')}/step-0000000002"
    with lease.reading(store.child("step-0000000002")) as held:
        assert held is not None and list(lease.active_leases(store)) == ["step-0000000002"]
    assert lease.active_leases(root, options) == {}
    events = resumer.Watcher(store).poll()
    assert [(e.kind.value, e.step) for e in events] == [("new", 1), ("new", 2)]
    result = prune(store, RetentionPolicy(keep_last=1))
    assert (result.root, result.deleted) == (root, (uri,))
    with pytest.raises(resumer.UsageError, match="Storage options were given with a Store"):
        resumer.list_checkpoints(store, storage_options={"anon": True})


# ------------------------------------------------------------------------------------------------ secrets


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "resumer", *args], capture_output=True, text=True, timeout=120)


def _s3_args(endpoint: str) -> list[str]:
    return ["-S", f"key={FAKE_KEY}", "-S", f"secret={FAKE_SECRET}", "-S", f"client_kwargs.endpoint_url={endpoint}"]


@pytest.fixture
def s3_saved(s3_root: tuple[str, dict[str, Any]]) -> Saved:
    root, options = s3_root
    torch.manual_seed(0)
    model = examples.mlp_v1()
    opt = examples.adam(model)
    examples.train_step(model, opt, 0)
    uri3 = resumer.save_checkpoint(root, 3, model, opt, storage_options=options)
    state = _state(model, opt)
    uri6 = resumer.save_checkpoint(root, 6, model, opt, storage_options=options)
    return Saved(root=root, options=options, uri3=uri3, uri6=uri6, state3=state, state6=state)


def test_cli_output_never_shows_credentials(s3_saved: Saved, s3_server: str) -> None:
    """inspect / plan / list on s3:// through the real entry point: ok runs and failing runs alike."""
    _damage(s3_saved, "flipped-byte")
    assert resumer.select(s3_saved.root, storage_options=s3_saved.options).chosen.step == 3  # type: ignore[union-attr]
    creds = _s3_args(s3_server)
    model = ["--model", "resumer.examples:mlp_v1", "--optimizer", "resumer.examples:adam"]
    runs = {  # what: (arguments, exit code, text the output must hold)
        "inspect --verify": (["inspect", "--verify", s3_saved.uri6, *creds], 1, "fails its checksum"),
        "plan": (["plan", s3_saved.root, *model, *creds], 0, "step-0000000003"),
        "list --all": (["list", "--all", s3_saved.root, *creds], 0, "QUARANTINED:"),
        "inspect missing bucket": (["inspect", "s3://no-such-bucket-here/run", *creds], 1, "does not exist"),
    }
    # Started together: each spends ~2 s of CPU importing torch.
    procs = {what: subprocess.Popen([sys.executable, "-m", "resumer", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for what, (args, _, _) in runs.items()}
    try:
        outputs = {what: p.communicate(timeout=120) for what, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for what, (_, code, expect) in runs.items():
        text = "".join(outputs[what])
        assert procs[what].returncode == code, f"{what}: exit {procs[what].returncode}\n{text}"
        assert expect in text, f"{what}:\n{text}"
        assert FAKE_SECRET not in text, what
        assert FAKE_KEY not in text, what


def test_cli_debug_logging_never_shows_credentials(s3_saved: Saved, s3_server: str) -> None:
    got = _cli("-vv", "list", s3_saved.root, *_s3_args(s3_server))
    assert got.returncode == 0, got.stderr
    assert "DEBUG resumer" in got.stderr or "DEBUG" in got.stderr  # debug logging really is on
    assert FAKE_SECRET not in got.stdout + got.stderr
    assert FAKE_KEY not in got.stdout + got.stderr


def test_transient_failure_message_has_no_credentials(caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage that refuses every connection: TransientStorageError names the problem, never the secret."""
    from resumer.testing.s3 import free_port

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(resumer.storage.retry.RetryPolicy, "delay", lambda self, attempt: 0.01)
    options = {"key": FAKE_KEY, "secret": FAKE_SECRET,
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    with pytest.raises(resumer.TransientStorageError, match=r"failed 6 times with transient errors") as err:
        resumer.latest_checkpoint("s3://some-bucket/run", storage_options=options)
    _no_credentials(str(err.value))
    assert FAKE_SECRET not in caplog.text
    assert "[retry]" in caplog.text
    for rec in caplog.records:
        if rec.name.startswith("resumer"):
            _no_credentials(rec.getMessage())


# ------------------------------------------------------------------------------------------- GET counts


class _Big(nn.Module):
    """~5.2 M float32 parameters (21 MB): with SGD momentum a checkpoint of ~42 MB in two files."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2048, 2048)
        self.b = nn.Linear(2048, 512)


def _big_trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = _Big()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return model, opt


def test_s3_resume_reads_each_file_with_one_get_per_pass(s3_root: tuple[str, dict[str, Any]], moto: MotoServer,
                                                         assert_same_tree: Callable[..., None]) -> None:
    root, options = s3_root
    model, opt = _big_trained()
    uri = resumer.save_checkpoint(root, 1, model, opt, storage_options=options)
    manifest = resumer.read_manifest(uri, options)
    sizes = {f.path: f.size for f in manifest.files}
    assert sum(sizes.values()) >= 40_000_000

    def measure(target: str, verify: bool) -> dict[str, int]:
        log_start = len(moto.log_text())
        fresh = _Big()
        fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
        res = resumer.resume(target, fresh, fresh_opt, storage_options=options, verify=verify)
        assert res.step == 1
        assert_same_tree(dict(model.state_dict()), dict(fresh.state_dict()), "model")
        assert_same_tree(opt.state_dict(), fresh_opt.state_dict(), "optimizer")
        data_get = r'GET /\S+/step-0000000001/((?:model|optimizer)\.[0-9a-f]+\.safetensors) HTTP/1\.1\S*" 20[06]'
        gets = re.findall(data_get, moto.log_text()[log_start:])
        return {name: gets.count(name) for name in sizes}

    # One pass (no verification): one streaming GET per file (transfer.StreamReader), no ranged block reads.
    once = measure(uri, verify=False)
    assert once == dict.fromkeys(sizes, 1)
    # From the root, verified: selection reads manifests only; each data file is checksummed in the one pass
    # that loads it into fresh memory (1 GET each): the bytes checksummed are the bytes loaded.
    full = measure(root, verify=True)
    assert full == dict.fromkeys(sizes, 1), full
    print(f"\n[GET count] files {sizes}: resume(uri, verify=False) {once}; resume(root) {full}")
