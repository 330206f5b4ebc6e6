"""A GPT language model (nanoGPT / GPT-2 architecture) on a BPE-tokenized text corpus.

The model is Karpathy's nanoGPT (https://github.com/karpathy/nanoGPT), itself
GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners"): learned token and position embeddings, ``layers`` pre-LayerNorm
blocks of causal self-attention (``scaled_dot_product_attention``) and a 4x GELU
MLP, a final LayerNorm and a linear head, with nanoGPT's parameter names::

    wte, wpe                              token / position embeddings (nn.Embedding)
    h.{i}.ln_1, h.{i}.ln_2                LayerNorms
    h.{i}.attn.c_attn                     fused QKV projection, width -> 3 * width
      (h.{i}.attn.q, .k, .v               with fused_qkv: false)
    h.{i}.attn.c_proj                     attention output projection
    h.{i}.mlp.c_fc, h.{i}.mlp.c_proj      MLP, width -> 4 * width -> width
    ln_f, lm_head                         final norm; head (bias-free nn.Linear)

With ``tie_head: true`` (the default, as GPT-2) ``lm_head.weight`` *is*
``wte.weight``, so ``named_parameters()`` yields only ``wte.weight`` and an
optimizer sees one matrix that is both embedding and head.  Weights start as in
nanoGPT: normal(0, 0.02), biases zero, and both ``c_proj`` weights
normal(0, 0.02 / sqrt(2 * layers)).

The defaults (vocab 8192, width 256, 4 layers, 4 heads, block 128) give the
embeddings a large share of the parameters, as in real language models and
unlike a character-level model: tied, 5.29 M parameters, 40 % of them in
``wte`` + ``wpe``; untied, 7.39 M, 57 % in embeddings and head
(:func:`parameter_counts`).  That share is what decides how an optimizer routes
and compresses them.

Data: the same corpora as ``chargpt`` (a file, a directory, or by default the
Python standard library's top-level sources, so nothing is downloaded), cut at
``max_chars``.  A byte-level BPE tokenizer with ``vocab`` tokens is trained on
it with HuggingFace ``tokenizers`` (deterministic, well under a second for the
default corpus); the tokenizer JSON and the token ids are cached under
``$COMMLMO_CACHE_DIR/gpt/<hash>/`` (default ``~/.cache/commlmo``), the hash
covering the corpus text, the vocabulary size and the ``tokenizers`` version.
Rank 0 fills the cache in :func:`prepare` before the ranks build the task; a
rank that finds no cache (unwritable directory) trains the same tokenizer itself.

The last ``test_fraction`` of the token stream is held out.  Each step draws
``global_batch`` random windows of ``block`` tokens from a generator seeded by
the run seed and the step, identical on every rank; rank ``r`` takes its slice.
The loss is next-token cross-entropy; evaluation reports the held-out loss,
next-token accuracy and perplexity (``eval_ppl``) over ``eval_batches`` fixed
batches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ..errors import ConfigError
from .base import NextTokenTask, shard_size
from .chargpt import read_corpus
from .mnist1d import cache_dir

__all__ = ["Config", "GPT", "GPTTask", "build", "prepare", "parameter_counts", "load_tokens",
           "train_tokenizer", "corpus_key"]

_FORMAT = 1  # bump when the cached files change meaning
_MIN_FREQUENCY = 2


class Config(BaseModel):
    """``gpt`` task: corpus, tokenizer and model size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["gpt"] = "gpt"
    corpus: str | None = None  # file or directory; default: the standard library's sources
    max_chars: int = Field(1_000_000, ge=1000)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    vocab: int = Field(8192, ge=256, le=1 << 20)  # BPE tokens, the 256 bytes included
    block: int = Field(128, ge=2)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    width: int = Field(256, ge=8)
    tie_head: bool = True  # lm_head.weight is wte.weight, as GPT-2
    fused_qkv: bool = True  # one c_attn (width -> 3 width) rather than q, k, v
    bias: bool = True  # biases in the Linear and LayerNorm layers
    eval_batches: int = Field(8, ge=1)


# --------------------------------------------------------------------------- tokenizer and cache


def corpus_key(text: str, vocab: int) -> str:
    """The cache key: a hash of the corpus text, the vocabulary size and the ``tokenizers`` version."""
    import tokenizers

    h = hashlib.sha256(json.dumps({"format": _FORMAT, "vocab": vocab, "min_frequency": _MIN_FREQUENCY,
                                   "tokenizers": tokenizers.__version__}, sort_keys=True).encode())
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def _chunks(text: str) -> list[str]:
    """The text cut before each line that follows a non-blank line and starts with a non-space.

    At those cuts the byte-level pre-tokenizer splits anyway, so encoding the
    chunks (in parallel) gives exactly the ids of encoding the whole text.
    """
    starts = [0, *(m.start() for m in re.finditer(r"(?<=\S\n)(?=\S)", text))]
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)])]


def train_tokenizer(text: str, vocab: int) -> Any:
    """A byte-level BPE :class:`tokenizers.Tokenizer` with (at most) ``vocab`` tokens, trained on ``text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=_MIN_FREQUENCY, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_chunks(text), trainer)
    return tok


def _encode(tok: Any, text: str) -> np.ndarray:
    ids = [i for enc in tok.encode_batch(_chunks(text)) for i in enc.ids]
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.int32
    return np.asarray(ids, dtype=dtype)


def _cache_path(key: str) -> Path:
    return cache_dir() / "gpt" / key


def _complete(path: Path) -> bool:
    return all((path / f).is_file() for f in ("tokenizer.json", "tokens.npy", "meta.json"))


def _tokenize(text: str, source: str, vocab: int) -> tuple[Any, np.ndarray, dict[str, Any]]:
    """``(tokenizer, ids, meta)`` of ``text``, freshly trained and encoded."""
    tok = train_tokenizer(text, vocab)
    ids = _encode(tok, text)
    meta = {"corpus": source, "characters": len(text), "tokens": len(ids), "vocab": tok.get_vocab_size(),
            "vocab_requested": vocab, "key": corpus_key(text, vocab)}
    return tok, ids, meta


def prepare(cfg: Config) -> Path | None:
    """Train the tokenizer and encode the corpus into the cache unless it is there.

    Returns the cache directory (``None`` if it is not writable).  The files are
    written into a temporary directory that is then renamed, so a concurrent
    reader sees all of them or none.
    """
    text, source = read_corpus(cfg.corpus, cfg.max_chars)
    path = _cache_path(corpus_key(text, cfg.vocab))
    if _complete(path):
        return path
    tok, ids, meta = _tokenize(text, source, cfg.vocab)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        tok.save(str(tmp / "tokenizer.json"))
        np.save(tmp / "tokens.npy", ids)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            tmp.rename(path)
        except OSError:  # another process got there first (or a stale partial directory)
            if not _complete(path):
                shutil.rmtree(path, ignore_errors=True)
                tmp.rename(path)
    except OSError:
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_tokens(cfg: Config) -> tuple[Any, np.ndarray, dict[str, Any]]:
    """``(tokenizer, ids, meta)``: from the cache if :func:`prepare` filled it, else computed here."""
    from tokenizers import Tokenizer

    text, source = read_corpus(cfg.corpus, cfg.max_chars)
    path = _cache_path(corpus_key(text, cfg.vocab))
    if _complete(path):
        try:
            meta = json.loads((path / "meta.json").read_text())
            return Tokenizer.from_file(str(path / "tokenizer.json")), np.load(path / "tokens.npy"), {
                **meta, "cache": str(path)}
        except (OSError, ValueError):
            pass  # unreadable cache: recompute
    tok, ids, meta = _tokenize(text, source, cfg.vocab)
    return tok, ids, {**meta, "cache": None}


# --------------------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, *, fused_qkv: bool, bias: bool):
        super().__init__()
        self.heads, self.fused = heads, fused_qkv
        if fused_qkv:
            self.c_attn = nn.Linear(width, 3 * width, bias=bias)
        else:
            self.q = nn.Linear(width, width, bias=bias)
            self.k = nn.Linear(width, width, bias=bias)
            self.v = nn.Linear(width, width, bias=bias)
        self.c_proj = nn.Linear(width, width, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        if self.fused:
            q, k, v = self.c_attn(x).split(c, dim=2)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, width: int, *, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width, bias=bias)
        self.c_proj = nn.Linear(4 * width, width, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, *, fused_qkv: bool, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, bias=bias)
        self.attn = CausalSelfAttention(width, heads, fused_qkv=fused_qkv, bias=bias)
        self.ln_2 = nn.LayerNorm(width, bias=bias)
        self.mlp = MLP(width, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's GPT (GPT-2's architecture, no dropout), with nanoGPT's parameter names at the top level."""

    def __init__(self, vocab: int, *, block: int, layers: int, heads: int, width: int,
                 tie_head: bool = True, fused_qkv: bool = True, bias: bool = True):
        super().__init__()
        if width % heads:
            raise ConfigError(f"task.width = {width} must be divisible by task.heads = {heads}")
        self.block = block
        if fused_qkv:  # c_attn is q, k and v stacked along dim 0: a matrix LMO sees 3 matrices
            self.commlmo_blocks = {"h.*.attn.c_attn.weight": 3}
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(block, width)
        self.h = nn.ModuleList(Block(width, heads, fused_qkv=fused_qkv, bias=bias) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, bias=bias)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        if tie_head:
            self.lm_head.weight = self.wte.weight  # one Parameter, registered first as wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.block:
            raise ValueError(f"sequence of {t} tokens exceeds block = {self.block}")
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.h:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


def parameter_counts(cfg: Config, vocab: int | None = None) -> dict[str, Any]:
    """Parameters of the model ``cfg`` builds, by part, counted from the shapes alone.

    ``embeddings`` is ``wte`` + ``wpe``; ``head`` is ``lm_head`` when untied (0
    when tied: it is ``wte``); ``embedding_share`` is (embeddings + head) / total.
    """
    v, d, b = vocab or cfg.vocab, cfg.width, int(cfg.bias)
    per_block = 12 * d * d + 9 * b * d + 2 * (d + b * d)  # qkv 3d^2, proj d^2, fc 4d^2, proj 4d^2; biases; 2 LN
    embeddings = v * d + cfg.block * d
    head = 0 if cfg.tie_head else v * d
    blocks = cfg.layers * per_block
    total = embeddings + head + blocks + d + b * d  # + ln_f
    return {"total": total, "embeddings": embeddings, "head": head, "blocks": blocks,
            "embedding_share": (embeddings + head) / total}


# --------------------------------------------------------------------------- task


class GPTTask(NextTokenTask):
    """Next-token prediction on random windows of the BPE-encoded corpus."""

    def __init__(self, cfg: Config, *, rank: int, world_size: int, seed: int, global_batch: int):
        tok, ids, meta = load_tokens(cfg)
        data = torch.from_numpy(ids.astype(np.int64))
        split = int(len(data) * (1 - cfg.test_fraction))
        self.train_data, self.test_data = data[:split], data[split:]
        if len(self.test_data) <= cfg.block + 1 or len(self.train_data) <= cfg.block + 1:
            raise ConfigError(
                f"task.corpus is too short ({len(data)} tokens, {len(self.test_data)} held out) for block = {cfg.block}")
        vocab = tok.get_vocab_size()
        torch.manual_seed(seed)  # same initial model on every rank
        model = GPT(vocab, block=cfg.block, layers=cfg.layers, heads=cfg.heads, width=cfg.width,
                    tie_head=cfg.tie_head, fused_qkv=cfg.fused_qkv, bias=cfg.bias)
        counts = parameter_counts(cfg, vocab)
        super().__init__(model, info={
            "corpus": meta["corpus"], "characters": meta["characters"], "tokens": len(data),
            "chars_per_token": meta["characters"] / max(1, len(data)), "vocab": vocab,
            "parameters": sum(p.numel() for p in model.parameters()),
            "embedding_share": counts["embedding_share"], "tied_head": cfg.tie_head,
            "uniform_loss": math.log(vocab), "tokenizer_cache": meta["cache"],
        })
        if vocab < cfg.vocab:
            self.info["vocab_requested"] = cfg.vocab  # the corpus had too few repeated pairs
        self.tokenizer = tok
        self.cfg, self.rank, self.seed, self.global_batch = cfg, rank, seed, global_batch
        self.local_batch = shard_size(global_batch, world_size)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss, next-token accuracy and perplexity over ``eval_batches`` fixed batches."""
        out = super().evaluate()
        loss = out["loss"]
        return out | {"loss": loss if math.isfinite(loss) else float("inf"),
                      "ppl": math.exp(min(loss, 700.0)) if math.isfinite(loss) else float("inf")}


def build(cfg: Config, *, rank: int, world_size: int, seed: int, global_batch: int) -> GPTTask:
    return GPTTask(cfg, rank=rank, world_size=world_size, seed=seed, global_batch=global_batch)
