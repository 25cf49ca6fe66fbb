"""Ray Train checkpoint directories: ``checkpoint_<timestamp>`` (Ray Train V2's default name,
``checkpoint_2026-12-02_23-34-36.365316``) or ``checkpoint_<index>`` (``checkpoint_000003``), as
``ray.train.report(checkpoint=Checkpoint.from_directory(d))`` copies the training loop's folder into the run's
storage.

What is inside is whatever the loop saved; commonly ONE ``torch.save`` file (``checkpoint.pt``, ``model.pt``).
That file is found by its name (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.tar``) and its first bytes (a
torch.save zip, or the legacy pickle form), never by unpickling anything, and read by the ``torch_save`` reader
(a Lightning ``.ckpt``, as Ray's Lightning callback saves ``checkpoint.ckpt``, by the ``lightning`` reader). Ray's
Hugging Face callback (``RayTrainReportCallback``) copies the Trainer's ``checkpoint-N/`` to ``checkpoint/`` inside:
that directory is read by the format the registry finds for it. Several such files or directories (a model and an
optimizer saved apart), or none, are a CheckpointError that lists the files and says to pass one file's path. Ray's
own ``.metadata.json`` (from ``Checkpoint.set_metadata``) is not read.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Any

import torch

from resumer.core.errors import CheckpointError
from resumer.formats.lightning_ckpt import READER as LIGHTNING
from resumer.formats.source import CheckpointSource, Probe, ReadOptions
from resumer.formats.torch_save import READER as TORCH_SAVE
from resumer.formats.torch_save import TorchSaveSource
from resumer.storage.store import Store

logger = logging.getLogger(__name__)

DIR_NAME = re.compile(r"^checkpoint_.+$")
SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
RAY_METADATA = ".metadata.json"  # Checkpoint.set_metadata's file
MAX_LISTED = 20  # files named in an error message
NESTED = "checkpoint"  # the directory Ray's Hugging Face callback (RayTrainReportCallback) copies checkpoint-N/ to
READER_NAME = "ray-train"


def _named_like_torch_save(name: str) -> bool:
    return name.endswith(SUFFIXES) and not name.startswith(".")


class RayTrainSource(CheckpointSource):
    """A Ray Train checkpoint directory, read through the one torch.save file inside it (``file``)."""

    format = READER_NAME

    def __init__(self, store: Store, file: str, inner: CheckpointSource, files: list[tuple[str, int]]) -> None:
        self.uri = store.uri
        self.file = file
        self._inner = inner
        self._files = files
        self.bytes_read = 0
        self.signature = replace(inner.signature, notes=(
            f"a Ray Train checkpoint directory: read {file} (as {inner.format})", *inner.signature.notes))

    def prepare(self) -> None:
        self._inner.prepare()

    def load(self, tensors: set[str], optimizer_params: set[str]) -> None:
        self._inner.load(tensors, optimizer_params)
        self.bytes_read = self._inner.bytes_read

    def tensor(self, name: str) -> torch.Tensor:
        found = self._inner.tensor(name)
        self.bytes_read = self._inner.bytes_read
        return found

    def optimizer_state(self, param: str) -> dict[str, Any]:
        return self._inner.optimizer_state(param)

    def group_hyperparams(self, index: int) -> dict[str, Any]:
        return self._inner.group_hyperparams(index)

    def scheduler_state(self) -> Any:
        return self._inner.scheduler_state()

    def rng_state(self) -> dict[str, Any] | None:
        return self._inner.rng_state()

    def extra(self) -> dict[str, Any]:
        return self._inner.extra()

    def details(self) -> dict[str, Any]:
        return {"kind": self.format, "file": self.file, "read_as": self._inner.format,
                "files": [{"path": name, "size": size, "checksum": "(no checksum recorded)"}
                          for name, size in self._files]}

    def close(self) -> None:
        self._inner.close()


def _entries(store: Store) -> tuple[list[tuple[str, int]], list[str]]:
    """(name, size) of each file directly inside the directory, and the names of its directories, sorted."""
    files, dirs = [], []
    for entry in store.ls(detail=True):
        name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") == "file":
            files.append((name, int(entry.get("size") or 0)))
        elif entry.get("type") == "directory":
            dirs.append(name)
    return sorted(files), sorted(dirs)


def torch_save_files(store: Store, files: list[tuple[str, int]]) -> list[str]:
    """The files named like torch.save files whose first bytes are torch.save's; nothing is unpickled."""
    return [name for name, _ in files
            if _named_like_torch_save(name) and TORCH_SAVE.detect(Probe(store.child(name)))]


def _which(store: Store, files: list[tuple[str, int]], dirs: list[str], found: list[str]) -> CheckpointError:
    names = [name for name, _ in files] + [f"{d}/" for d in dirs]
    listed = ", ".join(names[:MAX_LISTED]) + (" ..." if len(names) > MAX_LISTED else "")
    if found:
        what = "torch.save files" if f"{NESTED}/" not in found else f"torch.save files and a {NESTED}/ directory"
        why = f"it holds {what} ({', '.join(found)}), and which one is the training state cannot be told"
        example = store.uri_of(found[0])
    else:
        why = (f"it holds no torch.save file (a {'/'.join(SUFFIXES)} file that starts as torch.save writes) and no "
               f"{NESTED}/ directory; its files: {listed or 'none'}")
        example = store.uri_of("<file>")
    return CheckpointError(f"Cannot read the Ray Train checkpoint {store.uri}: {why}. Pass the path of the one "
                           f"file to resume from (e.g. {example}). Nothing was loaded.", uri=store.uri,
                           quarantine=False)


def _open_nested(store: Store, options: ReadOptions) -> CheckpointSource:
    """The checkpoint in ``checkpoint/`` (Ray's Hugging Face callback's copy of a Trainer ``checkpoint-N/``)."""
    from resumer.formats import registry  # the registry names this module: imported when used, no cycle

    sub = store.child(NESTED)
    found = registry.detect(sub)
    if found is None or found == READER_NAME:
        raise registry.unrecognised(sub, f"{store.uri}'s {NESTED}/ is not a checkpoint of a known format")
    return registry.open(sub, options, format=found)


class RayTrainReader:
    """The registry's entry for Ray Train checkpoint directories: a directory named ``checkpoint_*`` holding a
    file named like a torch.save file, Ray's ``.metadata.json``, or ``checkpoint/``; told by the names alone."""

    def detect(self, probe: Probe) -> bool:
        if probe.kind != "directory" or not DIR_NAME.match(probe.name):
            return False
        names = probe.names()
        return RAY_METADATA in names or NESTED in names or any(_named_like_torch_save(n) for n in names)

    def open(self, store: Store, options: ReadOptions) -> RayTrainSource:
        files, dirs = _entries(store)
        found = torch_save_files(store, files) + ([f"{NESTED}/"] if NESTED in dirs else [])
        if len(found) != 1:
            raise _which(store, files, dirs, found)
        [name] = found
        child = store.child(name.rstrip("/"))
        inner: CheckpointSource
        if name.endswith("/"):
            inner = _open_nested(store, options)
            files = [(f"{name}{f['path']}", int(f["size"])) for f in inner.details().get("files", ())]
        elif LIGHTNING.detect(Probe(child)):  # Ray's Lightning callback saves checkpoint.ckpt
            inner = LIGHTNING.open(child, options)
        else:
            inner = TorchSaveSource.open(child)
        logger.debug("[format] %s: Ray Train checkpoint, reading %s as %s", store.uri, name, inner.format)
        return RayTrainSource(store, name, inner, files)


READER = RayTrainReader()
