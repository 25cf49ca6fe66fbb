"""Lightning checkpoints: a ``.ckpt`` file as ``lightning.Trainer`` writes it (``ModelCheckpoint`` or
``trainer.save_checkpoint``).

The file is a torch.save zip holding a dict; what is read, under Lightning's names:

- ``state_dict``: the LightningModule's weights, named by its attribute paths (``model.0.weight`` for a module
  that holds ``self.model = nn.Sequential(...)``). When every name starts with the same attribute (the
  module wraps one network), that prefix is stripped, so the plain network resumes as it is; the plan says so,
  and a resume into the LightningModule itself takes the prefix back with ``renames="auto"``.
- ``optimizer_states[0]``: a torch optimizer ``state_dict``, keyed by position and tied to names through the
  CURRENT optimizer's order, exactly as ``resumer.formats.torch_save`` does (this source is one of its).
  Further optimizers are not resumed; the plan says so.
- ``lr_schedulers[0]``: the scheduler's ``state_dict``; further schedulers are not resumed, said in the plan.
- ``global_step`` is the step; ``epoch`` and the Lightning version are kept as extra.
- ``hyper_parameters``, ``callbacks``, ``loops`` and the rest are loaded (the whole file is one pickle) but not
  restored.

The file is loaded with ``weights_only=True`` and nothing added to the unpickler's allowlist: a checkpoint whose
hyperparameters or callback state hold Python objects is refused, never run. Detection looks only at the name
(``.ckpt``) and the first bytes (a torch.save zip); nothing is unpickled to recognise it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from resumer.core.errors import CheckpointError
from resumer.formats.source import Probe, ReadOptions
from resumer.formats.torch_save import READER as TORCH_SAVE
from resumer.formats.torch_save import TorchSaveSource, is_state_dict, safe_load, strip_prefixes
from resumer.storage.store import Store

logger = logging.getLogger(__name__)

SUFFIX = ".ckpt"
# Keys only Lightning writes: a .ckpt holding none of them is an ordinary torch.save file.
LIGHTNING_KEYS = ("pytorch-lightning_version", "optimizer_states", "lr_schedulers", "loops")
NOT_RESTORED = ("hyper_parameters", "callbacks", "loops")


def common_prefix(names: list[str]) -> str | None:
    """The one attribute every name is under (``model`` for ``model.0.weight``, ``model.2.bias``), or None."""
    firsts = {name.split(".", 1)[0] for name in names}
    if len(firsts) != 1 or not all("." in name for name in names):
        return None
    return firsts.pop()


def _model(uri: str, obj: Mapping[str, Any], notes: list[str]) -> dict[str, torch.Tensor]:
    """The weights of ``state_dict``, with the LightningModule's single attribute prefix stripped."""
    sd: Any = obj.get("state_dict")
    if not is_state_dict(sd):
        raise CheckpointError(f"{uri} is a Lightning checkpoint without a 'state_dict' of tensors; nothing was "
                              "loaded.", uri=uri)
    model, stripped = strip_prefixes(sd)
    notes += stripped
    prefix = common_prefix(list(model))
    if prefix is None:
        notes.append("weights keep the LightningModule's attribute names (no single attribute holds them all)")
        return model
    notes.append(f"stripped the LightningModule's attribute prefix '{prefix}.' from every saved name (all weights "
                 f"are under self.{prefix}); to resume into the LightningModule itself, pass renames='auto' "
                 "(--rename auto)")
    return {name[len(prefix) + 1:]: t for name, t in model.items()}


def _first(uri: str, obj: Mapping[str, Any], key: str, what: str, notes: list[str]) -> Mapping[str, Any] | None:
    """The first state_dict of the list ``obj[key]`` (None when it is absent or empty); the rest are noted."""
    states = obj.get(key)
    if states is None or (isinstance(states, (list, tuple)) and not states):
        notes.append(f"the checkpoint holds no {what} state ('{key}' is absent or empty)")
        return None
    if not isinstance(states, (list, tuple)) or not all(isinstance(s, Mapping) for s in states):
        raise CheckpointError(f"{uri}: '{key}' is not a list of {what} state_dicts; nothing was loaded.", uri=uri)
    if len(states) > 1:
        notes.append(f"{len(states)} {what}s saved: only the first ({key}[0]) is resumed, the other "
                     f"{len(states) - 1} are not")
    return states[0]


def _step(uri: str, obj: Mapping[str, Any], notes: list[str]) -> int | None:
    step = obj.get("global_step")
    if step is None:
        notes.append("the checkpoint holds no 'global_step': no step is resumed")
        return None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{uri}: 'global_step' is not a non-negative integer; nothing was loaded.", uri=uri)
    notes.append("the step is Lightning's global_step (optimizer steps taken)")
    return step


def _extra(obj: Mapping[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    epoch = obj.get("epoch")
    if isinstance(epoch, int) and not isinstance(epoch, bool):
        extra["epoch"] = epoch
    version = obj.get("pytorch-lightning_version")
    if isinstance(version, str):
        extra["lightning_version"] = version[:64]
    return extra


class LightningSource(TorchSaveSource):
    """A Lightning ``.ckpt``: a torch.save checkpoint whose optimizer and scheduler are the first of Lightning's
    lists; in memory once it is open."""

    format = "lightning"

    def __init__(self, store: Store, obj: Mapping[str, Any]) -> None:
        uri = store.uri
        notes = ["a Lightning checkpoint (.ckpt written by lightning.Trainer)"]
        model = _model(uri, obj, notes)
        optimizer = _first(uri, obj, "optimizer_states", "optimizer", notes)
        scheduler = _first(uri, obj, "lr_schedulers", "scheduler", notes)
        step = _step(uri, obj, notes)
        kept = [key for key in NOT_RESTORED if obj.get(key)]
        if kept:
            notes.append(f"not restored: {', '.join(kept)} (Lightning's own state, not the model's)")
        notes.append("RNG not restored: a Lightning checkpoint keeps none")
        super().__init__(uri, model, optimizer, scheduler, step, _extra(obj), notes)
        self._store = store

    def details(self) -> dict[str, Any]:
        name = self._store.path.rstrip("/").rsplit("/", 1)[-1]
        return {"kind": self.format, "files": [{"path": name, "size": self._store.size(),
                                                "checksum": "(no checksum recorded)"}]}


def is_lightning(obj: Any) -> bool:
    """Whether a loaded .ckpt has Lightning's layout (and not just a torch.save dict named .ckpt)."""
    return isinstance(obj, Mapping) and "state_dict" in obj and any(key in obj for key in LIGHTNING_KEYS)


class LightningReader:
    """The registry's entry for Lightning checkpoints: a file named ``*.ckpt`` that starts as a torch.save zip.
    A ``.ckpt`` without Lightning's keys is read as the plain torch.save file it is."""

    def detect(self, probe: Probe) -> bool:
        return probe.name.endswith(SUFFIX) and TORCH_SAVE.detect(probe)

    def open(self, store: Store, options: ReadOptions) -> TorchSaveSource:
        try:
            obj = safe_load(store)
        except CheckpointError as exc:
            if "arbitrary unpickling" not in str(exc):
                raise
            raise CheckpointError(f"{exc} In a Lightning checkpoint this is usually save_hyperparameters() or a "
                                  "callback's state holding a Python object (an argparse.Namespace, a dataclass, a "
                                  "class): save plain values there.", uri=store.uri) from None
        if not is_lightning(obj):
            logger.debug("[format] %s is named .ckpt but holds no Lightning keys: read as torch.save", store.uri)
            return TorchSaveSource.open(store)
        return LightningSource(store, obj)


READER = LightningReader()
