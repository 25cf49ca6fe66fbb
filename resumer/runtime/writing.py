"""What both savers (resumer.runtime.save and resumer.runtime.sharded_save) use: the code's fingerprint, the check
just before a commit that every data file is there, and the removal of an uncommitted save's files."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
from typing import Any

from torch import nn

from resumer.core.errors import CheckpointError, UsageError
from resumer.core.signature import Signature
from resumer.formats.jsonvalue import decode, encode, plain_state
from resumer.runtime.capture import unwrap
from resumer.storage.fs import basename
from resumer.storage.store import Store

logger = logging.getLogger("resumer.runtime.save")


def code_fingerprint(model: nn.Module, sig: Signature) -> dict[str, Any]:
    """What identifies the code: the model class, a hash of its source, a hash of the structure."""
    cls = type(unwrap(model))
    try:
        source = inspect.getsource(inspect.getmodule(cls) or cls)
        source_hash = hashlib.sha256(source.encode()).hexdigest()[:16]
    except (OSError, TypeError):
        source_hash = None
    structure = {"tensors": [t.to_dict() for t in sig.tensors],
                 "optimizer": sig.optimizer.cls if sig.optimizer else None,
                 "groups": [list(g.params) for g in sig.optimizer.groups] if sig.optimizer else None}
    structure_hash = hashlib.sha256(json.dumps(structure, sort_keys=True).encode()).hexdigest()[:16]
    return {"model_class": f"{cls.__module__}.{cls.__qualname__}", "source_sha256": source_hash,
            "structure_sha256": structure_hash, "fingerprint": f"{structure_hash}-{source_hash}"}


def encode_extra(extra: Any) -> dict[str, Any]:
    """``extra`` as the manifest holds it: a JSON object. Anything else is refused before a byte is written; a
    manifest whose ``extra`` is not an object is malformed, so every reader would skip the committed checkpoint."""
    if extra is not None and not isinstance(extra, dict):
        raise UsageError(f"extra must be a dict (or None), got a {type(extra).__name__}. Put the values in a dict, "
                         "e.g. extra={\"loss\": loss}.")
    return encode(extra or {}, "extra")


def encode_state(param: str, key: str, value: Any) -> Any:
    """Optimizer state value ``value`` (not a tensor) of parameter ``param`` as the manifest holds it. A value no
    optimizer keeps besides tensors (a string, a dict, an object) is refused before a byte is written: reading
    refuses it (see ``jsonvalue.plain_state``), so a checkpoint holding it would commit and never resume."""
    where = f"optimizer state '{param}' '{key}'"
    encoded = encode(value, where)
    if not plain_state(decode(encoded)):
        raise UsageError(f"Cannot save {where}: it is {value!r:.80}, and optimizer state besides tensors must be "
                         "a number, flag, None, small tensor, or a tuple or list of those (what resume can load). "
                         "Keep other values out of optimizer.state, or pass them in `extra`.")
    return encoded


def discard(ckpt: Store, names: list[str]) -> None:
    """Remove the data files of a save that did not commit; failures are logged (they are uncommitted anyway)."""
    for name in names:
        try:
            with contextlib.suppress(FileNotFoundError):
                ckpt.fs.rm_file(ckpt.path_of(name))  # one try, no retries: the save's own error is on its way
        except Exception as exc:  # noqa: BLE001 - cleanup must not hide the error being raised
            logger.warning("[save] could not remove the uncommitted %s: %s", ckpt.uri_of(name), exc)



def check_written(ckpt: Store, files: list[dict[str, Any]]) -> None:
    """One listing before the commit: every data file is there with its size (a store can lose an object)."""
    sizes = {basename(str(e["name"])): e.get("size") for e in ckpt.ls(detail=True)}
    for f in files:
        if sizes.get(f["path"]) != f["size"]:
            raise CheckpointError(f"{ckpt.uri_of(f['path'])} is missing or has the wrong size just before commit "
                                  f"({sizes.get(f['path'])} bytes, wrote {f['size']}): the store lost it. Nothing "
                                  "was committed; save again.", uri=ckpt.uri)
