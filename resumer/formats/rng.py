"""RNG state of torch, numpy, Python and CUDA as plain JSON (no pickle): capture, parse, restore.

``parse`` checks everything before ``restore`` sets anything, so a malformed state changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import random
from typing import Any

import numpy as np
import torch

from resumer.core.errors import CheckpointError, ResumerError
from resumer.formats.jsonvalue import decode, encode


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8).clone()


def capture() -> dict[str, Any]:
    """The calling process's RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": {"kind": str(kind), "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": encode(random.getstate(), "python RNG state"),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def parse(state: dict[str, Any], uri: str = "checkpoint") -> dict[str, Any]:
    """Decode and check a saved RNG state without applying it; a problem is a CheckpointError."""
    out: dict[str, Any] = {}
    try:
        if "torch" in state:
            t = _unb64(state["torch"])
            if t.numel() != torch.get_rng_state().numel():
                raise ValueError(f"torch state has {t.numel()} bytes")
            torch.Generator().set_state(t)  # validates without touching the global generator
            out["torch"] = t
        if "numpy" in state:
            n = state["numpy"]
            keys = np.asarray(n["keys"], dtype=np.uint32)
            if n["kind"] != "MT19937" or keys.shape != (624,) or not 0 <= int(n["pos"]) <= 624:
                raise ValueError("numpy state is not an MT19937 state")
            out["numpy"] = (n["kind"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"]))
            np.random.RandomState().set_state(out["numpy"])  # validates without touching the global generator
        if "python" in state:
            py = decode(state["python"])
            random.Random().setstate(py)  # validates without touching the global generator
            out["python"] = py
        if "cuda" in state:
            out["cuda"] = [_unb64(s) for s in state["cuda"]]
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                want = torch.cuda.get_rng_state().numel()
                if any(s.numel() != want for s in out["cuda"]):
                    raise ValueError(f"a CUDA state is not {want} bytes")
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, binascii.Error, ResumerError) as exc:
        raise CheckpointError(f"{uri}: the saved RNG state is malformed ({exc}). Nothing was loaded.",
                              uri=uri) from None
    return out


def restore(parsed: dict[str, Any]) -> list[str]:
    """Apply a state from :func:`parse`; returns the kinds restored (CUDA only where available)."""
    done = []
    if "torch" in parsed:
        torch.set_rng_state(parsed["torch"])
        done.append("torch")
    if "numpy" in parsed:
        np.random.set_state(parsed["numpy"])
        done.append("numpy")
    if "python" in parsed:
        random.setstate(parsed["python"])
        done.append("python")
    if "cuda" in parsed and torch.cuda.is_available():
        for i, s in enumerate(parsed["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
        done.append("cuda")
    return done
