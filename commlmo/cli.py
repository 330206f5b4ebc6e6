"""The ``commlmo`` command line.

    commlmo plugins [--check]        every plugin family, name, distribution (and summary)
    commlmo presets                  the paper methods and their rows
    commlmo schema                   JSON schema of a full config, from the installed plugins
    commlmo validate CONFIG          check a config and print it resolved
    commlmo train CONFIG [--nproc N] train a task (see commlmo.train)
    commlmo compare CONFIG... [--nproc N]   several runs side by side
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence

from . import registry
from .errors import CommlmoError

__all__ = ["main"]


def _cmd_plugins(args: argparse.Namespace) -> int:
    """List plugins from entry-point metadata; no third-party module is imported into this process.

    Built-ins show their summary; a third-party plugin shows ``not imported``
    unless ``--check`` probes its distribution in a subprocess (with the import
    timeout of :mod:`commlmo.registry`), which gives its summary or BROKEN.
    """
    rows = []
    for row in registry.listing(args.family, check=args.check):
        info = row.info
        if row.status == "broken":
            summary = f"BROKEN: {row.error}"
        elif row.status == "not imported":
            summary = f"(third-party, not imported: {info.target}; --check imports it in a subprocess)"
        else:
            summary = row.summary
        if row.note:
            summary = f"[{row.note}] {summary}"
        rows.append((info.family, info.name, f"{info.distribution} {info.version}".strip(), summary, row))
    if args.json:
        print(json.dumps([
            {"family": r[0], "name": r[1], "distribution": r[2], "summary": r[3], "kind": r[4].info.kind,
             "version": r[4].info.version, "target": r[4].info.target, "status": r[4].status,
             "error": r[4].error or None, "note": r[4].note or None}
            for r in rows], indent=2))
        return 0
    widths = [max(len(r[i]) for r in rows + [("family", "name", "distribution", "")]) for i in range(3)]
    print(f"{'family':<{widths[0]}}  {'name':<{widths[1]}}  {'distribution':<{widths[2]}}  summary")
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from .presets import PRESETS

    def show(c):
        return "-" if c is None else c["kind"] + ("" if len(c) == 1 else "(" + ", ".join(f"{k}={v}" for k, v in c.items() if k != "kind") + ")")

    head = ("preset", "lmo", "lmo_at", "uplink", "aggregator", "downlink", "summary")
    rows = [(n, show(p.lmo), p.lmo_at, show(p.uplink), show(p.aggregator), show(p.downlink), p.summary)
            for n, p in PRESETS.items()]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(6)]
    for r in [head, *rows]:
        print("  ".join(f"{str(c):<{w}}" for c, w in zip(r[:6], widths)) + "  " + r[6])
    # the row is the hidden (matrix) group; every preset is a complete recipe for the other roles
    from .config import describe_group, load_config

    print("\nWhat each preset does with the other parameters (roles read from the module tree;"
          " `elementwise: adamw|lion|onebit_adam|signum|scion` picks another recipe):")
    recipes: dict[str, list[str]] = {}
    for n in PRESETS:
        cfg = load_config(n)
        recipes.setdefault(cfg.elementwise or "-", []).append(n)
    for recipe, names in recipes.items():
        cfg = load_config(names[0])
        by_name = {g.name: g for g in cfg.all_groups()}
        print(f"\n  elementwise: {recipe}  ({', '.join(names)})")
        for role, group in cfg.recipe().items():
            if role != "hidden":
                print(f"    {role:<9} -> {group:<9} {describe_group(by_name[group])}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from .config import config_json_schema

    # Third-party plugins are probed in subprocesses first (registry.plugins), so one that
    # exits or hangs at import is skipped and reported here instead of taking the command down.
    for info, _, err in registry.plugins():
        if err is not None:
            print(f"commlmo schema: skipped a broken plugin ({info.distribution} {info.version}): {err}",
                  file=sys.stderr)
    print(json.dumps(config_json_schema(), indent=2))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config)
    print(f"# {args.config}: valid")
    print("# what happens to each kind of parameter (roles read from the module tree):")
    for line in cfg.describe_recipe().splitlines():
        print(f"#   {line}")
    print(cfg.describe(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="commlmo", description="Communication-efficient distributed LMO optimizers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugins")
    p.add_argument("--family", choices=sorted(registry.FAMILIES), help="only this family")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--check", action="store_true",
                   help="import each third-party plugin in a subprocess (with a timeout) to show its "
                        "summary or why it is broken")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("presets", help="list the preset methods")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("schema", help="print the JSON schema of a config")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("validate", help="validate a config file (or preset) and print it resolved")
    p.add_argument("config", help="a .yaml/.yml/.toml/.json file or a preset name")
    p.set_defaults(func=_cmd_validate)

    from .train import add_cli  # the training harness registers train/compare

    add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a commlmo error prints ``commlmo CMD: error: ...`` and returns 2.

    SIGINT (Ctrl-C) and SIGTERM end a command with one line and ``128 + signal``
    (130, 143), after every worker it started has stopped.
    """
    from .launch import Interrupted, stop_on_signals

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with stop_on_signals():
            return int(args.func(args) or 0)
    except CommlmoError as exc:
        print(f"commlmo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        hint = getattr(exc, "hint", None)
        print(f"\ncommlmo {args.command}: interrupted by {signal.Signals(signum).name}; every worker stopped"
              + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 128 + int(signum)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
