"""RNG state of torch, numpy, Python and CUDA as plain JSON (no pickle), and its restore."""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch

from resumer.errors import CheckpointError
from resumer.jsonvalue import decode, encode


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


def restore(state: dict[str, Any], uri: str = "checkpoint") -> list[str]:
    """Restore what ``state`` holds; returns the kinds restored. Bad data is a CheckpointError."""
    done = []
    try:
        if "torch" in state:
            torch.set_rng_state(_unb64(state["torch"]))
            done.append("torch")
        if "numpy" in state:
            n = state["numpy"]
            np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]),
                                 int(n["has_gauss"]), float(n["cached_gaussian"])))
            done.append("numpy")
        if "python" in state:
            random.setstate(decode(state["python"]))
            done.append("python")
        if "cuda" in state and torch.cuda.is_available():
            states = [_unb64(s) for s in state["cuda"]]
            for i, s in enumerate(states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)
            done.append("cuda")
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{uri}: the saved RNG state is malformed ({exc}).", uri=uri) from None
    return done
