"""Torn, truncated, corrupt, malformed and unsafe checkpoints: each is refused with a CheckpointError that says
what is wrong, the model / optimizer / scheduler / RNG are left exactly as they were, and nothing is deleted."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
from collections.abc import Callable
from typing import Any

import pytest
import torch
import xxhash

import resumer
from resumer.formats.native.manifest import MANIFEST, QUARANTINE, long_form
from resumer.testing.hostile import Payload


class Saved:
    """A root holding one committed checkpoint (step 2), and direct access to its files."""

    def __init__(self, root: str, uri: str, fs: Any, path: str, src: Any) -> None:
        self.root, self.uri, self.fs, self.path, self.src = root, uri, fs, path, src

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(f"{self.path}/{name}")

    def write(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.path}/{name}", data)

    def manifest(self) -> dict[str, Any]:
        return long_form(json.loads(self.read(MANIFEST)))

    def data_file(self, kind: str) -> str:
        """The model or optimizer data file's name (unique per save attempt)."""
        return resumer.read_manifest(self.uri).data_file(kind)

    @property
    def model_file(self) -> str:
        return self.data_file("model")

    @property
    def optimizer_file(self) -> str:
        return self.data_file("optimizer")

    def write_manifest(self, raw: dict[str, Any]) -> None:
        self.write(MANIFEST, json.dumps(raw, indent=1).encode())

    def files(self) -> set[str]:
        """Every file under the root (relative names): nothing may be deleted or renamed by a refusal."""
        root_path = self.path.rsplit("/", 1)[0]
        # A reader may add a quarantine mark beside a bad checkpoint; it never removes or changes a file.
        return {p[len(root_path):] for p in self.fs.find(root_path) if not p.endswith("/" + QUARANTINE)}


@pytest.fixture
def saved(root, trained, fs_of) -> Saved:
    src = trained(seed=0, steps=3)
    uri = resumer.save_checkpoint(root, 2, src.model, src.optimizer, src.scheduler)
    fs, path = fs_of(uri)
    return Saved(root, uri, fs, path, src)


@pytest.fixture
def dst(trained):
    """The live objects a refused resume must not touch: trained too, so the optimizer has state."""
    return trained(seed=5, steps=1)


@pytest.fixture
def refuses(dst, snapshot, assert_unchanged, saved) -> Callable[..., str]:
    """``refuses(target, *fragments, plan_too=False)``: resume (and optionally plan) raise CheckpointError whose
    message holds every fragment; nothing changed and no file vanished. Returns the message."""

    def check(target: str, *fragments: str, plan_too: bool = False) -> str:
        before, files = snapshot(dst), saved.files()
        calls = [lambda: resumer.resume(target, dst.model, dst.optimizer, dst.scheduler)]
        if plan_too:
            calls.append(lambda: resumer.plan(target, dst.model, dst.optimizer, dst.scheduler))
        message = ""
        for call in calls:
            with pytest.raises(resumer.CheckpointError) as info:
                call()
            message = str(info.value)
            for fragment in fragments:
                assert fragment in message, f"{fragment!r} not in: {message}"
            assert_unchanged(dst, before)
            assert saved.files() == files
        return message

    return check


# --- torn: data without a manifest ---------------------------------------------------------------------------


def test_torn_checkpoint_is_refused_by_uri_and_by_root(saved, refuses):
    data_files = [saved.model_file, saved.optimizer_file]
    saved.fs.rm(f"{saved.path}/{MANIFEST}")
    refuses(saved.uri, saved.uri, "no manifest.json", "torn checkpoint", "Nothing was loaded or deleted",
            plan_too=True)
    refuses(saved.root, saved.root, "no committed, valid checkpoint", plan_too=True)
    assert resumer.list_checkpoints(saved.root) == []
    assert resumer.latest_checkpoint(saved.root) is None
    for name in data_files:
        assert saved.fs.exists(f"{saved.path}/{name}")


# --- damaged data files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["model", "optimizer"])
def test_truncated_tensor_file_is_refused(saved, refuses, kind):
    name = saved.data_file(kind)
    data = saved.read(name)
    saved.write(name, data[:-10])
    refuses(saved.uri, f"{saved.uri}/{name}", f"has {len(data) - 10} bytes, the manifest says {len(data)}",
            "truncated", "Nothing was loaded")


def test_one_flipped_byte_fails_the_checksum(saved, refuses):
    data = bytearray(saved.read(saved.model_file))
    data[-3] ^= 0x10  # inside the last tensor's bytes: the header and the size still check out
    saved.write(saved.model_file, bytes(data))
    refuses(saved.uri, f"{saved.uri}/{saved.model_file}", "fails its checksum", "Nothing was loaded")


def _xxh(data: bytes) -> str:
    return f"xxh3_128:{xxhash.xxh3_128_hexdigest(data)}"


def _rewrite_model_file(saved: Saved, new: bytes, offset_delta: int) -> None:
    """Replace model.safetensors and fix the manifest (size, checksum, tensor offsets) so it agrees with it."""
    raw = saved.manifest()
    (entry,) = [f for f in raw["files"] if f["path"] == saved.model_file]
    assert entry["checksum"] == _xxh(saved.read(saved.model_file))  # the fix-up below computes it the same way
    entry["size"], entry["checksum"] = len(new), _xxh(new)
    for loc in raw["tensors"].values():
        loc["offset"] += offset_delta
    saved.write(saved.model_file, new)
    saved.write_manifest(raw)
    resumer.read_manifest(saved.uri)  # the manifest alone is consistent: only the header check can object


def test_header_offsets_past_the_end_of_the_file(saved, refuses):
    data = saved.read(saved.model_file)
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    b, e = header["3.bias"]["data_offsets"]
    header["3.bias"]["data_offsets"] = [b + len(body), e + len(body)]  # same length, starting past the end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    _rewrite_model_file(saved, struct.pack("<Q", len(raw)) + raw + body, offset_delta=len(raw) - n)
    refuses(saved.uri, f"{saved.uri}/{saved.model_file} is not a valid safetensors file", "'3.bias'",
            "past the end of the file", "corrupt")


def test_header_length_past_the_end_of_the_file(saved, refuses):
    data = saved.read(saved.model_file)
    _rewrite_model_file(saved, struct.pack("<Q", len(data)) + data[8:], offset_delta=0)
    refuses(saved.uri, "is not a valid safetensors file", f"header length {len(data)} does not fit")


# --- malformed manifests ---------------------------------------------------------------------------------------


def _without(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        del raw[key]

    return edit


MALFORMED = {
    "not JSON": (lambda raw: b'{"format": "resumer-checkpoint", "step": ', ["not JSON"]),
    "a JSON list": (lambda raw: [raw], ["not a resumer-checkpoint manifest"]),
    "no files": (_without("files"), ["missing or wrong field", "'files'"]),
    "no signature": (_without("signature"), ["missing or wrong field", "'signature'"]),
    "no step": (_without("step"), ["missing or wrong field", "'step'"]),
    "no tensors": (_without("tensors"), ["missing or wrong field", "'tensors'"]),
    "wrong format tag": (lambda raw: raw.update(format="torch-checkpoint"), ["not a resumer-checkpoint manifest"]),
    "no format tag": (_without("format"), ["not a resumer-checkpoint manifest"]),
    "step is text": (lambda raw: raw.update(step="two"), ["malformed"]),
    "overlapping tensors": (lambda raw: _overlap(raw["tensors"]), ["malformed", "overlap in"]),
    "overlapping optimizer state": (lambda raw: _overlap(raw["optimizer"]["tensors"]), ["malformed", "overlap in"]),
}


def _overlap(locations: dict[str, Any]) -> None:
    """Point the second-largest entry's bytes into the largest one's (same file, inside its size)."""
    first, second = sorted(locations.values(), key=lambda loc: -loc["nbytes"])[:2]
    second["file"] = first["file"]
    second["offset"] = first["offset"]


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_manifest_is_refused(saved, refuses, kind):
    edit, fragments = MALFORMED[kind]
    raw = saved.manifest()
    replaced = edit(raw)
    if isinstance(replaced, bytes):
        saved.write(MANIFEST, replaced)
    elif isinstance(replaced, list):
        saved.write(MANIFEST, json.dumps(replaced).encode())
    else:
        saved.write_manifest(raw)
    refuses(saved.uri, f"{saved.uri}/{MANIFEST} is malformed", *fragments, "nothing was loaded or deleted",
            plan_too=True)
    assert resumer.list_checkpoints(saved.root) == []


# Values inside a well-formed manifest that are only decoded while applying. A bad one must still be refused
# BEFORE the model is touched (apply.py promises "a bad checkpoint changes nothing").
LATE_VALUES = {
    "rng": (lambda raw: raw["rng"].update(torch="AAAA"), "RNG state"),
    "scheduler": (lambda raw: raw["scheduler"].update(state={"__resumer__": "bogus"}), "scheduler"),
    "extra": (lambda raw: raw.update(extra={"__resumer__": "bogus"}), "extra"),
    "hyperparameters": (lambda raw: raw["signature"]["optimizer"]["groups"][0]["hyperparams"].update(
        lr={"__resumer__": "bogus"}), "the saved optimizer param group 0 in the manifest is malformed"),
    "optimizer scalars": (lambda raw: raw["optimizer"]["scalars"].update({"0.weight": {"k": {"__resumer__": "x"}}}),
                          "the saved optimizer state in the manifest is malformed"),
}


@pytest.mark.parametrize("kind", list(LATE_VALUES))
def test_bad_values_in_a_manifest_are_refused_before_anything_changes(saved, refuses, kind):
    edit, fragment = LATE_VALUES[kind]
    raw = saved.manifest()
    edit(raw)
    saved.write_manifest(raw)
    resumer.read_manifest(saved.uri)  # it parses: only decoding the value can object
    refuses(saved.uri, saved.uri, fragment)


def _outside_names(saved: Saved) -> list[str]:
    root_path = saved.path.rsplit("/", 1)[0]
    return ["../x.safetensors", f"{root_path}/elsewhere/x.safetensors", "sub/../../x.safetensors"]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["dot-dot", "absolute", "nested-dot-dot"])
def test_manifest_naming_a_file_outside_its_directory_is_refused(saved, refuses, which):
    bad = _outside_names(saved)[which]
    # Put a perfectly good copy where the name points, so following it would "work": only refusing passes.
    root_path = saved.path.rsplit("/", 1)[0]
    saved.fs.makedirs(f"{root_path}/elsewhere", exist_ok=True)
    for target in (f"{root_path}/x.safetensors", f"{root_path}/elsewhere/x.safetensors"):
        saved.fs.pipe_file(target, saved.read(saved.model_file))
    raw = saved.manifest()
    for f in raw["files"]:
        if f["path"] == saved.model_file:
            f["path"] = bad
    for loc in raw["tensors"].values():
        loc["file"] = bad
    saved.write_manifest(raw)
    refuses(saved.uri, "is malformed", repr(bad), "path traversal refused", plan_too=True)


# --- falling back past a bad newest checkpoint ----------------------------------------------------------------


def _tear(s: Saved) -> None:
    s.fs.rm(f"{s.path}/{MANIFEST}")


def _truncate(s: Saved) -> None:
    s.write(s.optimizer_file, s.read(s.optimizer_file)[:-1])


def _flip(s: Saved) -> None:
    data = bytearray(s.read(s.model_file))
    data[-1] ^= 0x01
    s.write(s.model_file, bytes(data))


def _garble_manifest(s: Saved) -> None:
    s.write(MANIFEST, s.read(MANIFEST)[:-20])


def _flip_optimizer(s: Saved) -> None:
    data = bytearray(s.read(s.optimizer_file))
    data[len(data) // 2] ^= 0x01
    s.write(s.optimizer_file, bytes(data))


@pytest.mark.parametrize("select_first", [True, False], ids=["selected-first", "resume-alone"])
@pytest.mark.parametrize("damage", [_tear, _truncate, _flip, _flip_optimizer, _garble_manifest],
                         ids=["torn", "truncated", "flipped-byte", "flipped-optimizer-byte", "malformed-manifest"])
def test_root_falls_back_to_the_older_valid_checkpoint(saved, trained, make_trainee, snapshot, assert_same_tree,
                                                       damage, select_first):
    older = trained(seed=11, steps=2)
    old_uri = resumer.save_checkpoint(saved.root, 1, older.model, older.optimizer, older.scheduler)
    files = saved.files()
    damage(saved)
    if select_first:  # selection verifies every byte, and marks what it passes over
        latest = resumer.latest_checkpoint(saved.root)
        assert latest is not None
        assert (latest.step, latest.uri) == (1, old_uri)

    dst = make_trainee(seed=7)
    # Alone, resume checks the checksums as it reads the newest, and falls back before touching dst.
    res = resumer.resume(saved.root, dst.model, dst.optimizer, dst.scheduler)
    assert (res.step, res.checkpoint) == (1, old_uri)
    if damage is not _tear:
        assert saved.fs.exists(f"{saved.path}/{QUARANTINE}")  # marked, with the reason, for the next reader
        assert resumer.latest_checkpoint(saved.root).uri == old_uri
    assert_same_tree(snapshot(older).model, snapshot(dst).model, "model")
    assert_same_tree(snapshot(older).optimizer, snapshot(dst).optimizer, "optimizer")
    # The bad checkpoint was skipped, not deleted (only the manifest we removed ourselves is gone).
    removed = {f"/{saved.path.rsplit('/', 1)[1]}/{MANIFEST}"} if damage is _tear else set()
    assert saved.files() == files - removed


# --- foreign files that would run code when unpickled ----------------------------------------------------------


def test_the_payload_is_live(tmp_path):
    """Control: plain unpickling really does run it, so the tests below would notice if resumer did."""
    marker = tmp_path / "CONTROL"
    pickle.loads(pickle.dumps(Payload(str(marker))))  # noqa: S301 - the point of the test
    assert marker.exists()


def _evil_bytes(how: str, marker: str, model_sd: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    if how == "pickle":
        pickle.dump(Payload(marker), buf, protocol=2)
    elif how == "torch-legacy":
        torch.save({"model_state_dict": model_sd, "epoch": 3, "hook": Payload(marker)}, buf,
                   _use_new_zipfile_serialization=False)
    else:
        torch.save({"model_state_dict": model_sd, "epoch": 3, "hook": Payload(marker)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("how", ["torch-zip", "torch-legacy", "pickle"])
def test_pickle_that_would_run_code_is_refused(root, fs_of, dst, snapshot, assert_unchanged, tmp_path, how):
    marker = tmp_path / "MARKER"
    fs, path = fs_of(root)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/evil.pt", _evil_bytes(how, str(marker), dst.model.state_dict()))
    target = f"{root.rstrip('/')}/evil.pt"
    before = snapshot(dst)
    for call in (lambda: resumer.resume(target, dst.model, dst.optimizer, dst.scheduler),
                 lambda: resumer.resume(target, dst.model),
                 lambda: resumer.plan(target, dst.model, dst.optimizer, dst.scheduler)):
        with pytest.raises(resumer.CheckpointError) as info:
            call()
        message = str(info.value)
        assert "Refused" in message
        assert target in message
        assert "can run code" in message
        assert "weights_only=True" in message
        assert f"GLOBAL {os.system.__module__}.system" in message  # what the file would have called
        assert "Re-save it with tensors and plain values only" in message  # the fix, both ways
        assert message.endswith(", or save with resumer.save_checkpoint.")
        assert info.value.uri == target
        assert not marker.exists(), "unpickling ran the payload"
        assert_unchanged(dst, before)
    assert fs.exists(f"{path}/evil.pt")


def test_a_header_read_cut_short_is_a_checkpoint_error() -> None:
    """A stream that ends before the 8-byte length or the header itself (a file truncated under a reader)."""
    from resumer.core.errors import CheckpointError
    from resumer.formats.native.safetensors_io import read_header

    for data in (b"\x10\x00\x00", b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":"):
        with pytest.raises(CheckpointError, match="ended early"):
            read_header(io.BytesIO(data), 1000, "mem://x/model.safetensors")
