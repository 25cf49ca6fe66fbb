"""Checks of one field of a job's configuration (the job spec, an attempt's config): a UsageError naming it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from resumer.core.errors import UsageError

SHARDING = ("none", "fsdp")  # how a job's workers hold the model: replicated (DDP), or sharded by FSDP2


@dataclass(frozen=True, slots=True)
class Fields:
    """The checks, for one kind of document (``what``: "Job spec", "Attempt config")."""

    what: str

    def error(self, name: str, problem: str) -> UsageError:
        return UsageError(f"{self.what} field '{name}': {problem}")

    def integer(self, value: Any, name: str, *, minimum: int = 1, _or_null: str = "") -> int:
        """``value`` as an int of at least ``minimum`` (a bool is no integer)."""
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.error(name, f"must be an integer >= {minimum}{_or_null}, got {value!r}")
        return value

    def optional_integer(self, value: Any, name: str, *, minimum: int = 1) -> int | None:
        """None, or ``value`` as an int of at least ``minimum``."""
        return None if value is None else self.integer(value, name, minimum=minimum, _or_null=" or null")

    def number(self, value: Any, name: str, *, unit: str = "") -> float:
        """``value`` as a float >= 0 (an int is fine; a bool is no number)."""
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise self.error(name, f"must be a number{' of ' + unit if unit else ''} >= 0, got {value!r}")
        return float(value)

    def choice(self, value: Any, name: str, allowed: tuple[str, ...]) -> str:
        """``value`` as one of ``allowed``."""
        if value not in allowed:
            raise self.error(name, f"must be one of {', '.join(allowed)}, got {value!r}")
        return str(value)
