r"""Generate the reference parts of the documentation site from the code they document.

The site's hook ``docs/hooks/generated.py`` runs this script when ``mkdocs build``
(or ``mkdocs serve``) starts, into a temporary directory that it puts first in
pymdownx.snippets' ``base_path``; nothing generated is ever written under ``docs/``
or committed.  To look at the fragments themselves:

    python scripts/gen_docs.py [DIR]   # writes them to DIR (default: build/docs-fragments)

The hand-written pages under ``docs/`` include them with ``--8<-- "name.md"``
(``check_paths`` on, so a fragment that is not generated fails the build).
Every table comes from the code:

* plugin pages: each built-in plugin's docstring, its declared capabilities, the
  contract its methods report on an example tensor (bits per entry, alpha, omega)
  and its config fields, from the plugin's own pydantic ``Config``;
* presets: the rows of ``commlmo.presets.PRESETS`` and each one resolved by
  ``commlmo.load_config``;
* config reference: ``commlmo.config_json_schema()``, and the run config of
  ``commlmo train`` from its pydantic models;
* CLI reference: ``commlmo.cli.build_parser()``, the table of commands included;
* the ``commlmo plugins`` output with the example distributions under ``plugins/``
  really installed (``pip install --target``, into a temporary directory).

Whole pages are generated too (:func:`pages`): one API page per module of
``API_MODULES``, and a placeholder for each benchmark in ``BENCHMARKS`` whose
table has not been recorded under ``docs/benchmarks/`` yet, so the nav never
points at nothing.

A plugin (or anything else) that fails to load is shown as unavailable, with
its error, and listed in the build log; the build goes on.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:  # for docs_markdown, when the docs hook imports this file
    sys.path.insert(0, str(ROOT / "scripts"))

from docs_markdown import (  # noqa: E402
    cell, code, docstring_parts, field_comments, fields_table, flow, fmt_number, rst_to_markdown, table,
)

#: the example every compressor's contract is measured on
EXAMPLE_SHAPE = (1024, 1024)
#: the config a plugin is shown with when its Config has required fields
EXAMPLE_CONFIGS: dict[str, dict[str, Any]] = {
    "chain": {"kind": "chain", "stages": [{"kind": "topk", "k": 0.05}, {"kind": "natural"}]},
}
#: family -> (page under docs/, key a config names it by)
FAMILIES: dict[str, tuple[str, str]] = {
    "lmo": ("plugins/lmos.md", "lmo"),
    "lr_rule": ("plugins/lr_rules.md", "lr_rule"),
    "compressor": ("plugins/compressors.md", "uplink"),
    "aggregator": ("plugins/aggregators.md", "aggregator"),
    "rule": ("plugins/rules.md", "rule"),
}


@dataclass(frozen=True)
class Benchmark:
    page: str  # under docs/benchmarks/, written by the script
    title: str
    script: str  # bench/<script>.py or .sh
    measures: str


BENCHMARKS = [
    Benchmark("lmo.md", "Spectral LMO", "lmo",
              "Newton–Schulz time against torch.optim.Muon's; accuracy of jordan, polar_express and svd"),
    Benchmark("step.md", "Step time against torch.optim.Muon", "step",
              "one process configured as torch.optim.Muon, ratio of step times in one interleaved loop"),
    Benchmark("compressors.md", "Compressors", "compressors",
              "compress and decompress time on 16 M float32 entries, as ratios to one read or one axpy"),
    Benchmark("comm.md", "Bytes on the wire", "comm",
              "bytes and time per step of every preset on gloo workers, against a float32 all-reduce"),
    Benchmark("bandwidth.md", "Limited bandwidth", "bandwidth",
              "wall-clock time to a target loss with the loopback shaped to 100 Mbit/s and 1 Gbit/s"),
    Benchmark("mnist1d.md", "MNIST-1D", "mnist1d",
              "accuracy and bytes of signmuon, muon and signsgd on MNIST-1D with 4 workers, with plots"),
    Benchmark("lm_bytes.md", "Bytes on real language models", "lm_bytes",
              "bytes per step of every preset with every parameter routed, GPT-2-small shapes and the gpt task"),
    Benchmark("scale.md", "Scaling with ranks", "scale",
              "bytes per rank and step time of every preset on 2-16 gloo ranks, checked against the cost model "
              "and projected to 1024 ranks at 100 Gbit/s and 1 Gbit/s"),
    Benchmark("lm.md", "LM quality", "lm_quality",
              "eval loss and bytes of all-compressed signmuon against the DDP recipe on the gpt task, three seeds"),
    Benchmark("byzantine.md", "Byzantine workers", "byzantine",
              "final loss of vote and mean methods when 2 of 5 workers send flipped, random or zero messages"),
]

problems: list[str] = []  # what could not be generated, reported at the end


def _problem(what: str, exc: BaseException | str) -> str:
    msg = f"{what}: {exc if isinstance(exc, str) else f'{type(exc).__name__}: {exc}'}"
    problems.append(msg)
    return msg


# --------------------------------------------------------------------------- plugin pages


def _capabilities(obj: Any) -> str:
    """One sentence from the plugin's capabilities dataclass: what holds, then what does not."""
    caps = getattr(obj, "capabilities", None)
    if caps is None or not is_dataclass(caps):
        return ""
    values = {f.name: getattr(caps, f.name) for f in fields(caps)}
    values = {k: ", ".join(v) if isinstance(v, tuple) else v for k, v in values.items() if v != ()}
    yes = [f"`{k}`" if v is True else f"`{k}: {code(v).strip('`')}`" for k, v in values.items() if v is not False]
    no = [f"`{k}`" for k, v in values.items() if v is False]
    return f"Declared capabilities: {', '.join(yes) or 'none'}" + (f"; not {', '.join(no)}" if no else "") + ".\n\n"


def _example_plugin(name: str, cls: type) -> tuple[Any, str]:
    """An instance with the default config, else with ``EXAMPLE_CONFIGS[name]``."""
    try:
        return cls(), ""
    except Exception as exc:  # required fields: try the documented example
        if name not in EXAMPLE_CONFIGS:
            raise
        first = exc
    try:
        return cls(cls.Config.model_validate(EXAMPLE_CONFIGS[name])), f" with `{flow(EXAMPLE_CONFIGS[name])}`"
    except Exception:
        raise first from None


def _lmo_contract(inst: Any) -> str:
    import torch

    shape = (64, 32) if inst.capabilities.accepts(2) else (64,)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    d = inst.direction(g, generator=torch.Generator().manual_seed(1))
    inner = float((g * d).sum())
    dual = float(inst.dual_norm(g))
    what = "64×32 Gaussian matrix" if len(shape) == 2 else "Gaussian vector of 64 entries"
    return (f"On a {what} `G`, default config: "
            f"‖direction(G)‖ = {float(inst.norm(d)):.4f}, ⟨G, direction(G)⟩ / ‖G‖\\* = {inner / dual:.4f}.\n")


def _compressor_contract(inst: Any, how: str) -> str:
    import torch

    x = torch.randn(EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(0))
    shape, n = torch.Size(EXAMPLE_SHAPE), math.prod(EXAMPLE_SHAPE)
    payload = inst.compress(x, generator=torch.Generator().manual_seed(1))
    y = inst.decompress(payload)
    measured = 8 * payload.nbytes / n

    def declared(method: str, *args: Any) -> str:
        try:
            return fmt_number(getattr(inst, method)(*args))
        except NotImplementedError:
            return "not declared"

    err = float((y.float() - x).pow(2).sum() / x.pow(2).sum())
    rows = [
        ["bits per entry, measured from `payload.wire`", fmt_number(measured)],
        ["bits per entry, declared (`bits_per_entry`)", declared("bits_per_entry", shape, torch.float32)],
        ["α, declared (`alpha`)", declared("alpha", shape)],
        ["ω, declared (`omega`)", declared("omega", shape)],
        ["‖C(x) − x‖² / ‖x‖² on this example", fmt_number(err)],
        ["wire tensors", ", ".join(f"`{w.dtype}` {tuple(w.shape)}".replace("torch.", "") for w in payload.wire)],
    ]
    size = "×".join(map(str, EXAMPLE_SHAPE))
    return f"Measured on a {size} float32 Gaussian `x`{how}:\n\n" + table(["", "value"], rows)


def _lr_rule_contract(inst: Any) -> str:
    from commlmo import registry

    if getattr(inst, "needs_dual_norm", False):
        return "Reads the dual norm ‖G‖\\* of the aggregate, so it needs `lmo_at: server`; no fixed table of scales.\n"
    lmos = {}
    for kind in ("spectral", "sign"):
        try:
            lmos[kind] = registry.build_plugin("lmo", kind)
        except Exception:
            lmos[kind] = None
    rows = []
    for shape in [(1024, 256), (256, 1024), (64, 32, 3, 3), (512,)]:
        row = ["×".join(map(str, shape))]
        for kind, family in (("spectral", "lmo"), ("sign", "sign")):
            try:
                row.append(fmt_number(inst.scale(shape, lmo=lmos[kind], step_family=family)))
            except Exception:
                row.append("—")
        rows.append(row)
    return "`scale` for some shapes (— : the rule refuses the shape):\n\n" + table(
        ["shape", "with `spectral` (LMO step)", "with `sign` (±1 step)"], rows)


def plugin_section(family: str, info: Any, cls: type | None, err: str | None) -> str:
    page, key = FAMILIES[family]
    head = f"### `{info.name}` {{ #{info.name} }}\n\n"
    where = f"`{info.target}` · entry point group `{info.entry_point.group if info.entry_point else '?'}`"
    if cls is None:
        return head + f"!!! failure \"Unavailable in this build\"\n    {cell(err)}\n\n{where}\n\n"
    summary, rest = docstring_parts(cls)
    out = [head, f"**{summary or 'No docstring.'}**\n\n", where + "\n\n"]
    if rest:
        out.append(rest + "\n\n")
    try:
        inst, how = _example_plugin(info.name, cls)
        default = inst.config.model_dump(mode="json")
        if family == "compressor" and inst.capabilities.downlink_only:
            key = "downlink"
        out.append(f"In a config: `{key}: {flow({'kind': info.name})}`; with every default: "
                   f"`{key}: {flow(default)}`.\n\n" if not how
                   else f"In a config, e.g.: `{key}: {flow(EXAMPLE_CONFIGS[info.name])}`.\n\n")
        out.append("**Config fields**\n\n" + fields_table(cls.Config) + "\n")
        caps = _capabilities(inst)
        contract = {"lmo": lambda: _lmo_contract(inst), "compressor": lambda: _compressor_contract(inst, how),
                    "lr_rule": lambda: _lr_rule_contract(inst)}.get(family)
        out.append("**Contract**\n\n")
        out.append(caps)
        if contract is not None:
            try:
                out.append(contract() + "\n")
            except Exception as exc:
                out.append(f"Could not measure the contract: {cell(_problem(f'{family} {info.name} contract', exc))}\n\n")
    except Exception as exc:
        out.append(f"Could not build it with its default config: {cell(_problem(f'{family} {info.name}', exc))}\n\n")
    return "".join(out)


def builtin_plugins(family: str) -> list[tuple[Any, type | None, str | None]]:
    """The plugins commlmo's own distribution registers in ``family`` (third parties excluded)."""
    from commlmo import registry

    found = [p for p in registry.plugins(family) if p[0].distribution == "commlmo"]
    for info, _, err in found:
        if err:
            _problem(f"{family} {info.name}", err)
    return found


def gen_plugins(out: Path) -> None:
    from commlmo import registry

    rows = []
    for family in FAMILIES:
        plugins = builtin_plugins(family)
        text = "".join(plugin_section(family, *p) for p in plugins)
        (out / f"plugins/{family}.md").write_text(text)
        page = FAMILIES[family][0].removeprefix("plugins/")
        for info, cls, err in plugins:
            summary = docstring_parts(cls)[0] if cls is not None else "unavailable: " + (err or "")
            rows.append([family, f"[`{info.name}`]({page}#{info.name})", summary])
    (out / "plugins/all.md").write_text(table(["family", "name", "summary"], rows))
    (out / "plugins/compatibility.md").write_text(compatibility(registry))


def _refusal(cls: type, uplink: Any) -> str | None:
    """What ``cls.check_uplink`` says of ``uplink``, for the aggregator's default config.

    ``check_uplink(config, uplink_kind, capabilities)`` is a classmethod over declared
    capabilities (what config validation calls); the older form, ``check_uplink(uplink)``,
    is an instance method that takes the compressor."""
    params = inspect.signature(cls.check_uplink).parameters
    if len(params) >= 3:
        return cls.check_uplink(cls.Config(), uplink.kind, uplink.capabilities)
    return cls().check_uplink(uplink)


def compatibility(registry: Any) -> str:
    """Which uplink compressor each built-in aggregator accepts (``Aggregator.check_uplink``)."""
    uplinks = ["identity", "sign", {"kind": "sign", "scale": "mean"}, "topk", "randk", "rankk", "natural", "chain"]
    aggs = [(info.name, cls) for info, cls, _ in builtin_plugins("aggregator") if cls is not None]
    rows, reasons = [], {}  # aggregator -> the first refusal, as an example
    for u in uplinks:
        cfg = EXAMPLE_CONFIGS.get(u, {"kind": u}) if isinstance(u, str) else u
        try:
            comp = registry.build_plugin("compressor", cfg)
        except Exception as exc:
            rows.append([f"`{flow(cfg)}`"] + ["unavailable"] * len(aggs))
            _problem(f"compressor {flow(cfg)} for the compatibility table", exc)
            continue
        row = [f"`{flow(cfg)}`"]
        for name, cls in aggs:
            try:
                why = _refusal(cls, comp)
            except Exception as exc:
                row.append("?")
                _problem(f"aggregator {name} check_uplink({flow(cfg)})", exc)
                continue
            row.append("✓" if why is None else "✗")
            if why:
                reasons.setdefault(name, why)
        rows.append(row)
    text = table(["uplink"] + [f"`{n}`" for n, _ in aggs], rows)
    if reasons:
        text += "\nWhy not, in the words of the check that refuses such a config when it loads:\n\n"
        text += "".join(f"* `{name}`, for example: {cell(why)}\n" for name, why in reasons.items())
    return text


# --------------------------------------------------------------------------- presets


def _show(cfg: dict[str, Any] | None) -> str:
    """A preset's plugin as the table shows it: ``sign`` (scale: mean)."""
    if cfg is None:
        return "—"
    rest = ", ".join(f"{k}: {flow(v) if isinstance(v, dict) else v}" for k, v in cfg.items() if k != "kind")
    return f"`{cfg['kind']}`" + (f" ({rest})" if rest else "")


def gen_presets(out: Path) -> None:
    import torch

    from commlmo import load_config, registry
    from commlmo.presets import PRESETS

    rows = []
    for name, p in PRESETS.items():
        try:
            uplink = registry.build_plugin("compressor", p.uplink)
            bits = fmt_number(uplink.bits_per_entry(torch.Size(EXAMPLE_SHAPE), torch.float32))
        except Exception:
            bits = "—"
        rows.append([f"[`{name}`](#{name})", _show(p.lmo), f"`{p.lmo_at}`", _show(p.uplink), _show(p.aggregator),
                     _show(p.downlink), _show(p.lr_rule), p.lr, bits, f"`{p.elementwise}`", p.summary])
    head = ["preset", "LMO", "lmo_at", "uplink", "aggregator", "downlink", "lr rule", "lr",
            "uplink bits / entry", "elementwise", "summary"]
    (out / "presets/table.md").write_text(table(head, rows))
    from commlmo.config import describe_group
    from commlmo.presets import ELEMENTWISE

    recipe_rows = []
    for recipe in ELEMENTWISE:
        users = [n for n, p in PRESETS.items() if p.elementwise == recipe]
        cfg = load_config({"preset": users[0] if users else "signmuon", "elementwise": recipe})
        by_name = {g.name: g for g in cfg.all_groups()}
        for role, group in cfg.recipe().items():
            if role != "hidden":
                recipe_rows.append([f"`{recipe}`", ", ".join(f"`{u}`" for u in users) or "—", f"`{role}`",
                                    f"`{group}`", cell(describe_group(by_name[group]))])
    (out / "presets/recipes.md").write_text(
        table(["elementwise", "default of", "role", "group", "stages"], recipe_rows))
    for name in PRESETS:
        try:
            body = f"```yaml\n# load_config({name!r}).describe()\n{load_config(name).describe()}```\n"
        except Exception as exc:
            body = f"Cannot be resolved in this build: {cell(_problem(f'preset {name}', exc))}\n"
        text = f'??? example "`{name}` resolved: every field of the config it stands for"\n\n'
        text += "".join(f"    {line}\n" if line else "\n" for line in body.splitlines())
        (out / f"presets/{name}.md").write_text(text)


# --------------------------------------------------------------------------- config reference

#: descriptions of the core config fields that carry none in the code (checked against it below)
#: extra notes for core config fields beyond their ``Field(description=...)`` (none needed today)
CORE_NOTES: dict[str, dict[str, str]] = {}
CORE_PATHS = {"OptimizerConfig": "top level", "GroupConfig": "`groups[]`", "ParamMatch": "`groups[].params`",
              "MomentumConfig": "`groups[].momentum`", "FallbackConfig": "`fallback`"}


def core_notes_problems() -> list[str]:
    """Notes for fields that no longer exist, and core fields with no description anywhere."""
    from commlmo import config

    out = []
    for model_name, notes in CORE_NOTES.items():
        model = getattr(config, model_name)
        schema = model.model_json_schema()
        described = set(notes) | set(field_comments(model))
        for f in model.model_fields:
            if f not in described and not schema["properties"].get(f, {}).get("description"):
                out.append(f"{model_name}.{f} has no description (add Field(description=...) or a note in CORE_NOTES)")
        out += [f"CORE_NOTES has {model_name}.{f}, which is not a field" for f in notes if f not in model.model_fields]
    return out


def gen_config_reference(out: Path) -> None:
    from commlmo import config

    try:
        schema = config.config_json_schema()
    except Exception as exc:
        msg = _problem("config_json_schema()", exc)
        (out / "config/reference.md").write_text(f"!!! failure \"The schema cannot be built\"\n    {cell(msg)}\n")
        (out / "config/schema.md").write_text("")
        return
    for p in core_notes_problems():
        _problem("config reference", p)
    defs = schema.get("$defs", {})
    links = {name: f"#{name.lower()}" for name in CORE_PATHS}
    families = {"lmo": "lmo", "uplink": "compressor", "downlink": "compressor", "aggregator": "aggregator",
                "lr_rule": "lr_rule"}
    kind_urls = {field: f"../{FAMILIES[fam][0]}#" for field, fam in families.items()}
    parts = []
    for name, path in CORE_PATHS.items():
        model = getattr(config, name)
        sub = schema if name == "OptimizerConfig" else defs.get(name, model.model_json_schema())
        text = fields_table(model, schema=sub, notes=CORE_NOTES.get(name), links=links, kind_urls=kind_urls, skip=())
        parts.append(model_section(name, name.lower(), path, model, text))
    (out / "config/reference.md").write_text("".join(parts))
    body = json.dumps(schema, indent=2)
    (out / "config/schema.md").write_text(
        '??? example "The full JSON schema (`commlmo schema`)"\n\n    ```json\n'
        + "".join(f"    {line}\n" for line in body.splitlines()) + "    ```\n")


def model_section(title: str, anchor: str, path: str, model: type, fields_md: str) -> str:
    doc = " ".join(inspect.cleandoc(model.__dict__.get("__doc__") or "").split())
    return f"## {title} {{ #{anchor} }}\n\nAt {path}. {rst_to_markdown(doc)}\n\n{fields_md}\n"


def gen_run_config(out: Path) -> None:
    """The run config of ``commlmo train``: its sections and every task kind."""
    try:
        from commlmo import runconfig, tasks

        links = {"TrainConfig": "#trainconfig", "ScheduleConfig": "#scheduleconfig",
                 "AdversaryConfig": "#adversaryconfig", "FaultConfig": "#faultconfig"}
        parts = [
            model_section("RunConfig", "runconfig", "top level of a run config", runconfig.RunConfig,
                          fields_table(runconfig.RunConfig, links=links, kind_urls={"task": "#task-"}, skip=())),
            model_section("TrainConfig", "trainconfig", "`train`", runconfig.TrainConfig,
                          fields_table(runconfig.TrainConfig, links=links)),
            model_section("ScheduleConfig", "scheduleconfig", "`train.schedule`", runconfig.ScheduleConfig,
                          fields_table(runconfig.ScheduleConfig, skip=())),
            model_section("AdversaryConfig", "adversaryconfig", "`train.adversaries`", runconfig.AdversaryConfig,
                          fields_table(runconfig.AdversaryConfig, skip=())),
            model_section("FaultConfig", "faultconfig", "`train.fault`", runconfig.FaultConfig,
                          fields_table(runconfig.FaultConfig, skip=())),
        ]
        for kind, module in tasks.KINDS.items():
            parts.append(model_section(f"Task `{kind}`", f"task-{kind}", f"`task` with `kind: {kind}`",
                                       module.Config, fields_table(module.Config)))
        text = "".join(parts)
    except Exception as exc:
        text = f"!!! failure \"The run config cannot be documented in this build\"\n    {cell(_problem('run config', exc))}\n"
    (out / "config/run.md").write_text(text)


# --------------------------------------------------------------------------- CLI reference

#: command -> where the site says more about it (links from docs/reference/cli.md)
CLI_SEE_ALSO = {
    "plugins": "[Plugins](../plugins/index.md)",
    "presets": "[Presets](../presets.md)",
    "schema": "[Config reference](config.md)",
    "train": "[Training](../training.md), [run config](config.md#the-run-config-of-commlmo-train)",
    "compare": "[Training](../training.md)",
}


def gen_cli(out: Path) -> None:
    os.environ["COLUMNS"] = "100"  # argparse wraps help text at the terminal's width
    try:
        from commlmo.cli import build_parser

        parser = build_parser()
    except Exception as exc:
        (out / "cli.md").write_text(f"!!! failure \"The CLI cannot be built\"\n    {cell(_problem('cli', exc))}\n")
        (out / "cli-commands.md").write_text("")
        return
    parts = [f"## `commlmo` {{ #commlmo }}\n\n```text\n$ commlmo --help\n{parser.format_help()}```\n\n"]
    commands: list[list[str]] = []  # the rows of the table of commands
    named: list[list[str]] = []  # each command's words after "commlmo"

    def walk(p: argparse.ArgumentParser, words: list[str]) -> None:
        for action in p._actions:
            if not isinstance(action, argparse._SubParsersAction):
                continue
            helps = {a.dest: a.help for a in action._get_subactions()}
            for name, sub in action.choices.items():
                cmd = words + [name]
                anchor = "-".join(cmd)
                what = helps.get(name) or ""
                what = what[:1].upper() + what[1:]  # not str.capitalize(), which lowers "JSON" and "N"
                parts.append(f"## `{' '.join(cmd)}` {{ #{anchor} }}\n\n{what}.\n\n"
                             f"```text\n$ {' '.join(cmd)} --help\n{sub.format_help()}```\n\n")
                see = CLI_SEE_ALSO.get(" ".join(cmd[1:]))
                commands.append([f"[`{' '.join(cmd)}`](#{anchor})", what + (f" ({see})" if see else "")])
                named.append(cmd[1:])
                walk(sub, cmd)

    walk(parser, ["commlmo"])
    (out / "cli.md").write_text("".join(parts))
    (out / "cli-commands.md").write_text(table(["command", "what for"], commands))
    for extra in sorted(set(CLI_SEE_ALSO) - {" ".join(c) for c in named}):
        _problem("cli", f"CLI_SEE_ALSO names {extra!r}, which is not a command")


# --------------------------------------------------------------------------- writing a plugin


def gen_plugin_author(out: Path) -> None:
    """``commlmo plugins`` output with the example distributions under plugins/ really installed."""

    def plugins_output(site: str, family: str, keep: str | None = None) -> str:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]))
        res = subprocess.run([sys.executable, "-m", "commlmo", "plugins", "--family", family],
                             check=True, capture_output=True, text=True, env=env, timeout=120)
        lines = res.stdout.splitlines()
        if keep is not None:  # the header and the one line that matters
            lines = lines[:1] + [line for line in lines[1:] if line.split()[1:2] == [keep]]
        return f"```text\n$ commlmo plugins --family {family}\n" + "\n".join(lines) + "\n```\n"

    with tempfile.TemporaryDirectory() as site:
        try:
            for dist in ("commlmo-median", "commlmo-broken-example"):
                subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                                "--target", site, str(ROOT / "plugins" / dist)],
                               check=True, capture_output=True, text=True, timeout=120)
            median = plugins_output(site, "aggregator")
            broken = plugins_output(site, "compressor", keep="broken")
        except (subprocess.SubprocessError, OSError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            median = broken = (f"!!! failure \"Could not install the examples here\"\n"
                               f"    {cell(_problem('plugins/ examples', str(detail)))}\n")
    (out / "author/median-plugins.md").write_text(median)
    (out / "author/broken-plugins.md").write_text(broken)


# --------------------------------------------------------------------------- benchmarks


def bench_command(b: Benchmark) -> str | None:
    """``python bench/x.py`` or ``bash bench/x.sh``, whichever exists, else None."""
    for runner, suffix in (("python", ".py"), ("bash", ".sh")):
        if (ROOT / "bench" / (b.script + suffix)).exists():
            return f"{runner} bench/{b.script}{suffix}"
    return None


def placeholder(b: Benchmark) -> str:
    cmd = bench_command(b)
    how = (f"Run `{cmd}` from the repository root; it writes this page, with the machine it ran on."
           if cmd else f"The script that records it, `bench/{b.script}.*`, has not landed yet.")
    return (f"# {b.title}\n\n!!! note \"Not recorded yet\"\n    This table ({b.measures}) has not been "
            f"recorded in this checkout. {how}\n\n[All benchmarks](index.md)\n")


def gen_benchmarks(out: Path) -> None:
    rows = []
    for b in BENCHMARKS:
        path = ROOT / "docs/benchmarks" / b.page
        text = path.read_text() if path.exists() else ""
        cmd = re.search(r"Command:\s*`([^`]+)`", text)
        date = re.search(r"\b(20\d\d-\d\d-\d\d)\b", text)
        machine = re.search(r"[Mm]achine:\s*([^\n]+)", text)
        if text:
            status = ", ".join(filter(None, [date and date.group(1), machine and cell(machine.group(1))[:80]]))
        else:
            status = "not recorded yet"
        shown = cmd.group(1) if cmd else bench_command(b) or f"bench/{b.script}.* (not landed yet)"
        rows.append([f"[{b.title}]({b.page})", b.measures, f"`{shown}`", status or "recorded"])
    (out / "benchmarks.md").write_text(table(["benchmark", "what it measures", "command", "recorded"], rows))


# --------------------------------------------------------------------------- reliability


def _answer(call: Any) -> tuple[str, str]:
    """``(exception type, message)`` of a bad input's call, as the user sees it today."""
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - every answer is reported
        return type(exc).__name__, str(exc)
    return "—", "accepted (no error)"


def gen_reliability(out: Path) -> None:
    """``reliability/bad_inputs.md``: every bad input of the test tables, run now, with the answer it gets."""
    import importlib.util

    tests = Path(__file__).resolve().parents[1] / "tests"
    sys.path.insert(0, str(tests))
    rows = []
    try:
        for module, table_name, test in (
            ("test_bad_inputs", "BAD", "test_bad_input_gets_a_specific_error"),
            ("test_config", "BAD_CONFIGS", "test_bad_config_names_field_value_and_allowed"),
        ):
            spec = importlib.util.spec_from_file_location(module, tests / f"{module}.py")
            mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(mod)  # type: ignore[union-attr]
            from commlmo import load_config

            for row in getattr(mod, table_name):
                call = row[1] if callable(row[1]) else (lambda cfg=row[1]: load_config(cfg))
                kind, message = _answer(call)
                shown = " / ".join(line.strip() for line in message.splitlines() if line.strip())
                shown = shown if len(shown) <= 260 else shown[:257] + "..."
                rows.append([cell(row[0]), f"`{kind}`", cell(shown), f"`tests/{module}.py::{test}[{row[0]}]`"])
    except Exception as exc:  # the docs still build where the tests cannot run
        _problem("the bad-input table (tests/test_bad_inputs.py, tests/test_config.py)", exc)
    finally:
        sys.path.remove(str(tests))
    (out / "reliability").mkdir(exist_ok=True)
    text = f"{len(rows)} bad inputs, each run while these docs were built:\n\n"
    (out / "reliability/bad_inputs.md").write_text(text + table(["bad input", "error", "what the user reads", "pinned by"], rows))


# --------------------------------------------------------------------------- whole pages

#: modules with a page of their own under reference/api/ (besides ``commlmo``, on reference/api/index.md)
API_MODULES = ["commlmo.plugin", "commlmo.registry", "commlmo.config", "commlmo.comm", "commlmo.transport",
               "commlmo.testing", "commlmo.pipeline", "commlmo.owner", "commlmo.overlap", "commlmo.streams",
               "commlmo.cost", "commlmo.routing", "commlmo.ddp_hooks"]


def api_page(module: str) -> str:
    """``reference/api/<name>.md``: the module's docstring and members, rendered by mkdocstrings."""
    return f"# `{module}`\n\n::: {module}\n    options:\n      show_root_heading: false\n"


def pages() -> dict[str, str]:
    """``{uri: markdown}`` of the pages the build adds where ``docs/`` has none: the API
    pages, and placeholders for the benchmarks (a recorded table replaces its placeholder)."""
    found = {f"reference/api/{m.rsplit('.', 1)[-1]}.md": api_page(m) for m in API_MODULES}
    return found | {f"benchmarks/{b.page}": placeholder(b) for b in BENCHMARKS}


# --------------------------------------------------------------------------- main


def generate(out: Path) -> list[str]:
    """Write every fragment under ``out`` (emptied first); return what could not be generated."""
    problems.clear()
    if out.exists():
        shutil.rmtree(out)
    for sub in ("plugins", "presets", "config", "author"):
        (out / sub).mkdir(parents=True)
    for step in (gen_plugins, gen_presets, gen_config_reference, gen_run_config, gen_cli, gen_plugin_author,
                 gen_benchmarks, gen_reliability):
        step(out)
    return list(problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=ROOT / "build" / "docs-fragments",
                        help="directory to write the fragments to (emptied first)")
    out = parser.parse_args(argv).out.resolve()
    found = generate(out)
    print(f"gen_docs: wrote {sum(1 for _ in out.rglob('*.md'))} fragments to {out}", file=sys.stderr)
    if found:
        print(f"gen_docs: {len(found)} item(s) shown as unavailable:", file=sys.stderr)
        for p in found:
            print(f"  - {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
