"""Plugin registry over ``importlib.metadata`` entry points.

Four families, one entry-point group each (see :data:`commlmo.plugin.FAMILIES`):
``commlmo.lmos``, ``commlmo.compressors``, ``commlmo.aggregators`` and
``commlmo.lr_rules``.  The built-ins register through these same groups from
commlmo's own ``pyproject.toml``; there is no back door.

Discovering is not loading: names and their distributions come from metadata,
and a plugin's module is imported the first time that name is used.  A plugin
that fails to import is reported with its distribution's name and version and
does not affect any other plugin.  Two distributions claiming one name is an
error when that name is used.  :func:`register` adds plugins in-process for
notebooks and tests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from .errors import ConfigError, PluginConflictError, PluginLoadError, PluginNotFoundError
from .plugin import FAMILIES, Aggregator, Compressor, LMO, LRRule, Plugin, PluginConfig

__all__ = [
    "PluginInfo",
    "get",
    "names",
    "plugins",
    "register",
    "unregister",
    "build_plugin",
    "refresh",
]

_BASES: dict[str, type[Plugin]] = {
    "lmo": LMO,
    "compressor": Compressor,
    "aggregator": Aggregator,
    "lr_rule": LRRule,
}
_IN_PROCESS = "<registered in-process>"


@dataclass(frozen=True)
class PluginInfo:
    """One (family, name) as the registry sees it, before or after loading."""

    family: str
    name: str
    distribution: str
    version: str
    target: str  # "module:attr" from the entry point, or the class's qualified name
    entry_point: metadata.EntryPoint | None = None


_lock = threading.RLock()
_discovered: dict[str, dict[str, list[PluginInfo]]] | None = None
_in_process: dict[str, dict[str, type[Plugin]]] = {f: {} for f in FAMILIES}
_loaded: dict[tuple[str, str], type[Plugin]] = {}


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise PluginNotFoundError("plugin family", family, FAMILIES)
    return family


def _discover() -> dict[str, dict[str, list[PluginInfo]]]:
    global _discovered
    with _lock:
        if _discovered is None:
            found: dict[str, dict[str, list[PluginInfo]]] = {f: {} for f in FAMILIES}
            for family, group in FAMILIES.items():
                for ep in metadata.entry_points(group=group):
                    dist = getattr(ep, "dist", None)
                    dist_name = dist.metadata["Name"] if dist is not None else "<unknown distribution>"
                    version = dist.version if dist is not None else "?"
                    info = PluginInfo(family, ep.name, dist_name, version, ep.value, ep)
                    claims = found[family].setdefault(ep.name, [])
                    # One distribution can be visible twice (editable install next to
                    # its source tree's metadata); the same claim twice is no conflict.
                    if not any(c.distribution == info.distribution and c.target == info.target for c in claims):
                        claims.append(info)
            _discovered = found
        return _discovered


def refresh() -> None:
    """Forget discovered entry points and loaded classes (after ``pip install`` in-process)."""
    global _discovered
    with _lock:
        _discovered = None
        _loaded.clear()


def names(family: str) -> list[str]:
    """Every name installed in ``family``, without importing any plugin."""
    _check_family(family)
    return sorted(set(_discover()[family]) | set(_in_process[family]))


def _claims(family: str, name: str) -> list[PluginInfo]:
    return _discover()[family].get(name, [])


def get(family: str, name: str) -> type[Plugin]:
    """The plugin class registered as ``name`` in ``family``, imported on first use."""
    _check_family(family)
    with _lock:
        if name in _in_process[family]:
            return _in_process[family][name]
        if (family, name) in _loaded:
            return _loaded[(family, name)]
        claims = _claims(family, name)
        if not claims:
            raise PluginNotFoundError(family, name, names(family))
        if len(claims) > 1:
            who = "; ".join(f"{c.distribution} {c.version} ({c.target})" for c in claims)
            raise PluginConflictError(
                f"{family} {name!r} is registered by {len(claims)} distributions: {who}. "
                "Uninstall one of them, or register one under another name."
            )
        info = claims[0]
        try:
            cls = info.entry_point.load()  # type: ignore[union-attr]
        except Exception as exc:  # a third party's import error must not take the rest down
            raise PluginLoadError(
                f"{family} plugin {name!r} from distribution {info.distribution} {info.version} "
                f"failed to import ({info.target}): {type(exc).__name__}: {exc}"
            ) from exc
        _validate_class(family, name, cls, info.distribution)
        _loaded[(family, name)] = cls
        return cls


def _validate_class(family: str, name: str, cls: Any, source: str) -> None:
    base = _BASES[family]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginLoadError(
            f"{family} plugin {name!r} from {source} is {cls!r}, not a subclass of "
            f"commlmo.plugin.{base.__name__}"
        )
    cfg = getattr(cls, "Config", None)
    if not (isinstance(cfg, type) and issubclass(cfg, PluginConfig)):
        raise PluginLoadError(f"{family} plugin {name!r} from {source} has no pydantic Config class")
    kind = cfg.model_fields["kind"].default
    if kind != name:
        raise PluginLoadError(
            f"{family} plugin {name!r} from {source}: its Config.kind defaults to {kind!r}; "
            f"it must be the registered name {name!r}"
        )


def register(family: str, cls: type[Plugin] | None = None, *, name: str | None = None, replace: bool = False):
    """Register a plugin class in-process (notebooks, tests).  Usable as a decorator.

    ``name`` defaults to the default of ``cls.Config.kind``.  Registering a name
    that an installed distribution already provides raises unless ``replace``.
    """
    _check_family(family)

    def _do(c: type[Plugin]) -> type[Plugin]:
        n = name or c.Config.model_fields["kind"].default
        _validate_class(family, n, c, _IN_PROCESS)
        with _lock:
            if not replace and (n in _in_process[family] or _claims(family, n)):
                raise PluginConflictError(
                    f"{family} {n!r} is already registered; pass replace=True to shadow it in this process"
                )
            _in_process[family][n] = c
        return c

    return _do(cls) if cls is not None else _do


def unregister(family: str, name: str) -> None:
    """Remove an in-process registration."""
    with _lock:
        _in_process[_check_family(family)].pop(name, None)


def plugins(family: str | None = None) -> Iterator[tuple[PluginInfo, type[Plugin] | None, str | None]]:
    """``(info, class or None, error or None)`` for every plugin, loading each one.

    Used by ``commlmo plugins`` and ``commlmo schema``; a broken plugin yields its
    error and the iteration goes on.
    """
    for fam in [family] if family else list(FAMILIES):
        for n in names(fam):
            if n in _in_process[fam]:
                c = _in_process[fam][n]
                yield PluginInfo(fam, n, _IN_PROCESS, "", f"{c.__module__}:{c.__qualname__}"), c, None
                continue
            claims = _claims(fam, n)
            try:
                yield claims[0], get(fam, n), None
            except (PluginLoadError, PluginConflictError) as exc:
                yield claims[0], None, str(exc)


def build_plugin(family: str, config: Any) -> Plugin:
    """Build one plugin from its config: a ``{"kind": ...}`` mapping, a kind string or a Config.

    >>> topk = build_plugin("compressor", {"kind": "topk", "k": 0.05})
    """
    cfg = validate_plugin_config(family, config)
    return get(family, cfg.kind)(cfg)


def validate_plugin_config(family: str, value: Any) -> PluginConfig:
    """Validate ``value`` against the config class of the plugin it names."""
    if isinstance(value, PluginConfig):
        cls = get(family, value.kind)
        return value if isinstance(value, cls.Config) else cls.Config.model_validate(value.model_dump())
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"a {family} is given as a name or a mapping with 'kind'; got {value!r}")
    if "kind" not in value:
        raise ConfigError(f"a {family} config needs 'kind' (one of: {', '.join(names(family))}); got {dict(value)!r}")
    cls = get(family, value["kind"])
    return cls.Config.model_validate(dict(value))
