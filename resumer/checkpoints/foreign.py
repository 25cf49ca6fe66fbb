"""A folder of other tools' checkpoints used as a root: which one to resume from.

The folders people already have: a Hugging Face Trainer ``output_dir`` (``checkpoint-N/`` children), a
torchtitan ``checkpoint/`` folder (``step-N/`` DCP directories), a Ray Train run directory (``checkpoint_*/``
children). One listing of the folder finds its children by name; the newest (highest N, or the latest Ray
timestamp or index) that its format recognises and opens is used. One that does not is passed over for the next
newest, with the reason logged and written in the plan's notes. Nothing is ever marked or deleted here: these
checkpoints are not resumer's.

Steps of different tools are different counters, so a folder is never read across tools: one that holds children
of two naming families (``checkpoint-N`` beside ``step-N``), or resumer's own checkpoints beside another tool's,
is refused with a message that says to pass one checkpoint directory. ``step-N`` is also resumer's own name: a
``step-N`` with ``manifest.json`` is resumer's, one with DCP's ``.metadata`` is torch DCP's, one with neither is
a torn resumer checkpoint (native selection's business).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from resumer.core.errors import CheckpointError
from resumer.formats import registry
from resumer.formats.native.manifest import STEP_DIR
from resumer.formats.source import CheckpointSource, ReadOptions
from resumer.storage.store import Store

logger = logging.getLogger(__name__)

STEPS = "step-N"  # resumer's own naming, and torchtitan's
FAMILIES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("checkpoint-N", re.compile(r"^checkpoint-(\d+)$"), "Hugging Face Trainer's"),
    ("checkpoint_*", re.compile(r"^checkpoint_(.*\d.*)$"), "Ray Train's, or Accelerate's automatic naming"),
    (STEPS, STEP_DIR, "resumer's or torchtitan's"),
)
MAX_REASON = 400  # characters of one passed-over reason kept in the plan's notes


@dataclass(frozen=True, slots=True, kw_only=True)
class Child:
    """A directory under the folder whose name one tool gives its checkpoints."""

    name: str
    family: str
    key: tuple[int, ...]  # the numbers in its name: the step, Ray's index, or Ray's timestamp field by field


def children(store: Store) -> list[Child]:
    """The folder's checkpoint-named directories, newest first, from one listing.

    Raises:
        CheckpointError: the folder holds directories of two naming families (which is newer cannot be told).
    """
    try:
        listed = store.ls(detail=True)
    except FileNotFoundError:
        return []
    found: list[Child] = []
    for entry in listed:
        if entry.get("type") != "directory":
            continue
        name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        for family, pattern, _ in FAMILIES:
            match = pattern.match(name)
            if match:
                found.append(Child(name=name, family=family,
                                   key=tuple(int(n) for n in re.findall(r"\d+", match.group(1)))))
                break
    families = sorted({c.family for c in found})
    if len(families) > 1:
        raise _mixed(store, [f"{family} directories ({_whose(family)})" for family in families])
    return sorted(found, key=lambda c: (c.key, c.name), reverse=True)


def _whose(family: str) -> str:
    return next(whose for name, _, whose in FAMILIES if name == family)


def _mixed(store: Store, kinds: list[str]) -> CheckpointError:
    return CheckpointError(
        f"Cannot choose a checkpoint under {store.uri}: it holds {' and '.join(kinds)}, and which is newer cannot "
        "be told (each tool counts its own steps). Pass the one checkpoint directory to resume from, or keep each "
        "tool's checkpoints in a folder of their own. Nothing was loaded, marked or deleted.",
        uri=store.uri, quarantine=False)


def other_tools(kids: list[Child]) -> bool:
    """Whether the children are named by another tool only (no ``step-N``, which may be resumer's)."""
    return bool(kids) and kids[0].family != STEPS


def open_newest(store: Store, kids: list[Child], options: ReadOptions,
                passed_over: Mapping[str, str] | None = None) -> CheckpointSource | None:
    """The newest child that its format recognises and opens, with the choice in its plan notes.

    ``passed_over`` maps URIs a caller already found bad (while reading them) to why; they are passed over
    again. Returns None for ``step-N`` children when the newest that is not torn is resumer's own, or none is
    another format's: native selection's verdict (and its message) stands.

    Raises:
        CheckpointError: no child of another tool opens (each one and why are listed), or a ``step-N`` of
            another format lies beside resumer's own checkpoints.
    """
    skipped: list[tuple[str, str]] = []
    for child in kids:
        sub = store.child(child.name)
        found = registry.detect(sub) if child.family == STEPS else None
        if child.family == STEPS and found in (None, registry.NATIVE):
            if found is None:
                continue  # no manifest.json and no other format's files: a torn resumer checkpoint
            if skipped:  # another format's step-N is newer than this resumer checkpoint
                raise _mixed(store, ["resumer checkpoints", f"another format's newer ones ({skipped[0][0]})"])
            return None  # resumer's own, passed over by native selection: its verdict stands
        if passed_over and sub.uri in passed_over:
            skipped.append((child.name, passed_over[sub.uri]))
            continue
        found = found or registry.detect(sub)
        if found is None:
            skipped.append((child.name, "not a checkpoint of a known format (incomplete, or another tool's)"))
            continue
        try:
            source = registry.open(sub, options, format=found)
        except CheckpointError as exc:
            skipped.append((child.name, str(exc)))
            continue
        return _chosen(store, child, source, kids, skipped)
    if not skipped:
        return None
    listed = "; ".join(f"{name}: {why}" for name, why in skipped)
    raise CheckpointError(f"Cannot resume from {store.uri}: none of its {len(skipped)} {kids[0].family} "
                          f"directories ({_whose(kids[0].family)}) could be read ({listed}). Pass a checkpoint "
                          "directory that reads. Nothing was loaded, marked or deleted.", uri=store.uri,
                          quarantine=False)


def _chosen(store: Store, child: Child, source: CheckpointSource, kids: list[Child],
            skipped: list[tuple[str, str]]) -> CheckpointSource:
    for name, why in skipped:
        logger.warning("[select] passed over %s: %s", store.uri_of(name), why)
    logger.info("[select] %s: chose %s (%s), the newest of %d %s directories that reads", store.uri, child.name,
                source.format, len(kids), child.family)
    note = (f"chosen from the folder {store.uri}: {child.name} ({source.format}), the newest of its {len(kids)} "
            f"{child.family} director{'y' if len(kids) == 1 else 'ies'} that reads")
    if skipped:
        note += "; passed over (not marked, not deleted): " + "; ".join(
            f"{name}: {why[:MAX_REASON]}" for name, why in skipped)
    source.signature = replace(source.signature, notes=(*source.signature.notes, note))
    return source


def refuse_beside(store: Store, kids: list[Child], chosen_step: int) -> None:
    """Refuse a root whose resumer checkpoint (step ``chosen_step``) has another format's ``step-N`` newer than
    it beside it (torchtitan's DCP): only directories newer than the chosen one are looked into, and those are
    normally none.

    Raises:
        CheckpointError: one of them is another format's checkpoint.
    """
    for child in kids:
        if child.family != STEPS or child.key <= (chosen_step,):
            break
        found = registry.detect(store.child(child.name))
        if found not in (None, registry.NATIVE):
            raise _mixed(store, [f"resumer checkpoints (the newest readable is step {chosen_step})",
                                 f"a newer {found} checkpoint ({child.name})"])
