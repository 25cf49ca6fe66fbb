"""convert and export on small models (the real-tool round trips are tests/integration/test_convert_export.py).

Pinned here: a source without RNG state gives a native checkpoint without it (not the converting process's
streams); a source keyed by position exports its positions and says it never knew the names; tied weights are
stored once in the hf layout and listed; the target may not lie inside the source; an export OUT is checked
before anything is read; a crash mid-export leaves no file under the final name.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import resumer
from resumer.cli.main import cli
from resumer.core.errors import UsageError
from resumer.runtime.convert import convert
from resumer.runtime.export import export


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(x)))


def trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
    for _ in range(3):
        model(torch.randint(0, 8, (5,))).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def fresh() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(5)
    model = Tied()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)


@pytest.fixture
def plain_file(tmp_path: Path) -> str:
    """A plain torch.save checkpoint: position-keyed optimizer, no RNG."""
    model, opt, sched = trained()
    path = tmp_path / "plain.pt"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": 3}, path)
    return str(path)


def test_a_source_without_rng_gives_a_checkpoint_without_rng(plain_file: str, tmp_path: Path) -> None:
    model, opt, sched = fresh()
    done = convert(plain_file, str(tmp_path / "root"), model, opt, sched)
    assert done.rng == () and "the plan restored no RNG state: the native checkpoint holds none" in done.notes
    manifest = resumer.read_manifest(done.checkpoint)
    assert not manifest.rng and manifest.signature.rng == ()
    objects = fresh()
    torch.manual_seed(42)
    random.seed(42)
    before = (torch.get_rng_state(), random.getstate())
    result = resumer.resume(done.checkpoint, *objects)
    assert [e.action for e in result.plan.section(resumer.Section.RNG)] == [resumer.Action.SKIP]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]


def test_positional_source_exports_positions_without_names(plain_file: str, tmp_path: Path) -> None:
    done = export(plain_file, str(tmp_path / "out.pt"), "torch")
    assert any("never names the parameters" in n for n in done.notes)
    saved = torch.load(tmp_path / "out.pt", weights_only=True)
    assert saved["resumer"]["param_names"] is None and saved["resumer"]["format"] == "torch-save"
    original = torch.load(plain_file, weights_only=True)["optimizer_state_dict"]
    model, opt, _ = fresh()
    opt.load_state_dict(saved["optimizer"])
    for i, p in enumerate(model.parameters()):
        for key, value in original["state"][i].items():
            assert torch.equal(opt.state[p][key], value), (i, key)


def test_tied_weights_are_stored_once_in_hf_and_listed(tmp_path: Path) -> None:
    model, opt, sched = trained()
    uri = resumer.save_checkpoint(str(tmp_path / "root"), 3, model, opt, sched)
    r = pytest.importorskip("click.testing").CliRunner().invoke(
        cli, ["export", uri, str(tmp_path / "hf"), "--to", "hf", "--json"])
    assert r.exit_code == 0, r.output
    body = json.loads(r.stdout)
    assert body["deduplicated"] == [{"name": "head.weight", "stored_as": "embed.weight"}]
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(weights) == {"embed.weight", "body.weight", "body.bias"}
    assert torch.equal(weights["embed.weight"], model.embed.weight.detach())
    torch_out = export(uri, str(tmp_path / "all.pt"), "torch")
    assert torch_out.deduplicated == ()
    sd = torch.load(tmp_path / "all.pt", weights_only=True)["model"]
    assert sd["head.weight"] is sd["embed.weight"]  # one tensor under both names, as state_dict() gives it


def test_target_inside_the_source_is_refused(tmp_path: Path) -> None:
    model, opt, sched = trained()
    uri = resumer.save_checkpoint(str(tmp_path / "root"), 3, model, opt, sched)
    with pytest.raises(UsageError, match="inside the source"):
        convert(uri, uri, *fresh())
    assert sorted(p.name for p in Path(uri).iterdir() if p.is_dir()) == []


def test_export_out_is_checked_before_reading(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        export(str(tmp_path / "no-such-checkpoint"), str(tmp_path / "dir"), "torch")
    with pytest.raises(UsageError, match="--to torch or --to hf"):
        export(str(tmp_path / "no-such-checkpoint"), str(tmp_path / "x"), "onnx")


CRASH = """
import os, sys
from resumer.runtime import export as export_module

def dying(obj):
    def fill(f):
        f.write(b"half a file")
        f.flush()
        os._exit(9)  # the process dies mid-write: no cleanup runs
    return fill

export_module._saver = dying
export_module.export(sys.argv[1], sys.argv[2], "torch")
"""


def test_a_crash_mid_export_leaves_no_file_under_the_final_name(plain_file: str, tmp_path: Path) -> None:
    out = tmp_path / "out" / "exported.pt"
    r = subprocess.run([sys.executable, "-c", CRASH, plain_file, str(out)], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 9, r.stderr
    assert not out.exists()
    (partial,) = out.parent.iterdir()
    assert partial.name.startswith(".exported.pt.partial-") and partial.read_bytes() == b"half a file"


def test_a_root_converts_its_newest_checkpoint(tmp_path: Path) -> None:
    model, opt, sched = trained()
    resumer.save_checkpoint(str(tmp_path / "src"), 2, *trained(seed=1))
    newest = resumer.save_checkpoint(str(tmp_path / "src"), 3, model, opt, sched)
    done = convert(str(tmp_path / "src"), str(tmp_path / "dst"), *fresh())
    assert done.source == newest and done.format == "native" and done.step == 3
    assert resumer.read_manifest(done.checkpoint).extra["converted_from"]["uri"] == newest
    again, again_opt, again_sched = fresh()
    resumer.resume(done.checkpoint, again, again_opt, again_sched)
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
