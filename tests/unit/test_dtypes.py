"""One dtype table: every dtype torch holds in a state dict saves and resumes bitwise."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import resumer
from resumer.core import dtypes
from resumer.formats.torch_dtypes import dtype_name, torch_dtype

NAMES = [d.name for d in dtypes.TABLE if isinstance(getattr(torch, d.name, None), torch.dtype)]


class Every(nn.Module):
    """A buffer of every dtype, filled with distinct bytes."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name in NAMES:
            t = torch.empty((3, 5), dtype=getattr(torch, name))
            raw = t.view(torch.uint8)
            raw.copy_(torch.randint(0, 256, raw.shape, generator=g, dtype=torch.uint8))
            if name == "bool":
                raw.clamp_(0, 1)
            self.register_buffer(f"b_{name}", t)


def test_table_matches_torch() -> None:
    for name in NAMES:
        assert dtypes.itemsize(name) == torch_dtype(name).itemsize, name
        assert dtype_name(torch_dtype(name)) == name
    assert {"complex128", "complex64", "float8_e4m3fn", "float8_e5m2", "uint64", "bool"} <= set(NAMES)


def test_every_dtype_round_trips_bitwise(tmp_path: Path) -> None:
    saved = Every(1)
    uri = resumer.save_checkpoint(str(tmp_path), 1, saved)
    fresh = Every(2)
    resumer.resume(str(tmp_path), fresh)
    for name in NAMES:
        a, b = getattr(saved, f"b_{name}"), getattr(fresh, f"b_{name}")
        assert a.dtype == b.dtype
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    # The file stays readable by the safetensors library: dtypes without a code come back as raw bytes.
    manifest = resumer.read_manifest(uri)
    loaded = load_file(f"{uri}/{manifest.data_file('model')}")
    for name in NAMES:
        t, want = loaded[f"b_{name}"], getattr(saved, f"b_{name}")
        assert torch.equal(t.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name
        if dtypes.BY_NAME[name].code is None:
            assert t.dtype == torch.uint8 and tuple(t.shape) == (3, 5, dtypes.itemsize(name))


def test_unknown_dtype_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown dtype 'qint8'"):
        dtypes.itemsize("qint8")
    with pytest.raises(ValueError, match="unknown safetensors dtype 'F7'"):
        dtypes.from_code("F7")


def test_pure_core_does_not_import_torch() -> None:
    for path in (Path(resumer.__file__).parent / "core").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "torch" not in imported, path.name
