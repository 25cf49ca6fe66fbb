"""Reading a native checkpoint's manifest and checking its files against it (sizes, headers, checksums)."""

from __future__ import annotations

from typing import Any

from resumer.core.dtypes import stored_as
from resumer.core.errors import CheckpointError
from resumer.formats.native.entries import Manifest
from resumer.formats.native.manifest import MANIFEST, MAX_MANIFEST_BYTES, oversized, parse
from resumer.formats.native.safetensors_io import header_and_checksum
from resumer.storage import retry
from resumer.storage.store import Store


def read_manifest(uri: str | Store, storage_options: dict[str, Any] | None = None, *,
                  size: int | None = None) -> Manifest:
    """Read and validate the manifest of the checkpoint at ``uri`` (a URI or a Store; reads no tensor bytes).

    The size limit holds before anything is read: ``size`` (the manifest's size as listed, when the caller
    has a listing) or a stat on a local disk is checked first; elsewhere at most one byte more than the limit
    is read.
    """
    store = Store.of(uri, storage_options)
    uri = store.uri
    try:
        if size is None and store.local:
            size = store.size(MANIFEST)
        if size is not None and size > MAX_MANIFEST_BYTES:
            raise oversized(uri, size)
        # One byte more than expected: a file that grew since it was listed is seen to be longer, and refused.
        data = store.read(MANIFEST, limit=(MAX_MANIFEST_BYTES if size is None else size) + 1)
    except FileNotFoundError:
        if store.isdir():
            raise CheckpointError(f"{uri} has no {MANIFEST}: it is a torn checkpoint (the writer stopped before "
                                  "committing) or not a checkpoint. It is not used and nothing was deleted.",
                                  uri=uri) from None
        raise CheckpointError(f"No checkpoint at {uri}: the path does not exist.", uri=uri) from None
    return parse(data, uri)


def verify(manifest: Manifest, storage_options: dict[str, Any] | None = None, *, store: Store | None = None,
           checksums: bool = True, progress: Any = None, sizes: dict[str, int] | None = None,
           checksum_files: set[str] | None = None) -> None:
    """Check the checkpoint's files against its manifest; CheckpointError names the first problem.

    ``store``: the checkpoint's location (opened from ``manifest.uri`` and ``storage_options`` when not
    given). Sizes always (from ``sizes``, a listing already made, when given). With ``checksums`` also every
    safetensors header and every byte's checksum (a full read) of every file, or of ``checksum_files``
    only (the caller checksums the others while it reads them).
    """
    store = store if store is not None else Store.open(manifest.uri, storage_options)
    for entry in manifest.files:
        furi = store.uri_of(entry.path)
        size = sizes.get(entry.path) if sizes is not None else _size(store, entry.path)
        if size is None:
            raise CheckpointError(f"{furi} is missing: the checkpoint is incomplete. Nothing was loaded.",
                                  uri=manifest.uri)
        if size != entry.size:
            raise CheckpointError(f"{furi} has {size} bytes, the manifest says {entry.size}: the file is truncated "
                                  "or was replaced. Nothing was loaded.", uri=manifest.uri)
        if checksums and (checksum_files is None or entry.path in checksum_files):
            def check(e: Any = entry, fu: str = furi, n: int = size) -> None:
                _check_file(store, fu, n, e, manifest, progress)

            retry.call(check, what="verifying", uri=furi)


def _size(store: Store, name: str) -> int | None:
    try:
        return store.size(name)
    except FileNotFoundError:
        return None


def _check_file(store: Store, furi: str, size: int, entry: Any, manifest: Manifest, progress: Any) -> None:
    with store.open_read(entry.path, size=size) as f:
        header, got = header_and_checksum(f, size, furi, progress)
    if got != entry.checksum:
        raise CheckpointError(f"{furi} fails its checksum ({got} != {entry.checksum}): the bytes changed after "
                              "the checkpoint was written. Nothing was loaded.", uri=manifest.uri)
    _check_header(manifest, entry.path, header, furi)


def _check_header(manifest: Manifest, file: str, header: dict[str, Any], furi: str) -> None:
    want = manifest.in_file(file)
    for name, loc in want.items():
        got = header.get(name)
        if got is None or (got.offset, got.nbytes, got.dtype, got.shape) != (loc.offset, loc.nbytes,
                                                                               *stored_as(loc.dtype, loc.shape)):
            raise CheckpointError(f"{furi}: tensor {name!r} in the file does not match the manifest. The checkpoint "
                                  "is corrupt; nothing was loaded.", uri=manifest.uri)
