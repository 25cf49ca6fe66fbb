"""The native reader: a resumer checkpoint directory, streamed by byte range.

``NativeSource`` implements ``resumer.formats.source.CheckpointSource``. Its ``load`` is where the native
format's performance choreography lives: each data file is read once, in order, into fresh memory, its
header checked and every byte hashed in that same pass (model and optimizer files side by side, the
optimizer state's memory faulted in on a helper thread meanwhile). ``READER`` is the registry's entry point.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from resumer.core.errors import CheckpointError, ResumerError
from resumer.formats import rng
from resumer.formats.jsonvalue import decode, plain_state
from resumer.formats.native.consistency import check_manifest
from resumer.formats.native.entries import Manifest, chunk_key, state_key
from resumer.formats.native.manifest import MANIFEST
from resumer.formats.native.prefault import FreshTensors
from resumer.formats.native.readpass import read_file
from resumer.formats.native.safetensors_io import TensorLocation, piece_checksum, tensor_bytes
from resumer.formats.native.verify import read_manifest, verify
from resumer.formats.source import CheckpointSource, Probe, ReadOptions
from resumer.formats.torch_dtypes import torch_dtype
from resumer.storage.store import Store

Layout = list[tuple[str, list[tuple[str, TensorLocation]]]]


def _locked(progress: Any) -> Any:
    lock = threading.Lock()

    def call(n: int) -> None:
        with lock:
            progress(n)

    return call


class NativeSource(CheckpointSource):
    """A resumer checkpoint: each data file is read once, in order, into fresh memory; the live model and
    optimizer are written only from that memory, after every check has passed.

    ``store``: where the checkpoint is (opened from ``manifest.uri`` and ``storage_options`` when not given).
    ``verified``: selection already checked its checksums, so loading does not hash it all a second time.
    """

    format = "native"

    def __init__(self, manifest: Manifest, storage_options: dict[str, Any] | None = None, *,
                 store: Store | None = None, checksums: bool = True, progress: Any = None,
                 verified: bool = False) -> None:
        self.manifest = manifest
        self.uri = manifest.uri
        self.signature = manifest.signature
        self.store = store if store is not None else Store.open(manifest.uri, storage_options)
        self.checksums = checksums
        self.progress = _locked(progress) if progress is not None else None  # model and optimizer load side by side
        self.bytes_read = 0
        self._files: dict[str, Any] = {}
        self._plain: dict[str, Any] | None = None
        self._state_specs = self.signature.optimizer.state_by_param() if self.signature.optimizer else {}
        self._preloaded: dict[str, torch.Tensor] = {}
        self._model: dict[str, torch.Tensor] = {}
        self._handed: dict[str, torch.Tensor] = {}  # optimizer state state() gave out, see there
        self._verified = verified  # selection already checked it this way: do not hash it all twice
        self._regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None  # see restrict()
        self._local: set[str] = set()  # keys held as this rank's region only, see restrict()
        self._reserved: tuple[frozenset[str], FreshTensors] | None = None  # see reserve()

    def restrict(self, regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
        """A sharded resume: of each chunked tensor in ``regions`` (saved name or state key -> global offsets and
        sizes of what this rank keeps), read only the chunks that overlap it, each checked against its own
        checksum instead of whole files being read and checked. Such a tensor is then held as the region alone
        (see :meth:`is_local`): a rank never holds more of a tensor than it keeps. Returns whether it applies (a
        sharded checkpoint with every piece's checksum)."""
        m = self.manifest
        keys = [k for cs in (m.in_file(f.path) for f in m.files) for k in cs]
        if not m.sharded or (self.checksums and any(k not in m.piece_checksums for k in keys)):
            return False
        self._regions = regions
        return True

    def _overlaps(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> bool:
        region = self._regions.get(key) if self._regions is not None else None
        if region is None:
            return True
        r_off, r_size = region
        return all(o < ro + rs and ro < o + s for o, s, ro, rs in zip(offsets, sizes, r_off, r_size, strict=True))

    def verify(self) -> bool:
        """Sizes of every file; headers and checksums (unless turned off) of every file, read whole."""
        if not self._verified:
            verify(self.manifest, store=self.store, checksums=self.checksums, progress=self.progress)
        return self.checksums

    def _locs(self, wanted: set[str], locations: dict[str, TensorLocation], *,
              whole: set[str] | None = None) -> Layout:
        """The byte ranges of the ``wanted`` entries of ``locations`` (or of their chunks, for a sharded
        checkpoint), per file, in file order; every file in ``whole`` is listed (possibly with no entry), so a
        hashing pass still covers it."""
        by_file: dict[str, list[tuple[str, TensorLocation]]] = {f: [] for f in whole or ()}
        for key in sorted(wanted):
            if key in locations:
                pieces = [(key, locations[key])]
            else:
                pieces = [(chunk_key(key, c.offsets), c.loc) for c in self.manifest.chunks.get(key, ())
                          if self._overlaps(key, c.offsets, c.sizes)]
            for piece, loc in pieces:
                by_file.setdefault(loc.file, []).append((piece, loc))
        return [(name, sorted(locs, key=lambda kl: kl[1].offset)) for name, locs in sorted(by_file.items())]

    def _layout(self, params: set[str]) -> Layout:
        """The optimizer tensors of ``params`` (saved names), per file, in file order."""
        wanted = {state_key(p, e.key) for p in params for e in self._state_entries(p)}
        return self._locs(wanted, self.manifest.optimizer_tensors)

    def _hashing(self) -> bool:
        """Whether each file read is read whole and checked against its checksum (else, with ``restrict``, each
        piece read is checked against its own)."""
        return self.checksums and not self._verified and self._regions is None

    def load(self, tensors: set[str], optimizer_params: set[str]) -> None:
        """Read the model ``tensors`` and the optimizer state of ``optimizer_params`` into fresh memory, side by
        side.

        Neither touches the model, and the two read different files, so they overlap: storage stays busy
        while the other side hashes or copies, and the state's memory is faulted in meanwhile (``reserve``).
        Both must succeed; the model files' error is raised first when both fail.
        """
        if not optimizer_params:
            self.load_model(tensors)
            return
        self.reserve(optimizer_params)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="resumer-load") as pool:
            loaded = pool.submit(self.load_model, tensors)
            try:
                self.load_optimizer_state(optimizer_params)
            except BaseException:
                loaded.result()  # the model files' verdict first: it names the file at fault when both are bad
                raise
            loaded.result()

    def reserve(self, params: set[str]) -> None:
        """Start faulting in fresh memory for the optimizer state of ``params`` on a helper thread (see
        resumer.formats.native.prefault), so it overlaps the model's load instead of following it. Reads nothing."""
        if self._reserved is None:
            specs = [(loc.shape, torch_dtype(loc.dtype)) for _, locs in self._layout(params) for _, loc in locs]
            self._reserved = (frozenset(params), FreshTensors(specs))

    def load_model(self, names: set[str]) -> None:
        """Read model tensors ``names`` (saved names) into fresh memory: one pass per model file (all of
        them when checksums are on), its header checked, every byte hashed; CheckpointError (and nothing
        kept) when a file is bad. The bytes hashed are the bytes later copied into the model."""
        model_files = ({loc.file for t in self.signature.tensors for _, loc in self.manifest.pieces(t.name)}
                       if self._hashing() else set())
        layout = self._locs(names, self.manifest.tensors, whole=model_files)
        with FreshTensors([(loc.shape, torch_dtype(loc.dtype)) for _, locs in layout for _, loc in locs]) as fresh:
            staged: dict[str, torch.Tensor] = {}
            taken = 0
            for name, chosen in layout:
                staged.update(self._read_fresh(name, chosen, fresh, taken))
                taken += len(chosen)
        self._model = self._assemble(staged, names)

    def load_optimizer_state(self, params: set[str]) -> None:
        """Read each optimizer file once, in order, into fresh tensors for ``params`` (saved names), its header
        checked and every byte hashed; a bad file raises CheckpointError before anything is attached."""
        if self._reserved is None or self._reserved[0] != frozenset(params):
            self._release()
            self.reserve(params)
        assert self._reserved is not None
        fresh = self._reserved[1]
        try:
            taken = 0
            pieces: dict[str, torch.Tensor] = {}
            for name, chosen in self._layout(params):  # the order reserve() made the tensors in
                pieces.update(self._read_fresh(name, chosen, fresh, taken))
                taken += len(chosen)
            self._preloaded.update(self._assemble(pieces, {state_key(p, e.key) for p in params
                                                           for e in self._state_entries(p)}))
        finally:
            self._release()

    def is_local(self, key: str) -> bool:
        """Whether saved tensor or state key ``key`` is held as this rank's region only (its global offsets and
        sizes as given to :meth:`restrict`), not whole."""
        return key in self._local

    def _assemble(self, pieces: dict[str, torch.Tensor], keys: set[str]) -> dict[str, torch.Tensor]:
        """Whole tensors from the pieces read: a sharded tensor's chunks are copied into one fresh tensor of its
        global shape (checked at parse time to tile it exactly), or, restricted, into one of its region's shape."""
        chunks = self.manifest.chunks
        if not chunks:
            return pieces
        out = {k: t for k, t in pieces.items() if k in keys and k not in chunks}
        by_name = self.signature.by_name()
        for key in keys:
            if key not in chunks:
                continue
            region = self._regions.get(key) if self._regions is not None else None
            if region is not None:
                out[key] = _region_of(key, chunks[key], pieces, region)
                self._local.add(key)
                continue
            first = chunks[key][0].loc
            spec = by_name.get(key)
            if spec is not None:
                shape = spec.shape
            else:
                param, _, sub = key.rpartition("/")
                shape = next(e.shape for e in self._state_entries(param) if e.key == sub)
            full = torch.zeros(shape, dtype=torch_dtype(first.dtype))
            for c in chunks[key]:
                piece = pieces.pop(chunk_key(key, c.offsets), None)
                if piece is None:  # outside this rank's region (restrict): not read
                    continue
                full[tuple(slice(o, o + n) for o, n in zip(c.offsets, c.sizes, strict=True))] = piece.view(c.sizes)
            out[key] = full
        return out

    def _release(self) -> None:
        if self._reserved is not None:
            self._reserved[1].close()
            self._reserved = None

    def _read_fresh(self, name: str, chosen: list[tuple[str, TensorLocation]], fresh: FreshTensors,
                    first: int) -> dict[str, torch.Tensor]:
        """One pass over file ``name``: the ``chosen`` tensors (in file order) land in tensors ``first``,
        ``first + 1``, ... of ``fresh``; returned only when the header and checksum check out."""
        entry = self.manifest.file(name)
        furi = self.store.uri_of(name)
        tensors: dict[str, torch.Tensor] = {}
        by_piece = self._regions is not None and self.checksums and not self._verified

        def check(i: int) -> None:
            """Piece ``i`` against its own checksum (a restricted read hashes pieces, not whole files)."""
            key = chosen[i][0]
            if piece_checksum(tensor_bytes(tensors[key])) != self.manifest.piece_checksums[key]:
                raise CheckpointError(f"{furi}: {key!r} fails its checksum: its bytes changed after the "
                                      "checkpoint was written. Nothing was loaded.", uri=self.uri)

        def into(i: int) -> memoryview:
            if by_piece and i > 0:
                check(i - 1)  # just read, so still in the CPU's cache: hashed there, not read back from memory
            t = tensors[chosen[i][0]] = fresh.get(first + i)
            return tensor_bytes(t)

        want = self.manifest.in_file(name)
        got, n = read_file(self._file(name), entry.size, furi, self.uri, want=want,
                           regions=[(loc.offset, loc.nbytes) for _, loc in chosen], into=into,
                           hashing=self._hashing(), on_bytes=self.progress)
        self.bytes_read += n
        if by_piece and chosen:
            check(len(chosen) - 1)
        if got is not None and got != entry.checksum:
            raise CheckpointError(f"{furi} fails its checksum ({got} != {entry.checksum}): the bytes changed "
                                  "after the checkpoint was written. Nothing was loaded.", uri=self.uri)
        return tensors

    def _state_entries(self, param: str) -> tuple[Any, ...]:
        spec = self._state_specs.get(param)
        return tuple(e for e in spec.entries if e.shape is not None) if spec else ()

    def prepare(self) -> None:
        """Everything that needs no tensor bytes, before any is read: the manifest agrees with itself, every
        file has its size, and every plain value (hyperparameters, scalars, scheduler, RNG, extra) decodes."""
        m = self.manifest
        check_manifest(m)
        verify(m, store=self.store, checksums=False)  # sizes (fs.info), whatever ``checksums`` says
        opt = self.signature.optimizer
        self._plain = {
            "groups": [self._decode(dict(g.hyperparams), f"optimizer param group {i}")
                       for i, g in enumerate(opt.groups)] if opt else [],
            "scalars": self._decode(m.optimizer_scalars, "optimizer state"),
            "scheduler": self._decode(m.scheduler_state, "scheduler state"),
            "extra": self._decode(m.extra, "extra metadata"),
        }
        self._plain["rng"] = rng.parse(_own_rng(m), self.uri) if m.rng else None
        for param, values in self._plain["scalars"].items():
            for key, value in values.items() if isinstance(values, dict) else ((None, values),):
                if not plain_state(value):
                    raise CheckpointError(f"{self.uri}: the saved optimizer state '{param}/{key}' is {value!r:.80}, "
                                          "not a number, flag or None (what optimizers keep besides tensors). "
                                          "Nothing was loaded.", uri=self.uri)

    def _decode(self, value: Any, what: str) -> Any:
        try:
            return decode(value)
        except (ResumerError, AttributeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.uri}: the saved {what} in the manifest is malformed ({exc}). Nothing was "
                                  "loaded.", uri=self.uri) from None

    def _decoded(self, key: str) -> Any:
        if self._plain is None:
            self.prepare()
        assert self._plain is not None
        return self._plain[key]

    def _file(self, name: str) -> Any:
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = self.store.open_read(name, size=self.manifest.file(name).size)
        return f

    def tensor(self, name: str) -> torch.Tensor:
        """Saved tensor ``name``, read by :meth:`load` (kept until close(): tied names may copy it more than once)."""
        src = self._model.get(name)
        if src is None:
            raise ResumerError(f"{self.uri}: '{name}' was not loaded before it was applied (load first).")
        return src

    def optimizer_state(self, param: str) -> dict[str, Any]:
        """Saved optimizer state of ``param`` (by saved name): the tensors :meth:`load_optimizer_state` read,
        plus plain values."""
        out: dict[str, Any] = dict(self._decoded("scalars").get(param, {}))
        for entry in self._state_entries(param):
            key = state_key(param, entry.key)
            t = self._preloaded.pop(key, None)
            if t is not None:
                self._handed[key] = t
            elif key in self._handed:
                t = self._handed[key].clone()  # asked again (tied names): a copy of its own, never shared
            if t is None:
                raise ResumerError(f"{self.uri}: optimizer state '{param}/{entry.key}' was not loaded before it "
                                   "was applied (load first).")
            out[entry.key] = t
        return out

    def group_hyperparams(self, index: int) -> dict[str, Any]:
        return dict(self._decoded("groups")[index])

    def scheduler_state(self) -> Any:
        return self._decoded("scheduler")

    def rng_state(self) -> dict[str, Any] | None:
        """RNG state already parsed by :func:`resumer.formats.rng.parse`."""
        return self._decoded("rng")

    def extra(self) -> dict[str, Any]:
        return self._decoded("extra")

    def details(self) -> dict[str, Any]:
        m = self.manifest
        return {"kind": "resumer", "format_version": m.raw.get("version"), "time": m.time,
                "files": [f.to_dict() for f in m.files], "total_bytes": m.total_bytes, "code": m.code,
                "world": m.raw.get("world")}

    def close(self) -> None:
        self._release()
        self._preloaded.clear()
        self._model.clear()
        self._handed.clear()
        for f in self._files.values():
            f.close()
        self._files.clear()


def _region_of(key: str, chunks: Any, pieces: dict[str, torch.Tensor],
               region: tuple[tuple[int, ...], tuple[int, ...]]) -> torch.Tensor:
    """The ``region`` (global offsets and sizes) of chunked tensor ``key`` from the chunks read that overlap it
    (the chunks tile the tensor, so they cover the region): the one chunk read itself when it is exactly the region
    (a resume at the saved layout: no copy), else a fresh tensor each overlap is copied into."""
    r_off, r_size = region
    read = [(c, pieces.pop(chunk_key(key, c.offsets))) for c in chunks if chunk_key(key, c.offsets) in pieces]
    if len(read) == 1 and (read[0][0].offsets, read[0][0].sizes) == (r_off, r_size):
        return read[0][1].view(r_size)
    out = torch.empty(r_size, dtype=torch_dtype(chunks[0].loc.dtype))
    covered = 0
    for c, piece in read:
        lo = [max(o, ro) for o, ro in zip(c.offsets, r_off, strict=True)]
        hi = [min(o + n, ro + rn) for o, n, ro, rn in zip(c.offsets, c.sizes, r_off, r_size, strict=True)]
        src = piece.view(c.sizes)[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, c.offsets, strict=True))]
        out[tuple(slice(a - ro, b - ro) for a, b, ro in zip(lo, hi, r_off, strict=True))] = src
        covered += src.numel()
    if covered != out.numel():  # the chunks do not overlap (checked when parsed): so every element was written
        raise ResumerError(f"'{key}': the chunks read cover {covered} of the {out.numel()} elements this rank keeps "
                           "(a bug in resumer's sharded read; nothing was changed).")
    return out


def _own_rng(m: Manifest) -> Any:
    """The RNG state this process restores: in a process group of the world size a sharded save had, this rank's
    own; otherwise the saving rank 0's."""
    per_rank = (m.raw.get("world") or {}).get("rng_per_rank")
    dist = torch.distributed
    if per_rank and dist.is_available() and dist.is_initialized() and dist.get_world_size() == len(per_rank):
        return per_rank[dist.get_rank()] or m.rng
    return m.rng


class NativeReader:
    """The registry's entry for the native format: a directory holding ``manifest.json``, or that file."""

    def detect(self, probe: Probe) -> bool:
        if probe.kind == "file":
            return probe.name == MANIFEST
        return probe.kind == "directory" and MANIFEST in probe.names()

    def open(self, store: Store, options: ReadOptions) -> NativeSource:
        if store.name == MANIFEST and store.isfile():
            store = store.parent()
        return NativeSource(read_manifest(store), store=store, checksums=options.checksums,
                            progress=options.progress)


READER = NativeReader()
