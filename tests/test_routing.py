"""Default routing, read from the module tree, is pinned for the model kinds people train.

GPT-2 style (untied and tied head, fused QKV), a CNN, an MoE block, torch's MultiheadAttention;
block views orthogonalise each block on its own and give scaled compressors one scale per block.
"""

from __future__ import annotations

import torch
from torch import nn

import commlmo
from commlmo import build_optimizer
from commlmo.routing import parameter_roles, parameter_views
from commlmo.tasks.gpt import GPT
from commlmo.tasks.mnist1d import CNN


def gpt(tie: bool, fused: bool = True):
    torch.manual_seed(0)
    return GPT(64, block=8, layers=2, heads=2, width=16, tie_head=tie, fused_qkv=fused)


def test_gpt2_style_untied_routing():
    opt = build_optimizer(gpt(tie=False), "signmuon")
    r = opt.routing()
    assert r["embedding"] == ["wte.weight", "wpe.weight"]
    assert r["head"] == ["lm_head.weight"]
    assert r["hidden"] == [f"h.{i}.{m}" for i in range(2) for m in
                           ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")]
    assert all(n.startswith(("h.", "ln_f")) and (".ln_" in n or n.startswith("ln_f") or n.endswith("bias"))
               for n in r["vector"])
    assert "fallback" not in r
    roles = parameter_roles(gpt(tie=False))
    assert roles["h.0.ln_1.weight"] == "norm" and roles["h.0.attn.c_attn.bias"] == "bias"
    assert roles["ln_f.bias"] == "norm"


def test_tied_head_is_the_embedding_and_routed_once():
    model = gpt(tie=True)
    assert model.lm_head.weight is model.wte.weight
    r = build_optimizer(model, "signmuon").routing()
    assert "head" not in r and r["embedding"] == ["wte.weight", "wpe.weight"]
    assert sum(len(v) for v in r.values()) == len(list(model.parameters()))


def test_every_preset_routes_a_gpt_completely_with_its_recipe():
    expected = {"muon": "adamw", "muonserver": "adamw", "signmuon": "lion", "signsgd": None,
                "ef21muon": "onebit_adam", "scion": None}
    for name, rule in expected.items():
        opt = build_optimizer(gpt(tie=False), name)
        groups = {g["group"]: rt.config for g, rt in zip(opt.param_groups, opt._runtimes)}
        assert set(groups) == {"hidden", "embedding", "head", "vector"}, name
        for role in ("embedding", "head", "vector"):
            got = groups[role].rule.kind if groups[role].rule is not None else None
            assert got == rule, (name, role, got)
    scion = load = commlmo.load_config("scion")
    assert {g.name: g.lmo.kind for g in scion.groups} == {"hidden": "spectral", "embedding": "rownorm",
                                                          "head": "sign", "vector": "bias_rms"}
    del load


def test_cnn_routing_conv_kernels_hidden_last_linear_head():
    model = CNN()
    r = build_optimizer(model, "signmuon").routing()
    convs = [n for n, p in model.named_parameters() if p.ndim == 3]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert r["hidden"] == convs + [f"{n}.weight" for n in linears[:-1]]
    assert r["head"] == [f"{linears[-1]}.weight"]
    assert parameter_views(model) == {}  # conv kernels stay one matrix out x in*k


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(6, 4, bias=False)
        self.experts = nn.Parameter(torch.randn(4, 8, 6))
        self.out = nn.Linear(6, 3)


def test_moe_expert_stack_is_e_independent_matrices():
    model = MoE()
    assert parameter_views(model) == {"experts": {"kind": "stack"}}
    cfg = {"preset": "muonserver", "groups": {"hidden": {"lmo": {"kind": "spectral", "method": "svd"}}}}
    opt = build_optimizer(model, cfg)
    assert opt.routing()["hidden"] == ["experts", "router.weight"]
    g = torch.randn(4, 8, 6)
    model.experts.grad = g.clone()
    before = model.experts.detach().clone()
    opt.step()
    lmo = commlmo.build_plugin("lmo", {"kind": "spectral", "method": "svd"})
    # one step from zero momentum: M = (1-b)G + b(1-b)G, scale-free under the LMO
    expected = torch.stack([lmo.direction(g[e]) for e in range(4)])
    lr_scale = (8 / 6) ** 0.5  # unit_gain on each 8 x 6 expert, not on the 4 x 48 flattening
    torch.testing.assert_close(before - model.experts.detach(), 0.02 * lr_scale * expected, rtol=1e-4, atol=1e-6)


def test_fused_qkv_is_orthogonalised_per_block_with_one_scale_each():
    model = gpt(tie=True)
    views = parameter_views(model)
    assert views["h.0.attn.c_attn.weight"] == {"kind": "blocks", "blocks": 3}
    mha = nn.MultiheadAttention(8, 2)
    assert parameter_views(mha) == {"in_proj_weight": {"kind": "blocks", "blocks": 3}}

    w = model.h[0].attn.c_attn.weight
    cfg = {"preset": "muonserver", "groups": {"hidden": {"lmo": {"kind": "spectral", "method": "svd"}}}}
    opt = build_optimizer(model, cfg)
    assert "view=blocks(3)" in opt.describe_routing()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    g = torch.randn_like(w)
    w.grad = g.clone()
    before = w.detach().clone()
    opt.step()
    lmo = commlmo.build_plugin("lmo", {"kind": "spectral", "method": "svd"})
    expected = torch.cat([lmo.direction(b) for b in g.chunk(3)])
    torch.testing.assert_close(before - w.detach(), 0.02 * expected, rtol=1e-4, atol=1e-6)

    # a scaled-sign uplink sends one scale per block of the view
    opt = build_optimizer(gpt(tie=True), "ef21muonusign")
    rt = opt._runtimes[0]
    fused = next(p for n, p in zip(opt.param_groups[0]["param_names"], opt.param_groups[0]["params"])
                 if n.endswith("c_attn.weight"))
    assert rt.codec(fused).config.blocks == 3
    payload = rt.codec(fused).compress(torch.randn_like(fused))
    assert payload.wire[1].numel() == 3


def test_explicit_group_view_overrides_the_module_tree():
    cfg = {"preset": "muonserver", "groups": {"hidden": {"view": {"kind": "matrix"}}}}
    opt = build_optimizer(gpt(tie=True), cfg)
    assert "view=blocks" not in opt.describe_routing()


def test_validate_and_presets_show_the_recipe(capsys):
    from commlmo.cli import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "embedding" in out and "lion" in out and "adamw" in out
