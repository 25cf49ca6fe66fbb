"""What every ``resumer`` command shares: exit codes, the consoles, storage options, one paragraph per error.

Exit codes: 0 ok, 1 bad checkpoint or storage (``history``: tracking server unreachable), 2 usage error,
3 plan refused. Command modules import this module; nothing here imports a command.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from types import TracebackType
from typing import Any

import click
from rich.console import Console

from resumer.cli import output as cli_output
from resumer.core.errors import PlanRefused, ResumerError, UsageError
from resumer.render.text import printable, printable_plan

EXIT_OK, EXIT_CHECKPOINT, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3
SECRET_WORDS = ("secret", "token", "password", "key", "credential")
# Libraries that raise on a URI or storage options they cannot use: their errors are about what the user gave.
STORAGE_PACKAGES = ("fsspec", "s3fs", "gcsfs", "adlfs", "aiobotocore", "botocore", "aiohttp", "urllib3", "requests")

out = Console()
err = Console(stderr=True)


def parse_storage_options(items: tuple[str, ...]) -> dict[str, Any] | None:
    """``key=value`` pairs (dotted keys nest: client_kwargs.endpoint_url=...); values may be JSON."""
    options: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        parts = key.split(".")
        if not eq or not all(p.strip() for p in parts):
            raise UsageError(f"Bad --storage-option {printable(item)!r}: write KEY=VALUE, where KEY is a name or "
                             "dotted names (e.g. -S anon=true -S client_kwargs.endpoint_url=http://127.0.0.1:9000).")
        try:
            parsed: Any = json.loads(value)
        except (json.JSONDecodeError, ValueError):
            parsed = value
        node = options
        *path, leaf = parts
        for i, p in enumerate(path):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"Bad --storage-option {printable(item)!r}: {'.'.join(path[:i + 1])!r} is already "
                                 f"set to a value ({node!r}), so it cannot also hold {'.'.join(parts[i + 1:])!r}. "
                                 "Give each option once.")
        if isinstance(node.get(leaf), dict):
            raise UsageError(f"Bad --storage-option {printable(item)!r}: {key!r} already holds nested options "
                             f"({', '.join(node[leaf])}). Give each option once.")
        node[leaf] = parsed
    return options or None


def redact(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """A copy safe to print or log: values of secret-looking keys are replaced."""
    if options is None:
        return None
    return {k: redact(v) if isinstance(v, dict) else ("***" if any(w in k.lower() for w in SECRET_WORDS) else v)
            for k, v in options.items()}


def say(text: str) -> None:
    """One message on stderr, control characters escaped, never re-wrapped (a script may grep it)."""
    err.print(printable(text, keep_newlines=True), markup=False, highlight=False, soft_wrap=True)


def _verbose() -> int:
    ctx = click.get_current_context(silent=True)
    return int(ctx.find_root().params.get("verbose") or 0) if ctx is not None else 0


def _from_storage(tb: TracebackType | None) -> bool:
    """Whether the innermost frame of ``tb`` is in a storage library."""
    name = ""
    while tb is not None:
        name = str(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    return name.partition(".")[0] in STORAGE_PACKAGES


def _unexpected(exc: Exception) -> int:
    """One paragraph for an error resumer did not raise on purpose (``-v`` shows the traceback)."""
    what = f"{type(exc).__name__}: {exc}"
    if _from_storage(exc.__traceback__):
        say(f"error: the storage library could not use the URI or storage options as given ({what}). Check the "
             "URI (e.g. s3://bucket/path) and every -S KEY=VALUE option against the filesystem's documentation; "
             "run with -v to see the traceback.")
        return EXIT_USAGE
    say(f"error: unexpected {what}. Nothing was changed by this command unless it said so; run with -v to see "
         "the traceback, and report it if the cause is not in your code or storage.")
    return EXIT_CHECKPOINT


def run_command(fn: Callable[[], int]) -> None:
    """Run a command body: exit codes from errors, one paragraph each; ``--json`` keeps stdout for the JSON."""
    with cli_output.json_stdout() if cli_output.wants_json() else nullcontext():
        try:
            code = fn()
        except Exception as exc:  # noqa: BLE001 - every error becomes one paragraph and an exit code
            if _verbose():
                traceback.print_exception(exc, file=sys.stderr)
            code = _report(exc)
    sys.exit(code)


def _report(exc: Exception) -> int:
    if isinstance(exc, PlanRefused):
        say(printable_plan(exc.plan).describe_refusal())
        return EXIT_REFUSED
    if isinstance(exc, UsageError):
        say(f"error: {exc}")
        return EXIT_USAGE
    if isinstance(exc, ResumerError):  # CheckpointError, TransientStorageError, ...: this checkpoint or storage
        say(f"error: {exc}")
        return EXIT_CHECKPOINT
    return _unexpected(exc)


storage_option = click.option("--storage-option", "-S", "storage", multiple=True, metavar="KEY=VALUE",
                              help="fsspec storage option (repeatable; dotted keys nest).")
