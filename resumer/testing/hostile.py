"""Hostile input for tests: a pickle that runs code when it is loaded (what every reader must refuse)."""

from __future__ import annotations

import os
import shlex
from typing import Any


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: a test asserts the file never appears."""

    def __init__(self, marker: str | os.PathLike[str]) -> None:
        self.marker = os.fspath(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(self.marker)}",))
