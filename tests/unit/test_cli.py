"""The command line, run in-process (``resumer_cli`` in conftest.py): exit codes, JSON, one-paragraph errors.

The real entry points (console script, ``python -m resumer``) are tested in
``tests/integration/test_entry_points.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import Result

import resumer
from resumer import examples as ex
from resumer.formats.native.manifest import FORMAT_VERSION

MLP = "resumer.examples:mlp_v1"
RunCli = Callable[..., Result]  # the resumer_cli fixture (conftest.py)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    model = ex.mlp_v1()
    opt = ex.adam(model)
    for step in range(1, 4):
        ex.train_step(model, opt, step)
    path = str(tmp_path_factory.mktemp("cli"))
    resumer.save_checkpoint(path, 3, model, opt, extra={"loss": 0.25})
    return path


def test_plan_ok_exit_0_with_json(resumer_cli: RunCli, root: str) -> None:
    r = resumer_cli("plan", root, "--model", MLP, "--optimizer", "resumer.examples:adam", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["ok"] is True and d["step"] == 3 and d["counts"]["optimizer_carried"] == 6


def test_plan_refused_exit_3_still_prints_json(resumer_cli: RunCli, root: str) -> None:
    r = resumer_cli("plan", root, "--model", "resumer.examples:mlp_v2_dropout", "--optimizer",
                    "resumer.examples:adam", "--json")
    assert r.exit_code == 3
    d = json.loads(r.stdout)
    assert d["ok"] is False and d["suggestion"] == "--rename auto"
    assert any(x["text"].startswith("model '3.weight': missing in checkpoint") for x in d["refusals"])


def test_plan_table_and_rename_auto(resumer_cli: RunCli, root: str) -> None:
    r = resumer_cli("plan", root, "--model", "resumer.examples:mlp_v2_dropout", "--rename", "auto")
    assert r.exit_code == 0, r.stderr
    assert "load-renamed" in r.stdout and "index shift" in r.stdout
    assert "optimizer" in r.stdout and "unused" in r.stdout  # no --optimizer: saved state listed as not used
    refused = resumer_cli("plan", root, "--model", "resumer.examples:mlp_v2_dropout")
    assert refused.exit_code == 3
    assert "To resume: --rename auto" in refused.stdout + refused.stderr


def test_plan_markdown(resumer_cli: RunCli, root: str) -> None:
    r = resumer_cli("plan", root, "--model", MLP, "--markdown")
    assert r.exit_code == 0
    assert r.stdout.startswith("# Resume plan: ok") and "| section | name | action |" in r.stdout


@pytest.mark.parametrize(("args", "message"), [
    (("--policy", "lenient"), "Unknown policy 'lenient'. Choose one of: strict, partial, reset-optimizer."),
    (("--rename", "nope"), "write OLD_REGEX=NEW"),
    (("--rename", "(x=y"), "Bad rename (x=y"),
])
def test_usage_errors_exit_2_without_traceback(resumer_cli: RunCli, root: str, args: tuple[str, ...],
                                               message: str) -> None:
    r = resumer_cli("plan", root, "--model", MLP, *args)
    assert r.exit_code == 2
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(("model", "message"), [
    ("resumer.examples", "write MODULE:FACTORY"),
    ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
    ("resumer.examples:nope", "has no attribute 'nope'"),
])
def test_bad_factory_exit_2(resumer_cli: RunCli, root: str, model: str, message: str) -> None:
    r = resumer_cli("plan", root, "--model", model)
    assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_bad_uri_and_missing_and_torn(resumer_cli: RunCli, tmp_path: Path) -> None:
    r = resumer_cli("plan", "nosuchproto://bucket/x", "--model", MLP)
    assert r.exit_code == 2 and "Cannot open nosuchproto://bucket/x" in r.stderr
    r = resumer_cli("inspect", str(tmp_path / "absent"))
    assert r.exit_code == 1 and "does not exist" in r.stderr
    torn = tmp_path / "torn"
    model = ex.mlp_v1()
    uri = resumer.save_checkpoint(str(torn), 1, model)
    os.remove(os.path.join(uri, "manifest.json"))
    r = resumer_cli("plan", uri, "--model", MLP)
    assert r.exit_code == 1 and "torn checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert any(n.startswith("model.") for n in os.listdir(uri))  # nothing deleted


def test_inspect_json_and_text(resumer_cli: RunCli, root: str) -> None:
    r = resumer_cli("inspect", root, "--json", "--verify")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["step"] == 3 and d["tensors"] == 6 and d["verified"] is True
    assert d["optimizer"]["class"] == "torch.optim.adam.Adam" and d["optimizer"]["params_with_state"] == 6
    assert sorted(f["path"].split(".")[0] for f in d["files"]) == ["model", "optimizer"]
    assert d["extra"] == {"loss": 0.25}
    assert len(d["checkpoints"]) == 1
    assert d["format_version"] == FORMAT_VERSION and d["kind"] == "resumer"
    assert d["code"]["model_class"] == "torch.nn.modules.container.Sequential" and d["code"]["fingerprint"]
    text = resumer_cli("inspect", root)
    assert "step        3" in text.stdout and "file        model." in text.stdout
    assert f"code        torch.nn.modules.container.Sequential fingerprint {d['code']['fingerprint']}" in text.stdout


def test_inspect_torch_save_file(resumer_cli: RunCli, tmp_path: Path) -> None:
    model = ex.mlp_v1()
    opt = ex.sgd(model)
    ex.train_step(model, opt, 1)
    path = str(tmp_path / "legacy.pt")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": 7}, path)
    d = json.loads(resumer_cli("inspect", path, "--json").stdout)
    assert d["kind"] == "torch.save" and d["step"] == 7 and d["optimizer"]["class"] == "torch.optim.sgd.SGD"


def test_resume_and_save_to_new_root(resumer_cli: RunCli, root: str, tmp_path: Path) -> None:
    target = str(tmp_path / "migrated")
    r = resumer_cli("resume", root, "--model", "resumer.examples:mlp_v2_dropout", "--optimizer",
                    "resumer.examples:adam", "--rename", "auto", "--save-to", target, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["step"] == 3 and d["saved"].endswith("step-0000000003")
    # The migrated checkpoint now resumes the v2 code under strict with no renames.
    model = ex.mlp_v2_dropout()
    assert resumer.plan(target, model, ex.adam(model)).ok
    refused = resumer_cli("resume", root, "--model", "resumer.examples:mlp_v2_dropout")
    assert refused.exit_code == 3 and "Cannot resume" in refused.stderr


def test_list(resumer_cli: RunCli, root: str) -> None:
    d = json.loads(resumer_cli("list", root, "--json").stdout)
    assert [x["step"] for x in d] == [3]


def test_demo_runs(resumer_cli: RunCli, tmp_path: Path) -> None:
    r = resumer_cli("demo", "--dir", str(tmp_path), "--steps", "20")
    assert r.exit_code == 0, r.stderr
    assert "Missing key(s) in state_dict" in r.stdout
    assert "To resume: --rename auto" in r.stdout
    assert "resumed at step 20" in r.stdout
