"""What a parsed manifest holds: the typed ``Manifest``, its data files (``FileEntry``) and the chunks of sharded
tensors (``Chunk``), and the safetensors keys its tensors and optimizer state are stored under. Built by
``resumer.formats.native.manifest.parse``; nothing here reads or checks JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from resumer.core.signature import Signature
from resumer.formats.native.safetensors_io import TensorLocation


def chunk_key(name: str, offsets: tuple[int, ...]) -> str:
    """The safetensors key of one chunk of a sharded tensor (or optimizer state): its name and global offsets."""
    return f"{name}#{','.join(map(str, offsets))}"


def state_key(param: str, key: str) -> str:
    """The safetensors key of one piece of optimizer state, by parameter name."""
    return f"{param}/{key}"


@dataclass(frozen=True, slots=True, kw_only=True)
class FileEntry:
    path: str
    size: int
    checksum: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "checksum": self.checksum}


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    """One piece of a sharded tensor: where it starts in the global tensor, and its bytes (``loc.shape`` is the
    piece's size in every dimension)."""

    offsets: tuple[int, ...]
    loc: TensorLocation

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.loc.shape

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.loc.file, "offset": self.loc.offset, "offsets": list(self.offsets),
                "sizes": list(self.loc.shape)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """A parsed, validated manifest. ``raw`` is the JSON object it came from, less the sections held here typed
    (``signature``, ``tensors``, ``optimizer``)."""

    uri: str
    step: int
    time: str
    signature: Signature
    files: tuple[FileEntry, ...]
    tensors: dict[str, TensorLocation]
    optimizer_tensors: dict[str, TensorLocation]
    optimizer_scalars: dict[str, dict[str, Any]]
    scheduler_state: Any
    rng: dict[str, Any] | None
    code: dict[str, Any]
    extra: dict[str, Any]
    raw: dict[str, Any]
    # Tensors (by name) and optimizer state (by state key) stored in pieces, one or more per rank that held a
    # shard; they are absent from ``tensors`` / ``optimizer_tensors``. Their pieces tile them exactly.
    chunks: dict[str, tuple[Chunk, ...]] = field(default_factory=dict)
    # A sharded checkpoint's checksum of each piece (whole tensor or chunk) by its safetensors key: a rank that
    # reads only the pieces it needs checks each of them, not whole files.
    piece_checksums: dict[str, str] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        return bool(self.chunks)

    def pieces(self, key: str) -> list[tuple[str, TensorLocation]]:
        """The byte ranges holding tensor or optimizer state ``key``: itself, or its chunks (by chunk key)."""
        whole = self.tensors.get(key) or self.optimizer_tensors.get(key)
        if whole is not None:
            return [(key, whole)]
        return [(chunk_key(key, c.offsets), c.loc) for c in self.chunks.get(key, ())]

    def in_file(self, file: str) -> dict[str, TensorLocation]:
        """Every byte range the manifest places in ``file``, by its safetensors key."""
        out = {k: loc for k, loc in (*self.tensors.items(), *self.optimizer_tensors.items()) if loc.file == file}
        for key, chunks in self.chunks.items():
            out.update({chunk_key(key, c.offsets): c.loc for c in chunks if c.loc.file == file})
        return out

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def data_file(self, kind: str) -> str:
        """The name of this checkpoint's ``model`` or ``optimizer`` data file."""
        for f in self.files:
            if f.path.split(".", 1)[0] == kind:
                return f.path
        raise KeyError(kind)
