"""Summaries of a checkpoint of any registered format, or a root of checkpoints (for ``resumer inspect``)."""

from __future__ import annotations

from typing import Any

from resumer.checkpoints.catalog import list_checkpoints
from resumer.core.signature import Signature
from resumer.formats import registry
from resumer.render.text import printable
from resumer.runtime.api import open_source
from resumer.storage.store import Store


def _signature_summary(sig: Signature) -> dict[str, Any]:
    opt = sig.optimizer
    return {
        "step": sig.step,
        "tensors": len(sig.tensors),
        "parameters": sum(t.numel for t in sig.tensors if t.kind == "parameter"),
        "tensor_bytes": sig.total_bytes_hint,
        "dtypes": sorted({t.dtype for t in sig.tensors}),
        "optimizer": None if opt is None else {
            "class": opt.cls, "groups": len(opt.groups), "params_with_state": len(opt.state),
            "inferred": opt.inferred, "unmapped": opt.unmapped},
        "scheduler": None if sig.scheduler is None else sig.scheduler.cls,
        "rng": list(sig.rng),
        "world_size": sig.world_size,
        "notes": list(sig.notes),
    }


def inspect_checkpoint(uri: str, storage_options: dict[str, Any] | None = None, *, verify: bool = False
                       ) -> dict[str, Any]:
    """A JSON-ready summary; for a root, the committed checkpoints and the newest one's summary."""
    store = target = Store.open(uri, storage_options)
    info: dict[str, Any] = {"uri": uri}
    if registry.detect(store) is None and store.isdir():  # a root: its checkpoints, and the newest one
        infos = list_checkpoints(store)
        info["checkpoints"] = [{"uri": i.uri, "step": i.step, "time": i.time, "bytes": i.total_bytes} for i in infos]
        if infos:
            target = store.child(infos[0].uri.rstrip("/").rsplit("/", 1)[-1])
        else:  # a folder of other tools' checkpoints (its newest readable one), or the clear "nothing here"
            del info["checkpoints"]
    source = open_source(target, checksums=verify, select_verified=False)
    try:
        verified = source.verify() if verify else False
        summary = {"checkpoint": source.uri, "format": source.format, **_signature_summary(source.signature),
                   **source.details(), "extra": source.extra(), "verified": verified}
    finally:
        source.close()
    info.update(summary)
    return info


def describe(info: dict[str, Any]) -> str:
    """Readable text for an inspect summary."""
    lines = []
    if "checkpoints" in info:
        lines.append(f"{info['uri']}: {len(info['checkpoints'])} committed checkpoint(s)")
        lines += [f"  step {c['step']:>10}  {c['time']}  {c['bytes']:>12} bytes  {c['uri']}"
                  for c in info["checkpoints"]]
        lines.append("newest:")
    lines.append(f"checkpoint  {info['checkpoint']} ({info['kind']})")
    lines.append(f"step        {info['step']}")
    if info.get("time"):
        lines.append(f"time        {info['time']}")
    lines.append(f"tensors     {info['tensors']} ({info['parameters']:,} parameter values, "
                 f"{info['tensor_bytes']:,} bytes, {', '.join(info['dtypes'])})")
    opt = info["optimizer"]
    lines.append("optimizer   " + ("none" if opt is None else
                                   f"{opt['class']}: {opt['groups']} group(s), state for {opt['params_with_state']} "
                                   "parameter(s)" + (f" [{opt['inferred']}]" if opt.get("inferred") else "")))
    if opt and opt.get("unmapped"):
        lines.append(f"            not usable by name: {opt['unmapped']}")
    lines.append(f"scheduler   {info['scheduler'] or 'none'}")
    lines.append(f"rng         {', '.join(info['rng']) or 'none'}")
    for f in info.get("files", ()):
        lines.append(f"file        {f['path']}  {f['size']:,} bytes  {f['checksum']}")
    if info.get("code"):
        lines.append(f"code        {info['code'].get('model_class')} fingerprint {info['code'].get('fingerprint')}")
    if info.get("extra"):
        lines.append(f"extra       {info['extra']}")
    for n in info.get("notes", ()):
        lines.append(f"note        {n}")
    if info.get("verified"):
        lines.append("verified    sizes, headers and checksums ok")
    # Each line is ours; a newline or escape inside one came from the checkpoint and is shown escaped.
    return "\n".join(printable(line) for line in lines)
