"""Checkpoint storage primitives on any fsspec URI: filesystems, small reads and writes, manifests, verify.

URIs are strings (a pathlib.Path would mangle ``s3://``). Every call that can fail transiently goes
through ``resumer.storage.retry``. Commit order lives in ``resumer.runtime.save``: data files first, manifest last.
The commit is an exclusive create (``commit_bytes``): on a local disk the manifest is written to a
temporary name, fsynced and hard-linked into place (``link`` fails when the name exists, so a second
writer of the same step never replaces the first one's manifest, and a reader sees all of it or
none); on S3 a conditional PUT (``If-None-Match: *``), atomic per object.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

import fsspec

from resumer.core.dtypes import stored_as
from resumer.core.errors import CheckpointError, UsageError
from resumer.formats.native.manifest import MANIFEST, MAX_MANIFEST_BYTES, Manifest, oversized, parse
from resumer.formats.native.safetensors_io import header_and_checksum
from resumer.storage import retry

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{1,19})$")
# fsspec protocol -> package to install, for a helpful error (fsspec's own courtesy, repeated here)
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


_LISTING_CACHED = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}


def step_dir(step: int) -> str:
    return f"step-{step:010d}"


def get_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(filesystem, path) for a URI; unknown or uninstalled protocols are a UsageError."""
    options = dict(storage_options or {})
    if uri.split("://", 1)[0] in _LISTING_CACHED:
        # Checkpoints appear while we watch: a cached listing would hide a commit made by another process.
        options.setdefault("use_listings_cache", False)
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except ImportError as exc:
        proto = uri.split("://", 1)[0]
        pkg = _PACKAGES.get(proto, "the fsspec implementation for it")
        raise UsageError(f"Cannot open {uri}: the {proto}:// protocol needs {pkg} (pip install {pkg}). "
                         f"({exc.__class__.__name__})") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"Cannot open {uri}: {exc}. Use a local path or an fsspec URI such as s3://bucket/path "
                         "or memory://path, with valid --storage-option values.") from None
    return fs, path


def is_local(fs: Any) -> bool:
    return bool(_protocols(fs) & {"file", "local"})


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def read_bytes(fs: Any, path: str, uri: str, *, limit: int | None = None) -> bytes:
    """A whole small object (or its first ``limit`` bytes), with retries. FileNotFoundError passes through."""
    # start=0 makes it one ranged GET: without it s3fs first asks for the size (a HEAD per read).
    return retry.call(lambda: fs.cat_file(path, start=0, end=limit), what="reading", uri=uri)


def write_bytes_atomic(fs: Any, path: str, data: bytes, uri: str | None = None) -> None:
    """Write a small file so readers see all of it or nothing (rename on local disks), with retries.

    A failed local write (a full disk) leaves no temporary file behind.
    """
    def put() -> None:
        if is_local(fs):
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        else:
            fs.pipe_file(path, data)

    retry.call(put, what="writing", uri=uri or path)


# Hard links are missing on a few filesystems (some FUSE mounts, FAT): the commit falls back to a rename there.
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}
# One PUT for any manifest (they are at most MAX_MANIFEST_BYTES): a multipart upload ignores If-None-Match.
_ONE_PUT_CHUNK = 2**31


def commit_bytes(fs: Any, path: str, data: bytes, uri: str) -> None:
    """Create ``path`` holding ``data`` only if nothing is there yet: the commit of a save.

    Readers see all of the file or none of it. Local: written to a temporary name, fsynced, then hard-linked
    into place (the caller fsyncs the directory). S3: a conditional PUT (``If-None-Match: *``). Other
    filesystems: fsspec's ``mode="create"``, exclusive as far as that filesystem allows.

    Raises:
        FileExistsError: another writer created ``path`` first (its bytes are not ``data``). A retried
            PUT whose first attempt landed finds its own bytes there, and that counts as success.
    """
    try:
        if is_local(fs):
            _commit_local(path, data)
        else:
            kwargs = {"chunksize": _ONE_PUT_CHUNK} if _protocols(fs) & {"s3", "s3a"} else {}
            retry.call(lambda: fs.pipe_file(path, data, mode="create", **kwargs), what="committing", uri=uri)
    except FileExistsError:
        try:
            there = read_bytes(fs, path, uri)
        except FileNotFoundError:
            there = None
        if there != data:
            raise
        logger.debug("[commit] %s: a retried PUT found its own first attempt committed", uri)


def _protocols(fs: Any) -> set[str]:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return set(protocol)


def _commit_local(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and exclusive: EEXIST when another writer committed first
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "already committed", path) from None
            os.rename(tmp, path)  # no hard links here: exclusive only up to this check
    finally:
        with contextlib.suppress(OSError):  # never raise once linked: the commit stands
            os.unlink(tmp)


@contextlib.contextmanager
def create_file(fs: Any, path: str) -> Iterator[BinaryIO]:
    """A new file to write; on a local disk it is flushed and fsynced before the block ends (durable)."""
    if is_local(fs):
        with open(path, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    else:
        with fs.open(path, "wb") as f:
            yield f


def fsync_dir(path: str) -> None:
    """Make a local directory's entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(uri: str, storage_options: dict[str, Any] | None = None, *, size: int | None = None) -> Manifest:
    """Read and validate the manifest of the checkpoint at ``uri`` (reads no tensor bytes).

    The size limit holds before anything is read: ``size`` (the manifest's size as listed, when the caller
    has a listing) or a stat on a local disk is checked first; elsewhere at most one byte more than the limit
    is read.
    """
    fs, path = get_fs(uri, storage_options)
    mpath = join(path, MANIFEST)
    try:
        if size is None and is_local(fs):
            size = int(fs.size(mpath))
        if size is not None and size > MAX_MANIFEST_BYTES:
            raise oversized(uri, size)
        # One byte more than expected: a file that grew since it was listed is seen to be longer, and refused.
        data = read_bytes(fs, mpath, uri, limit=(MAX_MANIFEST_BYTES if size is None else size) + 1)
    except FileNotFoundError:
        if fs.exists(path) and fs.isdir(path):
            raise CheckpointError(f"{uri} has no {MANIFEST}: it is a torn checkpoint (the writer stopped before "
                                  "committing) or not a checkpoint. It is not used and nothing was deleted.",
                                  uri=uri) from None
        raise CheckpointError(f"No checkpoint at {uri}: the path does not exist.", uri=uri) from None
    return parse(data, uri)


def verify(manifest: Manifest, storage_options: dict[str, Any] | None = None, *, checksums: bool = True,
           progress: Any = None, sizes: dict[str, int] | None = None,
           checksum_files: set[str] | None = None) -> None:
    """Check the checkpoint's files against its manifest; CheckpointError names the first problem.

    Sizes always (from ``sizes``, a listing already made, when given). With ``checksums`` also every
    safetensors header and every byte's checksum (a full read) of every file, or of ``checksum_files``
    only (the caller checksums the others while it reads them).
    """
    fs, path = get_fs(manifest.uri, storage_options)
    for entry in manifest.files:
        fpath = join(path, entry.path)
        furi = join(manifest.uri, entry.path)
        size = sizes.get(entry.path) if sizes is not None else _size(fs, fpath, furi)
        if size is None:
            raise CheckpointError(f"{furi} is missing: the checkpoint is incomplete. Nothing was loaded.",
                                  uri=manifest.uri)
        if size != entry.size:
            raise CheckpointError(f"{furi} has {size} bytes, the manifest says {entry.size}: the file is truncated "
                                  "or was replaced. Nothing was loaded.", uri=manifest.uri)
        if checksums and (checksum_files is None or entry.path in checksum_files):
            def check(e: Any = entry, fp: str = fpath, fu: str = furi, n: int = size) -> None:
                _check_file(fs, fp, fu, n, e, manifest, progress)

            retry.call(check, what="verifying", uri=furi)


def _size(fs: Any, fpath: str, furi: str) -> int | None:
    try:
        return int(retry.call(lambda: fs.size(fpath), what="stat", uri=furi))
    except FileNotFoundError:
        return None


def _check_file(fs: Any, fpath: str, furi: str, size: int, entry: Any, manifest: Manifest, progress: Any) -> None:
    from resumer.storage.transfer import open_for_scan

    with open_for_scan(fs, fpath, size) as f:
        header, got = header_and_checksum(f, size, furi, progress)
    if got != entry.checksum:
        raise CheckpointError(f"{furi} fails its checksum ({got} != {entry.checksum}): the bytes changed after "
                              "the checkpoint was written. Nothing was loaded.", uri=manifest.uri)
    _check_header(manifest, entry.path, header, furi)


def _check_header(manifest: Manifest, file: str, header: dict[str, Any], furi: str) -> None:
    want = {n: loc for n, loc in manifest.tensors.items() if loc.file == file}
    want.update({n: loc for n, loc in manifest.optimizer_tensors.items() if loc.file == file})
    for name, loc in want.items():
        got = header.get(name)
        if got is None or (got.offset, got.nbytes, got.dtype, got.shape) != (loc.offset, loc.nbytes,
                                                                               *stored_as(loc.dtype, loc.shape)):
            raise CheckpointError(f"{furi}: tensor {name!r} in the file does not match the manifest. The checkpoint "
                                  "is corrupt; nothing was loaded.", uri=manifest.uri)
