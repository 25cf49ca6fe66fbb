"""How often a resume reads each byte: once. Each data file is checksummed in the pass that loads it."""

from __future__ import annotations

import copy

import pytest
import torch

import resumer
import resumer.formats.native.source
import resumer.formats.native.verify
from resumer import examples as ex


@pytest.fixture
def checksummed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the files that get a separate checksum pass."""
    seen: list[int] = []
    real = resumer.formats.native.verify.header_and_checksum

    def counting(f, size, uri, on_bytes=None):  # noqa: ANN001, ANN202
        seen.append(size)
        return real(f, size, uri, on_bytes)

    monkeypatch.setattr(resumer.formats.native.verify, "header_and_checksum", counting)
    return seen


def saved(tmp_path: pytest.TempPathFactory) -> tuple[str, torch.nn.Module, torch.optim.Optimizer]:
    model = ex.mlp_v1()
    opt = ex.adam(model)
    ex.train_step(model, opt, 1)
    return resumer.save_checkpoint(str(tmp_path), 1, model, opt), model, opt


def test_resume_from_root_reads_each_byte_once(tmp_path: pytest.TempPathFactory, checksummed: list[int]) -> None:
    uri, _, _ = saved(tmp_path)
    manifest = resumer.read_manifest(uri)
    model_file = manifest.file(manifest.data_file("model")).size
    seen: list[int] = []
    res = resumer.resume(str(tmp_path), ex.mlp_v1(), progress=seen.append)
    # Selection checked manifest and sizes only; the model file got one pass: checksummed while it loaded.
    assert checksummed == []
    assert res.bytes_read == model_file  # no optimizer given: its state is not read
    assert sum(seen) == model_file  # progress saw each byte once

    fresh = ex.mlp_v1()
    res = resumer.resume(str(tmp_path), fresh, ex.adam(fresh))
    assert checksummed == []  # each file is checksummed in the pass that loads it
    assert res.bytes_read == model_file + manifest.file(manifest.data_file("optimizer")).size


def test_optimizer_file_is_checksummed_while_it_loads(tmp_path: pytest.TempPathFactory,
                                                      checksummed: list[int]) -> None:
    uri, model, opt = saved(tmp_path)
    fresh = ex.mlp_v1()
    fresh_opt = ex.adam(fresh)
    resumer.resume(uri, fresh, fresh_opt)
    assert checksummed == []  # no separate pass
    assert torch.equal(fresh_opt.state[fresh[2].weight]["exp_avg"], opt.state[model[2].weight]["exp_avg"])


def test_flipped_byte_in_optimizer_file_changes_nothing(tmp_path: pytest.TempPathFactory) -> None:
    uri, _, _ = saved(tmp_path)
    path = f"{uri}/{resumer.read_manifest(uri).data_file('optimizer')}"
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[-3] ^= 0x10
    with open(path, "wb") as f:
        f.write(bytes(data))
    fresh = ex.mlp_v1()
    fresh_opt = ex.adam(fresh)
    ex.train_step(fresh, fresh_opt, 7)
    before = copy.deepcopy(fresh.state_dict())
    before_opt = copy.deepcopy(fresh_opt.state_dict())
    with pytest.raises(resumer.CheckpointError, match="fails its checksum"):
        resumer.resume(uri, fresh, fresh_opt)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    after_opt = fresh_opt.state_dict()
    assert all(torch.equal(after_opt["state"][i][k], v) for i, st in before_opt["state"].items() for k, v in st.items())


def _flip(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("bad", [("model",), ("optimizer",), ("model", "optimizer")])
def test_side_by_side_verification_names_the_bad_file_and_changes_nothing(tmp_path: pytest.TempPathFactory,
                                                                         bad: tuple[str, ...]) -> None:
    """The model files' checksum pass and the optimizer file's load run at once; either failing stops the
    resume before anything is touched, and when both fail the model file is named."""
    uri, _, _ = saved(tmp_path)
    manifest = resumer.read_manifest(uri)
    for kind in bad:
        name = manifest.data_file(kind)
        _flip(f"{uri}/{name}", manifest.file(name).size - 5)
    fresh = ex.mlp_v1()
    fresh_opt = ex.adam(fresh)
    ex.train_step(fresh, fresh_opt, 7)
    before = copy.deepcopy(fresh.state_dict())
    before_opt = copy.deepcopy(fresh_opt.state_dict())
    with pytest.raises(resumer.CheckpointError, match="fails its checksum") as err:
        resumer.resume(uri, fresh, fresh_opt)
    assert manifest.data_file(bad[0]) in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    after_opt = fresh_opt.state_dict()
    assert after_opt["state"].keys() == before_opt["state"].keys()
    assert all(torch.equal(after_opt["state"][i][k], v) for i, st in before_opt["state"].items() for k, v in st.items())
