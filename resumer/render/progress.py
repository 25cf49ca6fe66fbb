"""A byte-count progress display for the CLI (shown only on a terminal, after a short delay)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import DownloadColumn, Progress, SpinnerColumn, TextColumn, TransferSpeedColumn

SHOW_AFTER_S = 1.0


@contextlib.contextmanager
def byte_progress(console: Console, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """Yield a callback taking a number of bytes; draws a bar once the work has lasted SHOW_AFTER_S."""
    started = time.monotonic()
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), DownloadColumn(), TransferSpeedColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    task = progress.add_task(description, total=total)
    shown = False

    def advance(n: int) -> None:
        nonlocal shown
        progress.advance(task, n)
        if not shown and time.monotonic() - started > SHOW_AFTER_S:
            progress.start()
            shown = True

    try:
        yield advance
    finally:
        if shown:
            progress.stop()
