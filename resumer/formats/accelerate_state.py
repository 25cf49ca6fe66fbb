"""Hugging Face Accelerate checkpoints: the directory ``Accelerator.save_state`` writes.

Under the names ``accelerate.checkpointing.save_accelerator_state`` uses: the model as ``model.safetensors`` (or
``pytorch_model.bin``), ``optimizer.bin`` and ``scheduler.bin`` (torch.save files), and ``random_states_0.pkl``
(a torch.save dict of RNG states and Accelerate's ``step``). Everything is read as
``resumer.formats.hf_trainer`` reads a Trainer checkpoint: safetensors headers checked by resumer's own reader,
torch.save files weights-only, the optimizer state by position tied through the current optimizer's order, and the
RNG file weights-only with nothing but numpy's array types allowed. Only the first model, optimizer and scheduler
are resumed (``model_1.safetensors``, ``optimizer_1.bin``, ... are named in a note); RNG is not restored when the
directory holds several processes' ``random_states_N.pkl``; ``custom_checkpoint_N.pkl`` (pickles of arbitrary
registered objects) and ``sampler.bin`` (a pickled sampler) are never read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from resumer.core.errors import CheckpointError
from resumer.formats.hf_trainer import (
    HFTrainerSource,
    listing,
    load_rng_pickle,
    parse_rng,
    read_model,
    read_state_dict,
)
from resumer.formats.source import Probe, ReadOptions
from resumer.storage.store import Store

RNG_FILE = "random_states_0.pkl"
MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
OPTIMIZER = "optimizer.bin"
SCHEDULER = "scheduler.bin"
# The file's key -> the kind resumer.formats.rng restores.
RNG_KEYS = {"torch_manual_seed": "torch", "numpy_random_seed": "numpy", "random_state": "python",
            "torch_cuda_manual_seed": "cuda"}
_MORE = re.compile(r"(model|pytorch_model)_\d+\.(safetensors|bin)|(optimizer|scheduler)_\d+\.bin")
_PICKLES = re.compile(r"custom_checkpoint_\d+\.pkl|sampler(_\d+)?\.bin|dl_state_dict(_\d+)?\.bin")


class AccelerateSource(HFTrainerSource):
    """An ``Accelerator.save_state`` directory: read as a Trainer checkpoint is, with its own file names."""

    format = "accelerate"


def _step(states: Mapping[str, Any], uri: str) -> int:
    step = states.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{uri} holds no 'step' (a non-negative integer): it is not Accelerate's state.",
                              uri=uri)
    return step


class AccelerateReader:
    """The registry's entry for ``save_state`` directories: random_states_0.pkl beside a model file."""

    def detect(self, probe: Probe) -> bool:
        if probe.kind != "directory":
            return False
        names = probe.names()
        return RNG_FILE in names and any(m in names for m in MODEL_FILES)

    def open(self, store: Store, options: ReadOptions) -> AccelerateSource:
        names = listing(store)
        notes = ["an Accelerate save_state directory"]
        states = load_rng_pickle(store.child(RNG_FILE))
        step = _step(states, store.uri_of(RNG_FILE))
        notes.append(f"the step is Accelerate's own counter ('step' in {RNG_FILE}): it counts "
                     "accelerator.accumulate() steps, and stays 0 in a loop that never calls it")
        shards, state_dict = read_model(store, names, notes)
        optimizer = read_state_dict(store, OPTIMIZER, names, notes)
        scheduler = read_state_dict(store, SCHEDULER, names, notes)
        others = sorted(n for n in names if re.fullmatch(r"random_states_\d+\.pkl", n) and n != RNG_FILE)
        rng_state = None
        if others:
            notes.append(f"RNG not restored: {', '.join([RNG_FILE, *others])} are per-process states of a "
                         "multi-process run, and a resume cannot tell which belongs to which rank now")
        else:
            rng_state = parse_rng(states, RNG_KEYS, store.uri_of(RNG_FILE))
            unused = sorted(str(k) for k in states if k not in RNG_KEYS and k != "step")
            if unused:
                notes.append(f"RNG states {', '.join(unused)} in {RNG_FILE} are not restored (no such device here)")
        more = sorted(n for n in names if _MORE.fullmatch(n))
        if more:
            notes.append(f"only the first model, optimizer and scheduler are resumed: {', '.join(more)} not read")
        notes += [f"{n} is not read: a pickle of Python objects, which could run code" for n in sorted(names)
                  if _PICKLES.fullmatch(n)]
        if "scaler.pt" in names:
            notes.append("scaler.pt is not read: resumer restores no AMP gradient scaler")
        return AccelerateSource(store, shards=shards, state_dict=state_dict, optimizer=optimizer,
                                scheduler=scheduler, step=step, rng_state=rng_state, extra={}, notes=notes)


READER = AccelerateReader()
