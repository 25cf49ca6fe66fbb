"""Nothing is allocated from sizes a manifest declares before the real sizes are checked.

A 45 KB optimizer file whose manifest declares 2 GiB of Adam state (consistently: byte ranges, file size and
signature all agree) must cost nothing like 2 GiB: the real file size is checked first. Peak memory is read in a
fresh process (``ru_maxrss``), where nothing else has raised it before.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import resumer
from resumer import examples as ex
from resumer.formats.native.manifest import long_form

pytestmark = pytest.mark.slow

DECLARED = 16384 * 32768 * 4  # 2 GiB


def _inflate(uri: str) -> int:
    """Declare 2 GiB in the optimizer file; returns the file's real size."""
    path = Path(uri) / "manifest.json"
    d = long_form(json.loads(path.read_text()))
    t = d["optimizer"]["tensors"]["4.bias/exp_avg_sq"]  # the last tensor of the optimizer file
    t["shape"], t["nbytes"] = [16384, 32768], DECLARED
    opt_file = next(f for f in d["files"] if f["path"] == t["file"])
    opt_file["size"] = t["offset"] + DECLARED
    for s in d["signature"]["optimizer"]["state"]:
        for e in s["entries"]:
            if s["param"] == "4.bias" and e["key"] == "exp_avg_sq":
                e["shape"] = [16384, 32768]
    path.write_text(json.dumps(d))
    return (Path(uri) / t["file"]).stat().st_size


@pytest.mark.parametrize("verify", [True, False])
def test_declared_gigabytes_cost_nothing_before_sizes_are_checked(tmp_path: Path, verify: bool) -> None:
    torch.manual_seed(0)
    model = ex.mlp_v1()
    opt = ex.adam(model)
    ex.train_step(model, opt, 1)
    uri = resumer.save_checkpoint(str(tmp_path), 1, model, opt)
    real = _inflate(uri)
    code = textwrap.dedent(f"""
        import resource, resumer
        from resumer import examples as ex
        m = ex.mlp_v1(); o = ex.adam(m)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            resumer.resume({uri!r}, m, o, verify={verify})
            print("RESUMED")
        except resumer.CheckpointError as e:
            print("ERROR", e)
        print("GROWTH_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ERROR ") and f"has {real} bytes, the manifest says" in lines[0], lines
    growth_kib = int(lines[-1].split()[1])
    assert growth_kib < 256 * 1024, f"declared {DECLARED} bytes cost {growth_kib} KiB before the size check"
