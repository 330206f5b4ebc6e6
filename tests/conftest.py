"""Test-wide settings.

Tiny tensors run 10-100x slower on two torch threads than on one on a 2-core
machine (thread hand-off dominates), and the spawned gloo workers use one
thread each already; the suite does the same.
"""

import pytest
import torch

from resume_runs import RESUME_METHODS, STOP, resume_config

torch.set_num_threads(1)


# ---------------------------------------------------------------------------- reference runs for resume tests


@pytest.fixture(scope="session")
def resume_runs(tmp_path_factory):
    """Each of RESUME_METHODS straight through, and again stopped after step STOP, on 2 gloo workers.

    One launch for all six runs.  Returns ``{"straight": {name: dir}, "stopped": {name: dir},
    "configs": {name: config file of the stopped run}, "out": their parent directory}``.
    """
    import yaml

    from commlmo.train import compare

    base = tmp_path_factory.mktemp("resume")
    configs = {}
    for name in RESUME_METHODS:
        for suffix, extra in (("", {}), ("-stopped", {"stop_after": STOP})):
            configs[name + suffix] = base / f"{name}{suffix}.yaml"
            configs[name + suffix].write_text(yaml.safe_dump({**resume_config(name, **extra), "name": name + suffix}))
    compare([str(p) for p in configs.values()], out=base / "runs", progress=False, report=False)
    return {"straight": {n: base / "runs" / n for n in RESUME_METHODS},
            "stopped": {n: base / "runs" / f"{n}-stopped" for n in RESUME_METHODS},
            "configs": {n: configs[f"{n}-stopped"] for n in RESUME_METHODS}, "out": base / "runs"}
