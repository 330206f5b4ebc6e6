"""A small character-level transformer (nanoGPT-style) on a text corpus.

``corpus`` is a path to a UTF-8 text file or a directory (every ``*.py``,
``*.txt`` and ``*.md`` file under it, sorted).  Without one, the corpus is the
Python standard library's own top-level sources, which every Python install
carries, so nothing is downloaded; it therefore differs slightly between
Python versions (the summary records its size and source).

The last ``test_fraction`` of the text is held out.  Each step draws
``global_batch`` random windows of ``block`` characters from a generator seeded
by the run seed and the step (identical on every rank); rank ``r`` takes its
slice.  Accuracy is next-character accuracy.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ..errors import ConfigError
from .base import NextTokenTask, shard_size

__all__ = ["Config", "CharGPT", "CharGPTTask", "default_corpus", "read_corpus", "build"]


class Config(BaseModel):
    """``chargpt`` task: corpus and model size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["chargpt"] = "chargpt"
    corpus: str | None = None  # file or directory; default: the standard library's sources
    max_chars: int = Field(1_000_000, ge=1000)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    block: int = Field(64, ge=2)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    width: int = Field(128, ge=8)
    eval_batches: int = Field(8, ge=1)


def default_corpus(max_chars: int) -> tuple[str, str]:
    """``(text, description)``: the standard library's top-level ``.py`` files, sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return _read_files(sorted(stdlib.glob("*.py")), max_chars), f"Python standard library sources ({stdlib})"


def _read_files(files: list[Path], max_chars: int) -> str:
    parts, size = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "".join(parts)[:max_chars]


def read_corpus(corpus: str | None, max_chars: int) -> tuple[str, str]:
    """``(text, description)`` of the configured corpus."""
    if corpus is None:
        return default_corpus(max_chars)
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = sorted(p for ext in ("*.py", "*.txt", "*.md") for p in path.rglob(ext))
        if not files:
            raise ConfigError(f"task.corpus = {corpus!r}: the directory holds no .py, .txt or .md files")
        return _read_files(files, max_chars), f"{len(files)} files under {path}"
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")[:max_chars], str(path)
    raise ConfigError(f"task.corpus = {corpus!r}: no such file or directory (omit it for the built-in corpus)")


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.fc = nn.Linear(width, 4 * width, bias=False)
        self.out = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    """Token and position embeddings, ``layers`` pre-norm blocks, a final norm and an untied head."""

    def __init__(self, vocab: int, *, block: int, layers: int, heads: int, width: int):
        super().__init__()
        if width % heads:
            raise ConfigError(f"task.width = {width} must be divisible by task.heads = {heads}")
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(block, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class CharGPTTask(NextTokenTask):
    """Next-character prediction on random windows of the corpus."""

    def __init__(self, cfg: Config, *, rank: int, world_size: int, seed: int, global_batch: int):
        text, source = read_corpus(cfg.corpus, cfg.max_chars)
        chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(chars)}
        data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
        split = int(len(data) * (1 - cfg.test_fraction))
        self.train_data, self.test_data = data[:split], data[split:]
        if len(self.test_data) <= cfg.block + 1:
            raise ConfigError(f"task.corpus is too short ({len(data)} characters) for block = {cfg.block}")
        torch.manual_seed(seed)
        model = CharGPT(len(chars), block=cfg.block, layers=cfg.layers, heads=cfg.heads, width=cfg.width)
        super().__init__(model, info={
            "corpus": source, "characters": len(data), "vocab": len(chars),
            "parameters": sum(p.numel() for p in model.parameters()),
            "uniform_loss": math.log(len(chars)),
        })
        self.cfg, self.rank, self.seed, self.global_batch = cfg, rank, seed, global_batch
        self.local_batch = shard_size(global_batch, world_size)


def build(cfg: Config, *, rank: int, world_size: int, seed: int, global_batch: int) -> CharGPTTask:
    return CharGPTTask(cfg, rank=rank, world_size=world_size, seed=seed, global_batch=global_batch)
