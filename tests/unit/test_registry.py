"""The format registry: which format a location is (cheaply, without unpickling anything), the error when none
is, and that a new format is one reader plus one registry line, planned and resumed like any other."""

from __future__ import annotations

import io
import json
import logging
import pickle
from collections.abc import Callable
from typing import Any

import fsspec
import pytest
import torch
from torch import nn

import resumer
from resumer.core.errors import CheckpointError, UsageError
from resumer.core.signature import Signature, TensorSpec
from resumer.formats import registry
from resumer.formats.source import CheckpointSource, Probe, ReadOptions
from resumer.runtime.inspect import inspect_checkpoint
from resumer.storage.store import Store
from resumer.testing.hostile import Payload


def _torch_bytes(obj: Any, *, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


@pytest.fixture
def files(root: str, fs_of: Callable[[str], tuple[Any, str]]) -> Callable[[str, bytes], str]:
    """``files(name, data)`` writes a file under the root and returns its URI."""
    fs, path = fs_of(root)
    fs.makedirs(path, exist_ok=True)

    def write(name: str, data: bytes) -> str:
        fs.makedirs(f"{path}/{name}".rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(f"{path}/{name}", data)
        return f"{root.rstrip('/')}/{name}"

    return write


@pytest.fixture
def saved(root: str, trained: Callable[..., Any]) -> tuple[str, Any]:
    t = trained(seed=0, steps=3)
    return resumer.save_checkpoint(root, 3, t.model, t.optimizer, t.scheduler), t


def test_each_registered_format_is_detected(root: str, saved: tuple[str, Any], files: Callable[..., str]) -> None:
    uri, t = saved
    sd = t.model.state_dict()
    assert registry.detect(Store.open(uri)) == "native"
    assert registry.detect(Store.open(f"{uri}/manifest.json")) == "native"
    assert registry.detect(Store.open(files("zip.pt", _torch_bytes({"model_state_dict": sd})))) == "torch-save"
    assert registry.detect(Store.open(files("legacy.pt", _torch_bytes(sd, legacy=True)))) == "torch-save"
    # The two bytes that open a pickle (PROTO, protocol 2..5) are enough: torch-save's reader then says what is wrong.
    assert registry.detect(Store.open(files("cut.pt", _torch_bytes(sd, legacy=True)[:2]))) == "torch-save"
    # Not a checkpoint of any format: a root (selection's business), nothing at all, text, a safetensors file, a
    # zip that is not torch.save's, the data file of a native checkpoint.
    assert registry.detect(Store.open(root)) is None
    assert registry.detect(Store.open(f"{root}/absent.pt")) is None
    assert registry.detect(Store.open(files("notes.txt", b"PK? no: plain text"))) is None
    assert registry.detect(Store.open(files("odd.bin", b"\x80\x09 a byte that opens pickles, no protocol"))) is None
    buf = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "hello")
    assert registry.detect(Store.open(files("other.zip", buf.getvalue()))) is None
    model_file = resumer.read_manifest(uri).data_file("model")
    assert registry.detect(Store.open(f"{uri}/{model_file}")) is None


def test_detection_reads_a_few_bytes_and_never_unpickles(files: Callable[..., str], tmp_path: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "MARKER"
    big = {"model_state_dict": {"w": torch.zeros(64, 1024)}, "hook": Payload(str(marker))}
    uri = files("evil.pt", _torch_bytes(big))
    read: list[int | None] = []
    real = Store.read

    def counting(self: Store, *parts: str, limit: int | None = None) -> bytes:
        read.append(limit)
        return real(self, *parts, limit=limit)

    monkeypatch.setattr(Store, "read", counting)
    assert registry.detect(Store.open(uri)) == "torch-save"
    assert read == [512]  # one small read of the file's start, shared by every format tried
    assert not marker.exists()


@pytest.mark.parametrize("how", ["torch-zip", "torch-legacy", "pickle"])
def test_a_hostile_pickle_is_refused_with_nothing_run(files: Callable[..., str], tmp_path: Any, how: str) -> None:
    marker = tmp_path / "MARKER"
    evil = {"model_state_dict": {"w": torch.ones(2)}, "hook": Payload(str(marker))}
    data = (pickle.dumps(Payload(str(marker)), protocol=2) if how == "pickle"
            else _torch_bytes(evil, legacy=how == "torch-legacy"))
    uri = files("evil.pt", data)
    with pytest.raises(CheckpointError, match="can run code") as info:
        registry.open(Store.open(uri))
    assert "weights_only=True" in str(info.value)
    with pytest.raises(CheckpointError, match="can run code"):
        inspect_checkpoint(uri)
    assert not marker.exists(), "unpickling ran the payload"


def test_no_format_matched_says_what_was_tried_and_what_to_pass(root: str, files: Callable[..., str]) -> None:
    uri = files("weights.npy", b"\x93NUMPY not a checkpoint")
    for call in (lambda: resumer.plan(uri, nn.Linear(2, 2)), lambda: resumer.resume(uri, nn.Linear(2, 2)),
                 lambda: registry.open(Store.open(uri)), lambda: inspect_checkpoint(uri)):
        with pytest.raises(CheckpointError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"Cannot read {uri}: it is not a checkpoint of any known format. Tried: ")
        for fmt in registry.KNOWN_FORMATS.values():
            assert f"{fmt.name} ({fmt.description})" in message
        assert "Pass one of these, or a root directory of resumer checkpoints. Nothing was loaded." in message
        assert info.value.uri == uri
    # A directory that is neither a checkpoint nor a root of them says so too.
    odd = files("odd/readme.txt", b"hello").rsplit("/", 1)[0]
    with pytest.raises(CheckpointError, match=r"no root of resumer checkpoints \(no step-N directory under it\)"
                                              r"\. Tried: native \("):
        resumer.plan(odd, nn.Linear(2, 2))


def test_plan_resume_and_inspect_take_every_form(root: str, saved: tuple[str, Any], files: Callable[..., str],
                                                 make_trainee: Callable[..., Any]) -> None:
    uri, t = saved
    torch_file = files("plain.pt", _torch_bytes({"model_state_dict": t.model.state_dict(),
                                                 "optimizer_state_dict": t.optimizer.state_dict(), "step": 3}))
    forms = {root: "native", uri: "native", f"{uri}/manifest.json": "native", torch_file: "torch-save"}
    for target, fmt in forms.items():
        fresh = make_trainee(seed=9)
        assert resumer.plan(target, fresh.model, fresh.optimizer).ok, target
        res = resumer.resume(target, fresh.model, fresh.optimizer)
        assert res.step == 3, target
        assert res.checkpoint == (torch_file if fmt == "torch-save" else uri), target
        for name, value in t.model.state_dict().items():
            assert torch.equal(fresh.model.state_dict()[name], value), (target, name)
        info = inspect_checkpoint(target)
        assert (info["format"], info["step"], info["tensors"]) == (fmt, 3, len(t.model.state_dict())), target
        assert info["kind"] == ("resumer" if fmt == "native" else "torch.save"), target


# --- a new format is one reader module and one registry line ----------------------------------------------


class JsonWeights(CheckpointSource):
    """A toy format (a JSON file of float32 weights): it implements only what it reads."""

    format = "json-weights"

    def __init__(self, store: Store) -> None:
        raw = json.loads(store.read())
        self.uri = store.uri
        self._tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in raw["tensors"].items()}
        self.signature = Signature(tensors=tuple(TensorSpec(name=k, shape=tuple(v.shape), dtype="float32")
                                                 for k, v in self._tensors.items()), step=raw["step"])

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]


class JsonWeightsReader:
    def detect(self, probe: Probe) -> bool:
        return probe.kind == "file" and probe.name.endswith(".weights.json")

    def open(self, store: Store, options: ReadOptions) -> CheckpointSource:
        return JsonWeights(store)


READER = JsonWeightsReader()


def test_a_new_format_plugs_in_with_one_registry_line(files: Callable[..., str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    entry = registry.Format(name="json-weights", reader=f"{__name__}:READER", description="a .weights.json file")
    monkeypatch.setattr(registry, "KNOWN_FORMATS", {**registry.KNOWN_FORMATS, entry.name: entry})
    uri = files("tiny.weights.json", json.dumps({"step": 7, "tensors": {"weight": [[1.0, 2.0], [3.0, 4.0]],
                                                                         "bias": [0.5, -0.5]}}).encode())
    model = nn.Linear(2, 2)
    assert registry.detect(Store.open(uri)) == "json-weights"
    res = resumer.resume(uri, model)
    assert res.step == 7 and res.plan.ok
    assert torch.equal(model.weight.detach(), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert torch.equal(model.bias.detach(), torch.tensor([0.5, -0.5]))
    info = inspect_checkpoint(uri)
    assert (info["format"], info["kind"], info["verified"], info["rng"]) == ("json-weights", "json-weights", False, [])


def test_a_format_whose_package_is_missing_is_skipped_and_named_when_asked_for(
        files: Callable[..., str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    entry = registry.Format(name="nowhere", reader="resumer_no_such_module:READER",
                            description="a checkpoint only another package reads", package="no-such-package")
    monkeypatch.setattr(registry, "KNOWN_FORMATS", {entry.name: entry, **registry.KNOWN_FORMATS})
    sd = {"w": torch.ones(2)}
    uri = files("plain.pt", _torch_bytes(sd))
    with caplog.at_level(logging.DEBUG, logger="resumer"):
        assert registry.detect(Store.open(uri)) == "torch-save"  # the missing one is passed over, not fatal
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"[format] nowhere not tried for {uri}: ") for m in logged)  # with -v: why
    assert f"[format] {uri} is torch-save" in logged
    with pytest.raises(UsageError, match=r"needs no-such-package \(pip install no-such-package\)"):
        registry.open(Store.open(uri), format="nowhere")
    with pytest.raises(UsageError, match="Unknown checkpoint format 'nope'; known formats: nowhere, native"):
        registry.reader("nope")


def test_memory_and_local_stores_detect_alike() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/resumer-registry/a.pt", _torch_bytes({"w": torch.ones(1)}))
    try:
        assert registry.detect(Store.open("memory://resumer-registry/a.pt")) == "torch-save"
        assert registry.detect(Store.open("memory://resumer-registry")) is None
    finally:
        fs.rm("/resumer-registry", recursive=True)
