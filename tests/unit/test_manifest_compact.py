"""Format v2: the compact manifest. Small per tensor, read into exactly what the long form (v1) reads into, every
index in it checked; checkpoints written in format v1 keep loading. Each field of either form is checked on read: a
wrong one is refused with a CheckpointError that names it, an absent optional one takes its default, and what
``dumps`` writes reads back exactly (locations, shapes, dtypes, checksums, optimizer layout, free-form sections)."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import pytest
import torch
from torch import nn

import resumer
from resumer.core.errors import CheckpointError
from resumer.formats.native.compact import EXPANDED_PER_BYTE, MIN_EXPANDED
from resumer.formats.native.manifest import FORMAT, FORMAT_VERSION, MANIFEST, dumps, long_form, parse


def _trained(seed: int = 0, blocks: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(blocks)),
                          nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def _raw(uri: str) -> dict[str, Any]:
    with open(os.path.join(uri, MANIFEST), "rb") as f:
        return json.load(f)


def _write(uri: str, raw: dict[str, Any], *, indent: int | None = None) -> None:
    with open(os.path.join(uri, MANIFEST), "w") as f:
        json.dump(raw, f, indent=indent)


def test_a_save_writes_the_compact_form_and_reads_back_what_the_long_form_says(tmp_path):
    model, opt = _trained()
    uri = resumer.save_checkpoint(str(tmp_path), 1, model, opt)
    raw = _raw(uri)
    assert raw["version"] == FORMAT_VERSION == 2 and isinstance(raw["tensors"], list) and "dtypes" in raw
    compact = resumer.read_manifest(uri)
    long = parse(json.dumps(long_form(_raw(uri))).encode(), uri)
    assert compact.signature == long.signature
    assert compact.tensors == long.tensors and compact.optimizer_tensors == long.optimizer_tensors
    assert compact.files == long.files and compact.optimizer_scalars == long.optimizer_scalars
    assert set(compact.optimizer_tensors) == {f"{n}/{k}" for n, _ in model.named_parameters()
                                              for k in ("step", "exp_avg", "exp_avg_sq")}


def test_the_manifest_costs_at_most_150_bytes_per_stored_tensor(tmp_path):
    model, opt = _trained(blocks=100)
    uri = resumer.save_checkpoint(str(tmp_path), 1, model, opt)
    stored = len(model.state_dict()) + sum(len(s) for s in opt.state.values())
    size = os.path.getsize(os.path.join(uri, MANIFEST))
    assert size / stored <= 150, f"{size / stored:.0f} bytes per tensor"
    v1 = len(json.dumps({**long_form(_raw(uri)), "version": 1}, indent=1))
    assert size * 5 < v1  # what format v1 wrote for the same checkpoint


def test_a_format_v1_checkpoint_still_resumes_bitwise(tmp_path):
    model, opt = _trained()
    uri = resumer.save_checkpoint(str(tmp_path), 1, model, opt)
    # Format v1's writer: the long form, version 1, indented JSON.
    _write(uri, {**long_form(_raw(uri)), "version": 1}, indent=1)
    assert isinstance(_raw(uri)["tensors"], dict)
    fresh, fresh_opt = _trained(seed=1)
    assert resumer.plan(uri, fresh, fresh_opt).ok
    resumer.resume(uri, fresh, fresh_opt)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key, value in opt.state[p].items():
            assert torch.equal(value, fresh_opt.state[q][key]), key


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def edit(raw: dict[str, Any]) -> None:
        obj = raw
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return edit


def _amplify(raw: dict[str, Any]) -> None:
    """One layout of 2,000 non-tensor entries, named by 20,000 rows: 40 million entries from about 200 KB."""
    opt = raw["signature"]["optimizer"]
    opt["layouts"].append([["x", None, None]] * 2000)
    opt["state"] += [["p", len(opt["layouts"]) - 1]] * 20_000


HOSTILE = {
    "dtype index past the table": (_set(("signature", "tensors", 0, 2), 7), "signature tensor 0 dtype"),
    "file index past the table": (_set(("tensors", 0, 0), 9), "file is 9, outside 0..1"),
    "offset past the file": (_set(("tensors", 0, 1), 10**9), "lies outside"),
    "boolean offset": (_set(("tensors", 0, 1), True), "offset is a boolean"),
    "one location too few": (lambda raw: raw["tensors"].pop(), "locations for"),
    "optimizer location too few": (lambda raw: raw["optimizer"]["tensors"].pop(), "fewer locations"),
    "optimizer location too many": (lambda raw: raw["optimizer"]["tensors"].append([1, 0]), "more locations"),
    "param index past the rows": (_set(("signature", "optimizer", "state", 0, 0), 10**6), "optimizer state 0 param"),
    "layout index past the table": (_set(("signature", "optimizer", "state", 0, 1), 99), "optimizer state 0 layout"),
    "parameter's shape without a parameter": (_set(("signature", "optimizer", "state", 0, 0), "ghost"),
                                              "takes its parameter's shape"),
    "row is text": (_set(("signature", "tensors", 0), "0.0.weight"), "not a list of 3 to 5 fields"),
    "boolean dimension": (_set(("signature", "tensors", 0, 1), [True, 4]), "is a boolean, not an integer"),
    "two tensors on one byte range": (lambda raw: raw["tensors"][1].__setitem__(1, raw["tensors"][0][1]), "overlap"),
    "a small table repeated without bound": (_amplify, "expands to more than"),
    "dtypes is not a list": (_set(("dtypes",), "float32"), "'dtypes' is a string"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_compact_manifest_is_refused_and_changes_nothing(tmp_path, kind):
    model, opt = _trained()
    root = str(tmp_path / "ckpts")
    good = resumer.save_checkpoint(root, 1, model, opt)
    bad = resumer.save_checkpoint(root, 2, model, opt)
    edit, fragment = HOSTILE[kind]
    raw = _raw(bad)
    edit(raw)
    _write(bad, raw)
    with pytest.raises(resumer.CheckpointError) as info:
        resumer.read_manifest(bad)
    assert f"{bad}/{MANIFEST} is malformed" in str(info.value) and fragment in str(info.value)
    fresh, fresh_opt = _trained(seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(resumer.CheckpointError):
        resumer.resume(bad, fresh, fresh_opt)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert resumer.resume(root, fresh, fresh_opt).checkpoint == good  # the root falls back past it


# --- each field, by hand-built manifests: what a wrong one is refused for, and what a written one reads back as ---

URI = "/ckpts/step-0000000003"
MODEL, OPTIM = "model.a.safetensors", "optimizer.a.safetensors"
SUM = "0123456789abcdef"


def _long() -> dict[str, Any]:
    """A small long-form manifest: two model tensors, SGD momentum for one of them, every section filled."""
    def loc(file: str, offset: int, shape: list[int], **more: Any) -> dict[str, Any]:
        n = 1
        for d in shape:
            n *= d
        return {"file": file, "offset": offset, "nbytes": 4 * n, "dtype": "float32", "shape": shape, **more}

    return {
        "format": FORMAT, "version": 2, "step": 3, "time": "2026-01-01T00:00:00Z",
        "files": [{"path": MODEL, "size": 64, "checksum": "m"}, {"path": OPTIM, "size": 64, "checksum": "o"}],
        "signature": {
            "tensors": [{"name": "w", "shape": [2, 2], "dtype": "float32", "kind": "parameter"},
                        {"name": "b", "shape": [2], "dtype": "float32", "kind": "parameter"}],
            "optimizer": {"cls": "torch.optim.SGD", "groups": [{"params": ["w", "b"], "hyperparams": {"lr": 0.1}}],
                          "state": [{"param": "w", "entries": [
                              {"key": "momentum_buffer", "shape": [2, 2], "dtype": "float32"},
                              {"key": "step", "shape": None, "dtype": None}]}]},
            "scheduler": {"cls": "torch.optim.lr_scheduler.StepLR", "num_groups": 1},
            "step": 3, "rng": ["torch"], "world_size": 2, "notes": ["n"]},
        "tensors": {"w": loc(MODEL, 0, [2, 2], checksum=SUM), "b": loc(MODEL, 16, [2])},
        "optimizer": {"tensors": {"w/momentum_buffer": loc(OPTIM, 0, [2, 2], checksum="fedcba9876543210")},
                      "scalars": {"w": {"step": 1}}},
        "scheduler": {"state": {"last_epoch": 3}},
        "code": {"git": "abc123"}, "extra": {"note": "hi"}, "world": {"size": 2}, "rng": {"torch": "state"},
    }


def _bytes(raw: dict[str, Any]) -> bytes:
    return json.dumps(raw).encode()


def _refused(data: bytes, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        parse(data, URI)
    text = str(info.value)
    assert info.value.uri == URI and f"{URI}/{MANIFEST} is malformed" in text
    for fragment in fragments:
        assert fragment in text, text
    return text


def test_a_written_manifest_reads_back_exactly_in_both_forms():
    long = parse(_bytes(_long()), URI)
    data = dumps(_long())
    assert b'"dtypes"' in data  # the compact form
    short = parse(data, URI)
    for m in (long, short):
        assert m.step == 3 and m.time == "2026-01-01T00:00:00Z"
        assert m.signature.world_size == 2 and m.signature.step == 3 and m.signature.notes == ("n",)
        assert m.code == {"git": "abc123"} and m.extra == {"note": "hi"} and m.rng == {"torch": "state"}
        assert m.scheduler_state == {"last_epoch": 3} and m.optimizer_scalars == {"w": {"step": 1}}
        assert m.piece_checksums == {"w": SUM, "w/momentum_buffer": "fedcba9876543210"}
        assert m.tensors["b"].offset == 16 and m.optimizer_tensors["w/momentum_buffer"].file == OPTIM
    assert short.signature == long.signature
    assert short.tensors == long.tensors and short.optimizer_tensors == long.optimizer_tensors
    assert short.files == long.files and short.code == long.code


def test_an_absent_optimizer_state_list_is_no_state_in_both_forms():
    raw = _long()
    del raw["signature"]["optimizer"]["state"]
    raw["optimizer"]["tensors"] = {}
    assert parse(_bytes(raw), URI).signature.optimizer.state == ()
    short = json.loads(dumps(_long()))
    del short["signature"]["optimizer"]["state"], short["signature"]["optimizer"]["layouts"]
    short["optimizer"]["tensors"] = []
    m = parse(_bytes(short), URI)
    assert m.signature.optimizer.state == () and m.signature.optimizer.groups[0].params == ("w", "b")


def _edit(path: tuple[Any, ...], value: Any = None, *, delete: bool = False) -> dict[str, Any]:
    raw = _long()
    obj = raw
    for key in path[:-1]:
        obj = obj[key]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return raw


LONG = {
    "too many dimensions": (("signature", "tensors", 0, "shape"), [1] * 65,
                            "signature tensor 0 'shape' has 65 dimensions (at most 64)"),
    "tensor without a name": (("signature", "tensors", 0, "name"), None, "'name' missing in signature tensor 0"),
    "state entry shape is text": (("signature", "optimizer", "state", 0, "entries", 0, "shape"), "22",
                                  "optimizer state 0 entry 0 'shape' is a string, not a list"),
    "world size is text": (("signature", "world_size"), "two", "signature 'world_size' is a string"),
    "file without a path": (("files", 0, "path"), None, "'path' missing in file 0"),
    "tensor file is a number": (("tensors", "w", "file"), 5, "tensor 'w' 'file' is a number, not a string"),
    "tensor nbytes is text": (("tensors", "w", "nbytes"), "16", "tensor 'w' 'nbytes' is a string, not an integer"),
    "time is a number": (("time",), 5, "'time' is a number, not a string"),
    "scheduler is a list": (("scheduler",), [1], "'scheduler' is a list, not an object"),
    "no tensors": (("tensors",), None, "'tensors' missing in the manifest"),
}


@pytest.mark.parametrize("kind", list(LONG))
def test_a_wrong_long_form_field_is_refused_by_name(kind):
    path, value, fragment = LONG[kind]
    _refused(_bytes(_edit(path, value, delete=value is None)), fragment)


def test_an_unsafe_file_name_is_quoted_at_most_300_characters():
    name = "../" + "a" * 500
    text = _refused(_bytes(_edit(("files", 0, "path"), name)), "path traversal refused")
    assert f"file name {name[:300]!r} is not a plain name" in text


def _compact_raw() -> dict[str, Any]:
    return json.loads(dumps(_long()))


def _cedit(edit: Any) -> bytes:
    raw = _compact_raw()
    edit(raw)
    return _bytes(raw)


def _layout(raw: dict[str, Any]) -> list[Any]:
    return raw["signature"]["optimizer"]["layouts"]


COMPACT = {
    "no signature": (lambda raw: raw.pop("signature"), "'signature' missing in the manifest"),
    "world size is text": (lambda raw: raw["signature"].__setitem__("world_size", "two"),
                           "signature 'world_size' is a string"),
    "chunk row is a number": (lambda raw: raw["tensors"].__setitem__(0, [[0, 0, [0, 0], [1, 2]], 5]),
                              "tensor 'w' chunk 1 is a number, not a list of 4 or 5 fields"),
    "file index past the table": (lambda raw: raw["tensors"][0].__setitem__(0, 9),
                                  "tensor 'w' file is 9, outside 0..1"),
    "negative offset": (lambda raw: raw["tensors"][1].__setitem__(1, -1), "tensor 'b' offset is -1, outside"),
    "group param index past the rows": (
        lambda raw: raw["signature"]["optimizer"]["groups"][0]["params"].__setitem__(1, 99),
        "optimizer group 0 param 1 is 99, outside 0..1"),
    "layouts is text": (lambda raw: raw["signature"]["optimizer"].__setitem__("layouts", "x"),
                        "optimizer 'layouts' is a string, not a list"),
    "layout entry is text": (lambda raw: _layout(raw)[0].__setitem__(0, "momentum_buffer"),
                             "optimizer layout 0 entry 0 is a string, not a list"),
    "tensor entry without a dtype": (lambda raw: _layout(raw)[0][0].__setitem__(2, None),
                                     "optimizer layout 0 entry 0 is a tensor without a dtype"),
}


@pytest.mark.parametrize("kind", list(COMPACT))
def test_a_wrong_compact_field_is_refused_by_name(kind):
    edit, fragment = COMPACT[kind]
    _refused(_cedit(edit), fragment)


def test_the_entry_allowance_grows_with_the_manifest_bytes():
    """A compact manifest may expand to MIN_EXPANDED entries, and to 1 more per EXPANDED_PER_BYTE bytes of it."""
    raw = _compact_raw()
    opt = raw["signature"]["optimizer"]
    width = 1000
    opt["layouts"].append([["x", None, None]] * width)
    rows = MIN_EXPANDED // (width + 1) + 1  # just past MIN_EXPANDED entries: its bytes must pay for the rest
    opt["state"] += [["p", len(opt["layouts"]) - 1]] * rows
    data = _bytes(raw)
    assert MIN_EXPANDED < rows * (width + 1) + 10 < MIN_EXPANDED + len(data) // EXPANDED_PER_BYTE
    assert len(parse(data, URI).signature.optimizer.state) == rows + 1
    bigger = copy.deepcopy(raw)
    bigger["signature"]["optimizer"]["state"] += [["p", len(opt["layouts"]) - 1]] * rows
    _refused(_bytes(bigger), "its optimizer state expands to more than")
