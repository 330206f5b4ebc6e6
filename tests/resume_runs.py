"""The runs the resume and dead-rank tests share (importable, hence a module)."""

from __future__ import annotations

import math

import torch

#: Three methods whose state is per rank: a vote with random tie-breaks (2 workers: ties),
#: EF21 estimators, and a stochastic uplink drawing from each rank's local generator.
RESUME_METHODS = {
    "signmuon": "signmuon",
    "ef21muon": "ef21muon",
    "natural": {"preset": "muonserver", "groups": {"hidden": {"uplink": {"kind": "natural"}}}},
}
STEPS, STOP = 12, 6  # the stopped runs' last checkpoint is step 4: steps 5 and 6 are computed twice
RESUME_TRAIN = {"steps": STEPS, "global_batch": 32, "nproc": 2, "eval_every": 3, "checkpoint_every": 4,
                "keep_checkpoints": 3, "schedule": {"kind": "cosine", "warmup": 2}, "collective_timeout_s": 30}


def resume_config(name: str, **train) -> dict:
    """A small MNIST-1D MLP run (its biases go to AdamW, so the fallback's state is checkpointed too)."""
    return {"name": name, "optimizer": RESUME_METHODS[name],
            "task": {"kind": "mnist1d", "model": "mlp", "hidden": [16]},
            "train": {**RESUME_TRAIN, **train}}


# Not part of what a run computes: wall-clock times, byte counters (a resumed run checks the
# ranks' layouts once more), the resume history, and Python's `random` (seeded by the OS in a
# fresh process, so it differs between two straight runs too).
NOT_COMPUTED = ("progress.train_time", "progress.wall_time", "progress.sent_total", "progress.received_total",
                "progress.resumed_from", "bytes.", "rng.python")


def flat(x, prefix=""):
    """``(dotted key, leaf)`` pairs of nested dicts and lists."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from flat(v, f"{prefix}{k}.")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from flat(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], x


def _computed(state: dict) -> dict:
    return {k: v for k, v in flat(state) if not k.startswith(NOT_COMPUTED)}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    """Two checkpoints hold the same bits in everything the run computes (NaN equals NaN)."""
    fa, fb = _computed(a), _computed(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = fa[k], fb[k]
        if torch.is_tensor(x):
            assert x.dtype == y.dtype and torch.equal(x, y), k
        elif isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float) and math.isnan(y), k
        else:
            assert x == y, k
