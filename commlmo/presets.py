"""Paper methods as rows of data, and complete recipes for every kind of parameter.

Every method is fixed by where the LMO runs, the uplink compressor, the
aggregator and the downlink compressor (the SignMuon paper's table, Smirnova,
Kravatskiy, Kovalev; EF21-Muon, Gruntkowska et al. 2025; Scion, Pethick et al.
2025); one driver runs all rows, so two methods can only differ where this table
says they differ.  The row applies to the ``hidden`` group: the matrices (and
conv kernels) of the model body.

A preset is a complete recipe: the embeddings, the output head, and the norms,
biases and other vectors get groups of their own (roles read from the module
tree, :mod:`commlmo.routing`), running one of these *element-wise* recipes:

==============  ==================================================================
``adamw``       AdamW on the float32 mean -- DDP's recipe (Muon's README, the
                SignMuon code); 32 bits per entry each way
``lion``        Distributed Lion (Liu et al. 2024): each worker's Lion update is a
                sign, majority vote over the owner transport; 1 bit each way
``onebit_adam`` 1-bit Adam (Tang et al. 2021): float32 Adam for a warm-up, then
                frozen variance and an error-compensated scaled-sign momentum,
                compressed again by each parameter's owner (their two-stage
                all-reduce); 1 bit each way
``signum``      Signum with majority vote (Bernstein et al. 2018, 2019); 1 bit each way
``scion``       Scion's layer-wise LMOs (Pethick et al. 2025): rownorm for an
                embedding (each token's vector), sign for the head, bias_rms for
                vectors; float32 mean, LMO at the server
==============  ==================================================================

The 1-bit methods default to ``lion``, so every byte is compressed; ``muon`` and
``muonserver`` default to ``adamw`` (DDP Muon); the EF21 family to ``onebit_adam``;
``scion``/``gluon`` to ``scion``.  Choose another with ``elementwise``::

    load_config({"preset": "signmuon", "elementwise": "adamw"})   # the SignMuon code's routing
    load_config({"preset": "signmuon", "groups": {"hidden": {"lr": 0.01}}})

Deviation from the SignMuon code, stated here: its AdamW fallback uses weight
decay 0.0, and so does ``adamw`` here (torch.optim.AdamW's own default is 0.01).
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

__all__ = ["PRESETS", "ELEMENTWISE", "Preset", "preset_dict"]

SPECTRAL = {"kind": "spectral"}
IDENTITY = {"kind": "identity"}
SIGN = {"kind": "sign"}
SCALED_SIGN = {"kind": "sign", "scale": "mean"}
MEAN = {"kind": "mean"}
VOTE = {"kind": "majority_vote"}
EF21 = {"kind": "ef21"}
# 32 bits per kept entry: EF21 feeds the bf16 rounding back like any other compression error
TOPK5 = {"kind": "topk", "k": 0.05, "selection": "blocked", "blocks": "auto", "value_dtype": "bfloat16"}


class Preset(NamedTuple):
    lmo_at: str
    uplink: dict[str, Any]
    aggregator: dict[str, Any]
    downlink: dict[str, Any]
    summary: str
    lmo: dict[str, Any] | None = SPECTRAL
    lr_rule: dict[str, Any] = {"kind": "unit_gain"}  # noqa: RUF012 - NamedTuple default
    lr: float = 0.02
    elementwise: str = "lion"


PRESETS: dict[str, Preset] = {
    "muon": Preset("worker", IDENTITY, MEAN, IDENTITY,
                   "polar(M_i) on each worker, float32 mean (worker-LMO control)", elementwise="adamw"),
    "muonserver": Preset("server", IDENTITY, MEAN, IDENTITY,
                         "polar(mean M_i): DDP Muon, float32 all-reduce", elementwise="adamw"),
    "signmuon": Preset("worker", SIGN, VOTE, IDENTITY,
                       "sign(polar(M_i)) on each worker, majority vote, 1 bit each way"),
    "muonusign": Preset("server", SIGN, VOTE, IDENTITY,
                        "polar(vote(sign(M_i))): 1-bit uplink, LMO after the vote"),
    "muonsign": Preset("server", SIGN, VOTE, SIGN,
                       "sign(polar(vote(sign(M_i)))): 1-bit uplink and downlink"),
    "ef21signmuon": Preset("worker", SCALED_SIGN, EF21, IDENTITY,
                           "EF21 with scaled sign on polar(M_i); diverges (SignMuon paper, Thm 4)",
                           elementwise="onebit_adam"),
    "ef21muonusign": Preset("server", SCALED_SIGN, EF21, IDENTITY,
                            "polar(g), g the EF21 scaled-sign estimate of mean M_i", elementwise="onebit_adam"),
    "ef21muonsign": Preset("server", SCALED_SIGN, EF21, {"kind": "ef21p", "compressor": SCALED_SIGN},
                           "ef21muonusign plus an EF21-P scaled-sign downlink on the model",
                           elementwise="onebit_adam"),
    "signsgd": Preset("none", SIGN, VOTE, IDENTITY,
                      "signum with majority vote (Bernstein et al. 2018, 2019)", lmo=None, lr=0.02,
                      elementwise="signum"),
    "scion": Preset("server", IDENTITY, MEAN, IDENTITY,
                    "Scion: layer-wise spectral LMO with Scion radii (Pethick et al. 2025)",
                    lr_rule={"kind": "scion"}, elementwise="scion"),
    "gluon": Preset("server", IDENTITY, MEAN, IDENTITY,
                    "Gluon: layer-wise LMO with the adaptive (L0, L1) radius (Riabinin et al. 2025)",
                    lr_rule={"kind": "gluon"}, elementwise="scion"),
    "ef21muon": Preset("server", TOPK5, EF21, IDENTITY,
                       "EF21-Muon: EF21 top-5% uplink (bf16 values, 16-bit block-local indices), "
                       "server-side LMO (Gruntkowska et al. 2025)", elementwise="onebit_adam"),
}

#: the element-wise recipes; each maps a role group to the fields of its group
_CONSTANT = {"kind": "constant"}


def _rule_group(rule: dict[str, Any], uplink: dict[str, Any], aggregator: dict[str, Any], lr: float) -> dict[str, Any]:
    return {"rule": rule, "lmo": None, "lmo_at": "none", "momentum": None, "uplink": uplink,
            "aggregator": aggregator, "downlink": IDENTITY, "lr": lr, "lr_rule": _CONSTANT, "weight_decay": 0.0}


def _signum(lr: float) -> dict[str, Any]:
    return {"lmo": None, "lmo_at": "none", "momentum": {"beta": 0.9, "kind": "ema", "nesterov": False},
            "uplink": SIGN, "aggregator": VOTE, "downlink": IDENTITY, "lr": lr, "lr_rule": _CONSTANT,
            "weight_decay": 0.0}


def _scion(lmo: dict[str, Any], lr: float) -> dict[str, Any]:
    return {"lmo": lmo, "lmo_at": "server", "momentum": {"beta": 0.9, "kind": "ema", "nesterov": False},
            "uplink": IDENTITY, "aggregator": MEAN, "downlink": IDENTITY, "lr": lr, "lr_rule": _CONSTANT,
            "weight_decay": 0.0}


ADAMW = _rule_group({"kind": "adamw"}, IDENTITY, MEAN, 1e-3)
ELEMENTWISE: dict[str, dict[str, dict[str, Any]]] = {
    "adamw": {role: ADAMW for role in ("embedding", "head", "vector")},
    "lion": {role: _rule_group({"kind": "lion"}, SIGN, VOTE, 1e-3) for role in ("embedding", "head", "vector")},
    "onebit_adam": {role: _rule_group({"kind": "onebit_adam", "warmup": 100}, SCALED_SIGN,
                                      {"kind": "error_feedback", "server_compression": True}, 1e-3)
                    for role in ("embedding", "head", "vector")},
    "signum": {role: _signum(1e-3) for role in ("embedding", "head", "vector")},
    "scion": {"embedding": _scion({"kind": "rownorm"}, 0.01), "head": _scion({"kind": "sign", "zero": "positive"}, 1e-3),
              "vector": _scion({"kind": "bias_rms"}, 1e-3)},
}

#: the role groups of every preset, in routing order (first match wins)
ROLE_GROUPS = {
    "hidden": {"roles": ["hidden"], "ndim": [2, 3, 4, 5]},
    "embedding": {"roles": ["embedding"], "ndim": None},
    "head": {"roles": ["head"], "ndim": None},
    "vector": {"roles": ["norm", "bias", "vector"], "ndim": None},
}


def preset_dict(name: str, *, elementwise: str | None = None) -> dict[str, Any]:
    """The raw config mapping of a preset (validate it with :func:`commlmo.load_config`).

    ``elementwise`` picks the recipe of the embedding, head and vector groups
    (default: the preset's own, see the module docstring).
    """
    p = PRESETS[name]
    recipe = ELEMENTWISE[elementwise or p.elementwise]
    hidden = {
        "name": "hidden",
        "params": {"names": ["*"], **ROLE_GROUPS["hidden"]},
        "lmo": p.lmo,
        "lmo_at": p.lmo_at,
        "uplink": p.uplink,
        "aggregator": p.aggregator,
        "downlink": p.downlink,
        "lr": p.lr,
        "lr_rule": p.lr_rule,
        "momentum": {"beta": 0.95, "kind": "ema", "nesterov": True},
        "weight_decay": 0.0,
    }
    groups = [hidden]
    for role in ("embedding", "head", "vector"):
        groups.append({"name": role, "params": {"names": ["*"], **ROLE_GROUPS[role]}, **recipe[role]})
    fallback = {"name": "fallback", **recipe["vector"]}
    return copy.deepcopy({"groups": groups, "fallback": fallback, "elementwise": elementwise or p.elementwise})
