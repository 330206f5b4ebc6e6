"""One table of bad inputs, each with its own specific, actionable error.

Configs, plugin names, out-of-range hyperparameters, shapes and dtypes a
plugin does not take, sparse and complex gradients, empty parameter lists and
world sizes a transport cannot serve.  (tests/test_config.py holds a longer
table of config errors alone.)
"""

from __future__ import annotations

import pytest
import torch

import commlmo
from commlmo import build_optimizer, build_plugin, load_config
from commlmo.comm import Communicator
from commlmo.errors import (
    CommlmoError,
    ConfigError,
    DistributedError,
    PluginNotFoundError,
)


class _MirrorWorld(Communicator):
    """A pretend world of ``n`` ranks that all hold this rank's tensors (no process is started)."""

    def __init__(self, n: int):
        super().__init__()
        self.world_size = n

    def _all_max_(self, t):
        return t

    def _all_gather(self, t):
        return t.unsqueeze(0).expand(self.world_size, *t.shape).clone()

    def _all_to_all(self, t):
        raise AssertionError("must fail before any payload is exchanged")

    _all_reduce_sum_ = _all_to_all


def _linear():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 5)


def _step(config, *, model=None, grad=None, comm=None):
    model = model or _linear()
    opt = build_optimizer(model, config, process_group=comm)
    if grad is None:
        model(torch.randn(3, model.in_features)).sum().backward()
    else:
        grad(model)
    opt.step()


def _sparse_grad(model):
    model.weight.grad = torch.randn(5, 6).to_sparse()
    model.bias.grad = torch.randn(5)


def _write(text):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "bad.yaml"
    path.write_text(text)
    return path


def _write_bytes(data: bytes):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "bad.yaml"
    path.write_bytes(data)
    return path


def _alias_bomb() -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\ngroups: [{name: a}]\n"


def _group_cfg(**fields):
    return {"groups": [{"name": "a", **fields}]}


_shared = torch.nn.Parameter(torch.randn(4, 3))


def _compress(cfg, x, generator=None):
    return build_plugin("compressor", cfg).compress(x, generator=generator)


def _gen():
    return torch.Generator().manual_seed(0)


BAD = [
    # configs and plugin names
    ("unknown preset", lambda: load_config("sign_muon"), ConfigError, ["'sign_muon'", "did you mean 'signmuon'"]),
    ("unknown lmo", lambda: load_config({"groups": [{"name": "a", "lmo": "polar"}]}), ConfigError, ["unknown lmo 'polar'", "installed:"]),
    ("unknown compressor by API", lambda: build_plugin("compressor", {"kind": "top-k"}), PluginNotFoundError, ["did you mean 'topk'"]),
    ("unknown aggregator by API", lambda: build_plugin("aggregator", "majority"), PluginNotFoundError, ["'majority_vote'"]),
    ("unknown family", lambda: build_plugin("compresor", "sign"), PluginNotFoundError, ["plugin family 'compresor'", "compressor"]),
    ("config without kind", lambda: build_plugin("compressor", {"k": 0.1}), ConfigError, ["needs 'kind'", "topk"]),
    ("plugin field typo", lambda: build_plugin("compressor", {"kind": "topk", "kk": 3}), Exception, ["kk", "Extra inputs are not permitted"]),
    ("vote with a topk uplink", lambda: load_config({"groups": [{"name": "a", "uplink": {"kind": "topk", "k": 0.1},
                                                                   "aggregator": "majority_vote"}]}),
     ConfigError, ["sign_bits", "'topk'"]),
    ("ef21 with unscaled signs", lambda: load_config({"preset": "ef21muon", "groups": {"hidden": {"uplink": {"kind": "sign"}}}}),
     ConfigError, ["contractive", "scale: mean"]),
    ("gluon at the worker", lambda: load_config({"preset": "muon", "groups": {"hidden": {"lr_rule": "gluon"}}}),
     ConfigError, ["'gluon'", "lmo_at: server"]),
    ("unknown config file type", lambda: load_config("optimizer.ini"), ConfigError, ["'.ini' is not a config file extension"]),
    # hyperparameters out of range
    ("negative lr", lambda: load_config({"preset": "signmuon", "groups": {"hidden": {"lr": -1}}}), ConfigError, ["groups.hidden.lr", "-1"]),
    ("momentum 1", lambda: load_config({"preset": "signmuon", "groups": {"hidden": {"momentum": {"beta": 1.0}}}}),
     ConfigError, ["momentum.beta", "less than 1"]),
    ("zero Newton-Schulz steps", lambda: build_plugin("lmo", {"kind": "spectral", "steps": 0}), Exception, ["steps", "greater than or equal to 1"]),
    ("topk fraction above one", lambda: build_plugin("compressor", {"kind": "topk", "k": 1.5}), Exception, ["k"]),
    ("rank zero", lambda: build_plugin("compressor", {"kind": "rankk", "rank": 0}), Exception, ["rank", "greater than or equal to 1"]),
    ("gluon with no smoothness", lambda: build_plugin("lr_rule", {"kind": "gluon", "l0": 0, "l1": 0}), Exception, ["l0", "l1"]),
    ("negative weight decay", lambda: load_config({"preset": "muon", "groups": {"hidden": {"weight_decay": -0.1}}}),
     ConfigError, ["weight_decay", "-0.1"]),
    ("bad fallback option value", lambda: build_optimizer(_linear(), {"preset": "muon", "fallback": {"options": {"betas": 0.9}}}),
     ConfigError, ["fallback.rule", "adamw", "betas", "0.9"]),
    # shapes and dtypes a plugin does not take
    ("spectral on a vector", lambda: build_plugin("lmo", "spectral").direction(torch.randn(7)), ValueError, ["ndim >= 2", "(7,)"]),
    ("spectral group takes a bias", lambda: build_optimizer(_linear(), {"groups": [{"name": "v", "params": {"ndim": [1]}}]}),
     ConfigError, ["groups.v", "'bias'", "(5,)"]),
    ("shape-only lr rule on a vector", lambda: build_optimizer(_linear(), {"groups": [
        {"name": "v", "params": {"ndim": [1]}, "lmo": "sign", "lr_rule": "original"}]}),
     ConfigError, ["parameter 'bias'", "needs a matrix shape"]),
    ("sign blocks that do not divide", lambda: _compress({"kind": "sign", "scale": "mean", "blocks": 4}, torch.randn(6, 3)),
     ValueError, ["blocks=4 must divide dim 0", "(6, 3)"]),
    ("NaN into a compressor", lambda: _compress({"kind": "topk", "k": 0.5}, torch.tensor([1.0, float("nan")])),
     CommlmoError, ["topk", "NaN or Inf"]),
    ("stochastic compressor without generator", lambda: _compress({"kind": "natural"}, torch.randn(8)),
     ValueError, ["natural", "generator"]),
    ("integer parameters", lambda: build_optimizer([torch.zeros(3, 3, dtype=torch.int32)], "muon"), ConfigError, ["dtype torch.int32"]),
    ("complex parameters", lambda: build_optimizer([torch.zeros(3, 3, dtype=torch.complex64)], "muon"), ConfigError, ["complex"]),
    # gradients
    ("sparse gradient", lambda: _step("signmuon", grad=_sparse_grad), ConfigError, ["'weight'", "sparse gradient"]),
    ("typo in a config file", lambda: load_config(_write("groups:\n  - name: a\n    lmo_att: worker\n")), ConfigError,
     ["bad.yaml", "groups.a.lmo_att", "unknown field 'lmo_att'", "lmo_at"]),
    # parameter lists
    ("empty parameter list", lambda: build_optimizer([], "signmuon"), ConfigError, ["empty parameter list"]),
    ("model with no trainable parameters", lambda: build_optimizer(_linear().requires_grad_(False), "signmuon"),
     ConfigError, ["no trainable parameters"]),
    ("not tensors", lambda: build_optimizer([1, 2, 3], "signmuon"), ConfigError, ["module, (name, tensor) pairs, or tensors"]),
    # world sizes a transport cannot serve
    ("int8 vote past 127 ranks", lambda: _step({"preset": "signmuon", "groups": {"head": {
        "aggregator": {"kind": "majority_vote", "transport": "int8"}}}}, comm=_MirrorWorld(128)),
     DistributedError, ["int8", "127", "world size is 128", "transport: owner"]),
    ("process group without torch.distributed", lambda: commlmo.comm.make_communicator(object()), DistributedError,
     ["not initialised"]),
    # values that would run but cannot be right: refused, not coerced (each passed validation before)
    ("infinite lr", lambda: load_config(_group_cfg(lr=float("inf"))), ConfigError, ["groups.a.lr", "inf", "finite"]),
    ("nan weight decay", lambda: load_config(_group_cfg(weight_decay=float("nan"))), ConfigError,
     ["groups.a.weight_decay", "nan", "finite"]),
    ("lr true", lambda: load_config(_group_cfg(lr=True)), ConfigError, ["groups.a.lr", "True", "got bool", "nothing is coerced"]),
    ("lr as a string", lambda: load_config(_group_cfg(lr="0.01")), ConfigError, ["groups.a.lr", "'0.01'", "got str"]),
    ("seed past the generators", lambda: load_config({**_group_cfg(), "seed": 10**30}), ConfigError,
     ["seed", "1000000000000000000000000000000", "less than 2147483648"]),
    ("fallback LBFGS", lambda: load_config({**_group_cfg(), "fallback": {"optimizer": "LBFGS"}}), ConfigError,
     ["fallback.optimizer = 'LBFGS'", "allowed: AdamW", "adamw | lion | onebit_adam"]),
    ("fallback SparseAdam", lambda: load_config({**_group_cfg(), "fallback": {"optimizer": "SparseAdam"}}), ConfigError,
     ["fallback.optimizer = 'SparseAdam'", "pipeline group"]),
    ("binary config file", lambda: load_config(_write_bytes(b"\xff\xfe\x00garbage")), ConfigError, ["not UTF-8 text", "byte 0"]),
    ("NUL bytes in a config file", lambda: load_config(_write_bytes(b"groups: []\x00")), ConfigError, ["NUL bytes"]),
    ("YAML alias bomb", lambda: load_config(_write(_alias_bomb())), ConfigError, ["expands to more than 100,000 values"]),
    ("unknown element-wise recipe", lambda: load_config({"preset": "signmuon", "elementwise": "adam"}), ConfigError,
     ["elementwise = 'adam'", "did you mean 'adamw'", "allowed:"]),
    ("rule and lmo together", lambda: load_config(_group_cfg(rule={"kind": "lion"}, lmo={"kind": "spectral"})),
     ConfigError, ["rule 'lion'", "replaces the LMO", "lmo: null"]),
    ("rule and momentum together", lambda: load_config(_group_cfg(rule={"kind": "adamw"}, momentum={"beta": 0.9})),
     ConfigError, ["keeps its own moments", "momentum: null"]),
    ("lion beta of one", lambda: load_config(_group_cfg(rule={"kind": "lion", "betas": [0.9, 1.0]})), ConfigError,
     ["invalid rule 'lion'", "betas", "less than 1"]),
    ("negative 1-bit Adam warm-up", lambda: load_config(_group_cfg(rule={"kind": "onebit_adam", "warmup": -1})),
     ConfigError, ["invalid rule 'onebit_adam'", "warmup"]),
    ("a view of one block", lambda: load_config(_group_cfg(view={"kind": "blocks", "blocks": 1})), ConfigError,
     ["view", "blocks >= 2"]),
    ("blocks that do not divide", lambda: build_optimizer([("qkv", torch.nn.Parameter(torch.randn(7, 4)))],
                                                          _group_cfg(view={"kind": "blocks", "blocks": 3})),
     ConfigError, ["groups.a: parameter 'qkv'", "blocks=3 must divide dim 0 of shape (7, 4)"]),
    ("a stack view of a matrix", lambda: build_optimizer([("w", torch.nn.Parameter(torch.randn(7, 4)))],
                                                         _group_cfg(view={"kind": "stack"})),
     ConfigError, ["parameter 'w'", "view 'stack' needs a tensor of 3 or more dimensions"]),
    ("abstaining ties on the int8 transport", lambda: build_optimizer([("w", torch.nn.Parameter(torch.randn(7, 4)))], {
        "preset": "signmuon", "groups": {"hidden": {"aggregator": {"kind": "majority_vote", "transport": "int8",
                                                                   "ties": "abstain"}}}}, process_group=_MirrorWorld(2)),
     DistributedError, ["ties='abstain'", "owner and allgather"]),
    ("a parameter passed twice", lambda: build_optimizer([("a", _shared), ("b", _shared)], "muon"), ConfigError,
     ["'b' is the same tensor as 'a'", "updated twice"]),
    ("two parameters with one name", lambda: build_optimizer(
        [("a", torch.nn.Parameter(torch.randn(3, 3))), ("a", torch.nn.Parameter(torch.randn(3, 3)))], "muon"),
     ConfigError, ["both named 'a'"]),
    ("a state dict of another config", lambda: build_optimizer(_linear(), "ef21muon").load_state_dict(
        build_optimizer(_linear(), "signmuon").state_dict()), ConfigError,
     ["cannot load this optimizer state", "nothing was changed"]),
    ("a torch optimizer's state dict", lambda: build_optimizer(_linear(), "signmuon").load_state_dict(
        torch.optim.SGD(_linear().parameters(), lr=0.1).state_dict()), ConfigError, ["not saved by a commlmo optimizer"]),
    ("verify_every true", lambda: load_config({**_group_cfg(), "verify_every": True}), ConfigError,
     ["verify_every", "True", "got bool"]),
]


@pytest.mark.parametrize("call,error,fragments", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_a_specific_error(call, error, fragments):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_the_table_is_long_and_every_message_is_its_own():
    assert len(BAD) >= 30
    messages = []
    for _, call, error, _ in BAD:
        with pytest.raises(error) as info:
            call()
        messages.append(str(info.value))
    assert len(set(messages)) == len(messages)
