"""Format v2: the compact manifest. Small per tensor, read into exactly what the long form (v1) reads into, every
index in it checked; checkpoints written in format v1 keep loading."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from torch import nn

import resumer
from resumer.formats.native.manifest import FORMAT_VERSION, MANIFEST, long_form, parse


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
