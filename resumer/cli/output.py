"""``--json``: stdout carries the JSON document and nothing else, whatever runs underneath.

Ray's log monitor prints ``(raylet) ...`` lines to the process's stdout, C extensions write to file
descriptor 1 and user factories call ``print()``. So while a ``--json`` command works, file descriptor 1
(``os.dup2``) and ``sys.stdout`` both point at stderr, and the JSON goes to the real stdout, saved aside.

Commands opt in with ``json_option`` and write with ``emit_json``; ``resumer.cli.common.run_command`` wraps
the work in ``json_stdout``. This module imports no other module of ``resumer.cli``: every command can use it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import click

JSON_META_KEY = "resumer.json"

# Set by ``resumer.cli.main.main`` (a process of its own): stdout stays pointed at stderr after the JSON is out,
# because Ray's threads and exit handlers may still print after the command returns.
keep_redirected_at_exit = False


class _Redirect:
    """fd 1 and ``sys.stdout`` sent to stderr; ``write`` reaches the real stdout."""

    def __init__(self) -> None:
        self.stdout: IO[str] = sys.stdout
        self.saved_fd: int | None = None
        try:
            fd = self.stdout.fileno()
        except (AttributeError, OSError, ValueError):  # e.g. click's CliRunner: no descriptor to redirect
            fd = None
        self.stdout.flush()
        if fd == 1:
            self.saved_fd = os.dup(1)
            os.dup2(2, 1)
        sys.stdout = sys.stderr

    def write(self, text: str) -> None:
        if self.saved_fd is None:
            self.stdout.write(text)
            self.stdout.flush()
            return
        data = text.encode("utf-8")
        while data:
            data = data[os.write(self.saved_fd, data):]

    def restore(self) -> None:
        sys.stderr.flush()
        if self.saved_fd is not None:
            os.dup2(self.saved_fd, 1)
            os.close(self.saved_fd)
            self.saved_fd = None
        sys.stdout = self.stdout


_active: _Redirect | None = None


@contextmanager
def json_stdout() -> Iterator[None]:
    """Everything written to stdout inside goes to stderr; ``emit_json`` still reaches the real stdout."""
    global _active
    if _active is not None:
        yield
        return
    _active = _Redirect()
    try:
        yield
    finally:
        if not keep_redirected_at_exit:
            _active.restore()
            _active = None


def emit_json(obj: Any, *, indent: int | None = 2) -> None:
    """Write one JSON document (and a newline) to the real stdout."""
    text = json.dumps(obj, indent=indent) + "\n"
    if _active is None:
        click.echo(text, nl=False)
    else:
        _active.write(text)


def _mark_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[JSON_META_KEY] = True
    return value


json_option = click.option("--json", "as_json", is_flag=True, callback=_mark_json,
                           help="Print JSON for scripts: stdout holds the JSON document and nothing else.")


def wants_json() -> bool:
    """Whether the running command was given the shared ``--json`` option."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(JSON_META_KEY))
