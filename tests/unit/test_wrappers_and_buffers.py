"""BatchNorm buffers, DDP ``module.`` and compiled ``_orig_mod.`` prefixes, tied weights, meta-device planning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import resumer
from resumer import examples as ex
from resumer.core.plan import Action, Section


def train_cnn(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_batchnorm_buffers_restored(tmp_path: pytest.TempPathFactory) -> None:
    torch.manual_seed(0)
    model = ex.cnn()
    opt = ex.sgd(model)
    train_cnn(model, opt, 3)
    root = str(tmp_path)
    resumer.save_checkpoint(root, 3, model, opt)
    fresh = ex.cnn()
    fresh_opt = ex.sgd(fresh)
    plan = resumer.plan(root, fresh, fresh_opt)
    kinds = {e.name: e for e in plan.section(Section.MODEL)}
    assert kinds["features.1.num_batches_tracked"].action is Action.LOAD
    resumer.resume(root, fresh, fresh_opt)
    bn = fresh.features[1]
    assert int(bn.num_batches_tracked) == 3
    assert torch.equal(bn.running_mean, model.features[1].running_mean)
    assert torch.equal(bn.running_var, model.features[1].running_var)
    assert torch.equal(fresh_opt.state[fresh.head.weight]["momentum_buffer"],
                       opt.state[model.head.weight]["momentum_buffer"])


def test_batchnorm_removed_partial_drops_buffers(tmp_path: pytest.TempPathFactory) -> None:
    model = ex.cnn()
    resumer.save_checkpoint(str(tmp_path), 1, model)
    changed = ex.cnn()
    changed.features[1] = nn.Identity()
    plan = resumer.plan(str(tmp_path), changed, policy="partial")
    dropped = {e.name for e in plan.section(Section.MODEL) if e.action is Action.DROP}
    assert dropped == {"features.1.weight", "features.1.bias", "features.1.running_mean", "features.1.running_var",
                       "features.1.num_batches_tracked"}


def test_ddp_prefix_both_ways(tmp_path: pytest.TempPathFactory, process_group: None) -> None:
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(ex.mlp_v1())
    opt = ex.adam(ddp)
    ex.train_step(ddp, opt, 1)
    assert next(iter(ddp.state_dict())).startswith("module.")
    root = str(tmp_path / "native")
    resumer.save_checkpoint(root, 1, ddp, opt)
    manifest = resumer.read_manifest(resumer.list_checkpoints(root)[0].uri)
    assert "0.weight" in manifest.tensors and not any(n.startswith("module.") for n in manifest.tensors)
    plain = ex.mlp_v1()
    plain_opt = ex.adam(plain)
    resumer.resume(root, plain, plain_opt)
    assert torch.equal(plain[0].weight, ddp.module[0].weight)
    assert torch.equal(plain_opt.state[plain[0].weight]["exp_avg"], opt.state[ddp.module[0].weight]["exp_avg"])
    # ...and a DDP-wrapped model resumes from a plain checkpoint, and from a torch.save of ddp.state_dict().
    back = nn.parallel.DistributedDataParallel(ex.mlp_v1())
    resumer.resume(root, back)
    assert torch.equal(back.module[2].weight, ddp.module[2].weight)
    legacy = tmp_path / "ddp.pt"
    torch.save({"model_state_dict": ddp.state_dict(), "optimizer_state_dict": opt.state_dict()}, legacy)
    plan = resumer.plan(str(legacy), ex.mlp_v1(), None)
    assert plan.ok
    assert any("module." in n for n in plan.notes)


def test_compiled_prefix(tmp_path: pytest.TempPathFactory) -> None:
    torch.manual_seed(0)
    model = ex.mlp_v1()
    compiled = torch.compile(model)  # lazily compiled: wrapping is enough to change the names
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    opt = ex.adam(compiled)
    resumer.save_checkpoint(str(tmp_path / "c"), 2, compiled, opt)
    plain = ex.mlp_v1()
    assert resumer.plan(str(tmp_path / "c"), plain, ex.adam(plain)).ok
    resumer.resume(str(tmp_path / "c"), plain)
    assert torch.equal(plain[4].weight, model[4].weight)
    legacy = tmp_path / "compiled.pt"
    torch.save(compiled.state_dict(), legacy)
    target = torch.compile(ex.mlp_v1())
    res = resumer.resume(str(legacy), target)
    assert torch.equal(target._orig_mod[4].weight, model[4].weight)
    assert any("_orig_mod." in n for n in res.plan.notes)


class TiedLM(nn.Module):
    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(idx))))


def test_tied_weights_stored_once_and_resumed(tmp_path: pytest.TempPathFactory) -> None:
    torch.manual_seed(0)
    model = TiedLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = model(torch.arange(10)).pow(2).mean()
    loss.backward()
    opt.step()
    root = str(tmp_path)
    resumer.save_checkpoint(root, 1, model, opt)
    manifest = resumer.list_checkpoints(root)[0].manifest
    assert "head.weight" not in manifest.tensors
    spec = manifest.signature.by_name()["embed.weight"]
    assert spec.aliases == ("head.weight",)
    again = TiedLM()
    again_opt = torch.optim.Adam(again.parameters(), lr=1e-2)
    plan = resumer.plan(root, again, again_opt)
    assert plan.ok and plan.counts()["loaded"] == 3
    tied = plan.entry(Section.MODEL, "head.weight")  # every alias is in the plan, with what happens to it
    assert tied.action is Action.TIED and tied.source == "embed.weight"
    assert tied.reason == "tied to 'embed.weight' (the same tensor): loaded with it from 'embed.weight'"
    resumer.resume(root, again, again_opt)
    assert again.head.weight is again.embed.weight
    assert torch.equal(again.embed.weight, model.embed.weight)
    # Untied now: strict refuses (the state cannot be split honestly); partial loads both from the one tensor.
    untied = TiedLM(tie=False)
    strict = resumer.plan(root, untied, torch.optim.Adam(untied.parameters()))
    assert any("tied to 'embed.weight' in the checkpoint, separate now" in str(r) for r in strict.refusals)
    untied_opt = torch.optim.Adam(untied.parameters())
    resumer.resume(root, untied, untied_opt, policy="partial")
    assert torch.equal(untied.head.weight, model.embed.weight)
    assert torch.equal(untied.embed.weight, model.embed.weight)


class HeadlessLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.body = nn.Linear(6, 6)


def test_a_saved_alias_whose_name_is_gone_is_listed(tmp_path: pytest.TempPathFactory) -> None:
    root = str(tmp_path)
    resumer.save_checkpoint(root, 1, TiedLM())
    plan = resumer.plan(root, HeadlessLM(), policy="partial")
    gone = plan.entry(Section.MODEL, "head.weight")
    assert gone.action is Action.TIED and gone.source == "embed.weight" and not gone.refused
    assert plan.counts()["dropped"] == 0
    assert "tied to 'embed.weight' in the checkpoint (the same values)" in gone.reason


def test_planning_on_meta_device_reads_no_tensor_bytes(tmp_path: pytest.TempPathFactory) -> None:
    model = ex.mlp_v1()
    uri = resumer.save_checkpoint(str(tmp_path), 1, model, ex.adam(model))
    with torch.device("meta"):
        meta = ex.mlp_v1()
    meta_opt = ex.adam(meta)
    # Planning needs the manifest only: it works with the tensor files gone.
    for data in (tmp_path / "step-0000000001").glob("*.safetensors"):
        data.unlink()
    plan = resumer.plan(uri, meta, meta_opt)
    assert plan.ok and plan.counts()["loaded"] == 6
    assert all(p.device.type == "meta" for p in meta.parameters())
