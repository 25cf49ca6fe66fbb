"""``resumer convert`` and ``resumer export``: nobody is locked in. The foreign checkpoint is written by the real
``transformers.Trainer`` (a tiny GPT-2 from a config, three steps on CPU), converted to a native checkpoint and
exported back out; a Lightning ``.ckpt`` from the real ``lightning.Trainer`` is converted and exported too, and a
``torch.distributed.checkpoint.save`` directory exported.

What is pinned: the native checkpoint resumes into fresh objects exactly as the Trainer checkpoint itself does
(weights bitwise, optimizer state by name, each group's lr, scheduler, step, RNG) and records the source and
the plan that produced it; a refused plan, an occupied step and a hostile source write nothing; a written
checkpoint that fails its checksums is not reported as converted. An export to ``torch`` loads with
``weights_only=True`` into plain ``load_state_dict`` calls bitwise; an export to ``hf`` resumes through the
hf-trainer reader bitwise and loads in ``transformers``; an occupied OUT is refused, and a failed export
leaves no file behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_trainer import Tokens, arguments, gpt2

import resumer
from resumer.cli.main import cli
from resumer.core.errors import CheckpointError, PlanRefused, UsageError
from resumer.formats import registry
from resumer.runtime import convert as convert_module
from resumer.runtime import export as export_module
from resumer.runtime.convert import convert
from resumer.runtime.export import export
from resumer.storage.store import Store
from resumer.testing.hostile import Payload

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

STEPS = 3


def wider_gpt2() -> torch.nn.Module:
    """A code change strict cannot resume into: every hidden size differs."""
    config = transformers.GPT2Config(n_layer=2, n_embd=48, n_head=2, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def trainer_args(output_dir: str) -> Any:
    return arguments(output_dir, steps=STEPS, save_every=STEPS, weight_decay=0.1)


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer factory: AdamW with the decay / no-decay groups a fresh ``Trainer`` builds."""
    return transformers.Trainer(model=model, args=trainer_args(tempfile.mkdtemp())).create_optimizer()


def scheduler(opt: torch.optim.Optimizer) -> Any:
    """The scheduler factory: the Trainer's linear schedule with warmup."""
    return transformers.get_linear_schedule_with_warmup(opt, 1, STEPS)


def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model = gpt2()
    opt = optimizer(model)
    return model, opt, scheduler(opt)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """checkpoint-3/ as the real Trainer writes it."""
    out = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                                                 n_positions=32))
    transformers.Trainer(model=model, args=trainer_args(str(out)), train_dataset=Tokens()).train()
    path = out / f"checkpoint-{STEPS}"
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(os.listdir(path))
    return str(path)


@pytest.fixture(scope="module")
def converted(checkpoint: str, tmp_path_factory: pytest.TempPathFactory) -> convert_module.Conversion:
    model, opt, sched = fresh()
    return convert(checkpoint, str(tmp_path_factory.mktemp("native") / "root"), model, opt, sched)


def resumed_state(path: str) -> dict[str, Any]:
    """Resume fresh objects from ``path``; everything they then hold, by name (and the RNG after)."""
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    model, opt, sched = fresh()
    result = resumer.resume(path, model, opt, sched)
    return after(model, opt, sched, result.step)


def after(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int | None) -> dict[str, Any]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": {by_id[id(p)]: dict(s) for p, s in opt.state.items()},
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "members": [[by_id[id(p)] for p in g["params"]] for g in opt.param_groups],
        "scheduler": sched.state_dict() if sched is not None else None,
        "step": step,
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
    }


def assert_same(a: dict[str, Any], b: dict[str, Any], *, rng: bool = True) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for name, t in a["weights"].items():
        assert torch.equal(t, b["weights"][name]), name
    assert a["optimizer"].keys() == b["optimizer"].keys() and a["optimizer"]
    for name, state in a["optimizer"].items():
        assert state.keys() == b["optimizer"][name].keys(), name
        for key, value in state.items():
            other = b["optimizer"][name][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (name, key)
    assert [g["lr"] for g in a["groups"]] == [g["lr"] for g in b["groups"]]
    assert a["groups"] == b["groups"] and a["members"] == b["members"]
    assert a["scheduler"] == b["scheduler"]
    assert a["step"] == b["step"] == STEPS
    if rng:
        assert torch.equal(a["rng"][0], b["rng"][0])
        assert a["rng"][1] == b["rng"][1]
        assert np.array_equal(a["rng"][2], b["rng"][2])


def test_converted_resumes_as_the_source(checkpoint: str, converted: convert_module.Conversion) -> None:
    straight = resumed_state(checkpoint)
    assert converted.format == "hf-trainer" and converted.step == STEPS
    assert set(converted.rng) == {"torch", "numpy", "python"}  # what the plan restored from rng_state.pth
    assert_same(resumed_state(converted.checkpoint), straight)
    manifest = resumer.read_manifest(converted.checkpoint)
    assert manifest.step == STEPS
    recorded = manifest.extra["converted_from"]
    assert recorded["uri"] == converted.source and recorded["format"] == "hf-trainer"
    assert recorded["plan_digest"] == converted.plan.digest()
    assert resumer.Plan.from_dict(recorded["plan"]).digest() == converted.plan.digest()


def test_a_trainer_output_dir_converts_its_newest_checkpoint(checkpoint: str, tmp_path: Path) -> None:
    done = convert(str(Path(checkpoint).parent), str(tmp_path / "root"), *fresh())
    assert done.source == Store.open(checkpoint).uri and done.format == "hf-trainer" and done.step == STEPS


def test_convert_leaves_the_callers_rng_alone(checkpoint: str, tmp_path: Path) -> None:
    model, opt, sched = fresh()
    torch.manual_seed(99)
    before = torch.get_rng_state()
    convert(checkpoint, str(tmp_path / "root"), model, opt, sched)
    assert torch.equal(torch.get_rng_state(), before)


def cli_convert(source: str, root: Path, *extra: str, model: str = "gpt2") -> Any:
    return CliRunner().invoke(cli, ["convert", source, str(root), "--model", f"{__name__}:{model}", "--optimizer",
                                    f"{__name__}:optimizer", "--scheduler", f"{__name__}:scheduler", *extra])


def test_cli_convert_then_occupied_step_is_refused(checkpoint: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = cli_convert(checkpoint, root, "--json")
    assert r.exit_code == 0, r.output
    done = json.loads(r.stdout)
    assert done["ok"] and done["verified"] and done["format"] == "hf-trainer" and done["step"] == STEPS
    manifest = Path(done["checkpoint"]) / "manifest.json"
    assert resumer.read_manifest(done["checkpoint"]).extra["converted_from"]["plan_digest"] == done["plan_digest"]
    before = manifest.read_bytes()
    again = cli_convert(checkpoint, root)
    assert again.exit_code == 2, again.output
    assert "already holds a committed checkpoint (step 3)" in again.stderr
    assert "Nothing was written" in again.stderr
    assert manifest.read_bytes() == before
    assert os.listdir(root) == [Path(done["checkpoint"]).name]


def test_occupied_step_is_refused_before_anything_is_read(checkpoint: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    resumer.save_checkpoint(str(root), STEPS, gpt2(seed=1))
    manifest = next(root.iterdir()) / "manifest.json"
    before_bytes = manifest.read_bytes()
    model, opt, sched = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match="already holds a committed checkpoint"):
        convert(checkpoint, str(root), model, opt, sched)
    assert manifest.read_bytes() == before_bytes
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not opt.state


def test_cli_refused_plan_exits_3_and_writes_nothing(checkpoint: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = cli_convert(checkpoint, root, model="wider_gpt2")
    assert r.exit_code == 3, r.output
    assert "Cannot resume" in r.stderr and "under policy 'strict'" in r.stderr
    as_json = cli_convert(checkpoint, root, "--json", model="wider_gpt2")
    assert as_json.exit_code == 3, as_json.output
    body = json.loads(as_json.stdout)
    assert body["ok"] is False and body["plan"]["refusals"] and body["checkpoint"] is None
    assert not root.exists()


def test_refused_plan_changes_nothing(checkpoint: str, tmp_path: Path) -> None:
    model = wider_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanRefused):
        convert(checkpoint, str(tmp_path / "root"), model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "root").exists()


def test_hostile_source_is_refused_with_nothing_written(checkpoint: str, tmp_path: Path) -> None:
    source = tmp_path / "checkpoint-3"
    shutil.copytree(checkpoint, source)
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "payload": Payload(str(marker))}, source / "optimizer.pt")
    model, opt, sched = fresh()
    with pytest.raises(CheckpointError, match="needs arbitrary unpickling"):
        convert(str(source), str(tmp_path / "root"), model, opt, sched)
    assert not marker.exists()
    assert not (tmp_path / "root").exists()
    r = cli_convert(str(source), tmp_path / "root2")
    assert r.exit_code == 1 and "needs arbitrary unpickling" in r.stderr
    assert not marker.exists() and not (tmp_path / "root2").exists()


def test_a_written_checkpoint_that_fails_its_checksums_is_not_reported(checkpoint: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = convert_module.write_snapshot

    def write_then_rot(snap: Any, root: Any, storage_options: Any = None) -> str:
        uri = real(snap, root, storage_options)
        data = next(Path(uri).glob("model.*.safetensors"))
        raw = bytearray(data.read_bytes())
        raw[-1] ^= 0xFF  # the last byte of the last tensor: the header still parses
        data.write_bytes(bytes(raw))
        return uri

    monkeypatch.setattr(convert_module, "write_snapshot", write_then_rot)
    model, opt, sched = fresh()
    root = tmp_path / "root"
    with pytest.raises(CheckpointError, match="failed verification after writing.*fails its checksum"):
        convert(checkpoint, str(root), model, opt, sched)
    assert resumer.latest_checkpoint(str(root)) is None  # quarantined: never selected
    assert (next(root.iterdir()) / "quarantine.json").exists()


def test_export_torch_loads_into_plain_torch(converted: convert_module.Conversion, checkpoint: str,
                                             tmp_path: Path) -> None:
    out = tmp_path / "exported.pt"
    r = CliRunner().invoke(cli, ["export", converted.checkpoint, str(out), "--to", "torch", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tensors"] == len(resumer.read_manifest(converted.checkpoint).tensors)
    saved = torch.load(out, weights_only=True)
    assert saved["step"] == STEPS
    assert saved["resumer"]["source"] == converted.checkpoint and saved["resumer"]["format"] == "native"
    model, opt, sched = fresh()
    model.load_state_dict(saved["model"])  # strict: every name, the tied lm_head.weight included
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert saved["resumer"]["param_names"] == [by_id[id(p)] for g in opt.param_groups for p in g["params"]]
    assert_same(after(model, opt, sched, saved["step"]), resumed_state(checkpoint), rng=False)


def test_export_hf_resumes_and_loads_in_transformers(converted: convert_module.Conversion, checkpoint: str,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "hf-out"
    r = CliRunner().invoke(cli, ["export", converted.checkpoint, str(out), "--to", "hf"])
    assert r.exit_code == 0, r.output
    assert "deduplicated: lm_head.weight is tied to transformer.wte.weight" in r.stdout
    assert registry.detect(Store.open(str(out))) == "hf-trainer"
    assert_same(resumed_state(str(out)), resumed_state(checkpoint))  # the RNG travelled too
    weights = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in weights
    state = transformers.TrainerState.load_from_json(str(out / "trainer_state.json"))
    assert state.global_step == STEPS
    gpt2().config.save_pretrained(str(out))
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(out))
    straight = resumed_state(checkpoint)["weights"]
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, straight[name]), name


def test_export_refuses_an_occupied_out(converted: convert_module.Conversion, tmp_path: Path) -> None:
    file = tmp_path / "taken.pt"
    file.write_bytes(b"mine")
    r = CliRunner().invoke(cli, ["export", converted.checkpoint, str(file), "--to", "torch"])
    assert r.exit_code == 2 and "already exists" in r.stderr and file.read_bytes() == b"mine"
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    r = CliRunner().invoke(cli, ["export", converted.checkpoint, str(folder), "--to", "hf"])
    assert r.exit_code == 2 and "non-empty directory" in r.stderr
    assert os.listdir(folder) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(converted.checkpoint, str(empty), "hf").files[-1] == "trainer_state.json"


def test_failed_export_leaves_nothing(converted: convert_module.Conversion, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(file: Store) -> None:
        raise CheckpointError(f"{file.uri}: refused for the test")

    monkeypatch.setattr(export_module, "_weights_only", refuse)
    out = tmp_path / "hf-out"
    with pytest.raises(CheckpointError, match="refused for the test"):
        export(converted.checkpoint, str(out), "hf")
    assert not out.exists()  # model.safetensors was finished and renamed, then removed with the rest
    with pytest.raises(CheckpointError, match="refused for the test"):
        export(converted.checkpoint, str(tmp_path / "x.pt"), "torch")
    assert os.listdir(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="refused for the test"):
        export(converted.checkpoint, str(empty), "hf")
    assert os.listdir(tmp_path) == ["empty"] and os.listdir(empty) == []  # it was there before: it stays


def net(seed: int = 7) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def fresh_net() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A .ckpt the real lightning.Trainer writes: the network under ``self.model``, Adam and StepLR, 3 steps."""
    lightning = pytest.importorskip("lightning")

    class Wrapped(lightning.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.model = net(seed=0)

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.model(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.Adam(self.parameters(), lr=0.01)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}

    out = tmp_path_factory.mktemp("lightning")
    data = torch.utils.data.TensorDataset(torch.randn(12, 4), torch.randn(12, 2))
    trainer = lightning.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_progress_bar=False,
                                enable_model_summary=False,
                                callbacks=[lightning.pytorch.callbacks.ModelCheckpoint(dirpath=str(out))])
    trainer.fit(Wrapped(), torch.utils.data.DataLoader(data, batch_size=4))
    (path,) = out.glob("*.ckpt")
    return str(path)


def test_lightning_converts_and_exports(lightning_ckpt: str, tmp_path: Path) -> None:
    model, opt, sched = fresh_net()
    straight = after(model, opt, sched, resumer.resume(lightning_ckpt, model, opt, sched).step)
    done = convert(lightning_ckpt, str(tmp_path / "root"), *fresh_net())
    assert done.format == "lightning" and done.rng == ()  # a Lightning checkpoint keeps no RNG state
    model, opt, sched = fresh_net()
    assert_same(after(model, opt, sched, resumer.resume(done.checkpoint, model, opt, sched).step), straight,
                rng=False)
    exported = export(lightning_ckpt, str(tmp_path / "plain.pt"), "torch")
    assert exported.format == "lightning" and exported.step == STEPS
    saved = torch.load(tmp_path / "plain.pt", weights_only=True)
    model, opt, sched = fresh_net()
    model.load_state_dict(saved["model"])  # the LightningModule's 'model.' prefix was stripped by the reader
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    assert_same(after(model, opt, sched, saved["step"]), straight, rng=False)


def test_a_dcp_directory_exports_by_name(tmp_path: Path) -> None:
    """torch.distributed.checkpoint.save's directory (optimizer keyed by name, two groups) to one torch.save file."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def run() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        model = net(seed=0)
        opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": 1e-2},
                                {"params": model[2].parameters(), "lr": 3e-3}])
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    model, opt, sched = run()
    for _ in range(STEPS):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save({"model": model_sd, "optim": optim_sd, "lr_scheduler": sched.state_dict(), "step": STEPS},
                 checkpoint_id=str(tmp_path / "step-3"))
    done = export(str(tmp_path / "step-3"), str(tmp_path / "plain.pt"), "torch")
    assert done.format == "torch-dcp" and done.step == STEPS
    saved = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert saved["resumer"]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    again, again_opt, again_sched = run()
    again.load_state_dict(saved["model"])
    again_opt.load_state_dict(saved["optimizer"])
    again_sched.load_state_dict(saved["scheduler"])
    assert_same(after(again, again_opt, again_sched, saved["step"]), after(model, opt, sched, STEPS), rng=False)
