"""Third-party plugins cannot take the listing, the schema or the built-in presets down.

Throw-away distributions are written at test time as a package plus a
``*.dist-info`` (METADATA and entry_points.txt) in a temporary directory that
the subprocesses get on ``PYTHONPATH`` -- no pip, no build.  Their imports call
``sys.exit(3)``, hang for ever, ``os._exit(5)`` the process, or register a name
that a built-in (``mean``) or another third party already has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

IMPORT_TIMEOUT = 4  # seconds each probed import may take (COMMLMO_PLUGIN_IMPORT_TIMEOUT)
SLACK = 45  # interpreter and torch start-up of the command and its probes, on 2 shared cores

_SHADOW_MEAN = '''
from typing import Literal
from commlmo.plugin import Aggregator, PluginConfig

class ShadowMean(Aggregator):
    """A third-party mean that registers the built-in's name."""

    class Config(PluginConfig):
        kind: Literal["mean"] = "mean"
        weight: float = 1.0

    def aggregate(self, vectors, states, *, uplink, comm, generators, label):
        return [v * self.config.weight for v in vectors]
'''


def _twin(label: str) -> str:
    return f'''
from typing import Literal
from commlmo.plugin import Aggregator, PluginConfig

class Twin(Aggregator):
    """Twin aggregator from {label}."""

    class Config(PluginConfig):
        kind: Literal["twin"] = "twin"

    def aggregate(self, vectors, states, *, uplink, comm, generators, label):
        return list(vectors)
'''


_HANGS = '''
import os, threading
pid_file = os.environ.get("HANG_PID_FILE")
if pid_file:
    with open(pid_file, "a") as f:
        f.write(f"{os.getpid()}\\n")
threading.Event().wait()  # no KeyboardInterrupt will come
'''

_CRASHY_OK = '''
from typing import Literal
from commlmo.plugin import Compressor, PluginConfig, Payload

class Fine(Compressor):
    """Fine compressor next to a module that kills the process."""

    class Config(PluginConfig):
        kind: Literal["fine"] = "fine"

    def compress(self, x, *, generator=None):
        return Payload((x.clone(),))

    def decompress(self, payload):
        return payload.wire[0]
'''

DISTRIBUTIONS = {
    # name: (version, {module: source}, {group: {entry name: target}})
    "commlmo-exits": ("0.1", {"commlmo_exits": "import sys\nsys.exit(3)\n"},
                      {"commlmo.lmos": {"exits": "commlmo_exits:Exits"}}),
    "commlmo-hangs": ("0.2", {"commlmo_hangs": _HANGS},
                      {"commlmo.compressors": {"hangs": "commlmo_hangs:Hangs"}}),
    "commlmo-crashy": ("0.3", {"commlmo_crashy_dies": "import os\nos._exit(5)\n", "commlmo_crashy_ok": _CRASHY_OK},
                       {"commlmo.compressors": {"dies": "commlmo_crashy_dies:Dies", "fine": "commlmo_crashy_ok:Fine"}}),
    "commlmo-shadow": ("0.4", {"commlmo_shadow": _SHADOW_MEAN},
                       {"commlmo.aggregators": {"mean": "commlmo_shadow:ShadowMean"}}),
    "commlmo-twin-a": ("1.0", {"commlmo_twin_a": _twin("A")}, {"commlmo.aggregators": {"twin": "commlmo_twin_a:Twin"}}),
    "commlmo-twin-b": ("2.0", {"commlmo_twin_b": _twin("B")}, {"commlmo.aggregators": {"twin": "commlmo_twin_b:Twin"}}),
}


def write_distribution(site: Path, name: str, version: str, modules: dict[str, str],
                       entry_points: dict[str, dict[str, str]]) -> None:
    """A minimal installed distribution: its modules and a ``.dist-info`` that importlib.metadata reads."""
    for module, source in modules.items():
        (site / module).mkdir(parents=True, exist_ok=True)
        (site / module / "__init__.py").write_text(textwrap.dedent(source))
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()) for group, items in entry_points.items()))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-site")
    for name, (version, modules, eps) in DISTRIBUTIONS.items():
        write_distribution(root, name, version, modules, eps)
    return root


def _env(site: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                COMMLMO_PLUGIN_IMPORT_TIMEOUT=str(IMPORT_TIMEOUT), **extra)


def _commlmo(site: Path, *args: str, **extra: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "commlmo", *args], capture_output=True, text=True,
                         env=_env(site, **extra), timeout=IMPORT_TIMEOUT + SLACK + 60)
    return out, time.monotonic() - start


def _python(site: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=_env(site), timeout=SLACK + 60)


def _line(lines: list[str], family: str, name: str, dist: str) -> str:
    return next(line for line in lines if line.split()[:3] == [family, name, dist])


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def test_plugins_lists_every_distribution_from_metadata_without_importing_third_party_code(site):
    out, elapsed = _commlmo(site, "plugins")
    assert out.returncode == 0, out.stderr
    assert elapsed < SLACK
    lines = out.stdout.splitlines()
    for family, name, dist in [("lmo", "exits", "commlmo-exits"), ("compressor", "hangs", "commlmo-hangs"),
                               ("compressor", "dies", "commlmo-crashy"), ("aggregator", "mean", "commlmo-shadow"),
                               ("aggregator", "twin", "commlmo-twin-a"), ("aggregator", "twin", "commlmo-twin-b")]:
        assert "not imported" in _line(lines, family, name, dist)
    assert "Average of the decompressed" in _line(lines, "aggregator", "mean", "commlmo")  # built-ins: summary
    assert "'commlmo-shadow:mean'" in _line(lines, "aggregator", "mean", "commlmo-shadow")
    rows = json.loads(_commlmo(site, "plugins", "--json", "--family", "aggregator")[0].stdout)
    kinds = {(r["name"], r["distribution"].split()[0]): r["kind"] for r in rows}
    assert kinds[("mean", "commlmo")] == "mean"
    assert kinds[("mean", "commlmo-shadow")] == "commlmo-shadow:mean"
    assert kinds[("twin", "commlmo-twin-a")] == "commlmo-twin-a:twin"


def test_plugins_check_probes_in_subprocesses_and_reports_exit_hang_and_crash_by_distribution(site, tmp_path):
    pids = tmp_path / "pids"
    out, elapsed = _commlmo(site, "plugins", "--check", HANG_PID_FILE=str(pids))
    assert out.returncode == 0, out.stderr
    assert elapsed < IMPORT_TIMEOUT + SLACK
    lines = out.stdout.splitlines()
    exits = _line(lines, "lmo", "exits", "commlmo-exits")
    assert "BROKEN" in exits and "commlmo-exits 0.1" in exits and "SystemExit(3)" in exits
    hangs = _line(lines, "compressor", "hangs", "commlmo-hangs")
    assert "BROKEN" in hangs and "commlmo-hangs 0.2" in hangs and f"within {IMPORT_TIMEOUT} s" in hangs
    dies = _line(lines, "compressor", "dies", "commlmo-crashy")
    assert "BROKEN" in dies and "exit status 5" in dies
    # the rest of a distribution whose import killed the probe is probed again, and works
    assert "Fine compressor next to" in _line(lines, "compressor", "fine", "commlmo-crashy")
    assert "A third-party mean" in _line(lines, "aggregator", "mean", "commlmo-shadow")
    assert all(_dead(int(p)) for p in pids.read_text().split()), "a hung probe was left running"


def test_schema_skips_and_reports_broken_plugins_and_lists_qualified_kinds(site, tmp_path):
    pids = tmp_path / "pids"
    out, elapsed = _commlmo(site, "schema", HANG_PID_FILE=str(pids))
    assert out.returncode == 0, out.stderr
    assert elapsed < IMPORT_TIMEOUT + SLACK
    schema = json.loads(out.stdout)
    for dist in ("commlmo-exits 0.1", "commlmo-hangs 0.2", "commlmo-crashy 0.3"):
        assert f"skipped a broken plugin ({dist})" in out.stderr
    text = json.dumps(schema)
    for kind in ('"mean"', '"commlmo-shadow:mean"', '"commlmo-twin-a:twin"', '"commlmo-twin-b:twin"', '"fine"'):
        assert kind in text, kind
    assert all(_dead(int(p)) for p in pids.read_text().split())


def test_get_turns_sys_exit_at_import_into_a_plugin_load_error_and_the_process_goes_on(site):
    result = _python(site, """
        from commlmo import registry, build_plugin
        from commlmo.errors import PluginLoadError
        try:
            registry.get("lmo", "exits")
        except PluginLoadError as exc:
            print("ERR", exc)
        print("still here:", type(build_plugin("lmo", "spectral")).__name__)
    """)
    assert result.returncode == 0, result.stderr
    assert "ERR lmo plugin 'exits' from distribution commlmo-exits 0.1 failed to import" in result.stdout
    assert "SystemExit(3)" in result.stdout and "still here: Spectral" in result.stdout


def test_a_third_party_mean_leaves_the_presets_on_the_builtin_and_is_reachable_qualified(site):
    result = _python(site, """
        import warnings
        import torch, commlmo
        from commlmo import registry
        from commlmo.config import load_config
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = load_config("muon")
            model = torch.nn.Linear(8, 4)
            opt = commlmo.build_optimizer(model, "muon")
            model(torch.randn(3, 8)).sum().backward()
            before = model.weight.detach().clone()
            opt.step()
            assert not torch.equal(before, model.weight)
            load_config("muon")
        shadow = [w for w in caught if issubclass(w.category, registry.PluginShadowWarning)]
        print("warnings:", len(shadow), str(shadow[0].message) if shadow else "")
        print("builtin:", registry.get("aggregator", "mean").__module__)
        q = registry.validate_plugin_config("aggregator", {"kind": "Commlmo_Shadow:mean", "weight": 2})
        print("qualified:", q.kind, q.weight, type(registry.build_plugin("aggregator", q)).__name__)
        print("round trip:", registry.validate_plugin_config("aggregator", q.model_dump()) == q)
        print("canonical:", registry.validate_plugin_config("aggregator", "commlmo:mean").kind)
        qcfg = load_config({"preset": "muon", "groups": {"hidden": {"aggregator": {"kind": "commlmo-shadow:mean"}}}})
        agg = [g.aggregator.kind for g in qcfg.groups if g.name == "hidden"]
        print("in a config:", agg, load_config(qcfg.model_dump(mode="json")) == qcfg)
    """)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "warnings: 1 aggregator 'mean' is also registered by commlmo-shadow 0.4" in out
    assert "'commlmo-shadow:mean'" in out
    assert "builtin: commlmo_aggregators.mean" in out
    assert "qualified: commlmo-shadow:mean 2.0 ShadowMean" in out
    assert "round trip: True" in out and "canonical: mean" in out
    assert "in a config: ['commlmo-shadow:mean'] True" in out


def test_two_third_party_distributions_conflict_with_the_qualified_kinds_to_choose_from(site):
    result = _python(site, """
        from commlmo import registry
        from commlmo.errors import PluginConflictError
        try:
            registry.get("aggregator", "twin")
        except PluginConflictError as exc:
            print("ERR", exc)
        for kind in ("commlmo-twin-a:twin", "commlmo_twin_b:twin"):
            print(kind, registry.get("aggregator", kind).summary())
    """)
    assert result.returncode == 0, result.stderr
    err = next(line for line in result.stdout.splitlines() if line.startswith("ERR"))
    assert "registered by 2 distributions" in err
    assert "'commlmo-twin-a:twin'" in err and "'commlmo-twin-b:twin'" in err
    assert "commlmo-twin-a:twin Twin aggregator from A." in result.stdout
    assert "commlmo_twin_b:twin Twin aggregator from B." in result.stdout
