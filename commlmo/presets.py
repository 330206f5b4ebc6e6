"""Paper methods as rows of data (REFERENCE.md section 5).

Every method is fixed by where the LMO runs, the uplink compressor, the
aggregator and the downlink compressor; one driver runs all rows, so two
methods can only differ where this table says they differ.  Each preset has one
group, ``hidden``, taking every parameter with 2 to 5 dimensions (conv kernels
are viewed as matrices); everything else goes to AdamW with the mean gradient,
as the SignMuon code routes it.  Override any field::

    load_config({"preset": "signmuon", "groups": {"hidden": {"lr": 0.01}}})
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

__all__ = ["PRESETS", "Preset", "preset_dict"]

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


PRESETS: dict[str, Preset] = {
    "muon": Preset("worker", IDENTITY, MEAN, IDENTITY,
                   "polar(M_i) on each worker, float32 mean (worker-LMO control)"),
    "muonserver": Preset("server", IDENTITY, MEAN, IDENTITY,
                         "polar(mean M_i): DDP Muon, float32 all-reduce"),
    "signmuon": Preset("worker", SIGN, VOTE, IDENTITY,
                       "sign(polar(M_i)) on each worker, majority vote, 1 bit each way"),
    "muonusign": Preset("server", SIGN, VOTE, IDENTITY,
                        "polar(vote(sign(M_i))): 1-bit uplink, LMO after the vote"),
    "muonsign": Preset("server", SIGN, VOTE, SIGN,
                       "sign(polar(vote(sign(M_i)))): 1-bit uplink and downlink"),
    "ef21signmuon": Preset("worker", SCALED_SIGN, EF21, IDENTITY,
                           "EF21 with scaled sign on polar(M_i); diverges (SignMuon paper, Thm 4)"),
    "ef21muonusign": Preset("server", SCALED_SIGN, EF21, IDENTITY,
                            "polar(g), g the EF21 scaled-sign estimate of mean M_i"),
    "ef21muonsign": Preset("server", SCALED_SIGN, EF21, {"kind": "ef21p", "compressor": SCALED_SIGN},
                           "ef21muonusign plus an EF21-P scaled-sign downlink on the model"),
    "signsgd": Preset("none", SIGN, VOTE, IDENTITY,
                      "signum with majority vote (Bernstein et al. 2018, 2019)", lmo=None, lr=0.02),
    "scion": Preset("server", IDENTITY, MEAN, IDENTITY,
                    "Scion: layer-wise spectral LMO with Scion radii (Pethick et al. 2025)",
                    lr_rule={"kind": "scion"}),
    "gluon": Preset("server", IDENTITY, MEAN, IDENTITY,
                    "Gluon: layer-wise LMO with the adaptive (L0, L1) radius (Riabinin et al. 2025)",
                    lr_rule={"kind": "gluon"}),
    "ef21muon": Preset("server", TOPK5, EF21, IDENTITY,
                       "EF21-Muon: EF21 top-5% uplink (bf16 values, 16-bit block-local indices), "
                       "server-side LMO (Gruntkowska et al. 2025)"),
}


def preset_dict(name: str) -> dict[str, Any]:
    """The raw config mapping of a preset (validate it with :func:`commlmo.load_config`)."""
    p = PRESETS[name]
    group = {
        "name": "hidden",
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
    return copy.deepcopy({"groups": [group], "fallback": {"optimizer": "AdamW", "lr": 1e-3}})
