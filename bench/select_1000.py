"""Benchmark: find the latest valid checkpoint among 1,000, on a local folder and on a local S3 server.

1,000 committed checkpoints of a small model, the newest ``--bad`` of them corrupt (a truncated data
file), plus one torn directory (no manifest) above them. ``resumer.select(root, checksums=False)`` must
take ONE listing pass plus one small read (the manifest) per candidate examined: bad + 1 reads.
On S3 every HTTP request is counted from the server's log; locally the manifest reads are counted.
Run: ``python bench/select_1000.py [--n 1000] [--bad 3] [--json] [--no-check]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import fsspec

import resumer
from resumer.examples import mlp_v1
from resumer.formats.native.manifest import step_dir
from resumer.testing import local_s3


def populate(root: str, n: int, bad: int, so: dict[str, Any] | None) -> None:
    """Write one real checkpoint, then clone it n-1 times (same bytes, step changed in the manifest)."""
    first = resumer.save_checkpoint(root, 1, mlp_v1(), storage_options=so)
    fs, base = fsspec.core.url_to_fs(root, **(so or {}))
    src = first.split("://", 1)[-1] if "://" in first else first
    files = {name.rsplit("/", 1)[-1]: fs.cat_file(name) for name in fs.find(src)}
    manifest = json.loads(files.pop("manifest.json"))
    batch: dict[str, bytes] = {}
    for step in range(2, n + 1):
        manifest["step"] = step
        manifest["signature"]["step"] = step
        d = f"{base}/{step_dir(step)}"
        for name, data in files.items():
            batch[f"{d}/{name}"] = data[:-7] if step > n - bad and name.startswith("model.") else data
        batch[f"{d}/manifest.json"] = json.dumps(manifest).encode()
        if len(batch) > 600:
            put(fs, batch)
            batch = {}
    batch[f"{base}/{step_dir(n + 1)}/model.torn.safetensors"] = b"partial"
    put(fs, batch)


def put(fs: Any, batch: dict[str, bytes]) -> None:
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        for path in {p.rsplit("/", 1)[0] for p in batch}:
            fs.makedirs(path, exist_ok=True)
    fs.pipe(batch)


def measure(root: str, so: dict[str, Any] | None, requests: Any) -> dict[str, Any]:
    before = len(requests())
    t = time.perf_counter()
    sel = resumer.select(root, storage_options=so, checksums=False, mark=False)
    secs = time.perf_counter() - t
    kinds = Counter()
    for r in requests()[before:]:
        method, target = r.split(" ")[:2]
        kinds["LIST" if "list-type=2" in target else f"{method} {target.rsplit('/', 1)[-1].split('.')[0]}"] += 1
    return {"chosen_step": sel.chosen.step if sel.chosen else None, "rejected": len(sel.rejected),
            "manifests_read": sel.manifests_read, "seconds": round(secs, 3), "requests": dict(kinds),
            "total_requests": sum(kinds.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--bad", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {}
    local = tempfile.mkdtemp(prefix="resumer-bench-")
    populate(local, args.n, args.bad, None)
    out["local"] = measure(local, None, lambda: [])
    log = os.path.join(local, "moto.log")
    with local_s3(log_path=log) as s3:
        so = s3.storage_options()
        root = s3.make_bucket("select") + "/run"
        populate(root, args.n, args.bad, so)
        out["s3"] = measure(root, so, s3.requests)
    want_step, want_reads = args.n - args.bad, args.bad + 1
    s3r = out["s3"]
    ok = (all(r["chosen_step"] == want_step and r["manifests_read"] == want_reads for r in out.values())
          and s3r["requests"].get("LIST", 0) == -(-(args.n * 2 + 1) // 1000)
          and s3r["total_requests"] == s3r["requests"].get("LIST", 0) + want_reads)
    out["target"] = f"one listing pass + {want_reads} manifest reads, newest valid = step {want_step}"
    out["met"] = ok
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name in ("local", "s3"):
            r = out[name]
            print(f"{name:>5}: chose step {r['chosen_step']} in {r['seconds'] * 1e3:.0f} ms; manifests read "
                  f"{r['manifests_read']}; requests {r['requests'] or '(not counted locally)'}")
        print(f"target: {out['target']}: {'met' if ok else 'NOT met'}")
    return 0 if ok or args.no_check else 1


if __name__ == "__main__":
    sys.exit(main())
