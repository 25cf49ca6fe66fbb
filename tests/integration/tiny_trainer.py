"""A tiny GPT-2 and its data, trained by the real transformers ``Trainer`` in the tests that need a Trainer's
checkpoints (built from a config, random init: nothing is downloaded)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")


def gpt2(seed: int = 0, width: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=width, n_head=2, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A few rows of token ids, their own labels."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def arguments(output_dir: str, *, steps: int, save_every: int, weight_decay: float = 0.0) -> Any:
    """Training arguments for ``steps`` steps on the CPU, a checkpoint every ``save_every``, no reporting."""
    return transformers.TrainingArguments(output_dir=output_dir, max_steps=steps, save_steps=save_every,
                                          per_device_train_batch_size=2, report_to=[], use_cpu=True,
                                          disable_tqdm=True, logging_strategy="no", weight_decay=weight_decay,
                                          warmup_steps=1)
