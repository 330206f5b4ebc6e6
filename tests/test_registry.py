"""The plugin registry: entry points, lazy loading, clear errors, third-party distributions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest

from commlmo import registry
from commlmo.errors import PluginConflictError, PluginNotFoundError
from commlmo.plugin import Compressor, CompressorCapabilities, Payload, PluginConfig

ROOT = Path(__file__).resolve().parents[1]

BUILTINS = {
    "lmo": {"spectral", "sign", "colnorm", "rownorm", "bias_rms", "euclidean"},
    "compressor": {"identity", "sign", "topk", "randk", "rankk", "natural", "chain", "ef21p"},
    "aggregator": {"mean", "majority_vote", "ef21"},
    "lr_rule": {"constant", "original", "match_rms_adamw", "unit_gain", "scion", "gluon"},
}


def test_builtins_come_from_the_entry_points_of_the_commlmo_distribution():
    for family, expected in BUILTINS.items():
        assert expected <= set(registry.names(family))
        for name in expected:
            (claim,) = registry._claims(family, name)
            assert claim.distribution == "commlmo"


def test_listing_names_imports_no_plugin():
    code = (
        "import sys, commlmo.registry as r\n"
        "assert 'topk' in r.names('compressor')\n"
        "loaded = [m for m in sys.modules if m.startswith(('commlmo_compressors', 'commlmo_lmos', 'commlmo_aggregators'))]\n"
        "print(loaded)\n"
        "r.get('compressor', 'topk')\n"
        "print('commlmo_compressors.topk' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"


def test_unknown_name_suggests_and_lists_installed():
    with pytest.raises(PluginNotFoundError) as info:
        registry.get("compressor", "top_k")
    msg = str(info.value)
    assert "unknown compressor 'top_k'" in msg and "did you mean 'topk'" in msg
    assert "installed: " in msg and "randk" in msg
    with pytest.raises(PluginNotFoundError, match="unknown plugin family 'compresor'"):
        registry.names("compresor")


class _Halve(Compressor):
    """Halves its input (a test plugin)."""

    class Config(PluginConfig):
        kind: Literal["halve"] = "halve"

    capabilities = CompressorCapabilities(summable=True)

    def compress(self, x, *, generator=None):
        return Payload((x * 0.5,), {})

    def decompress(self, payload):
        return payload.wire[0]


def test_register_in_process_build_and_unregister():
    registry.register("compressor", _Halve)
    try:
        assert "halve" in registry.names("compressor")
        c = registry.build_plugin("compressor", {"kind": "halve"})
        assert isinstance(c, _Halve)
        with pytest.raises(PluginConflictError, match="already registered"):
            registry.register("compressor", _Halve)
    finally:
        registry.unregister("compressor", "halve")
    assert "halve" not in registry.names("compressor")


def test_register_refuses_shadowing_an_installed_name_without_replace():
    class Topk(_Halve):
        class Config(PluginConfig):
            kind: Literal["topk"] = "topk"

    with pytest.raises(PluginConflictError, match="replace=True"):
        registry.register("compressor", Topk)


def test_register_checks_the_class():
    with pytest.raises(Exception, match="not a subclass of commlmo.plugin.LMO"):
        registry.register("lmo", _Halve)


def _with_claims(monkeypatch, family, name, extra):
    found = registry._discover()
    patched = {f: dict(v) for f, v in found.items()}
    patched[family][name] = found[family].get(name, []) + extra
    monkeypatch.setattr(registry, "_discovered", patched)
    monkeypatch.setattr(registry, "_loaded", {})
    monkeypatch.setattr(registry, "_warned", set())


def test_two_third_party_distributions_claiming_one_name_is_a_clear_error_naming_the_qualified_kinds(monkeypatch):
    fakes = [registry.PluginInfo("aggregator", "median2", "someone-elses-median", "9.9", "other:Median"),
             registry.PluginInfo("aggregator", "median2", "Yet_Another.Median", "1.0", "yet:Median")]
    _with_claims(monkeypatch, "aggregator", "median2", fakes)
    with pytest.raises(PluginConflictError) as info:
        registry.get("aggregator", "median2")
    msg = str(info.value)
    assert "registered by 2 distributions" in msg
    assert "someone-elses-median 9.9" in msg and "Yet_Another.Median 1.0" in msg
    assert "'someone-elses-median:median2'" in msg and "'yet-another-median:median2'" in msg
    # every other name keeps working
    assert registry.get("aggregator", "majority_vote").__name__ == "MajorityVote"


def test_a_third_party_claim_on_a_builtin_name_resolves_to_the_builtin_with_one_warning(monkeypatch):
    fake = registry.PluginInfo("aggregator", "mean", "someone-elses-mean", "9.9", "other:Mean")
    _with_claims(monkeypatch, "aggregator", "mean", [fake])
    with pytest.warns(registry.PluginShadowWarning, match="someone-elses-mean 9.9.*'someone-elses-mean:mean'"):
        assert registry.get("aggregator", "mean").__module__ == "commlmo_aggregators.mean"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        assert registry.build_plugin("aggregator", {"kind": "commlmo:mean"}).kind == "mean"
        assert registry.validate_plugin_config("aggregator", "COMMLMO:mean").kind == "mean"
    with pytest.raises(PluginNotFoundError, match="installed: commlmo:mean, someone-elses-mean:mean"):
        registry.get("aggregator", "nobody:mean")


def test_listing_rows_come_from_metadata_with_the_kind_that_selects_each(monkeypatch):
    fake = registry.PluginInfo("aggregator", "mean", "someone-elses-mean", "9.9", "other:Mean")
    _with_claims(monkeypatch, "aggregator", "mean", [fake])
    rows = {(r.info.name, r.info.distribution): r for r in registry.listing("aggregator")}
    builtin, other = rows[("mean", "commlmo")], rows[("mean", "someone-elses-mean")]
    assert builtin.status == "ok" and builtin.info.kind == "mean" and builtin.summary
    assert other.status == "not imported" and other.info.kind == "someone-elses-mean:mean"
    assert "shadowed by the built-in" in other.note


@pytest.fixture(scope="module")
def third_party_site(tmp_path_factory):
    """The example distributions under plugins/, installed by pip into a private directory."""
    target = tmp_path_factory.mktemp("site")
    for dist in ("commlmo-median", "commlmo-broken-example"):
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             "--target", str(target), str(ROOT / "plugins" / dist)],
            check=True, capture_output=True,
        )
    return target


def _run_with(site: Path, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)


def test_third_party_plugins_are_discovered_and_a_broken_one_is_reported_by_distribution(third_party_site):
    env = dict(os.environ, PYTHONPATH=str(third_party_site))
    out = subprocess.run([sys.executable, "-m", "commlmo", "plugins"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # listed from metadata: no third-party module is imported, so no summary and no verdict yet
    median = next(line for line in lines if " median " in line)
    assert "commlmo-median 0.1.0" in median and "not imported" in median
    broken = next(line for line in lines if " broken " in line)
    assert "commlmo-broken-example 0.0.1" in broken and "not imported" in broken
    # --check imports them, each distribution in a subprocess
    out = subprocess.run([sys.executable, "-m", "commlmo", "plugins", "--check"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    median = next(line for line in lines if " median " in line)
    assert "commlmo-median 0.1.0" in median and "Coordinate-wise median" in median
    broken = next(line for line in lines if " broken " in line)
    assert "BROKEN" in broken and "commlmo-broken-example 0.0.1" in broken
    assert "commlmo_dependency_that_does_not_exist" in broken
    # every built-in is still listed and loads
    for family, expected in BUILTINS.items():
        for name in expected:
            assert any(line.split()[:2] == [family, name] for line in lines), (family, name)


def test_third_party_aggregator_runs_in_an_optimizer_and_broken_plugin_errors_name_it(third_party_site):
    result = _run_with(third_party_site, """
        import torch, commlmo
        from commlmo.errors import PluginLoadError
        model = torch.nn.Linear(8, 4)
        opt = commlmo.build_optimizer(model, {"preset": "muonserver", "groups": {"hidden": {"aggregator": {"kind": "median"}}}})
        model(torch.randn(3, 8)).sum().backward()
        before = model.weight.detach().clone()
        opt.step()
        assert not torch.equal(before, model.weight)
        from commlmo.testing import check_aggregator  # the median as its entry point loads it
        print("median kit:", check_aggregator("median", world_sizes=(1, 3), examples=1).checked)
        try:
            commlmo.build_plugin("compressor", {"kind": "broken"})
        except PluginLoadError as exc:
            print("ERR", exc)
        print("topk still loads:", type(commlmo.build_plugin("compressor", {"kind": "topk", "k": 0.1})).__name__)
    """)
    assert result.returncode == 0, result.stderr
    assert "ERR compressor plugin 'broken' from distribution commlmo-broken-example 0.0.1 failed to import" in result.stdout
    assert "topk still loads: TopK" in result.stdout
    assert "median kit: ['count', " in result.stdout and "'reference', 'state', 'robust']" in result.stdout
