"""Loading configs: files, presets, overrides, and one specific error per bad config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import commlmo
from commlmo import ConfigError, load_config
from commlmo.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def _group(**fields):
    return {"groups": [{"name": "hidden", **fields}]}


# (id, config, fragments the error message must contain: the field, the value, what is allowed)
BAD_CONFIGS = [
    ("unknown-preset", {"preset": "signmuonn"}, ["preset", "'signmuonn'", "did you mean 'signmuon'"]),
    ("no-groups", {"groups": []}, ["groups", "at least 1 item"]),
    ("unknown-top-field", {"groups": [{"name": "a"}], "sed": 1}, ["sed", "unknown field 'sed'", "allowed:", "seed"]),
    ("unknown-group-field", _group(learning_rate=0.1), ["groups.hidden", "unknown field 'learning_rate'", "allowed:", "lr"]),
    ("negative-lr", _group(lr=-0.1), ["groups.hidden.lr", "-0.1", "greater than or equal to 0"]),
    ("bad-lmo-at", _group(lmo_at="client"), ["groups.hidden.lmo_at", "'client'", "'worker', 'server' or 'none'"]),
    ("unknown-lmo", _group(lmo={"kind": "spectal"}), ["groups.hidden.lmo", "unknown lmo 'spectal'", "did you mean 'spectral'", "installed:"]),
    ("unknown-compressor", _group(uplink={"kind": "top_k"}), ["groups.hidden.uplink", "unknown compressor 'top_k'", "'topk'"]),
    ("unknown-aggregator", _group(aggregator={"kind": "vote"}), ["groups.hidden.aggregator", "unknown aggregator 'vote'", "installed:"]),
    ("unknown-lr-rule", _group(lr_rule={"kind": "orignal"}), ["groups.hidden.lr_rule", "'orignal'", "did you mean 'original'"]),
    ("bad-plugin-field", _group(lmo={"kind": "spectral", "stepz": 5}), ["groups.hidden.lmo", "invalid lmo 'spectral'", "stepz"]),
    ("bad-plugin-value", _group(lmo={"kind": "spectral", "method": "qr"}), ["groups.hidden.lmo", "method", "'qr'", "'jordan'"]),
    ("bad-topk-k", _group(uplink={"kind": "topk", "k": -3}), ["groups.hidden.uplink", "invalid compressor 'topk'", "k", "-3"]),
    ("momentum-too-big", _group(momentum={"beta": 1.5}), ["groups.hidden.momentum.beta", "1.5", "less than 1"]),
    ("momentum-kind", _group(momentum={"kind": "adam"}), ["groups.hidden.momentum.kind", "'adam'", "'ema' or 'heavy_ball'"]),
    ("nesterov-without-momentum", _group(momentum={"beta": 0.0, "nesterov": True}), ["groups.hidden.momentum", "nesterov=true needs beta > 0"]),
    ("vote-needs-sign", _group(uplink={"kind": "topk", "k": 0.1}, aggregator={"kind": "majority_vote"}),
     ["groups.hidden", "majority_vote", "sign_bits", "'topk'"]),
    ("ef21-needs-contractive", _group(uplink={"kind": "sign"}, aggregator={"kind": "ef21"}),
     ["groups.hidden", "ef21", "contractive", "scale: mean"]),
    ("mean-cannot-sum-topk", _group(uplink={"kind": "topk", "k": 0.1}, aggregator={"kind": "mean", "transport": "allreduce"}),
     ["groups.hidden", "'allreduce'", "do not sum", "allgather"]),
    ("lmo-null-but-at-server", _group(lmo=None, lmo_at="server"), ["groups.hidden", "lmo is null but lmo_at is 'server'"]),
    ("lmo-at-none-with-lmo", _group(lmo_at="none"), ["groups.hidden", "lmo_at is 'none' but lmo is 'spectral'"]),
    ("gluon-needs-server", _group(lmo_at="worker", lr_rule={"kind": "gluon"}), ["groups.hidden", "'gluon'", "lmo_at: server", "'worker'"]),
    ("ef21p-as-uplink", _group(uplink={"kind": "ef21p"}, aggregator={"kind": "mean"}), ["groups.hidden", "downlink-only"]),
    ("duplicate-group-names", {"groups": [{"name": "a"}, {"name": "a"}]}, ["groups", "'a' is used twice"]),
    ("bad-ndim", _group(params={"ndim": [2, 12]}), ["groups.hidden.params.ndim.1", "12", "less than or equal to 8"]),
    ("empty-names", _group(params={"names": []}), ["groups.hidden.params.names", "at least 1 item"]),
    ("fallback-unknown", {"groups": [{"name": "a"}], "fallback": {"optimizer": "AdamWW"}},
     ["fallback.optimizer", "'AdamWW'", "not a torch.optim optimizer", "did you mean 'AdamW'", "allowed:"]),
    ("fallback-bad-option", {"groups": [{"name": "a"}], "fallback": {"options": {"beta": 0.9}}},
     ["fallback", "torch.optim.AdamW takes no option 'beta'", "did you mean 'betas'", "it takes:"]),
    ("nonfinite-policy", {"groups": [{"name": "a"}], "nonfinite": "ignore"}, ["nonfinite", "'ignore'", "'raise' or 'skip'"]),
    ("override-unknown-group", {"preset": "signmuon", "groups": {"hiden": {"lr": 0.1}}},
     ["groups.hiden", "no group 'hiden'", "did you mean 'hidden'"]),
    ("groups-mapping-without-preset", {"groups": {"hidden": {"lr": 0.1}}}, ["only override a preset's groups"]),
    ("negative-seed", {"groups": [{"name": "a"}], "seed": -1}, ["seed", "-1", "greater than or equal to 0"]),
]


@pytest.mark.parametrize("config,fragments", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_field_value_and_allowed(config, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(config)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from:\n{message}"


def test_every_bad_config_has_its_own_message():
    messages = set()
    for _, config, _ in BAD_CONFIGS:
        with pytest.raises(ConfigError) as info:
            load_config(config)
        messages.add(str(info.value))
    assert len(messages) == len(BAD_CONFIGS) >= 15


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups: [unclosed")
    with pytest.raises(ConfigError, match="not valid yaml"):
        load_config(bad)
    wrong = tmp_path / "c.ini"
    wrong.write_text("x")
    with pytest.raises(ConfigError, match="unknown extension '.ini'"):
        load_config(wrong)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / 'x.json'))
    with pytest.raises(ConfigError, match="neither a config file nor a preset"):
        load_config("no-such-thing")


@pytest.mark.parametrize("path", ["examples/torch_muon.yaml", "examples/signmuon.toml", "examples/ef21muon_rankk.json",
                                  "examples/scion_layerwise.yaml"])
def test_example_files_load(path):
    cfg = load_config(ROOT / path)
    assert cfg.groups


def test_the_same_config_in_three_formats_is_equal(tmp_path):
    import tomllib  # noqa: F401 - python >= 3.11 in CI

    import yaml

    raw = {"preset": "muonsign", "groups": {"hidden": {"lr": 0.005}}, "seed": 3}
    (tmp_path / "c.json").write_text(json.dumps(raw))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "c.toml").write_text('preset = "muonsign"\nseed = 3\n[groups.hidden]\nlr = 0.005\n')
    loaded = [load_config(tmp_path / f"c.{ext}") for ext in ("json", "yaml", "toml")]
    assert loaded[0] == loaded[1] == loaded[2] == load_config(raw)
    assert loaded[0].groups[0].lr == 0.005 and loaded[0].groups[0].downlink.kind == "sign"


def test_preset_override_replaces_plugin_of_another_kind():
    cfg = load_config({"preset": "ef21muon", "groups": {"hidden": {"uplink": {"kind": "natural"}}}})
    assert cfg.groups[0].uplink.kind == "natural"
    assert cfg.groups[0].aggregator.kind == "ef21"
    same_kind = load_config({"preset": "ef21muon", "groups": {"hidden": {"uplink": {"k": 0.1}}}})
    assert same_kind.groups[0].uplink.kind == "topk" and same_kind.groups[0].uplink.k == 0.1


def test_every_preset_loads_and_round_trips():
    for name in commlmo.PRESETS:
        cfg = load_config(name)
        assert cfg.preset == name
        assert load_config(cfg.model_dump(mode="json")) == cfg


def test_validate_cli(capsys):
    assert cli(["validate", str(ROOT / "examples/torch_muon.yaml")]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "kind: spectral" in out and "weight_decay: 0.1" in out
    assert cli(["validate", "signmuonn"]) == 2
    assert "did you mean 'signmuon'" in capsys.readouterr().err


def test_schema_cli_lists_every_installed_plugin(capsys):
    assert cli(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    text = json.dumps(schema)
    for kind in ("spectral", "colnorm", "topk", "natural", "majority_vote", "ef21", "unit_gain", "gluon"):
        assert f'"{kind}"' in text
    assert "GroupConfig" in text
