"""Exceptions raised by commlmo.

Every error says what was wrong, what is allowed, and how to fix it.  They all
derive from :class:`CommlmoError` so callers can catch the library's errors in
one place; the config and plugin errors are also ``ValueError`` /
``LookupError`` so they read naturally next to the standard library.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "CommlmoError",
    "ConfigError",
    "PluginNotFoundError",
    "PluginLoadError",
    "PluginConflictError",
    "IncompatiblePluginsError",
    "DistributedError",
    "NonFiniteGradientError",
    "AggregatorOutputError",
    "NonFiniteInputError",
]


class CommlmoError(Exception):
    """Base class of every error raised by commlmo."""


class ConfigError(CommlmoError, ValueError):
    """A configuration is invalid; the message names the field, value and what is allowed."""


class PluginNotFoundError(CommlmoError, LookupError):
    """No installed plugin has the requested name."""

    def __init__(self, family: str, name: str, installed: Iterable[str]):
        installed = sorted(installed)
        close = difflib.get_close_matches(name, installed, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        shown = ", ".join(installed) if installed else "none"
        super().__init__(f"unknown {family} {name!r}{hint}; installed: {shown}")
        self.family, self.name, self.installed, self.suggestions = family, name, installed, close


class PluginLoadError(CommlmoError, ImportError):
    """A plugin's entry point could not be imported; names the distribution that ships it."""


class PluginConflictError(CommlmoError, LookupError):
    """Two distributions register the same name in one plugin family."""


class IncompatiblePluginsError(ConfigError):
    """A combination of plugins whose declared capabilities do not fit together."""


class DistributedError(CommlmoError, RuntimeError):
    """The distributed runtime cannot serve this request (world size, backend, wrapped model...)."""


class AggregatorOutputError(CommlmoError, RuntimeError):
    """An aggregator returned too few results, a wrong shape or dtype, or NaN/Inf from finite inputs."""


class NonFiniteGradientError(CommlmoError, FloatingPointError):
    """A gradient contained NaN or Inf; nothing was sent and no state changed."""


class NonFiniteInputError(CommlmoError, ValueError):
    """A plugin (compressor, LMO) was given NaN or Inf; nothing was computed."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x' or 'y'?)"`` for the closest choices, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=2, cutoff=0.5)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
