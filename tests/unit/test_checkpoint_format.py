"""The checkpoint format v1: save -> list -> resume round trips bit-exactly, on a local folder and memory://."""

from __future__ import annotations

import json
import random

import fsspec
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import resumer
from resumer.formats.native.entries import state_key
from resumer.formats.native.manifest import FORMAT_VERSION, MANIFEST, long_form
from resumer.runtime.inspect import inspect_checkpoint

MODEL_KEYS = ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
              "1.num_batches_tracked", "3.weight", "3.bias"]
PARAMS = ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]


def _file(uri: str, kind: str) -> str:
    return resumer.read_manifest(uri).data_file(kind)


def _read(fs_of, uri: str) -> bytes:
    fs, path = fs_of(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def _load_safetensors(fs_of, uri: str, tmp_path) -> dict[str, torch.Tensor]:
    """Load with the safetensors library itself (load_file needs a local file: copy it there first)."""
    local = tmp_path / uri.rsplit("/", 1)[-1]
    local.write_bytes(_read(fs_of, uri))
    return safetensors.torch.load_file(str(local))


def test_round_trip_is_bit_exact(root, trained, make_trainee, train, snapshot, assert_same_tree):
    src = trained(seed=0, steps=3)
    uri = resumer.save_checkpoint(root, 3, src.model, src.optimizer, src.scheduler, extra={"epoch": 1, "tag": "a"})
    saved = snapshot(src)
    # What a training loop would draw next from every RNG, right after saving.
    next_draws = (torch.rand(5), np.random.rand(3), random.random())

    dst = make_trainee(seed=7)
    assert not torch.equal(dst.model[0].weight, src.model[0].weight)  # the resume has something to do
    res = resumer.resume(root, dst.model, dst.optimizer, dst.scheduler)

    assert (res.step, res.checkpoint, res.extra) == (3, uri, {"epoch": 1, "tag": "a"})
    assert res.plan.ok
    after = snapshot(dst)
    assert_same_tree(saved.model, after.model, "model")
    assert list(after.model) == MODEL_KEYS
    assert after.model["1.num_batches_tracked"].dtype == torch.int64
    assert int(after.model["1.num_batches_tracked"]) == 3
    assert_same_tree(saved.optimizer, after.optimizer, "optimizer")  # Adam state, step, decayed lr
    assert dst.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert_same_tree(saved.scheduler, after.scheduler, "scheduler")
    torch.testing.assert_close(torch.rand(5), next_draws[0], rtol=0, atol=0)
    assert np.array_equal(np.random.rand(3), next_draws[1])
    assert random.random() == next_draws[2]

    # Training on from the checkpoint is bitwise the same as training on without stopping.
    assert train(src, 2, data_seed=99) == train(dst, 2, data_seed=99)
    assert_same_tree(snapshot(src).model, snapshot(dst).model, "model after 2 more steps")
    assert_same_tree(snapshot(src).optimizer, snapshot(dst).optimizer, "optimizer after 2 more steps")


def test_resume_from_the_checkpoint_uri_and_its_manifest_file(root, trained, make_trainee, snapshot, assert_same_tree):
    src = trained(seed=0)
    old = resumer.save_checkpoint(root, 1, src.model, src.optimizer, src.scheduler)
    trained_more = trained(seed=3)
    resumer.save_checkpoint(root, 2, trained_more.model, trained_more.optimizer, trained_more.scheduler)
    for target in (old, f"{old}/{MANIFEST}"):
        dst = make_trainee(seed=7)
        res = resumer.resume(target, dst.model, dst.optimizer, dst.scheduler)
        assert res.step == 1
        assert_same_tree(snapshot(src).model, snapshot(dst).model, target)


def test_list_checkpoints_newest_first_and_latest(root, trained):
    t = trained()
    uris = {step: resumer.save_checkpoint(root, step, t.model, t.optimizer, t.scheduler) for step in (1, 30, 7)}
    infos = resumer.list_checkpoints(root)
    assert [i.step for i in infos] == [30, 7, 1]
    assert [i.uri for i in infos] == [uris[30], uris[7], uris[1]]
    latest = resumer.latest_checkpoint(root)
    assert latest is not None
    assert (latest.step, latest.uri) == (30, uris[30])


def test_empty_or_missing_root_has_no_checkpoints(root):
    assert resumer.list_checkpoints(root) == []
    assert resumer.latest_checkpoint(root) is None


def test_directory_without_manifest_is_never_listed(root, trained, fs_of):
    t = trained()
    uri = resumer.save_checkpoint(root, 5, t.model, t.optimizer, t.scheduler)
    fs, path = fs_of(root)
    # A newer directory holding data but no manifest: a writer that stopped before committing.
    torn = f"{path}/step-0000000009"
    fs.makedirs(torn, exist_ok=True)
    fs.pipe_file(f"{torn}/model.abc.safetensors", _read(fs_of, f"{uri}/{_file(uri, 'model')}"))
    fs.makedirs(f"{path}/notes", exist_ok=True)  # and a directory that is not a step at all
    assert [i.step for i in resumer.list_checkpoints(root)] == [5]
    latest = resumer.latest_checkpoint(root)
    assert latest is not None
    assert latest.step == 5
    assert fs.exists(f"{torn}/model.abc.safetensors")  # skipped, not deleted


def test_saving_the_same_step_twice_is_refused(root, trained, fs_of):
    t = trained()
    uri = resumer.save_checkpoint(root, 4, t.model, t.optimizer, t.scheduler)
    manifest_before = _read(fs_of, f"{uri}/{MANIFEST}")
    with pytest.raises(resumer.CheckpointError, match="already committed") as info:
        resumer.save_checkpoint(root, 4, t.model, t.optimizer, t.scheduler)
    assert info.value.uri == uri
    assert uri in str(info.value)
    assert _read(fs_of, f"{uri}/{MANIFEST}") == manifest_before


def test_files_are_readable_by_the_safetensors_library(root, trained, fs_of, tmp_path):
    t = trained()
    uri = resumer.save_checkpoint(root, 3, t.model, t.optimizer, t.scheduler)
    model = _load_safetensors(fs_of, f"{uri}/{_file(uri, 'model')}", tmp_path)
    want = t.model.state_dict()
    assert sorted(model) == sorted(MODEL_KEYS)
    for name in MODEL_KEYS:
        assert model[name].dtype == want[name].dtype, name
        assert torch.equal(model[name], want[name]), name
    # Also from bytes (no file name involved), as a reader on object storage would.
    from_bytes = safetensors.torch.load(_read(fs_of, f"{uri}/{_file(uri, 'model')}"))
    assert all(torch.equal(from_bytes[n], want[n]) for n in MODEL_KEYS)


def test_optimizer_state_is_keyed_by_parameter_name(root, trained, fs_of, tmp_path):
    t = trained()
    uri = resumer.save_checkpoint(root, 3, t.model, t.optimizer, t.scheduler)
    assert state_key("0.weight", "exp_avg") == "0.weight/exp_avg"
    opt = _load_safetensors(fs_of, f"{uri}/{_file(uri, 'optimizer')}", tmp_path)
    assert sorted(opt) == sorted(state_key(p, k) for p in PARAMS for k in ("exp_avg", "exp_avg_sq", "step"))
    params = dict(t.model.named_parameters())
    for p in PARAMS:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt[state_key(p, key)], t.optimizer.state[params[p]][key]), (p, key)
    manifest = long_form(json.loads(_read(fs_of, f"{uri}/{MANIFEST}")))
    assert manifest["format"] == "resumer-checkpoint"
    assert manifest["version"] == FORMAT_VERSION == 2
    assert sorted(manifest["optimizer"]["tensors"]) == sorted(opt)
    paths = [f["path"] for f in manifest["files"]]
    assert [p.split(".")[0] for p in paths] == ["model", "optimizer"]
    assert len({p.split(".")[1] for p in paths}) == 1  # one token per save attempt


def test_optimizer_state_follows_names_when_parameter_order_differs(root, trained, make_model, assert_same_tree):
    """Saved with parameters in reverse order, resumed into the usual order: state lands on the same NAME."""
    src = trained()
    model = src.model
    rev = torch.optim.Adam(list(model.parameters())[::-1], lr=1e-2)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        rev.zero_grad()
        model(torch.randn(8, 4, generator=gen)).pow(2).mean().backward()
        rev.step()
    resumer.save_checkpoint(root, 2, model, rev)

    dst = make_model(seed=9)
    opt = torch.optim.Adam(dst.parameters(), lr=1e-2)
    assert resumer.resume(root, dst, opt).plan.ok
    src_params, dst_params = dict(model.named_parameters()), dict(dst.named_parameters())
    for name in PARAMS:
        assert_same_tree(rev.state[src_params[name]], opt.state[dst_params[name]], name)


def test_model_without_optimizer_round_trips(root, make_model, snapshot, make_trainee, assert_same_tree):
    src = make_trainee(seed=1)
    uri = resumer.save_checkpoint(root, 0, src.model)
    dst = make_model(seed=2)
    res = resumer.resume(uri, dst)
    assert res.step == 0
    assert_same_tree(snapshot(src).model, {k: v.detach().clone() for k, v in dst.state_dict().items()})


def test_bfloat16_round_trip(root, make_model, fs_of, tmp_path):
    src = make_model(seed=1).to(torch.bfloat16)
    with torch.no_grad():
        src[0].weight.mul_(3.3)  # values that do not survive a trip through float16
    uri = resumer.save_checkpoint(root, 1, src)
    stored = _load_safetensors(fs_of, f"{uri}/{_file(uri, 'model')}", tmp_path)
    assert stored["0.weight"].dtype == torch.bfloat16
    assert torch.equal(stored["0.weight"], src[0].weight)

    dst = make_model(seed=2).to(torch.bfloat16)
    resumer.resume(uri, dst)
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), name
    assert dst[1].num_batches_tracked.dtype == torch.int64


class TiedLM(nn.Module):
    """An embedding and an output head sharing one weight, as language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def test_tied_weights_are_stored_once(root, fs_of, tmp_path):
    torch.manual_seed(0)
    src = TiedLM()
    opt = torch.optim.Adam(src.parameters(), lr=1e-2)
    src(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    uri = resumer.save_checkpoint(root, 1, src, opt)

    stored = _load_safetensors(fs_of, f"{uri}/{_file(uri, 'model')}", tmp_path)
    assert list(stored) == ["embed.weight"]
    assert torch.equal(stored["embed.weight"], src.embed.weight)
    manifest = long_form(json.loads(_read(fs_of, f"{uri}/{MANIFEST}")))
    assert list(manifest["tensors"]) == ["embed.weight"]
    (spec,) = manifest["signature"]["tensors"]
    assert spec["name"] == "embed.weight"
    assert spec["aliases"] == ["head.weight"]
    assert sorted(manifest["optimizer"]["tensors"]) == ["embed.weight/exp_avg", "embed.weight/exp_avg_sq",
                                                        "embed.weight/step"]

    torch.manual_seed(1)
    dst = TiedLM()
    dst_opt = torch.optim.Adam(dst.parameters(), lr=1e-2)
    resumer.resume(uri, dst, dst_opt)
    assert dst.head.weight is dst.embed.weight  # still tied
    assert torch.equal(dst.head.weight, src.head.weight)
    assert torch.equal(dst_opt.state[dst.embed.weight]["exp_avg"], opt.state[src.embed.weight]["exp_avg"])


def test_a_checkpoint_behind_storage_options_is_read_and_verified_through_them(tmp_path) -> None:
    """Every size check and read uses the storage options given (credentials, an endpoint), never a store opened
    again without them: fsspec's dir:// filesystem stands in, as it cannot even be opened without its options."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    resumer.save_checkpoint(str(tmp_path / "root"), 5, model, opt)
    options = {"path": str(tmp_path), "fs": fsspec.filesystem("file")}
    fresh = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    res = resumer.resume("dir://root", fresh, fresh_opt, storage_options=options)
    assert res.step == 5
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    info = inspect_checkpoint("dir://root", options, verify=True)
    assert (info["step"], info["verified"]) == (5, True)
    assert (info["kind"], info["format_version"]) == ("resumer", FORMAT_VERSION)
    assert info["code"]["model_class"] == "torch.nn.modules.container.Sequential" and info["code"]["fingerprint"]
