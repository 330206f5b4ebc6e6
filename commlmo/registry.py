r"""Plugin registry over ``importlib.metadata`` entry points.

Four families, one entry-point group each (see :data:`commlmo.plugin.FAMILIES`):
``commlmo.lmos``, ``commlmo.compressors``, ``commlmo.aggregators`` and
``commlmo.lr_rules``.  The built-ins register through these same groups from
commlmo's own ``pyproject.toml``; there is no back door.  :func:`register` adds
plugins in-process for notebooks and tests.

Discovering is not loading
--------------------------
Names, distributions and versions come from metadata (:func:`names`,
:func:`plugins` with ``load=False``, :func:`listing`, ``commlmo plugins``) and
import no third-party module.  ``commlmo plugins`` shows summaries only for
plugins that are safe to import: the built-ins (distribution ``commlmo``, whose
modules are commlmo's own) and in-process registrations; a third-party plugin is
listed as *not imported* unless ``commlmo plugins --check`` probes it (below).

A third-party module is imported in two ways:

* **in-process** by :func:`get` (and :func:`build_plugin` and
  :func:`validate_plugin_config`), the first time a config names it.  Whatever
  its import raises -- an ``ImportError``, ``SystemExit`` from a ``sys.exit()``
  at import, any other ``BaseException`` except ``KeyboardInterrupt`` -- becomes a
  :class:`~commlmo.errors.PluginLoadError` naming the distribution and version;
  the process and every other plugin carry on.  There is no timeout on this
  path: the config asked for exactly this plugin (Ctrl-C interrupts a hang);
* **probed first** by :func:`plugins` with ``load=True`` (``commlmo schema``,
  which needs every plugin's ``Config``) and :func:`listing` with ``check=True``
  (``commlmo plugins --check``).  Each third-party distribution is imported in a
  child process (``python -c``; all distributions concurrently; the verdicts are
  cached for the life of this process and dropped by :func:`refresh`).  The
  child imports commlmo, then each entry point of the distribution in turn,
  checks its class and reports back on a private pipe.  Each entry point must
  finish importing within ``COMMLMO_PLUGIN_IMPORT_TIMEOUT`` seconds (default
  20; counted after the child has imported commlmo and torch, so a slow machine
  does not make a healthy plugin look hung).  An entry point that raised, hung
  past the timeout (the child's process group is killed) or ended the child
  (``os._exit``, a crash) is reported broken, with its distribution, and is never
  imported into this process; the distribution's other entry points are probed
  again in a fresh child.  Only plugins whose probe succeeded are then imported
  in-process (still guarded as above), and :func:`get` refuses, with the probe's
  verdict, a plugin the probe found broken.  Should the child itself fail to
  start or import commlmo (a frozen executable, no usable ``sys.executable``),
  plugins are imported in-process as by :func:`get`.

Choosing among distributions: qualified kinds
---------------------------------------------
A kind is a registered name (``"mean"``) or a name qualified by the distribution
that ships it, ``"<distribution>:<name>"``: ``"commlmo:mean"`` is the built-in,
``"commlmo-median:mean"`` the one from ``commlmo-median``.  The distribution is
matched normalised (PEP 503: case and runs of ``-``, ``_``, ``.`` do not matter)
and written normalised.  An unqualified name resolves to

1. the in-process registration, if there is one (``register(..., replace=True)``);
2. else the only distribution that registers it;
3. else the built-in, when commlmo itself registers it, with a one-time
   :class:`PluginShadowWarning` naming the other distributions and their
   qualified kinds -- so a third party that registers ``mean`` never breaks the
   built-in presets, and its plugin stays reachable as ``"<dist>:mean"``;
4. else (two third-party distributions) a
   :class:`~commlmo.errors.PluginConflictError` listing the qualified kinds to
   choose from.

A qualified kind that selects what the bare name resolves to anyway is
canonicalised to the bare name (``"commlmo:mean"`` validates to ``kind: mean``).
Otherwise the validated config is an instance of a subclass of the plugin's own
``Config`` whose ``kind`` is the qualified string, and :func:`get` of the
qualified kind returns a subclass of the plugin class with that ``Config``; so
the config keeps naming that plugin through ``model_dump``, ``describe()``,
spawned workers and checkpoints, and ``commlmo schema`` lists it under its
qualified kind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal

from pydantic import create_model

from .errors import ConfigError, PluginConflictError, PluginLoadError, PluginNotFoundError
from .plugin import FAMILIES, Aggregator, Compressor, LMO, LRRule, Plugin, PluginConfig, Rule

__all__ = [
    "PluginInfo",
    "PluginListing",
    "PluginShadowWarning",
    "get",
    "names",
    "plugins",
    "listing",
    "probe",
    "register",
    "unregister",
    "build_plugin",
    "validate_plugin_config",
    "refresh",
    "BUILTIN_DISTRIBUTION",
    "IMPORT_TIMEOUT_ENV",
]

_BASES: dict[str, type[Plugin]] = {
    "lmo": LMO,
    "compressor": Compressor,
    "aggregator": Aggregator,
    "lr_rule": LRRule,
    "rule": Rule,
}
_IN_PROCESS = "<registered in-process>"
#: the distribution whose plugins are the built-ins (trusted, imported in-process)
BUILTIN_DISTRIBUTION = "commlmo"
#: environment variable: seconds each third-party entry point may take to import in the probe
IMPORT_TIMEOUT_ENV = "COMMLMO_PLUGIN_IMPORT_TIMEOUT"
_DEFAULT_IMPORT_TIMEOUT = 20.0
_STARTUP_TIMEOUT = 120.0  # the probe child importing commlmo and torch, before any plugin


class PluginShadowWarning(UserWarning):
    """A third-party distribution registers a name a built-in has; the name means the built-in."""


def _normalize(distribution: str) -> str:
    """PEP 503 normal form of a distribution name: ``Commlmo_Median`` -> ``commlmo-median``."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


@dataclass(frozen=True)
class PluginInfo:
    """One (family, name) claim as the registry sees it, before or after loading.

    ``kind`` is what a config writes to select this very plugin: the bare name,
    or ``"<distribution>:<name>"`` where the bare name resolves to another one
    (filled in by :func:`plugins`; empty in raw claims).
    """

    family: str
    name: str
    distribution: str
    version: str
    target: str  # "module:attr" from the entry point, or the class's qualified name
    entry_point: metadata.EntryPoint | None = None
    kind: str = ""

    @property
    def qualified(self) -> str:
        """``"<normalised distribution>:<name>"``."""
        return f"{_normalize(self.distribution)}:{self.name}"

    @property
    def builtin(self) -> bool:
        """Shipped by commlmo itself."""
        return _normalize(self.distribution) == BUILTIN_DISTRIBUTION


@dataclass(frozen=True)
class PluginListing:
    """One row of ``commlmo plugins``: metadata, plus a summary where it was safe to get one.

    ``status``: ``"ok"`` (imported, or probed in a subprocess), ``"broken"``
    (``error`` says why, naming the distribution) or ``"not imported"`` (a
    third-party plugin listed from metadata only).  ``note``: how this claim
    relates to other distributions registering the same name.
    """

    info: PluginInfo
    status: Literal["ok", "broken", "not imported"]
    summary: str = ""
    error: str = ""
    note: str = ""


@dataclass(frozen=True)
class _Verdict:
    ok: bool
    summary: str = ""
    error: str = ""  # a full sentence when ``ok`` is False


_lock = threading.RLock()
_discovered: dict[str, dict[str, list[PluginInfo]]] | None = None
_in_process: dict[str, dict[str, type[Plugin]]] = {f: {} for f in FAMILIES}
_loaded: dict[tuple[str, str], type[Plugin]] = {}  # (family, kind as asked) -> class
_claim_classes: dict[tuple[str, str, str], type] = {}  # (family, dist, name) -> entry point's class
_qualified_classes: dict[tuple[type, str], type[Plugin]] = {}
_probed: dict[tuple[str, str, str], _Verdict] = {}  # (family, dist, name) -> probe verdict
_probed_dists: set[str] = set()
_warned: set[tuple[str, str]] = set()


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise PluginNotFoundError("plugin family", family, FAMILIES)
    return family


def _key(info: PluginInfo) -> tuple[str, str, str]:
    return (info.family, _normalize(info.distribution), info.name)


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
                    # One distribution can be visible twice (editable install next to its
                    # source tree's metadata, or two copies on sys.path): the first one on
                    # sys.path is the one Python imports, and it is no conflict.
                    if not any(_normalize(c.distribution) == _normalize(dist_name) for c in claims):
                        claims.append(info)
            _discovered = found
        return _discovered


def refresh() -> None:
    """Forget discovered entry points, loaded classes and probe verdicts (after ``pip install`` in-process)."""
    global _discovered
    with _lock:
        _discovered = None
        _loaded.clear()
        _claim_classes.clear()
        _probed.clear()
        _probed_dists.clear()
        _warned.clear()


def names(family: str) -> list[str]:
    """Every name installed in ``family``, without importing any plugin."""
    _check_family(family)
    return sorted(set(_discover()[family]) | set(_in_process[family]))


def _claims(family: str, name: str) -> list[PluginInfo]:
    return _discover()[family].get(name, [])


def _known_kinds(family: str) -> list[str]:
    """Bare names, plus the qualified kinds of names more than one distribution registers."""
    extra = [c.qualified for claims in _discover()[family].values() if len(claims) > 1 for c in claims]
    return names(family) + extra


def _split(kind: str) -> tuple[str | None, str]:
    dist, sep, name = kind.partition(":")
    return (dist.strip(), name.strip()) if sep else (None, kind)


def _who(claims: list[PluginInfo]) -> str:
    return "; ".join(f"{c.distribution} {c.version} ({c.target})" for c in claims)


def _default(family: str, name: str, claims: list[PluginInfo], *, warn: bool) -> PluginInfo:
    """The claim an unqualified ``name`` resolves to (no in-process registration)."""
    if len(claims) == 1:
        return claims[0]
    builtin = [c for c in claims if c.builtin]
    if builtin:
        others = [c for c in claims if not c.builtin]
        if warn and (family, name) not in _warned:
            _warned.add((family, name))
            warnings.warn(PluginShadowWarning(
                f"{family} {name!r} is also registered by {_who(others)}; the unqualified name means the "
                f"built-in ({builtin[0].qualified!r}). Write kind {others[0].qualified!r} to use "
                f"{others[0].distribution}'s."
            ), stacklevel=4)
        return builtin[0]
    choices = ", ".join(repr(c.qualified) for c in claims)
    raise PluginConflictError(
        f"{family} {name!r} is registered by {len(claims)} distributions: {_who(claims)}. "
        f"Choose one with a qualified kind -- one of {choices} (e.g. kind: {claims[0].qualified!r}) -- "
        "or uninstall one of them."
    )


def _resolve(family: str, kind: str, *, warn: bool = True) -> tuple[PluginInfo, str]:
    """The claim ``kind`` selects and the canonical kind for it (bare where that is unambiguous)."""
    dist, name = _split(kind)
    claims = _claims(family, name)
    if dist is None:
        if not claims:
            raise PluginNotFoundError(family, name, names(family))
        return _default(family, name, claims, warn=warn), name
    match = [c for c in claims if _normalize(c.distribution) == _normalize(dist)]
    if not match:
        if claims:
            raise PluginNotFoundError(family, kind, [c.qualified for c in claims])
        raise PluginNotFoundError(family, kind, _known_kinds(family))
    info = match[0]
    return info, _canonical_kind(family, info)


def _canonical_kind(family: str, info: PluginInfo) -> str:
    """The bare name if it resolves to ``info``, else ``info.qualified``."""
    if info.name in _in_process[family]:
        return info.qualified
    try:
        default = _default(family, info.name, _claims(family, info.name), warn=False)
    except PluginConflictError:
        return info.qualified
    return info.name if _key(default) == _key(info) else info.qualified


def _describe(exc: BaseException) -> str:
    """An exception raised while importing a plugin, in a few words."""
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r}): the module called sys.exit() while being imported"
    return f"{type(exc).__name__}: {exc}"


def _broken(info: PluginInfo, why: str) -> str:
    return (f"{info.family} plugin {info.name!r} from distribution {info.distribution} {info.version} "
            f"failed to import ({info.target}): {why}")


def _load(info: PluginInfo) -> type[Plugin]:
    """The class behind one claim, imported in this process (guarded; see the module docstring)."""
    key = _key(info)
    with _lock:
        if key in _claim_classes:
            return _claim_classes[key]
        verdict = _probed.get(key)
        if verdict is not None and not verdict.ok:
            raise PluginLoadError(verdict.error)
        if info.entry_point is None:
            raise PluginLoadError(_broken(info, "no entry point to load"))
        try:
            cls = info.entry_point.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a third party's import must not take the process or the rest down
            raise PluginLoadError(_broken(info, _describe(exc))) from exc
        _validate_class(info.family, info.name, cls, f"distribution {info.distribution} {info.version}")
        _claim_classes[key] = cls
        return cls


def _qualified_class(cls: type[Plugin], kind: str) -> type[Plugin]:
    """``cls`` with a ``Config`` whose ``kind`` is the qualified ``kind`` (a cached subclass)."""
    with _lock:
        if (cls, kind) not in _qualified_classes:
            base = cls.Config
            config = create_model(
                base.__name__, __base__=base, __module__=base.__module__,
                kind=(Literal[kind], kind),  # type: ignore[valid-type]
            )
            config.__qualname__ = base.__qualname__
            _qualified_classes[(cls, kind)] = type(cls.__name__, (cls,), {
                "Config": config, "__doc__": cls.__doc__, "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
            })
        return _qualified_classes[(cls, kind)]


def _class_for(info: PluginInfo, kind: str) -> type[Plugin]:
    cls = _load(info)
    return cls if kind == info.name else _qualified_class(cls, kind)


def get(family: str, name: str) -> type[Plugin]:
    """The plugin class registered as ``name`` in ``family``, imported on first use.

    ``name`` is a registered name or a qualified kind ``"<distribution>:<name>"``
    (see the module docstring for how an unqualified name is resolved).
    """
    _check_family(family)
    if not isinstance(name, str):
        raise ConfigError(f"a {family} kind is a name (a string); got {name!r}")
    with _lock:
        if name in _in_process[family]:
            return _in_process[family][name]
        if (family, name) in _loaded:
            return _loaded[(family, name)]
        info, kind = _resolve(family, name)
        cls = _class_for(info, kind)
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


def _forget(family: str, name: str) -> None:
    """Drop resolutions that a change to the in-process registrations of ``name`` affects."""
    for key in [k for k in _loaded if k[0] == family and _split(k[1])[1] == name]:
        del _loaded[key]


def register(family: str, cls: type[Plugin] | None = None, *, name: str | None = None, replace: bool = False):
    """Register a plugin class in-process (notebooks, tests).  Usable as a decorator.

    ``name`` defaults to the default of ``cls.Config.kind``.  Registering a name
    that an installed distribution already provides raises unless ``replace``;
    the installed one stays reachable by its qualified kind.
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
            _forget(family, n)
        return c

    return _do(cls) if cls is not None else _do


def unregister(family: str, name: str) -> None:
    """Remove an in-process registration."""
    with _lock:
        _in_process[_check_family(family)].pop(name, None)
        _forget(family, name)


# --------------------------------------------------------------------------- listing


def _families(family: str | None) -> list[str]:
    return [_check_family(family)] if family else list(FAMILIES)


def _rows(family: str | None) -> Iterator[tuple[PluginInfo, type[Plugin] | None]]:
    """Every in-process registration and every claim, with its ``kind`` filled in."""
    for fam in _families(family):
        for n in names(fam):
            if n in _in_process[fam]:
                c = _in_process[fam][n]
                yield PluginInfo(fam, n, _IN_PROCESS, "", f"{c.__module__}:{c.__qualname__}", kind=n), c
            for info in _claims(fam, n):
                yield dataclasses.replace(info, kind=_canonical_kind(fam, info)), None


def plugins(
    family: str | None = None, *, load: bool = True
) -> Iterator[tuple[PluginInfo, type[Plugin] | None, str | None]]:
    """``(info, class or None, error or None)`` for every plugin: one row per claim.

    With ``load`` (``commlmo schema``), third-party distributions are first
    probed in subprocesses (see the module docstring), then each plugin is
    imported in-process unless its probe found it broken; a broken plugin yields
    its error naming its distribution and the iteration goes on.  A claim that
    is only reachable by a qualified kind (``info.kind``) yields the class whose
    ``Config.kind`` is that qualified kind.  Without ``load``: metadata only,
    nothing is imported and the class is ``None``.
    """
    if load:
        probe(family)
    for info, cls in _rows(family):
        if cls is not None or not load:
            yield info, cls, None
            continue
        try:
            yield info, _class_for(info, info.kind), None
        except PluginLoadError as exc:
            yield info, None, str(exc)


def _note(info: PluginInfo) -> str:
    claims = _claims(info.family, info.name)
    others = [c for c in claims if _key(c) != _key(info)]
    if info.distribution == _IN_PROCESS:
        return f"shadows {', '.join(repr(c.qualified) for c in claims)} in this process" if claims else ""
    if info.name in _in_process[info.family]:
        return f"shadowed in this process by an in-process registration; select it with kind {info.kind!r}"
    if not others:
        return ""
    if info.kind == info.name:
        return f"also registered by {', '.join(c.distribution for c in others)} (select those as " \
               f"{', '.join(repr(c.qualified) for c in others)})"
    if any(c.builtin for c in others):
        return f"shadowed by the built-in {info.name!r}; select it with kind {info.kind!r}"
    return f"registered by {len(claims)} distributions; select it with kind {info.kind!r}"


def listing(family: str | None = None, *, check: bool = False) -> list[PluginListing]:
    """The rows of ``commlmo plugins``: every claim, with no third-party import in this process.

    Built-ins and in-process registrations show their summary (their modules are
    commlmo's own, or already imported).  A third-party plugin is ``"not
    imported"`` unless ``check``: then its distribution is probed in a subprocess
    (with the import timeout) and it is ``"ok"`` with its summary, or ``"broken"``.
    """
    if check:
        probe(family)
    rows = []
    for info, cls in _rows(family):
        note = _note(info)
        if cls is not None:
            rows.append(PluginListing(info, "ok", cls.summary(), note=note))
        elif info.builtin:
            try:
                rows.append(PluginListing(info, "ok", _load(info).summary(), note=note))
            except PluginLoadError as exc:
                rows.append(PluginListing(info, "broken", error=str(exc), note=note))
        else:
            verdict = _probed.get(_key(info)) if check else None
            if verdict is None and check and _key(info) in _claim_classes:  # probe unavailable: fell back
                verdict = _Verdict(True, _claim_classes[_key(info)].summary())
            if verdict is None:
                rows.append(PluginListing(info, "not imported", note=note))
            elif verdict.ok:
                rows.append(PluginListing(info, "ok", verdict.summary, note=note))
            else:
                rows.append(PluginListing(info, "broken", error=verdict.error, note=note))
    return rows


# --------------------------------------------------------------------------- probing


def _import_timeout() -> float:
    raw = os.environ.get(IMPORT_TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw.strip() else _DEFAULT_IMPORT_TIMEOUT
    except ValueError:
        value = _DEFAULT_IMPORT_TIMEOUT
    return value if value > 0 else _DEFAULT_IMPORT_TIMEOUT


def probe(family: str | None = None) -> None:
    """Probe, in subprocesses, every third-party distribution not probed yet (see the module docstring).

    ``family`` only restricts which distributions need probing (those with a
    plugin in it); each distribution is probed whole, once per process.
    """
    todo: dict[str, list[PluginInfo]] = {}
    with _lock:
        for info, cls in _rows(family):
            dist = _normalize(info.distribution)
            if cls is None and not info.builtin and dist not in _probed_dists:
                todo.setdefault(dist, [])
        for fam in FAMILIES:  # every entry point of those distributions, in all families
            for claims in _discover()[fam].values():
                for info in claims:
                    if _normalize(info.distribution) in todo and info.entry_point is not None:
                        todo[_normalize(info.distribution)].append(info)
    todo = {d: infos for d, infos in todo.items() if infos}
    if not todo:
        return
    with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
        results = dict(zip(todo, pool.map(_probe_safely, todo.values())))
    with _lock:
        for dist, verdicts in results.items():
            _probed_dists.add(dist)
            if verdicts is None:  # the probe could not run here: get() imports in-process, guarded
                continue
            for info, verdict in zip(todo[dist], verdicts):
                _probed[_key(info)] = verdict


_PROBE = r"""
import json, os, sys
_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
os.dup2(2, 1)  # whatever the plugins print goes to stderr, never into the report
def send(*msg):
    _out.write("\x1ecommlmo-probe " + json.dumps(msg) + "\n")
    _out.flush()
req = json.loads(sys.argv[1])
sys.path[:] = req["path"]
try:
    from importlib.metadata import EntryPoint
    from commlmo.registry import _describe, _validate_class
except BaseException as exc:
    send("failed", f"{type(exc).__name__}: {exc}")
    os._exit(1)
send("ready")
for i, (family, group, name, target, source) in enumerate(req["eps"]):
    send("start", i)
    try:
        cls = EntryPoint(name, target, group).load()
    except BaseException as exc:
        send("error", i, _describe(exc))
        continue
    try:
        _validate_class(family, name, cls, source)
        send("ok", i, str(cls.summary()))
    except BaseException as exc:
        send("invalid", i, str(exc))
send("done")
os._exit(0)
"""
_MARK = "\x1ecommlmo-probe "


def _probe_safely(infos: list[PluginInfo]) -> list[_Verdict] | None:
    try:
        return _probe_distribution(infos)
    except Exception:  # a bug in the probe itself must not hide the plugins: import them as get() does
        return None


def _probe_distribution(infos: list[PluginInfo]) -> list[_Verdict] | None:
    """Verdicts for the entry points of one distribution, ``None`` if no probe could run."""
    verdicts: dict[int, _Verdict] = {}
    remaining = list(range(len(infos)))
    while remaining:
        got = _probe_once([infos[i] for i in remaining])
        if got is None:
            if verdicts:  # a later round could not start: say so rather than import blind
                for i in remaining:
                    verdicts[i] = _Verdict(False, error=_broken(infos[i], "could not be probed in a subprocess"))
                break
            return None
        for j, verdict in got.items():
            verdicts[remaining[j]] = verdict
        remaining = [i for i in remaining if i not in verdicts]
    return [verdicts[i] for i in range(len(infos))]


def _probe_once(infos: list[PluginInfo]) -> dict[int, _Verdict] | None:
    """Import ``infos`` in turn in one child; stop at the first that hangs or ends the child.

    Returns the verdicts it reached (at least one), or ``None`` if the child did
    not get as far as importing commlmo.
    """
    timeout = _import_timeout()
    request = {"path": list(sys.path), "eps": [
        [i.family, FAMILIES[i.family], i.name, i.target, f"distribution {i.distribution} {i.version}"]
        for i in infos]}
    with tempfile.TemporaryFile() as stderr:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _PROBE, json.dumps(request)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                start_new_session=os.name == "posix",
            )
        except (OSError, ValueError):
            return None
        lines: queue.Queue[bytes | None] = queue.Queue()

        def pump() -> None:
            try:
                for line in proc.stdout:  # type: ignore[union-attr]
                    lines.put(line)
            except (OSError, ValueError):
                pass
            finally:
                lines.put(None)

        threading.Thread(target=pump, name="commlmo-plugin-probe", daemon=True).start()
        verdicts: dict[int, _Verdict] = {}
        current: int | None = None
        ready = False
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        try:
            while True:
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    if current is None and not ready:
                        return None
                    if current is not None:
                        verdicts[current] = _Verdict(False, error=_broken(
                            infos[current], f"the import did not finish within {timeout:g} s (does it hang?); "
                            f"set {IMPORT_TIMEOUT_ENV} to allow longer"))
                    break
                if line is None:  # the child ended before saying "done"
                    if not ready:
                        return None
                    if current is not None:
                        rc = proc.wait()
                        verdicts[current] = _Verdict(False, error=_broken(
                            infos[current], f"the import ended the process (exit status {rc}){_tail(stderr)}"))
                    break
                text = line.decode("utf-8", "replace")
                if not text.startswith(_MARK):
                    continue
                try:
                    msg = json.loads(text[len(_MARK):])
                except ValueError:
                    continue
                deadline = time.monotonic() + timeout
                if msg[0] == "failed":
                    return None
                if msg[0] == "ready":
                    ready = True
                elif msg[0] == "start":
                    current = msg[1]
                elif msg[0] == "ok":
                    verdicts[msg[1]], current = _Verdict(True, summary=msg[2]), None
                elif msg[0] == "error":
                    verdicts[msg[1]], current = _Verdict(False, error=_broken(infos[msg[1]], msg[2])), None
                elif msg[0] == "invalid":
                    verdicts[msg[1]], current = _Verdict(False, error=msg[2]), None
                elif msg[0] == "done":
                    break
        finally:
            _end(proc)
    if not verdicts:  # ready, but nothing started: treat the rest as not probed
        return None
    return verdicts


def _tail(stderr: Any) -> str:
    try:
        stderr.seek(0)
        last = [line for line in stderr.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except (OSError, ValueError):
        return ""
    return f"; its last words: {last[-1].strip()[:300]}" if last else ""


def _end(proc: subprocess.Popen) -> None:
    """Stop the probe child and anything it started (its own process group on POSIX)."""
    if proc.poll() is None:
        try:
            if os.name == "posix":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except (ProcessLookupError, PermissionError, OSError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if proc.stdout is not None:
        proc.stdout.close()


# --------------------------------------------------------------------------- configs


def build_plugin(family: str, config: Any) -> Plugin:
    """Build one plugin from its config: a ``{"kind": ...}`` mapping, a kind string or a Config.

    >>> topk = build_plugin("compressor", {"kind": "topk", "k": 0.05})
    """
    cfg = validate_plugin_config(family, config)
    return get(family, cfg.kind)(cfg)


def _own_kind(cls: type[Plugin]) -> str:
    return cls.Config.model_fields["kind"].default


def validate_plugin_config(family: str, value: Any) -> PluginConfig:
    """Validate ``value`` against the config class of the plugin it names.

    ``kind`` may be qualified (``"commlmo-median:mean"``); the result's ``kind``
    is canonical (see the module docstring).
    """
    if isinstance(value, PluginConfig):
        cls = get(family, value.kind)
        if isinstance(value, cls.Config):
            return value
        owner = _owner_of(family, type(value))  # another distribution's Config with the same bare kind
        if owner is not None:
            cls = get(family, _canonical_kind(family, owner))
        return cls.Config.model_validate(value.model_dump() | {"kind": _own_kind(cls)})
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"a {family} is given as a name or a mapping with 'kind'; got {value!r}")
    if "kind" not in value:
        raise ConfigError(f"a {family} config needs 'kind' (one of: {', '.join(names(family))}); got {dict(value)!r}")
    cls = get(family, value["kind"])
    return cls.Config.model_validate(dict(value) | {"kind": _own_kind(cls)})


def _owner_of(family: str, config_cls: type) -> PluginInfo | None:
    with _lock:
        for (fam, dist, name), cls in _claim_classes.items():
            if fam == family and getattr(cls, "Config", None) is config_cls:
                return next((c for c in _claims(fam, name) if _normalize(c.distribution) == dist), None)
    return None
