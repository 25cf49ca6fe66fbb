"""The registry of checkpoint formats: which readers exist, how one is chosen, and opening a checkpoint with it.

In the spirit of fsspec's ``known_implementations``: one line per format, naming its reader
(``module:attribute``, imported only when the format is tried), what it reads (said so that a user knows what
to pass), and the package it needs, if any (named in the error when it is missing).

Adding a format: a module with a ``FormatReader`` (``detect(probe) -> bool``, ``open(store, options) ->
CheckpointSource``; see ``resumer.formats.source``) and one line in ``KNOWN_FORMATS``. Detection tries the
formats in the order below and the first that says yes opens the checkpoint, so a specific format goes
before a general one that would also accept it (a Lightning ``.ckpt`` is a torch.save file too). A root of
native checkpoints is not a format: choosing one of them is ``resumer.checkpoints.catalog.select``'s work.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

from resumer.core.errors import CheckpointError, UsageError
from resumer.formats.source import CheckpointSource, FormatReader, Probe, ReadOptions
from resumer.storage.store import Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Format:
    """One registered checkpoint format."""

    name: str
    reader: str  # "module:attribute" of its FormatReader
    description: str  # what it reads, as a user would pass it
    package: str | None = None  # the pip package its reader needs, when one is not a dependency of resumer


KNOWN_FORMATS: dict[str, Format] = {f.name: f for f in (
    Format(name="native", reader="resumer.formats.native.source:READER",
           description="a resumer checkpoint directory holding manifest.json, or that manifest.json"),
    Format(name="hf-trainer", reader="resumer.formats.hf_trainer:READER",
           description="a Hugging Face Trainer checkpoint-N/ directory (trainer_state.json beside the model)"),
    Format(name="accelerate", reader="resumer.formats.accelerate_state:READER",
           description="an Accelerate save_state directory (random_states_0.pkl beside the model)"),
    Format(name="torch-dcp", reader="resumer.formats.dcp:READER", description="a DCP directory (.metadata, *.distcp)"),
    Format(name="ray-train", reader="resumer.formats.ray_train:READER",
           description="a Ray Train checkpoint_* directory holding one torch.save file (.pt, .pth, .bin, .ckpt)"),
    Format(name="lightning", reader="resumer.formats.lightning_ckpt:READER", description="a Lightning .ckpt file"),
    Format(name="torch-save", reader="resumer.formats.torch_save:READER",
           description="a file written by torch.save (read with weights_only=True)"),
)}
NATIVE = "native"


def reader(name: str) -> FormatReader:
    """The reader of format ``name``; UsageError for an unknown format or one whose package is missing."""
    fmt = KNOWN_FORMATS.get(name)
    if fmt is None:
        raise UsageError(f"Unknown checkpoint format {name!r}; known formats: {', '.join(KNOWN_FORMATS)}.")
    module, _, attr = fmt.reader.partition(":")
    try:
        found: FormatReader = getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        hint = f" (pip install {fmt.package})" if fmt.package else ""
        raise UsageError(f"Reading {fmt.description} needs {fmt.package or module}{hint}: "
                         f"{exc.__class__.__name__}: {exc}") from None
    return found


def detect(store: Store) -> str | None:
    """The name of the first format that recognises ``store``, or None. Cheap: at most one stat, one listing
    and one small read of the start of a file, shared by every format tried; nothing is unpickled."""
    probe = Probe(store)
    for name in KNOWN_FORMATS:
        try:
            found = reader(name)
        except UsageError as exc:  # its package is missing: it cannot be this format's reader today
            logger.debug("[format] %s not tried for %s: %s", name, store.uri, exc)
            continue
        if found.detect(probe):
            logger.debug("[format] %s is %s", store.uri, name)
            return name
    return None


def open(store: Store, options: ReadOptions | None = None, *, format: str | None = None) -> CheckpointSource:
    """The checkpoint at ``store``, opened by the reader of ``format`` (detected when not given).

    Raises:
        CheckpointError: no format recognises it (the message lists the formats tried), or its reader
            finds it unreadable or unsafe.
        UsageError: ``format`` is unknown, or its reader's package is missing.
    """
    name = format or detect(store)
    if name is None:
        raise unrecognised(store)
    return reader(name).open(store, options or ReadOptions())


def tried() -> str:
    """Every format detection tries, with what each reads: for messages."""
    return "; ".join(f"{f.name} ({f.description})" for f in KNOWN_FORMATS.values())


def unrecognised(store: Store, why: str = "it is not a checkpoint of any known format") -> CheckpointError:
    """The error for a location no format reads: what was tried and what to pass instead."""
    return CheckpointError(f"Cannot read {store.uri}: {why}. Tried: {tried()}. Pass one of these, or a root "
                           "directory of resumer checkpoints. Nothing was loaded.", uri=store.uri)
