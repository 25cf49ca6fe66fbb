"""Storage on any fsspec URI: the ``Store`` (a filesystem, a location in it, the options it was opened with)
and the byte primitives it is made of: small reads, atomic writes, the exclusive commit, durable files.

It knows nothing of checkpoint formats. URIs are strings (a pathlib.Path would mangle ``s3://``). Every
call that can fail transiently goes through ``resumer.storage.retry``. Commit order lives in
``resumer.runtime.save``: data files first, manifest last. The commit is an exclusive create
(``commit_bytes``): on a local disk the manifest is written to a temporary name, fsynced and hard-linked
into place (``link`` fails when the name exists, so a second writer of the same step never replaces the
first one's manifest, and a reader sees all of it or none); on S3 a conditional PUT (``If-None-Match: *``),
atomic per object.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from resumer.core.errors import UsageError
from resumer.storage import retry
from resumer.storage.fs import basename, get_fs, is_local, join, protocols
from resumer.storage.transfer import open_for_scan

logger = logging.getLogger(__name__)

T = TypeVar("T")

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
            kwargs = {"chunksize": _ONE_PUT_CHUNK} if protocols(fs) & {"s3", "s3a"} else {}
            retry.call(lambda: fs.pipe_file(path, data, mode="create", **kwargs), what="committing", uri=uri)
    except FileExistsError:
        try:
            there = read_bytes(fs, path, uri)
        except FileNotFoundError:
            there = None
        if there != data:
            raise
        logger.debug("[commit] %s: a retried PUT found its own first attempt committed", uri)


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


@dataclass(frozen=True, slots=True)
class Store:
    """One storage location: its URI, the fsspec filesystem and path it resolves to, and the options used.

    Made once at the edge (``Store.open``, or ``Store.of`` for an argument that may already be one) and
    handed to whoever reads or writes; ``child`` names a location below it on the same filesystem, with no
    second resolution. Options are never shown (they can hold credentials). Calls that can fail transiently
    are retried (``resumer.storage.retry``); FileNotFoundError always passes through at once.
    """

    uri: str
    fs: Any = field(repr=False)
    path: str
    options: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, uri: str, storage_options: dict[str, Any] | None = None) -> Store:
        """The store at ``uri``; an unknown or uninstalled protocol is a UsageError."""
        uri = str(uri)
        fs, path = get_fs(uri, storage_options)
        return cls(uri=uri, fs=fs, path=path, options=storage_options)

    @classmethod
    def of(cls, root: str | Store, storage_options: dict[str, Any] | None = None) -> Store:
        """``root`` as a store: a Store as it is, a URI opened with ``storage_options``.

        Raises:
            UsageError: ``root`` is a Store and other storage options are given too (they would be ignored).
        """
        if not isinstance(root, Store):
            return cls.open(root, storage_options)
        if storage_options and storage_options != root.options:
            raise UsageError(f"Storage options were given with a Store for {root.uri}; a Store already holds its "
                             "options. Pass either a URI and storage options, or a Store alone.")
        return root

    def child(self, *parts: str) -> Store:
        """The location ``parts`` below this one (same filesystem and options)."""
        return Store(uri=join(self.uri, *parts), fs=self.fs, path=join(self.path, *parts), options=self.options)

    def parent(self) -> Store:
        """The location one level up (same filesystem and options)."""
        uri, path = self.uri.rstrip("/").rpartition("/")[0], self.path.rstrip("/").rpartition("/")[0]
        return Store(uri=uri, fs=self.fs, path=path or ("/" if self.path.startswith("/") else ""),
                     options=self.options)

    @property
    def name(self) -> str:
        """The last component of the URI (``step-0000000012`` for ``s3://runs/a/step-0000000012``)."""
        return basename(self.uri)

    def uri_of(self, *parts: str) -> str:
        return join(self.uri, *parts) if parts else self.uri

    def path_of(self, *parts: str) -> str:
        return join(self.path, *parts) if parts else self.path

    @property
    def local(self) -> bool:
        return is_local(self.fs)

    def _retried(self, what: str, parts: tuple[str, ...], op: Callable[[str], T]) -> T:
        """``op`` on the path of ``parts``, with retries; errors name the location's URI."""
        path = self.path_of(*parts)
        return retry.call(lambda: op(path), what=what, uri=self.uri_of(*parts))

    def exists(self, *parts: str) -> bool:
        return bool(self._retried("checking", parts, self.fs.exists))

    def isfile(self, *parts: str) -> bool:
        return bool(self._retried("checking", parts, self.fs.isfile))

    def isdir(self, *parts: str) -> bool:
        return bool(self._retried("checking", parts, self.fs.isdir))

    def size(self, *parts: str) -> int:
        """The size in bytes, with retries. FileNotFoundError passes through."""
        return int(self._retried("stat", parts, self.fs.size))

    def ls(self, *parts: str, detail: bool = False) -> list[Any]:
        return list(self._retried("listing", parts, lambda path: self.fs.ls(path, detail=detail)))

    def find(self) -> dict[str, dict[str, Any]]:
        """Every file below this location (full path -> fsspec info) from one recursive listing."""
        base = self.path.rstrip("/")
        return dict(retry.call(lambda: self.fs.find(base, detail=True), what="listing", uri=self.uri))

    def invalidate_cache(self, *parts: str) -> None:
        """Forget cached listings here: a file another process made a moment ago must show in the next one."""
        self.fs.invalidate_cache(self.path_of(*parts))

    def read(self, *parts: str, limit: int | None = None) -> bytes:
        """A whole small object (or its first ``limit`` bytes), with retries."""
        return read_bytes(self.fs, self.path_of(*parts), self.uri_of(*parts), limit=limit)

    def open_read(self, *parts: str, size: int | None = None) -> BinaryIO:
        """A file to read sequentially and fast (see ``resumer.storage.transfer``)."""
        return open_for_scan(self.fs, self.path_of(*parts), size)

    def write_atomic(self, *parts: str, data: bytes) -> None:
        write_bytes_atomic(self.fs, self.path_of(*parts), data, self.uri_of(*parts))

    def commit(self, *parts: str, data: bytes) -> None:
        """Create the file holding ``data`` only if nothing is there yet (see ``commit_bytes``)."""
        commit_bytes(self.fs, self.path_of(*parts), data, self.uri_of(*parts))

    def create(self, *parts: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return create_file(self.fs, self.path_of(*parts))

    def makedirs(self, *parts: str) -> None:
        """Create the directory (and its parents) if missing; object stores need none, and do nothing."""
        self._retried("creating", parts, lambda path: self.fs.makedirs(path, exist_ok=True))

    def move(self, src: str, dst: str, *, what: str = "moving") -> None:
        """Rename ``src`` to ``dst`` (both below this location), with retries; ``what`` names it in errors."""
        a, b = self.path_of(src), self.path_of(dst)
        retry.call(lambda: self.fs.mv(a, b), what=what, uri=self.uri_of(src))

    def rm(self, *parts: str, missing_ok: bool = False, what: str = "removing") -> None:
        """Remove one file (a symlink itself, never what it points to), with retries.

        Raises:
            FileNotFoundError: nothing is there, unless ``missing_ok`` (S3 never says so: it deletes nothing).
        """
        try:
            self._retried(what, parts, self.fs.rm_file)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmdir_if_empty(self, *parts: str) -> bool:
        """Remove the directory if it is there and empty; whether it did. Local folders and memory:// keep
        empty directories, object stores have none. Tidying only: one try, OSError passes through."""
        path = self.path_of(*parts)
        if self.fs.exists(path) and not self.fs.ls(path, detail=False):
            self.fs.rmdir(path)
            return True
        return False

    def fsync_dir(self, *parts: str) -> None:
        """Make a local directory's entries durable (files created, renamed or removed in it); elsewhere there
        is nothing to sync (object stores have no directory entries, each PUT is durable on its own)."""
        if self.local:
            fsync_dir(self.path_of(*parts) or "/")
