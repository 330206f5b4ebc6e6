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
