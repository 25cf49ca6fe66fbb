"""Models, factories and worker entrypoints for the ``jobs/`` examples beyond the MLP.

* ``jobs/cnn.yaml``: a small CNN with BatchNorm (``cnn_v1``) on synthetic images;
  ``jobs/cnn_v2.yaml`` resizes its head for more classes (``cnn_v2_wider_head``: resumes under ``partial``).
* ``jobs/charlm.yaml``: a tiny character-level transformer (``charlm_v1``) on ``jobs/data/tiny.txt``;
  ``jobs/charlm_v2.yaml`` inserts a parameterless Dropout into each block's ``nn.Sequential`` MLP
  (``charlm_v2_dropout``: resumes with ``renames: [auto]``); ``jobs/charlm_sgd.yaml`` switches Adam to SGD
  (resumes under ``reset-optimizer``).

The entrypoints are written like ``resumer.examples.train.train_loop``: seed, ``resumer.train.build()``,
``resumer.train.restore()``, then one GLOBAL batch per step, derived from the step alone, of which rank r
trains on slice r. A resumed run (on any number of workers) sees exactly the data the dead one would have.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import resumer.train
from resumer.examples import CNN, optimizer_step

# ---------------------------------------------------------------------------------------------- CNN

CNN_CLASSES, CNN_V2_CLASSES, IMAGE = 4, 6, 16
_MAX_CLASSES = 16


def cnn_v1() -> nn.Module:
    """Conv-BN-ReLU x2, global pooling, a linear head over 4 classes (BatchNorm buffers included)."""
    return CNN(CNN_CLASSES)


def cnn_v2_wider_head() -> nn.Module:
    """v1 with the head resized to 6 classes: ``head.weight`` / ``head.bias`` change shape."""
    return CNN(CNN_V2_CLASSES)


@functools.lru_cache(maxsize=1)
def _class_patterns() -> torch.Tensor:
    """A fixed look per class: a colour (per-channel offset) plus a faint texture."""
    g = torch.Generator().manual_seed(7)
    colour = torch.randn(_MAX_CLASSES, 3, 1, 1, generator=g)
    texture = 0.5 * torch.randn(_MAX_CLASSES, 3, IMAGE, IMAGE, generator=g)
    return colour + texture


def cnn_batch(step: int, batch_size: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The GLOBAL batch of ``step``: images [B, 3, 16, 16] and labels in [0, classes)."""
    if not 1 <= classes <= _MAX_CLASSES:
        raise ValueError(f"cnn_batch supports 1..{_MAX_CLASSES} classes, got {classes}")
    g = torch.Generator().manual_seed(2000 + step)
    y = torch.randint(0, classes, (batch_size,), generator=g)
    x = _class_patterns()[y] + torch.randn(batch_size, 3, IMAGE, IMAGE, generator=g)
    return x, y


def _classes(model: nn.Module) -> int:
    inner = getattr(model, "module", model)  # DDP (Ray Train's prepare_model) wraps the model
    head = inner.head
    if not isinstance(head, nn.Linear):
        raise TypeError(f"train_cnn needs a model whose 'head' is an nn.Linear, got {type(head).__name__}")
    return head.out_features


# ------------------------------------------------------------------------------------ char transformer

VOCAB, CONTEXT, WIDTH, HEADS, LAYERS = 128, 32, 48, 4, 2  # VOCAB: ASCII codes


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block; the MLP is an ``nn.Sequential`` (where v2 inserts its Dropout)."""

    def __init__(self, width: int, heads: int, dropout: float | None = None) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        layers: list[nn.Module] = [nn.Linear(width, 4 * width), nn.GELU()]
        if dropout is not None:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(4 * width, width))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    """A tiny GPT-style character model: token + position embeddings, ``LAYERS`` blocks, a linear head."""

    def __init__(self, dropout: float | None = None) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.Sequential(*(Block(WIDTH, HEADS, dropout) for _ in range(LAYERS)))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.norm(self.blocks(self.tok(idx) + self.pos(positions))))


def charlm_v1() -> nn.Module:
    return CharLM()


def charlm_v2_dropout() -> nn.Module:
    """v1 with a parameterless Dropout inserted in every block's MLP: ``blocks.N.mlp.2`` becomes ``blocks.N.mlp.3``."""
    return CharLM(dropout=0.1)


DEFAULT_TEXT = "jobs/data/tiny.txt"


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=4)
def load_text(path: str = DEFAULT_TEXT) -> torch.Tensor:
    """The text as ASCII codes (int64). A relative path is taken from the repository root (the folder that
    holds ``resumer/`` and ``jobs/``), so workers find it whatever their working directory."""
    full = Path(path) if os.path.isabs(path) else _repo_root() / path
    try:
        raw = full.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"No text file at {full}: set the job's config.text to an absolute path, or run "
                                "from a checkout of the repository (which ships jobs/data/tiny.txt).") from None
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    if data.numel() <= CONTEXT + 1 or int(data.max()) >= VOCAB:
        raise ValueError(f"{full}: need ASCII text longer than {CONTEXT + 1} bytes")
    return data


def charlm_batch(step: int, batch_size: int, text: str = DEFAULT_TEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """The GLOBAL batch of ``step``: ``batch_size`` windows of CONTEXT characters and their next characters."""
    data = load_text(text)
    g = torch.Generator().manual_seed(3000 + step)
    starts = torch.randint(0, data.numel() - CONTEXT - 1, (batch_size,), generator=g)
    offsets = torch.arange(CONTEXT + 1)
    windows = data[starts[:, None] + offsets]
    return windows[:, :-1], windows[:, 1:]


# ------------------------------------------------------------------------------------------ entrypoints


def _world() -> tuple[int, int]:
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return world, resumer.train.rank()


def _shard(t: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s slice of a global batch (the global batch size must divide evenly)."""
    if t.shape[0] % world:
        raise ValueError(f"batch_size {t.shape[0]} does not divide into {world} workers")
    per = t.shape[0] // world
    return t[rank * per:(rank + 1) * per]


def _after_step(config: dict[str, Any], step: int) -> None:
    """Fault injection for tests and demos (``crash_at``) and a slower pace (``step_delay_s``)."""
    if step == config.get("crash_at"):
        raise RuntimeError(f"injected crash at step {step}")
    delay = float(config.get("step_delay_s", 0))
    if delay:
        time.sleep(delay)


def train_cnn(config: dict[str, Any]) -> None:
    """Cross-entropy on synthetic class images; the number of classes is read from the model's head."""
    torch.manual_seed(int(config.get("seed", 0)))
    model, optimizer, scheduler = resumer.train.build()
    start = resumer.train.restore(model, optimizer, scheduler)
    world, rank = _world()
    classes = _classes(model)
    model.train()
    for step in range(start + 1, int(config["total_steps"]) + 1):
        x, y = cnn_batch(step, int(config.get("batch_size", 32)), classes)
        loss = F.cross_entropy(model(_shard(x, world, rank)), _shard(y, world, rank))
        value = optimizer_step(optimizer, scheduler, loss)
        _after_step(config, step)
        resumer.train.save(step, model, optimizer, scheduler, metrics={"loss": value})


def train_charlm(config: dict[str, Any]) -> None:
    """Next-character prediction on ``config.text`` (default ``jobs/data/tiny.txt``)."""
    torch.manual_seed(int(config.get("seed", 0)))
    model, optimizer, scheduler = resumer.train.build()
    start = resumer.train.restore(model, optimizer, scheduler)
    world, rank = _world()
    text = str(config.get("text", DEFAULT_TEXT))
    model.train()
    for step in range(start + 1, int(config["total_steps"]) + 1):
        x, y = charlm_batch(step, int(config.get("batch_size", 16)), text)
        logits = model(_shard(x, world, rank))
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), _shard(y, world, rank).reshape(-1))
        value = optimizer_step(optimizer, scheduler, loss)
        _after_step(config, step)
        resumer.train.save(step, model, optimizer, scheduler, metrics={"loss": value})
