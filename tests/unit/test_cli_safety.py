"""The command line against hostile input, run in-process (``resumer_cli`` in conftest.py).

Bad factories, URIs and storage options are one paragraph and exit 2; names read from a checkpoint reach the
terminal escaped. What needs a real process (``--json`` stdout is one JSON document whatever writes to file
descriptor 1; a file in the working directory cannot shadow a module the CLI imports; the console script lists
every command) is in ``tests/integration/test_entry_points.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import Result

import resumer
from resumer import examples as ex
from resumer.render.html import plan_html
from resumer.render.text import plan_markdown, printable
from resumer.testing import defined_commands

MLP = "resumer.examples:mlp_v1"
EVIL = "w\x1b]0;pwned\x07\x1b[2J\r[red]x[/red]<b>\u202e"
RAW = ("\x1b", "\x07", "\r", "\u202e")
RunCli = Callable[..., Result]  # the resumer_cli fixture (conftest.py)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("safety"))
    resumer.save_checkpoint(path, 1, ex.mlp_v1())
    return path


@pytest.fixture(scope="module")
def evil_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A checkpoint whose tensor name carries terminal escapes, a carriage return, markup and HTML."""
    model = torch.nn.Module()
    model.register_parameter(EVIL, torch.nn.Parameter(torch.zeros(2)))
    path = str(tmp_path_factory.mktemp("evil"))
    resumer.save_checkpoint(path, 1, model)
    return path


def _one_paragraph(stderr: str) -> None:
    assert "Traceback" not in stderr
    assert stderr.strip() and "\n" not in stderr.strip(), stderr


@pytest.fixture
def factories(tmp_path: Path) -> Path:
    (tmp_path / "boom_import.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "bad_syntax.py").write_text("def build(:\n")
    (tmp_path / "boom_factory.py").write_text("def build():\n    raise ValueError('factory failed')\n")
    return tmp_path


@pytest.mark.parametrize(("args", "message"), [
    (("--model", "boom_import:build"),
     "Bad --model 'boom_import:build': importing module 'boom_import' raised RuntimeError: boom at import. "
     "Fix the module (run with -v to see the traceback)."),
    (("--model", "bad_syntax:build"), "importing module 'bad_syntax' raised SyntaxError"),
    (("--model", "boom_factory:build"),
     "--model 'boom_factory:build' raised ValueError: factory failed. Fix the factory"),
    (("--model", MLP, "--optimizer", "boom_factory:build"), "--optimizer 'boom_factory:build' raised TypeError"),
    (("--model", MLP, "-S", "a=1", "-S", "a.b=2"),
     "Bad --storage-option 'a.b=2': 'a' is already set to a value (1), so it cannot also hold 'b'."),
    (("--model", MLP, "-S", "=1"), "Bad --storage-option '=1': write KEY=VALUE"),
    (("--model", MLP, "-S", "a..b=1"), "Bad --storage-option 'a..b=1': write KEY=VALUE"),
])
def test_bad_factory_or_option_is_one_paragraph_exit_2(resumer_cli: RunCli, root: str, factories: Path,
                                                       args: tuple[str, ...], message: str) -> None:
    r = resumer_cli("plan", root, *args, cwd=factories)
    assert r.exit_code == 2, r.stderr
    assert message in r.stderr
    _one_paragraph(r.stderr)


@pytest.mark.parametrize(("uri", "options", "message"), [
    ("nosuchproto://bucket/x", (), "Cannot open nosuchproto://bucket/x"),
    ("s3://", ("-S", "anon=true"), "(ValueError: Cannot traverse all of S3). Check the URI"),
    ("s3://bucket/x", ("-S", "bogus=1"), "unexpected keyword argument 'bogus'). Check the URI"),
])
def test_bad_uri_or_storage_option_is_one_paragraph_exit_2(resumer_cli: RunCli, uri: str, options: tuple[str, ...],
                                                           message: str) -> None:
    r = resumer_cli("plan", uri, "--model", MLP, *options)
    assert r.exit_code == 2, r.stderr
    assert message in r.stderr
    _one_paragraph(r.stderr)


def test_verbose_shows_the_traceback(resumer_cli: RunCli, root: str, factories: Path) -> None:
    r = resumer_cli("-v", "plan", root, "--model", "boom_factory:build", cwd=factories)
    assert r.exit_code == 2
    assert "Traceback" in r.stderr and "ValueError: factory failed" in r.stderr


def test_printable_escapes_controls_only() -> None:
    assert printable("a\x1b]0;t\x07b\rc\u202ed") == "a\\x1b]0;t\\x07b\\x0dc\\u202ed"
    assert printable("two\nlines\r", keep_newlines=True) == "two\nlines\\x0d"
    assert printable("blocks.0.attn/ünïcode") == "blocks.0.attn/ünïcode"


def _no_raw_controls(text: str) -> None:
    for ch in RAW:
        assert ch not in text, f"{ch!r} reached the output raw"


def test_checkpoint_names_are_escaped_in_table_refusals_and_markdown(resumer_cli: RunCli, evil_root: str) -> None:
    table = resumer_cli("plan", evil_root, "--model", MLP)
    assert table.exit_code == 3
    _no_raw_controls(table.stdout + table.stderr)
    shown = table.stdout.replace("\n", "").replace(" ", "")
    assert "w\\x1b]0;pwned\\x07\\x1b[2J\\x0d[red]x[/red]<b>\\u202e" in shown  # escaped, markup left as text
    markdown = resumer_cli("plan", evil_root, "--model", MLP, "--markdown")
    _no_raw_controls(markdown.stdout)
    assert "## Refusals" in markdown.stdout and "w\\x1b]0;pwned\\x07" in markdown.stdout


def test_refusal_raised_by_resume_is_escaped(resumer_cli: RunCli, evil_root: str) -> None:
    r = resumer_cli("resume", evil_root, "--model", MLP)
    assert r.exit_code == 3 and "Cannot resume" in r.stderr
    _no_raw_controls(r.stdout + r.stderr)
    assert "w\\x1b]0;pwned\\x07" in r.stderr.replace("\n", "")


def test_json_keeps_the_name_exactly(resumer_cli: RunCli, evil_root: str) -> None:
    r = resumer_cli("plan", evil_root, "--model", MLP, "--json")
    assert r.exit_code == 3
    names = {e["name"] for e in json.loads(r.stdout)["entries"]}
    assert EVIL in names  # lossless: json.dumps escapes, json.loads gives the bytes back


def test_html_escapes_controls_and_markup(evil_root: str) -> None:
    plan = resumer.plan(evil_root, ex.mlp_v1())
    html = plan_html(plan)
    _no_raw_controls(html)
    assert "w\\x1b]0;pwned\\x07\\x1b[2J\\x0d[red]x[/red]&lt;b&gt;" in html
    _no_raw_controls(plan_markdown(plan))
    assert any(e.name == EVIL for e in plan.entries)  # the plan itself is untouched


def test_inspect_and_list_escape_what_the_storage_says(resumer_cli: RunCli, tmp_path: Path) -> None:
    evil_dir = tmp_path / "evil\x1b[2J"
    uri = resumer.save_checkpoint(str(evil_dir), 2, ex.mlp_v1())
    r = resumer_cli("inspect", uri)
    assert r.exit_code == 0, r.stderr
    _no_raw_controls(r.stdout)
    assert "evil\\x1b[2J" in r.stdout
    listed = resumer_cli("list", str(evil_dir))
    _no_raw_controls(listed.stdout)
    assert "evil\\x1b[2J" in listed.stdout




def test_every_command_is_registered_on_the_cli_group(resumer_cli: RunCli) -> None:
    """The group the entry point runs lists every command defined (the console script: test_entry_points.py)."""
    r = resumer_cli("--help")
    assert r.exit_code == 0
    listed = {line.split()[0] for line in r.stdout.split("Commands:")[1].splitlines() if line.strip()}
    expected = {"inspect", "plan", "resume", "list", "demo", "watch", "history", "prune", "submit", "status",
                "stop", "logs"}
    assert expected <= defined_commands()
    assert defined_commands() <= listed
