"""The ``gpt`` task: an offline, cached BPE tokenizer and nanoGPT's model with its names and shares.

Tiny configs (vocab 512, width 32, 50k characters) keep every test to a second
or so; the default model is only counted (on the ``meta`` device), never run.
"""

from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch

from commlmo.metrics import load_run
from commlmo.runconfig import TASKS, load_run_config
from commlmo.tasks import build_task, gpt, prepare_task
from commlmo.train import train

TINY = {"vocab": 512, "width": 32, "layers": 2, "heads": 2, "block": 16, "max_chars": 50_000, "eval_batches": 1}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMMLMO_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run far slower on two intra-op threads of a 2-core machine
    yield tmp_path / "cache"
    torch.set_num_threads(threads)


def _meta_model(cfg: gpt.Config) -> gpt.GPT:
    with torch.device("meta"):
        return gpt.GPT(cfg.vocab, block=cfg.block, layers=cfg.layers, heads=cfg.heads, width=cfg.width,
                       tie_head=cfg.tie_head, fused_qkv=cfg.fused_qkv, bias=cfg.bias)


# ------------------------------------------------------------------ tokenizer and cache


def test_tokenizer_is_deterministic_offline_and_cached(private_cache, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the gpt task must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    cfg = gpt.Config(**TINY)
    text, _ = gpt.read_corpus(None, cfg.max_chars)
    assert gpt.train_tokenizer(text, 512).to_str() == gpt.train_tokenizer(text, 512).to_str()

    path = gpt.prepare(cfg)
    assert path is not None and path.is_relative_to(private_cache / "gpt")
    assert sorted(f.name for f in path.iterdir()) == ["meta.json", "tokenizer.json", "tokens.npy"]
    ids = np.load(path / "tokens.npy")
    assert ids.dtype == np.uint16 and json.loads((path / "meta.json").read_text())["tokens"] == len(ids)
    tok = gpt.train_tokenizer(text, 512)
    assert tok.get_vocab_size() == 512 and tok.decode(ids.tolist()) == text  # byte-level: lossless
    # encoding in chunks (in parallel) gives the ids of encoding the text whole
    assert ids.tolist() == tok.encode(text).ids

    def must_not_retrain(*args, **kwargs):
        raise AssertionError("the second prepare must reuse the cache")

    monkeypatch.setattr(gpt, "train_tokenizer", must_not_retrain)
    assert gpt.prepare(cfg) == path
    task = build_task(cfg, global_batch=8)
    assert task.info["tokenizer_cache"] == str(path) and task.info["tokens"] == len(ids)
    # another vocabulary is another cache entry
    monkeypatch.undo()
    monkeypatch.setenv("COMMLMO_CACHE_DIR", str(private_cache))
    assert gpt.prepare(gpt.Config(**{**TINY, "vocab": 300})) != path


def test_the_cache_key_covers_text_vocab_and_tokenizers_version(monkeypatch):
    import tokenizers

    key = gpt.corpus_key("abc", 512)
    assert key == gpt.corpus_key("abc", 512)
    assert key != gpt.corpus_key("abd", 512) and key != gpt.corpus_key("abc", 513)
    monkeypatch.setattr(tokenizers, "__version__", "0.0.0")
    assert key != gpt.corpus_key("abc", 512)


def test_without_a_writable_cache_each_rank_tokenizes_itself(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("COMMLMO_CACHE_DIR", str(blocker))  # a file: no directory can be made under it
    cfg = gpt.Config(**TINY)
    assert gpt.prepare(cfg) is None
    task = build_task(cfg, global_batch=8)
    assert task.info["tokenizer_cache"] is None and task.info["vocab"] == 512


# ------------------------------------------------------------------ model


def _names(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_tied_and_untied_head_names():
    tied = build_task(gpt.Config(**TINY), global_batch=8).model
    assert tied.lm_head.weight is tied.wte.weight
    names = _names(tied)
    assert "lm_head.weight" not in names and names["wte.weight"] == (512, 32)
    assert "lm_head.weight" in tied.state_dict()  # a checkpoint still holds both keys
    untied = build_task(gpt.Config(**TINY, tie_head=False), global_batch=8).model
    assert untied.lm_head.weight is not untied.wte.weight
    assert _names(untied)["lm_head.weight"] == (512, 32) and untied.lm_head.bias is None
    assert set(_names(untied)) - set(names) == {"lm_head.weight"}


def test_fused_and_separate_qkv_names_and_shapes():
    fused = _names(_meta_model(gpt.Config(**TINY)))
    assert fused["h.0.attn.c_attn.weight"] == (96, 32) and fused["h.0.attn.c_attn.bias"] == (96,)
    split = _names(_meta_model(gpt.Config(**TINY, fused_qkv=False)))
    for z in "qkv":
        assert split[f"h.1.attn.{z}.weight"] == (32, 32)
    assert not any("c_attn" in n for n in split)
    expected = {"wte.weight": (512, 32), "wpe.weight": (16, 32), "ln_f.weight": (32,), "ln_f.bias": (32,),
                "h.0.ln_1.weight": (32,), "h.0.ln_2.bias": (32,), "h.0.attn.c_proj.weight": (32, 32),
                "h.0.mlp.c_fc.weight": (128, 32), "h.0.mlp.c_proj.weight": (32, 128)}
    assert expected.items() <= split.items()
    assert sum(math.prod(s) for s in fused.values()) == sum(math.prod(s) for s in split.values())
    no_bias = _names(_meta_model(gpt.Config(**TINY, bias=False)))
    assert not any(n.endswith(".bias") for n in no_bias)


@pytest.mark.parametrize("tie_head", [True, False])
def test_default_model_puts_a_quarter_of_its_parameters_in_embeddings_and_head(tie_head):
    cfg = gpt.Config(tie_head=tie_head)
    assert (cfg.vocab, cfg.width, cfg.layers, cfg.heads, cfg.block) == (8192, 256, 4, 4, 128)
    names = _names(_meta_model(cfg))
    total = sum(math.prod(s) for s in names.values())
    emb = sum(math.prod(names[n]) for n in ("wte.weight", "wpe.weight", "lm_head.weight") if n in names)
    counts = gpt.parameter_counts(cfg)
    assert counts["total"] == total and counts["embeddings"] + counts["head"] == emb
    assert emb / total >= 0.25
    assert counts["embedding_share"] == pytest.approx(0.403 if tie_head else 0.572, abs=1e-3)


def test_init_follows_nanogpt():
    torch.manual_seed(0)
    m = gpt.GPT(2048, block=16, layers=8, heads=4, width=256).requires_grad_(False)
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert m.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert m.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 0.02 / sqrt(2 * 8)
    assert m.h[3].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert not m.h[0].attn.c_attn.bias.detach().any()


def test_attention_is_causal():
    torch.manual_seed(0)
    m = gpt.GPT(64, block=8, layers=1, heads=2, width=16).eval()
    x = torch.randint(64, (1, 8))
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % 64
    torch.testing.assert_close(m(x)[:, :5], m(y)[:, :5])


# ------------------------------------------------------------------ data and training


def test_ranks_take_different_slices_of_one_global_batch():
    cfg = gpt.Config(**TINY)
    one = build_task(cfg, global_batch=8, seed=3)
    ranks = [build_task(cfg, rank=r, world_size=2, global_batch=8, seed=3) for r in range(2)]
    for step in (0, 7):
        x0, y0 = ranks[0].train_batch(step)
        x1, _ = ranks[1].train_batch(step)
        assert x0.shape == x1.shape == (4, 16) and torch.equal(x0[:, 1:], y0[:, :-1])
        assert not torch.equal(x0, x1)
        assert torch.equal(torch.cat([x0, x1]), one.train_batch(step)[0])
    assert not torch.equal(one.train_batch(0)[0], one.train_batch(1)[0])
    assert all(torch.equal(a, b) for a, b in zip(ranks[0].model.parameters(), ranks[1].model.parameters()))


def test_untrained_model_is_near_uniform_and_reports_perplexity():
    task = build_task(gpt.Config(**TINY), global_batch=8)
    result = task.evaluate()
    assert set(result) == {"loss", "acc", "ppl"}
    assert result["loss"] == pytest.approx(math.log(512), rel=0.05)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))


def test_commlmo_train_runs_a_few_steps_on_one_process(tmp_path):
    cfg = {"optimizer": "signmuon", "task": {"kind": "gpt", **TINY},
           "train": {"steps": 3, "global_batch": 8, "nproc": 1, "eval_every": 0}}
    run = train(cfg, out=tmp_path / "run", progress=False, report=False)
    assert run is not None and run.summary["steps_run"] == 3
    final = run.summary["final"]
    assert math.isfinite(final["eval_loss"]) and final["eval_ppl"] == pytest.approx(math.exp(final["eval_loss"]))
    assert run.summary["task"]["vocab"] == 512 and run.summary["task"]["tokenizer_cache"]  # rank 0 prepared it
    routed = [n for names in run.summary["routing"].values() for n in names]
    assert routed.count("wte.weight") == 1 and "lm_head.weight" not in routed  # the tied matrix is one parameter


@pytest.mark.parametrize("name, tied", [("gpt", True), ("gpt-untied", False)])
def test_named_tasks_validate(name, tied):
    cfg = load_run_config({**TASKS[name], "optimizer": "muon"})
    assert cfg.task.kind == "gpt" and cfg.task.tie_head is tied
    assert cfg.train.global_batch % cfg.train.nproc == 0
    assert gpt.parameter_counts(cfg.task)["embedding_share"] >= 0.25


def test_the_run_loops_prepare_hook_fills_the_cache(private_cache):
    prepare_task(gpt.Config(**TINY))
    assert [p.name for p in (private_cache / "gpt").iterdir() if not p.name.endswith(".tmp")]
