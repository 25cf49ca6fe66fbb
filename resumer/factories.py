"""``MODULE:FACTORY`` references from the command line, resolved with clear errors."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from resumer.errors import UsageError


def resolve(ref: str, what: str) -> Callable[..., Any]:
    """Import ``module:attr`` (the current directory is importable) and return the callable."""
    if ":" not in ref:
        raise UsageError(f"Bad {what} {ref!r}: write MODULE:FACTORY, e.g. 'mypkg.models:build_model'.")
    module_name, _, attr = ref.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"Bad {what} {ref!r}: cannot import module {module_name!r} ({exc}). Run from the directory "
                         "that holds it or install it.") from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UsageError(f"Bad {what} {ref!r}: module {module_name!r} has no attribute {attr!r}.")
    if not callable(obj):
        raise UsageError(f"Bad {what} {ref!r}: {attr!r} is not callable.")
    return obj


def build(model_ref: str, optimizer_ref: str | None = None, scheduler_ref: str | None = None
          ) -> tuple[Any, Any, Any]:
    """Model from a no-argument factory; optimizer from factory(model); scheduler from factory(optimizer)."""
    import torch

    model = resolve(model_ref, "--model")()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {model_ref!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    optimizer = resolve(optimizer_ref, "--optimizer")(model) if optimizer_ref else None
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"--optimizer {optimizer_ref!r} returned a {type(optimizer).__name__}, not an optimizer.")
    if scheduler_ref and optimizer is None:
        raise UsageError("--scheduler needs --optimizer: the scheduler factory takes the optimizer.")
    scheduler = resolve(scheduler_ref, "--scheduler")(optimizer) if scheduler_ref else None
    return model, optimizer, scheduler
