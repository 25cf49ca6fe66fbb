"""The ``resumer`` command through its real entry points, in fresh processes: what an in-process run cannot show.

The console script is installed and lists every command; ``python -m resumer`` runs the same command;
``--json`` stdout is one JSON document even when code underneath writes to file descriptor 1; a file in the
working directory cannot shadow a module the CLI imports later. Everything else about the command line is tested
in-process in ``tests/unit/test_cli.py`` and ``tests/unit/test_cli_safety.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import resumer
from resumer import examples as ex
from resumer.testing import defined_commands

pytestmark = pytest.mark.slow  # every test starts a Python that imports torch, ray and mlflow

ENTRY_POINT = str(Path(sys.executable).parent / "resumer")


def resumer_cli(*args: str, cwd: str | Path | None = None, module: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the installed ``resumer`` script (or ``python -m resumer``) in a fresh process."""
    env = {**os.environ, "COLUMNS": "400"}
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "resumer"] if module else [ENTRY_POINT]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=180, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("entry"))
    resumer.save_checkpoint(path, 1, ex.mlp_v1())
    return path




def test_every_command_is_registered_on_the_entry_point() -> None:
    (script,) = entry_points(group="console_scripts", name="resumer")
    assert script.value == "resumer.cli.main:main"
    assert os.access(ENTRY_POINT, os.X_OK), f"{ENTRY_POINT} is not installed"
    r = resumer_cli("--help")
    assert r.returncode == 0
    listed = {line.split()[0] for line in r.stdout.split("Commands:")[1].splitlines() if line.strip()}
    expected = {"inspect", "plan", "resume", "list", "demo", "watch", "history", "prune", "submit", "status",
                "stop", "logs"}
    assert expected <= defined_commands()
    assert defined_commands() <= listed


NOISY = """
import os
import resumer.examples


def build():
    print("noise from print")
    os.write(1, b"noise on fd 1\\n")
    return resumer.examples.mlp_v1()
"""


@pytest.mark.parametrize("command", ["plan", "resume"])
def test_json_stdout_is_one_document_whatever_prints(root: str, tmp_path: Path, command: str) -> None:
    (tmp_path / "noisy.py").write_text(NOISY)
    r = resumer_cli(command, root, "--model", "noisy:build", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # raises on anything but exactly one JSON document
    assert isinstance(doc, dict) and doc["ok"] is True
    assert "noise from print" in r.stderr and "noise on fd 1" in r.stderr


def test_json_error_leaves_stdout_empty(tmp_path: Path) -> None:
    (tmp_path / "noisy.py").write_text(NOISY)
    r = resumer_cli("plan", str(tmp_path / "absent"), "--model", "noisy:build", "--json", cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert "does not exist" in r.stderr


SHADOW = """
open({marker!r}, "w").write("the working directory shadowed an import")
raise ImportError("shadow")
"""


@pytest.mark.parametrize("module", [False, True], ids=["entry-point", "python-m"])
def test_working_directory_cannot_shadow_later_imports(tmp_path: Path, module: bool) -> None:
    """s3fs imports ``netrc`` (through aiohttp) only once an s3:// URI is opened, after the factory ran."""
    marker = tmp_path / "marker"
    (tmp_path / "netrc.py").write_text(SHADOW.format(marker=str(marker)))
    (tmp_path / "mylayers.py").write_text("import torch\n\ndef head():\n    return torch.nn.Linear(2, 2)\n")
    (tmp_path / "mymodel.py").write_text("import mylayers\n\ndef build():\n    return mylayers.head()\n")
    r = resumer_cli("plan", "s3://bucket/x", "--model", "mymodel:build", "-S", "bogus=1", cwd=tmp_path,
                    module=module)
    # The factory's module and its sibling came from the working directory; the storage layer was reached.
    assert r.returncode == 2 and "unexpected keyword argument 'bogus'" in r.stderr, r.stderr
    assert not marker.exists(), "a netrc.py in the working directory ran"
