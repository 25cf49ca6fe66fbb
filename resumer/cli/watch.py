"""``resumer watch ROOT``: report checkpoints as they appear (new, invalid, torn, quarantined) and stalls.

Exit codes: 0 normally (a loop ends at ``--timeout`` or on Ctrl-C); with ``--once``, 1 when the newest
committed checkpoint did not verify (invalid, quarantined, or unreadable right now: a resume would fall back
to an older one), 0 when it verified or there is none yet; 1 also when the listing itself fails; 2 on a
usage error.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from resumer.cli.common import EXIT_CHECKPOINT, EXIT_OK, err, out, parse_storage_options, run_command
from resumer.cli.output import emit_json, json_option
from resumer.render.text import printable

if TYPE_CHECKING:
    from resumer.checkpoints.watch import Watcher, WatchEvent

_POSITIVE = click.FloatRange(min=0, min_open=True)


def _emit(event: WatchEvent, as_json: bool) -> None:

    if as_json:
        emit_json(event.to_dict(), indent=None)  # one line per event, on the real stdout only
    else:
        out.print(f"{event.at}  {printable(event.describe())}", markup=False, highlight=False, soft_wrap=True)
    sys.stdout.flush()  # one line per event, visible at once through a pipe


def _once(watcher: Watcher, as_json: bool) -> int:

    events = watcher.poll()
    for event in events:
        _emit(event, as_json)
    if not events and not as_json:
        err.print(f"no checkpoints under {printable(watcher.root)}", markup=False, highlight=False)
    newest = watcher.newest_committed
    if newest is None or (watcher.latest_valid is not None and watcher.latest_valid.uri == newest.uri):
        return EXIT_OK
    err.print(f"the newest committed checkpoint {printable(newest.uri)} did not verify; a resume would fall back to an "
              "older one", markup=False, highlight=False)
    return EXIT_CHECKPOINT


@click.command(name="watch")
@click.argument("root")
@click.option("--interval", default=5.0, show_default=True, type=_POSITIVE, metavar="SECONDS",
              help="Seconds between polls (one listing each).")
@click.option("--stall-after", type=_POSITIVE, metavar="SECONDS",
              help="Report a stall when no new valid checkpoint appears for this long.")
@click.option("--checksums", is_flag=True, help="Verify every byte of each new checkpoint (sizes are always checked).")
@click.option("--once", is_flag=True, help="Poll once, report what is there, exit (1 if the newest is bad).")
@click.option("--timeout", type=_POSITIVE, metavar="SECONDS", help="Stop watching after this long.")
@json_option
@click.option("--storage-option", "-S", "storage", multiple=True, metavar="KEY=VALUE",
              help="fsspec storage option (repeatable; dotted keys nest).")
def watch_command(root: str, interval: float, stall_after: float | None, checksums: bool, once: bool,
                  timeout: float | None, as_json: bool, storage: tuple[str, ...]) -> None:
    """Watch ROOT and report each checkpoint as it appears: new, invalid (corrupt or torn), quarantined;
    and stalls in training progress. Reports what already exists first."""

    def run() -> int:
        from resumer.checkpoints.watch import Watcher, watch  # torch only for the commands that read checkpoints

        options = parse_storage_options(storage)
        if once:
            return _once(Watcher(root, storage_options=options, stall_after_s=stall_after, checksums=checksums),
                         as_json)
        if not as_json:
            err.print(f"watching {root} every {interval:g}s (Ctrl-C to stop)", markup=False, highlight=False)
        try:
            for event in watch(root, interval_s=interval, timeout_s=timeout, storage_options=options,
                               stall_after_s=stall_after, checksums=checksums):
                _emit(event, as_json)
        except KeyboardInterrupt:
            pass  # stopping a watcher is how it normally ends
        return EXIT_OK

    run_command(run)

