"""Checkpoint storage on any fsspec URI: listing, manifests, verification, commits.

URIs are strings (a pathlib.Path would mangle ``s3://``). Commit order: data files first, manifest
last; on a local disk the manifest is written to a temporary name and renamed, so a reader sees the
whole manifest or none.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec

from resumer.errors import CheckpointError, UsageError
from resumer.manifest import MANIFEST, Manifest, parse
from resumer.safetensors_io import checksum_stream, read_header

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{1,19})$")
# fsspec protocol -> package to install, for a helpful error (fsspec's own courtesy, repeated here)
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def step_dir(step: int) -> str:
    return f"step-{step:010d}"


def get_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(filesystem, path) for a URI; unknown or uninstalled protocols are a UsageError."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except ImportError as exc:
        proto = uri.split("://", 1)[0]
        pkg = _PACKAGES.get(proto, "the fsspec implementation for it")
        raise UsageError(f"Cannot open {uri}: the {proto}:// protocol needs {pkg} (pip install {pkg}). "
                         f"({exc.__class__.__name__})") from None
    except ValueError as exc:
        raise UsageError(f"Cannot open {uri}: {exc}. Use a local path or an fsspec URI such as s3://bucket/path "
                         "or memory://path.") from None
    return fs, path


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointInfo:
    """A committed checkpoint: its URI, step, and parsed manifest."""

    uri: str
    step: int
    manifest: Manifest

    @property
    def time(self) -> str:
        return self.manifest.time

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes


def read_manifest(uri: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read and validate the manifest of the checkpoint at ``uri`` (reads no tensor bytes)."""
    fs, path = get_fs(uri, storage_options)
    mpath = join(path, MANIFEST)
    try:
        with fs.open(mpath, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if fs.exists(path) and fs.isdir(path):
            raise CheckpointError(f"{uri} has no {MANIFEST}: it is a torn checkpoint (the writer stopped before "
                                  "committing) or not a checkpoint. It is not used and nothing was deleted.",
                                  uri=uri) from None
        raise CheckpointError(f"No checkpoint at {uri}: the path does not exist.", uri=uri) from None
    return parse(data, uri)


def list_checkpoints(root: str, *, storage_options: dict[str, Any] | None = None) -> list[CheckpointInfo]:
    """Committed checkpoints under ``root``, newest first; directories without a valid manifest are skipped."""
    fs, path = get_fs(root, storage_options)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    steps = []
    for e in entries:
        name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
        m = STEP_DIR.match(name)
        if m and e.get("type") == "directory":
            steps.append((int(m.group(1)), name))
    out = []
    for _step, name in sorted(steps, reverse=True):
        uri = join(root, name)
        try:
            manifest = read_manifest(uri, storage_options)
        except CheckpointError as exc:
            logger.debug("skipping %s: %s", uri, exc)
            continue
        out.append(CheckpointInfo(uri=uri, step=manifest.step, manifest=manifest))
    return out


def verify(manifest: Manifest, storage_options: dict[str, Any] | None = None, *, checksums: bool = True,
           progress: Any = None) -> None:
    """Check every file's size (and checksum) and every safetensors header against the manifest."""
    fs, path = get_fs(manifest.uri, storage_options)
    for entry in manifest.files:
        fpath = join(path, entry.path)
        furi = join(manifest.uri, entry.path)
        try:
            size = fs.size(fpath)
        except FileNotFoundError:
            raise CheckpointError(f"{furi} is missing: the checkpoint is incomplete. Nothing was loaded.",
                                  uri=manifest.uri) from None
        if size != entry.size:
            raise CheckpointError(f"{furi} has {size} bytes, the manifest says {entry.size}: the file is truncated "
                                  "or was replaced. Nothing was loaded.", uri=manifest.uri)
        with fs.open(fpath, "rb") as f:
            header = read_header(f, size, furi)
            if checksums:
                f.seek(0)
                got = checksum_stream(f, size, furi, progress)
                if got != entry.checksum:
                    raise CheckpointError(f"{furi} fails its checksum ({got} != {entry.checksum}): the bytes changed "
                                          "after the checkpoint was written. Nothing was loaded.", uri=manifest.uri)
        _check_header(manifest, entry.path, header, furi)


def _check_header(manifest: Manifest, file: str, header: dict[str, Any], furi: str) -> None:
    want = {n: loc for n, loc in manifest.tensors.items() if loc.file == file}
    want.update({n: loc for n, loc in manifest.optimizer_tensors.items() if loc.file == file})
    for name, loc in want.items():
        got = header.get(name)
        if got is None or (got.offset, got.nbytes, got.dtype, got.shape) != (loc.offset, loc.nbytes, loc.dtype,
                                                                               loc.shape):
            raise CheckpointError(f"{furi}: tensor {name!r} in the file does not match the manifest. The checkpoint "
                                  "is corrupt; nothing was loaded.", uri=manifest.uri)


def latest_checkpoint(root: str, *, storage_options: dict[str, Any] | None = None,
                      checksums: bool = True, progress: Any = None) -> CheckpointInfo | None:
    """The newest checkpoint under ``root`` that is committed AND verifies; falls back past bad ones."""
    for info in list_checkpoints(root, storage_options=storage_options):
        try:
            verify(info.manifest, storage_options, checksums=checksums, progress=progress)
        except CheckpointError as exc:
            logger.warning("[select] skipping %s: %s", info.uri, exc)
            continue
        return info
    return None


def write_bytes_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write a small file so readers see all of it or nothing (rename on local disks)."""
    if getattr(fs, "protocol", None) in ("file", ("file", "local")) or "file" in (fs.protocol or ()):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)
