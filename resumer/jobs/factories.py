"""``MODULE:FACTORY`` references from the command line, resolved with clear errors.

The working directory is NOT put first on ``sys.path``: only the named module's top-level package may come
from it (found there by name, like ``python -m`` would), and while that module is imported and its factories
run, the working directory sits LAST on ``sys.path`` (so the user's own sibling modules resolve, and nothing
installed can be shadowed by a file there). It is taken off again afterwards: a ``netrc.py`` or ``json.py``
lying in the working directory never runs when the CLI later imports storage libraries.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from resumer.core.errors import ResumerError, UsageError

_VERBOSE_HINT = "run with -v to see the traceback"


@contextmanager
def _cwd_importable() -> Iterator[None]:
    """The working directory on ``sys.path`` last, for the duration only (left alone if already there)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import(module_name: str) -> ModuleType:
    """Import ``module_name``; its top-level package comes from the working directory when it is there."""
    top = module_name.partition(".")[0]
    if top not in sys.modules:
        spec = importlib.machinery.PathFinder.find_spec(top, [os.getcwd()])
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules[top] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(top, None)
                raise
    return importlib.import_module(module_name)


def resolve(ref: str, what: str) -> Callable[..., Any]:
    """Import ``module:attr`` (the module may live in the working directory) and return the callable."""
    if ":" not in ref:
        raise UsageError(f"Bad {what} {ref!r}: write MODULE:FACTORY, e.g. 'mypkg.models:build_model'.")
    module_name, _, attr = ref.partition(":")
    with _cwd_importable():
        try:
            module = _import(module_name)
        except ImportError as exc:
            raise UsageError(f"Bad {what} {ref!r}: cannot import module {module_name!r} ({exc}). Run from the "
                             "directory that holds it or install it.") from exc
        except Exception as exc:  # the user's module failed while it ran: say so in one paragraph
            raise UsageError(f"Bad {what} {ref!r}: importing module {module_name!r} raised "
                             f"{type(exc).__name__}: {exc}. Fix the module ({_VERBOSE_HINT}).") from exc
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UsageError(f"Bad {what} {ref!r}: module {module_name!r} has no attribute {attr!r}.")
    if not callable(obj):
        raise UsageError(f"Bad {what} {ref!r}: {attr!r} is not callable.")
    return obj


def _call(ref: str, what: str, *args: Any) -> Any:
    """Resolve and call a factory; an exception from the user's code becomes one clear ``UsageError``."""
    factory = resolve(ref, what)
    with _cwd_importable():  # a factory may import its sibling modules lazily
        try:
            return factory(*args)
        except ResumerError:
            raise
        except Exception as exc:
            raise UsageError(f"{what} {ref!r} raised {type(exc).__name__}: {exc}. Fix the factory "
                             f"({_VERBOSE_HINT}).") from exc


def build(model_ref: str, optimizer_ref: str | None = None, scheduler_ref: str | None = None
          ) -> tuple[Any, Any, Any]:
    """Model from a no-argument factory; optimizer from factory(model); scheduler from factory(optimizer)."""
    import torch

    model = _call(model_ref, "--model")
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {model_ref!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    optimizer = _call(optimizer_ref, "--optimizer", model) if optimizer_ref else None
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"--optimizer {optimizer_ref!r} returned a {type(optimizer).__name__}, not an optimizer.")
    if scheduler_ref and optimizer is None:
        raise UsageError("--scheduler needs --optimizer: the scheduler factory takes the optimizer.")
    scheduler = _call(scheduler_ref, "--scheduler", optimizer) if scheduler_ref else None
    return model, optimizer, scheduler
