"""Benchmark: resume a >= 1 GiB checkpoint from a local folder, against `cat` and torch.load.

A model of ``nn.Linear`` layers (float32) with Adam state is saved once with ``resumer.save_checkpoint``
and once with ``torch.save({"model": ..., "optimizer": ...})``. Then, each in a fresh process:

* ``cat`` of the checkpoint's files to /dev/null: the raw read baseline (one for each format), timed in a
  fresh process after the same setup as the loaders (imports, the model built), so it reads at the same
  moment after the eviction as they do;
* the floor for any loader that copies: the same files read into the same kind of memory without parsing
  (model bytes into memory touched beforehand, optimizer bytes into fresh memory);
* ``resumer.resume(uri, model, opt)``: the default, which reads every data file once into fresh memory,
  checksumming it on the way (model and optimizer files side by side), and only then copies into the live
  objects; ``verify=False``; and resuming from the ROOT (``resumer.resume(root, ...)``);
* ``torch.load(path)`` + ``load_state_dict`` for model and optimizer: the usual path.

Each is run with a warm page cache (files read beforehand) and a cold one (every file evicted with
``posix_fadvise(DONTNEED)`` after an fsync, before each run; residency checked with ``fincore``).
Why cat runs in a child too: on a VM that reports freed memory to its host (virtio-balloon free page
reporting, as here), memory freed by the eviction is handed back to the host within seconds, and a read
then lands in pages the host must fault in again. Measured here: ``cat`` of the 1.03 GiB checkpoint right
after the eviction 0.36-0.40 s, 3 s later 1.17-1.23 s, 6 s later 1.55 s. Earlier versions timed cat right
after the eviction and every loader ~3 s later (interpreter start-up), which overstated the cold ratios.
Wall time is that of the load call alone; peak RSS growth is VmHWM at the end minus VmRSS before the
model is built (VmHWM is reset first; a tiny model is built before that, so torch's lazy imports are not
counted), so it includes the fresh model and the optimizer state.

Targets: the default ``resumer.resume`` call within 1.3x of ``cat`` with a COLD cache (a restarted job
reads a checkpoint that is not in memory; ``--target-cache warm`` for the other condition), and every
resumer variant's peak RSS growth <= 1.2x the checkpoint's size. Loaded state must match what was saved.
Cold runs vary far more than warm ones here (a cold ``cat`` of the same files took 0.57-2.56 s in one
session), so they are repeated more often by default (``--cold-repeat``), interleaved with the others.
Run: ``python bench/resume_local.py [--gib 1] [--repeat 3] [--cold-repeat 7] [--json] [--no-check]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GIB = 2**30
TIME_TARGET = 1.3
RSS_TARGET = 1.2
TORCH_FILE = "torch_checkpoint.pt"
STEP = 1000
# method -> (label, format whose files it reads)
METHODS = {
    "cat": ("cat resumer files", "resumer"),
    "read_floor": ("floor: raw read into place", "resumer"),
    "resume": ("resumer.resume(uri)  [verify]", "resumer"),
    "resume_noverify": ("resumer.resume(uri, verify=False)", "resumer"),
    "resume_root": ("resumer.resume(root) [verify]", "resumer"),
    "cat_torch": ("cat torch.save file", "torch"),
    "torch_load": ("torch.load + load_state_dict", "torch"),
}
CAT_OF = {"resumer": "cat", "torch": "cat_torch"}


# ---------------------------------------------------------------- child side (fresh processes)

def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def build(width: int, layers: int, *, random_init: bool) -> tuple[Any, Any]:
    """A model of ``layers`` x Linear(width, width) (float32) and a fresh Adam over it.

    ``random_init=False`` fills every parameter with a constant instead of the (slow) default init: the
    memory is touched all the same, as in a real freshly built model, and differs from any saved state.
    """
    import torch
    from torch import nn

    if random_init:
        torch.manual_seed(0)
        model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    else:
        model = nn.Sequential(*(nn.Linear(width, width, device="meta") for _ in range(layers))).to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.5)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def digest(t: Any) -> str:
    """xxh3-64 of a CPU tensor's bytes."""
    import torch
    import xxhash

    return xxhash.xxh3_64_hexdigest(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def fingerprint(model: Any, optimizer: Any) -> list[str]:
    """Digests of every model tensor and every piece of optimizer state, in model order."""
    import torch

    out = [digest(t) for t in model.state_dict().values()]
    for p in model.parameters():
        for key, v in sorted(optimizer.state[p].items()):
            out.append(f"{key}:{digest(v) if isinstance(v, torch.Tensor) else v!r}")
    return out


def child_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one step, save both checkpoints, and record the state's fingerprint."""
    import torch

    import resumer

    model, opt = build(spec["width"], spec["layers"], random_init=True)
    model(torch.randn(8, spec["width"])).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    started = time.perf_counter()
    uri = resumer.save_checkpoint(spec["root"], STEP, model, opt)
    saved_s = time.perf_counter() - started
    started = time.perf_counter()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, spec["torch_file"])
    torch_s = time.perf_counter() - started
    return {"uri": uri, "fingerprint": fingerprint(model, opt), "save_s": saved_s, "torch_save_s": torch_s}


def is_model_file(path: str) -> bool:
    """The checkpoint's model data file: ``model[.<token>].safetensors``."""
    name = Path(path).name
    return name.split(".", 1)[0] == "model" and name.endswith(".safetensors")


def read_into(path: str, view: memoryview) -> int:
    """Fill ``view`` from the start of ``path`` in 16 MiB reads; returns the bytes read."""
    pos = 0
    with open(path, "rb", buffering=0) as f:
        while pos < len(view):
            n = f.readinto(view[pos:pos + 16 * 2**20])
            if not n:
                break
            pos += n
    return pos


def floor_loader(files: list[str]) -> Callable[[], int]:
    """The floor for any copying loader: the same bytes into the same kind of memory, no parsing.

    The model file goes into a buffer touched beforehand (like a built model's parameters), every
    other file into fresh memory (like newly created optimizer state).
    """
    import torch

    model_file = next(p for p in files if is_model_file(p))
    touched = torch.ones(os.path.getsize(model_file), dtype=torch.uint8)

    def load() -> int:
        n = read_into(model_file, touched.numpy().data)
        for path in files:
            if path != model_file:
                n += read_into(path, torch.empty(os.path.getsize(path), dtype=torch.uint8).numpy().data)
        return n

    return load


def cat_loader(paths: list[str]) -> Callable[[], int]:
    """``cat PATHS > /dev/null``; returns the bytes it read."""
    def load() -> int:
        subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)
        return sum(os.path.getsize(p) for p in paths)

    return load


def checkpoint_loader(spec: dict[str, Any]) -> tuple[Callable[[], int], Callable[[], bool]]:
    """(load, check) for ``spec['method']``: load into a freshly built model and optimizer, check the state."""
    import torch

    import resumer

    model, opt = build(spec["width"], spec["layers"], random_init=False)

    def torch_load() -> int:
        ckpt = torch.load(spec["torch_file"], weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        return os.path.getsize(spec["torch_file"])

    def resume() -> int:
        target = spec["root"] if spec["method"] == "resume_root" else spec["uri"]
        return resumer.resume(target, model, opt, verify=spec["method"] != "resume_noverify").bytes_read

    def check() -> bool:
        return fingerprint(model, opt) == spec["fingerprint"]

    return (torch_load if spec["method"] == "torch_load" else resume), check


def child_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Set up (from a clean RSS baseline), time the load alone, then check the loaded state."""
    import resumer  # noqa: F401  (imported before the baseline: its own memory is not the loader's)

    build(8, 1, random_init=False)  # torch's lazy imports (~70 MiB here: nn init, optim) happen now, not below
    hwm_reset = reset_peak_rss()
    base_kib = _proc_status_kib("VmRSS")
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    check: Callable[[], bool | None]
    if spec["method"] in CAT_OF.values():
        # Same setup as a loader (a fresh process that built the model), so cat reads at the same moment
        # after the eviction: on this VM the delay alone changes cold read speed 3x (see the docstring).
        build(spec["width"], spec["layers"], random_init=False)
        load, check = cat_loader(spec["files"] if spec["method"] == "cat" else [spec["torch_file"]]), lambda: None
    elif spec["method"] == "read_floor":
        load, check = floor_loader(spec["files"]), lambda: None
    else:
        load, check = checkpoint_loader(spec)
    started = time.perf_counter()
    bytes_read = load()
    wall = time.perf_counter() - started
    peak_kib = _proc_status_kib("VmHWM")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"wall_s": wall, "peak_growth": (peak_kib - base_kib) * 1024, "hwm_reset": hwm_reset,
            "maxrss_growth": (maxrss - base_maxrss) * 1024, "bytes_read": bytes_read, "state_matches": check()}


def child_main(spec: dict[str, Any]) -> int:
    out = child_prepare(spec) if spec["method"] == "prepare" else child_load(spec)
    print(json.dumps(out))
    return 0


# ---------------------------------------------------------------- parent side

def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; returns the JSON it printed last."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec['method']} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_cat(files: list[str]) -> float:
    """Wall seconds of ``cat FILES > /dev/null``."""
    started = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def evict(files: list[str]) -> None:
    """Drop the files' pages from the page cache (flushed first: dirty pages cannot be dropped)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(files: list[str]) -> int | None:
    """Bytes of ``files`` in the page cache, per ``fincore``; None when fincore is not installed."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *files],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(x) for x in out.split())


def set_cache(cache: str, files: list[str]) -> int | None:
    """Put ``files`` in the requested cache state; returns their resident bytes afterwards."""
    if cache == "cold":
        evict(files)
    else:
        time_cat(files)
    return resident_bytes(files)


def layers_for(gib: float, width: int) -> int:
    """Layers of Linear(width, width) whose weights + bias + 2 Adam buffers reach ``gib`` GiB in float32."""
    per_layer = 3 * 4 * (width * width + width)
    return max(1, math.ceil(gib * GIB / per_layer))


def check_space(directory: str, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise SystemExit(f"{directory} has {free / GIB:.1f} GiB free; this run needs {needed / GIB:.1f} GiB.")


def measure_once(method: str, cache: str, base: dict[str, Any], files: dict[str, list[str]]) -> dict[str, Any]:
    """One timed run of ``method`` under ``cache``."""
    all_files = files["resumer"] + files["torch"]
    resident = set_cache(cache, all_files)
    out = run_child({**base, "method": method})
    out["resident_before"] = resident
    return out


def run_all(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Prepare the checkpoints, then measure every method under both cache conditions."""
    layers = layers_for(args.gib, args.width)
    base: dict[str, Any] = {"width": args.width, "layers": layers, "root": str(work / "ckpts"),
                            "torch_file": str(work / TORCH_FILE)}
    prep = run_child({**base, "method": "prepare"})
    os.sync()  # no writeback of the fresh files during the measurements
    files = {"resumer": sorted(str(p) for p in Path(prep["uri"]).iterdir()), "torch": [base["torch_file"]]}
    base.update(uri=prep["uri"], fingerprint=prep["fingerprint"], files=files["resumer"])
    sizes = {p: os.path.getsize(p) for fs in files.values() for p in fs}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"warm": {}, "cold": {}}
    for cache in ("warm", "cold"):
        for _ in range(args.cold_repeat if cache == "cold" else args.repeat):
            for method in METHODS:
                runs[cache].setdefault(method, []).append(measure_once(method, cache, base, files))
    model_bytes = sum(s for p, s in sizes.items() if is_model_file(p))
    return {"layers": layers, "width": args.width, "files": sizes, "model_bytes": model_bytes,
            "checkpoint_bytes": sum(sizes[p] for p in files["resumer"]), "torch_bytes": sizes[base["torch_file"]],
            "save_s": prep["save_s"], "torch_save_s": prep["torch_save_s"], "runs": runs}


def summarize(raw: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Median figures and ratios per cache condition and method."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for cache, methods in raw["runs"].items():
        rows: dict[str, dict[str, Any]] = {}
        for method, runs in methods.items():
            fmt = METHODS[method][1]
            nbytes = raw["checkpoint_bytes"] if fmt == "resumer" else raw["torch_bytes"]
            wall = statistics.median(r["wall_s"] for r in runs)
            row: dict[str, Any] = {"wall_s": round(wall, 3), "gb_per_s": round(nbytes / wall / 1e9, 2),
                                   "resident_before_max": max((r["resident_before"] or 0) for r in runs)}
            if "peak_growth" in runs[0]:
                peak = max(r["peak_growth"] for r in runs)
                matches = [r["state_matches"] for r in runs if r["state_matches"] is not None]
                row.update(peak_rss_growth=peak, rss_ratio=round(peak / raw["checkpoint_bytes"], 3),
                           state_matches=all(matches) if matches else None,
                           bytes_read=runs[0]["bytes_read"])
            rows[method] = row
        for method, row in rows.items():
            row["time_ratio"] = round(row["wall_s"] / rows[CAT_OF[METHODS[method][1]]]["wall_s"], 2)
            if "peak_rss_growth" in row:
                row["read_ratio"] = round(row["wall_s"] / rows["read_floor"]["wall_s"], 2)
        table[cache] = rows
    return table


def failures(table: dict[str, dict[str, dict[str, Any]]], target_cache: str) -> list[str]:
    """Every missed target (empty when all are met)."""
    out = []
    ratio = table[target_cache]["resume"]["time_ratio"]
    if ratio > TIME_TARGET:
        out.append(f"resumer.resume (default, verify) takes {ratio}x cat with a {target_cache} cache "
                   f"(target {TIME_TARGET}x)")
    for cache, rows in table.items():
        for method, row in rows.items():
            if method.startswith("resume") and row["rss_ratio"] > RSS_TARGET:
                out.append(f"{method} ({cache}) peak RSS growth {row['rss_ratio']}x the checkpoint "
                           f"(target {RSS_TARGET}x)")
            if row.get("state_matches") is False:
                out.append(f"{method} ({cache}) loaded state differs from the saved state")
    return out


def _row(cache: str, method: str, row: dict[str, Any]) -> str:
    mib = 2**20
    loads = "rss_ratio" in row
    rss = f"{row['peak_rss_growth'] / mib:>15.0f}{row['rss_ratio']:>8.2f}" if loads else f"{'':>23}"
    x_read = f"{row['read_ratio']:>8.2f}" if loads else f"{'':>8}"
    ok = {None: "", True: "yes", False: "NO"}[row.get("state_matches")]
    return (f"  {cache:<6}{METHODS[method][0]:<35}{row['wall_s']:>8.3f}{row['gb_per_s']:>7.2f}{row['time_ratio']:>7.2f}"
            f"{x_read}{rss}{row['resident_before_max'] / mib:>12.0f}  {ok}")


def render(report: dict[str, Any]) -> str:
    """The human-readable report: sizes, then one row per cache condition and method."""
    lines = [
        f"resume_local: {report['layers']} x Linear({report['width']}, {report['width']}) float32 + Adam state; "
        f"medians of {report['repeat']} warm / {report['cold_repeat']} cold runs (peak RSS: max)",
        f"  checkpoint {report['checkpoint_bytes'] / GIB:.3f} GiB (model part {report['model_bytes'] / GIB:.3f} GiB);"
        f" torch.save file {report['torch_bytes'] / GIB:.3f} GiB; save {report['save_s']:.2f}s, "
        f"torch.save {report['torch_save_s']:.2f}s",
        f"  {'cache':<6}{'method':<35}{'wall s':>8}{'GB/s':>7}{'x cat':>7}{'x read':>8}{'peak RSS +MiB':>15}"
        f"{'x ckpt':>8}{'cached MiB':>12}  state ok",
    ]
    lines += [_row(cache, method, row) for cache, rows in report["table"].items() for method, row in rows.items()]
    lines += [
        "  x cat: wall / cat of the same format's files; x read: wall / the floor (the resumer files read, no parsing,",
        "  model bytes into memory touched beforehand, optimizer bytes into fresh memory: what any loader must do);",
        "  cached MiB: the files' bytes in the page cache just before the run (fincore).",
        f"  targets: default resume <= {TIME_TARGET}x cat ({report['target_cache']} cache); resumer peak RSS growth "
        f"<= {RSS_TARGET}x checkpoint: " + ("MET" if not report["missed"] else "MISSED"),
    ]
    lines += [f"  - {m}" for m in report["missed"]]
    lines.append(f"  total bench time {report['bench_s']:.0f}s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="checkpoint size to reach, GiB (default 1)")
    parser.add_argument("--width", type=int, default=2048, help="Linear width (default 2048)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method with a warm cache")
    parser.add_argument("--cold-repeat", type=int, default=7, help="runs per method with a cold cache")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the checkpoints")
    parser.add_argument("--target-cache", choices=("cold", "warm"), default="cold",
                        help="cache condition the time target is checked under (default cold)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--no-check", action="store_true", help="exit 0 even when a target is missed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    started = time.perf_counter()
    check_space(args.dir, int(2.2 * args.gib * GIB) + GIB)
    work = Path(tempfile.mkdtemp(prefix="resumer-bench-", dir=args.dir))
    try:
        raw = run_all(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report = {k: v for k, v in raw.items() if k != "runs"}
    report.update(benchmark="resume_local", repeat=args.repeat, cold_repeat=args.cold_repeat,
                  target_cache=args.target_cache, table=summarize(raw), workdir=str(work) if args.keep else None)
    report["missed"] = failures(report["table"], args.target_cache)
    report["targets_met"] = not report["missed"]
    report["bench_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0 if args.no_check or not report["missed"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
    sys.exit(main())
