"""Plain torch.save checkpoints: layouts, position-keyed optimizer state mapped to names, class inference."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import resumer
from resumer import examples as ex
from resumer.core.plan import Action


def trained(opt_factory=ex.adam):  # noqa: ANN001, ANN201
    torch.manual_seed(0)
    model = ex.mlp_v1()
    opt = opt_factory(model)
    for step in range(1, 3):
        ex.train_step(model, opt, step)
    return model, opt


def test_bare_state_dict(tmp_path: pytest.TempPathFactory) -> None:
    model, _ = trained()
    path = str(tmp_path / "bare.pt")
    torch.save(model.state_dict(), path)
    fresh = ex.mlp_v1()
    res = resumer.resume(path, fresh)
    assert res.step == 0 and res.plan.counts()["loaded"] == 6
    assert torch.equal(fresh[2].weight, model[2].weight)


def test_common_dict_layout_carries_optimizer_by_name(tmp_path: pytest.TempPathFactory) -> None:
    model, opt = trained()
    path = str(tmp_path / "ckpt.pt")
    torch.save({"epoch": 5, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "loss": 0.125}, path)
    fresh = ex.mlp_v2_dropout()  # and the code changed: auto renames + by-name state follow it
    fresh_opt = ex.adam(fresh)
    res = resumer.resume(path, fresh, fresh_opt, renames="auto")
    assert res.step == 5 and res.extra == {"loss": 0.125}
    assert "shapes checked for 6 of 6 parameters" in " ".join(res.plan.notes)
    assert "Adam inferred" in " ".join(res.plan.notes)
    assert torch.equal(fresh_opt.state[fresh[5].weight]["exp_avg"], opt.state[model[4].weight]["exp_avg"])
    assert torch.equal(fresh_opt.state[fresh[3].bias]["exp_avg_sq"], opt.state[model[2].bias]["exp_avg_sq"])


def test_optimizer_built_in_another_order_is_detected(tmp_path: pytest.TempPathFactory) -> None:
    torch.manual_seed(0)
    model = ex.mlp_v1()
    opt = torch.optim.Adam(list(reversed(list(model.parameters()))), lr=1e-2)
    ex.train_step(model, opt, 1)
    path = str(tmp_path / "reordered.pt")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    fresh = ex.mlp_v1()
    plan = resumer.plan(path, fresh, ex.adam(fresh))
    assert not plan.ok
    assert "the current optimizer's order does not fit the saved one" in str(plan.refusals[0])
    assert plan.suggestion == "--policy reset-optimizer"
    ok = resumer.plan(path, fresh, ex.adam(fresh), policy="reset-optimizer")
    assert ok.ok and ok.optimizer_action() is Action.RESET


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("scale", torch.ones(3))


def test_custom_buffer_does_not_shift_positions(tmp_path: pytest.TempPathFactory) -> None:
    """Positions follow the current optimizer, so a buffer a plain state_dict shows like a parameter is no bother."""
    torch.manual_seed(0)
    model = WithBuffer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.lin(torch.randn(2, 3)).sum().backward()
    opt.step()
    path = str(tmp_path / "buf.pt")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    fresh = WithBuffer()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    res = resumer.resume(path, fresh, fresh_opt)
    assert res.plan.counts()["optimizer_carried"] == 2
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], fresh_opt.state[q]["momentum_buffer"])


class Blocks(nn.Module):
    """Identically shaped blocks: a wrong position mapping passes every shape check."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(4))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(x)


def layerwise_decay(model: Blocks) -> torch.optim.Optimizer:
    """Layer-wise LR decay, blocks listed top-down (the head first): another order than registration."""
    groups = [{"params": list(model.head.parameters()), "lr": 1e-2}]
    groups += [{"params": list(b.parameters()), "lr": 1e-2 * 0.5 ** (4 - i)}
               for i, b in reversed(list(enumerate(model.blocks)))]
    return torch.optim.Adam(groups)


def decay_no_decay(model: Blocks) -> torch.optim.Optimizer:
    """The nanoGPT / Hugging Face recipe: matrices decay, biases and norms do not."""
    params = dict(model.named_parameters())
    decay = [p for n, p in params.items() if p.dim() >= 2]
    no_decay = [p for n, p in params.items() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=3e-3)


def _trained_blocks(make_opt) -> tuple[Blocks, torch.optim.Optimizer]:  # noqa: ANN001
    torch.manual_seed(0)
    model = Blocks()
    opt = make_opt(model)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 8)).pow(2).mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("make_opt", [layerwise_decay, decay_no_decay])
def test_optimizer_order_of_recipes_resumes_exactly(tmp_path: pytest.TempPathFactory, make_opt) -> None:  # noqa: ANN001
    model, opt = _trained_blocks(make_opt)
    path = str(tmp_path / "recipe.pt")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    fresh = Blocks()
    fresh_opt = make_opt(fresh)
    res = resumer.resume(path, fresh, fresh_opt)
    assert res.plan.ok and res.plan.counts()["optimizer_carried"] == len(list(model.parameters()))
    saved_params = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        for key, value in opt.state[saved_params[name]].items():
            assert torch.equal(fresh_opt.state[p][key], value), (name, key)
    for g_saved, g_now in zip(opt.param_groups, fresh_opt.param_groups, strict=True):
        assert {k: v for k, v in g_now.items() if k != "params"} == {k: v for k, v in g_saved.items()
                                                                       if k != "params"}
    # what torch itself restores, for the same file
    torch_opt = make_opt(Blocks())
    torch_opt.load_state_dict(opt.state_dict())
    assert str(torch_opt.state_dict()) == str(fresh_opt.state_dict())


def test_positions_refused_when_groups_no_longer_line_up(tmp_path: pytest.TempPathFactory) -> None:
    model, opt = _trained_blocks(layerwise_decay)
    path = str(tmp_path / "llrd.pt")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    fresh = Blocks()
    plan = resumer.plan(path, fresh, decay_no_decay(fresh))
    assert not plan.ok
    assert "param groups do not line up with the saved ones ([2, 4, 4, 4, 4] parameters per group saved, [5, 13] " \
           "now)" in str(plan.refusals[0])
    partial = resumer.plan(path, fresh, decay_no_decay(fresh), policy="partial")
    assert partial.ok and partial.optimizer_action() is Action.RESET


def test_adam_or_adamw_ambiguity_is_said(tmp_path: pytest.TempPathFactory) -> None:
    model, opt = trained()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g.pop("decoupled_weight_decay")  # as in files from torch versions without the flag
    path = str(tmp_path / "old.pt")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": sd}, path)
    fresh = ex.mlp_v1()
    plan = resumer.plan(path, fresh, ex.adam(fresh))
    assert plan.ok
    assert any("Adam or AdamW: the file's state and hyperparameter keys cannot tell them apart" in n
               for n in plan.notes)
    assert not resumer.plan(path, fresh, ex.sgd(fresh)).ok


def test_sgd_inferred(tmp_path: pytest.TempPathFactory) -> None:
    model, opt = trained(ex.sgd)
    path = str(tmp_path / "sgd.pt")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    fresh = ex.mlp_v1()
    fresh_opt = ex.sgd(fresh)
    resumer.resume(path, fresh, fresh_opt)
    assert torch.equal(fresh_opt.state[fresh[0].weight]["momentum_buffer"],
                       opt.state[model[0].weight]["momentum_buffer"])


def test_unrecognised_layout_and_truncated_file(tmp_path: pytest.TempPathFactory) -> None:
    path = str(tmp_path / "odd.pt")
    torch.save({"weights": [1, 2, 3]}, path)
    with pytest.raises(resumer.CheckpointError, match="without a model state_dict"):
        resumer.plan(path, ex.mlp_v1())
    model, _ = trained()
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(resumer.CheckpointError, match="not a readable torch.save file"):
        resumer.plan(str(cut), ex.mlp_v1())


def test_bare_state_dict_plan_names_the_file(tmp_path: pytest.TempPathFactory) -> None:
    model, _ = trained()
    path = str(tmp_path / "bare.pt")
    torch.save(model.state_dict(), path)
    res = resumer.resume(path, ex.mlp_v1())
    assert res.plan.checkpoint == path
    assert resumer.open_source(path).uri == path


@pytest.mark.parametrize("where", ["local", "memory"])
def test_file_saved_from_gpu_tensors_loads_onto_the_cpu(tmp_path: pytest.TempPathFactory, monkeypatch, where) -> None:  # noqa: ANN001
    """A checkpoint saved on a GPU records 'cuda:0' for each tensor; it loads onto the CPU, GPU or no GPU."""
    import fsspec
    import torch.serialization as ser

    model, opt = trained()
    everything_on_cuda = [(0, lambda _storage: "cuda:0", lambda _storage, _location: None)]
    with monkeypatch.context() as m:
        m.setattr(ser, "_package_registry", everything_on_cuda + list(ser._package_registry))
        buf = io.BytesIO()
        torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}, buf)
    assert b"cuda:0" in buf.getvalue()
    if where == "local":
        path = str(tmp_path / "gpu.pt")
        (tmp_path / "gpu.pt").write_bytes(buf.getvalue())
    else:
        path = f"memory://resumer-tests/{tmp_path.name}/gpu.pt"
        fsspec.filesystem("memory").pipe_file(path, buf.getvalue())
    source = resumer.open_source(path)
    try:
        assert {source.tensor(t.name).device.type for t in source.signature.tensors} == {"cpu"}
        assert {v.device.type for v in source.optimizer_state("#0").values()} == {"cpu"}
    finally:
        source.close()
    fresh = ex.mlp_v1()
    fresh_opt = ex.adam(fresh)
    resumer.resume(path, fresh, fresh_opt)
    assert torch.equal(fresh[2].weight, model[2].weight)
    assert torch.equal(fresh_opt.state[fresh[0].weight]["exp_avg"], opt.state[model[0].weight]["exp_avg"])


def _groups_as_pairs(sd: dict) -> None:
    sd["param_groups"] = [list(g.items()) for g in sd["param_groups"]]


def _params_not_positions(sd: dict) -> None:
    sd["param_groups"][0]["params"] = [True] + sd["param_groups"][0]["params"][1:]


def _position_twice(sd: dict) -> None:
    sd["param_groups"][0]["params"][1] = sd["param_groups"][0]["params"][0]


def _state_not_a_mapping(sd: dict) -> None:
    sd["state"] = list(sd["state"].values())


def _state_of_no_group(sd: dict) -> None:
    sd["state"][7] = sd["state"][0]


def _no_param_groups(sd: dict) -> None:
    del sd["param_groups"]


@pytest.mark.parametrize(("damage", "fragment"), [
    (_groups_as_pairs, "an optimizer param group's 'params' is not a list of positions"),
    (_params_not_positions, "an optimizer param group's 'params' is not a list of positions"),
    (_position_twice, "the optimizer's param groups list one position twice"),
    (_state_not_a_mapping, "the optimizer's 'state' is not a mapping"),
    (_state_of_no_group, "the optimizer holds state for position 7, which no param group lists"),
    (_no_param_groups, "the optimizer entry is not an optimizer state_dict (no 'state' and 'param_groups')"),
])
def test_malformed_optimizer_entry_is_refused_naming_the_file(tmp_path: pytest.TempPathFactory, damage,  # noqa: ANN001
                                                              fragment: str) -> None:
    model, opt = trained()
    sd = opt.state_dict()
    damage(sd)
    path = str(tmp_path / "odd.pt")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": sd}, path)
    fresh = ex.mlp_v1()
    for call in (lambda: resumer.plan(path, fresh, ex.adam(fresh)), lambda: resumer.plan(path, fresh)):
        with pytest.raises(resumer.CheckpointError) as info:
            call()
        assert str(info.value) == f"{path}: {fragment}."
        assert info.value.uri == path


def test_unusable_files_are_refused_naming_the_file(tmp_path: pytest.TempPathFactory, monkeypatch) -> None:  # noqa: ANN001
    from resumer.formats import torch_save

    model, _ = trained()
    no_model = str(tmp_path / "no_model.pt")
    torch.save({"weights": [1, 2, 3], "epoch": 1}, no_model)
    with pytest.raises(resumer.CheckpointError, match="without a model state_dict") as info:
        resumer.plan(no_model, ex.mlp_v1())
    assert info.value.uri == no_model
    big = str(tmp_path / "big.pt")
    torch.save(model.state_dict(), big)
    monkeypatch.setattr(torch_save, "MAX_FOREIGN_BYTES", 1000)
    with pytest.raises(resumer.CheckpointError, match="is larger than 1000 bytes; refusing to load it whole") as info:
        resumer.plan(big, ex.mlp_v1())
    assert info.value.uri == big


def _saved_signature(path: str) -> resumer.Signature:
    source = resumer.open_source(path)
    source.close()
    return source.signature


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[1, 3], gamma=0.5),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=1e-4),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.9 ** step),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_in_a_torch_save_file_is_recognised_and_restored(tmp_path: pytest.TempPathFactory,
                                                                   name: str) -> None:
    model, opt = trained()
    sched = SCHEDULERS[name](opt)
    for _ in range(3):
        opt.step()
        sched.step()
    path = str(tmp_path / "sched.pt")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "scheduler_state_dict": sched.state_dict(), "step": 3}, path)
    assert _saved_signature(path).scheduler.cls == f"torch.optim.lr_scheduler.{name}"
    fresh = ex.mlp_v1()
    fresh_opt = ex.adam(fresh)
    fresh_sched = SCHEDULERS[name](fresh_opt)
    res = resumer.resume(path, fresh, fresh_opt, fresh_sched)  # strict: a scheduler not restored is refused
    assert [e.action for e in res.plan.section(resumer.Section.SCHEDULER)] == [Action.RESTORE]
    assert fresh_sched.last_epoch == 3 and fresh_sched.get_last_lr() == sched.get_last_lr()


def test_unrecognised_scheduler_is_said_and_starts_fresh(tmp_path: pytest.TempPathFactory) -> None:
    model, opt = trained()
    make = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10)  # noqa: E731
    path = str(tmp_path / "onecycle.pt")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "scheduler_state_dict": make(opt).state_dict()}, path)
    assert _saved_signature(path).scheduler.cls == "unknown"
    fresh = ex.mlp_v1()
    fresh_opt = ex.adam(fresh)
    plan = resumer.plan(path, fresh, fresh_opt, make(fresh_opt), policy="partial")
    (entry,) = plan.section(resumer.Section.SCHEDULER)
    assert entry.action is Action.FRESH and entry.reason.startswith("unknown saved, OneCycleLR now")


@pytest.mark.parametrize(("keys", "cls"), [
    ({"params", "lr", "momentum", "dampening", "nesterov"}, "torch.optim.sgd.SGD"),
    ({"params", "lr", "alpha", "centered"}, "torch.optim.rmsprop.RMSprop"),
    ({"lr_decay"}, "torch.optim.adagrad.Adagrad"),  # exactly the keys that tell it
    ({"betas", "amsgrad"}, "torch.optim.adam.Adam|torch.optim.adamw.AdamW"),
    ({"params", "lr", "rho"}, "unknown"),
])
def test_optimizer_class_inferred_from_hyperparameter_keys(keys: set, cls: str) -> None:
    from resumer.formats.torch_save import infer_optimizer_class

    inferred, how = infer_optimizer_class([dict.fromkeys(keys, 0)])
    assert inferred == cls
    if cls == "unknown":
        assert how == "could not be inferred from the hyperparameter keys ['lr', 'rho']"


def test_unknown_optimizer_class_is_said_and_refused_under_strict(tmp_path: pytest.TempPathFactory) -> None:
    model, opt = trained(lambda m: torch.optim.Adadelta(m.parameters()))
    path = str(tmp_path / "adadelta.pt")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    fresh = ex.mlp_v1()
    plan = resumer.plan(path, fresh, torch.optim.Adadelta(fresh.parameters()))
    assert not plan.ok
    assert any("could not be inferred from the hyperparameter keys ['capturable'," in n and "'params'" not in n
               for n in plan.notes)


def test_hyperparameter_no_checkpoint_holds_is_a_checkpoint_error_and_a_root_falls_back(tmp_path) -> None:  # noqa: ANN001
    """A file's optimizer hyperparameter resumer cannot carry (a large tensor here) makes the FILE bad: a
    CheckpointError naming it and the hyperparameter, and a folder of Trainer checkpoints passes it over."""
    import json

    model, opt = trained()
    for step, mask in ((5, None), (10, torch.zeros(5000))):
        d = tmp_path / "run" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        torch.save(model.state_dict(), d / "pytorch_model.bin")
        sd = opt.state_dict()
        if mask is not None:
            sd["param_groups"][0]["mask"] = mask
        torch.save(sd, d / "optimizer.pt")
    bad = str(tmp_path / "bad.pt")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": sd}, bad)
    fresh = ex.mlp_v1()
    with pytest.raises(resumer.CheckpointError, match="optimizer hyperparameter 'mask'") as info:
        resumer.plan(bad, fresh, ex.adam(fresh))
    assert info.value.uri == bad
    fresh_opt = ex.adam(fresh)
    res = resumer.resume(str(tmp_path / "run"), fresh, fresh_opt)
    assert res.step == 5 and res.plan.checkpoint.endswith("checkpoint-5")
    assert any("checkpoint-10" in n and "'mask'" in n for n in res.plan.notes)
    assert torch.equal(fresh_opt.state[fresh[0].weight]["exp_avg"], opt.state[model[0].weight]["exp_avg"])


def test_signature_of_position_keyed_optimizer_state(tmp_path: pytest.TempPathFactory) -> None:
    """What reconcile and inspect see of the file's optimizer: positions, each state entry's shape and dtype."""
    model, opt = trained()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].to(torch.bfloat16)
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": sd}, path)
    spec = _saved_signature(path).optimizer
    assert spec.positional and spec.cls == "torch.optim.adam.Adam"
    assert [g.params for g in spec.groups] == [tuple(f"#{i}" for i in range(6))]
    first = spec.state_by_param()["#0"]
    assert {e.key: (e.shape, e.dtype) for e in first.entries} == {
        "step": ((), "float32"), "exp_avg": ((64, 16), "bfloat16"), "exp_avg_sq": ((64, 16), "float32")}
    # A value that is no tensor (an older torch's integer step) is listed by its key, with no shape.
    sd["state"][1]["step"] = 2
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": sd}, path)
    second = _saved_signature(path).optimizer.state_by_param()["#1"]
    assert {e.key: e.shape for e in second.entries} == {"step": None, "exp_avg": (64,), "exp_avg_sq": (64,)}


def test_a_saved_value_no_checkpoint_holds_names_its_checkpoint_and_a_long_name_is_cut() -> None:
    from resumer.core.errors import CheckpointError
    from resumer.formats.jsonvalue import encode_saved

    with pytest.raises(CheckpointError, match=r"^/ckpt: optimizer hyperparameter 'x+\.\.\. cannot be carried") as e:
        encode_saved(torch.zeros(5000), f"optimizer hyperparameter {'x' * 5000!r}", "/ckpt")
    assert e.value.uri == "/ckpt" and len(str(e.value)) < 600
    assert encode_saved(3, "lr", "/ckpt") == 3
