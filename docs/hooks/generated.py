"""mkdocs hook: the reference parts of the site are generated from the code by the build itself.

``mkdocs build`` and ``mkdocs serve`` both run it (``hooks:`` in mkdocs.yml), so no
separate step can be forgotten and no generated markdown is committed:

* ``on_config`` runs ``scripts/gen_docs.py`` to write the fragments (plugin
  sections, preset tables, config and CLI reference, ``commlmo plugins`` outputs)
  into a temporary directory, then puts that directory first in pymdownx.snippets'
  ``base_path``, so a page's ``--8<-- "cli.md"`` includes what the installed code
  says today.  With ``COMMLMO_DOCS_FRAGMENTS=DIR`` the fragments go to ``DIR`` and
  stay there (the tests read them);
* ``on_files`` adds the pages that are generated whole (``gen_docs.pages``): one
  API page per module, and a placeholder for each benchmark not recorded yet;
* ``on_serve`` makes ``mkdocs serve`` rebuild when the code changes.

The hook imports ``scripts/gen_docs.py`` only for :func:`gen_docs.pages`, which imports
nothing of commlmo.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

import gen_docs  # noqa: E402

log = logging.getLogger("mkdocs.hooks.generated")
#: the code the generated parts describe; ``mkdocs serve`` watches it (not plugins/: installing
#: the examples writes build/ and *.egg-info there, which would start the next build)
SOURCES = ["commlmo", "lmos", "compressors", "aggregators", "scripts"]

_temporary: list[Path] = []


def on_config(config: Any) -> Any:
    keep = os.environ.get("COMMLMO_DOCS_FRAGMENTS")
    out = Path(keep).resolve() if keep else Path(tempfile.mkdtemp(prefix="commlmo-docs-"))
    if not keep:
        _temporary.append(out)
    # a fresh interpreter, so that `mkdocs serve` documents the code as it is now, not as first imported
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"scripts/gen_docs.py failed:\n{res.stderr[-4000:]}")
    for line in res.stderr.splitlines():  # shown on their page as unavailable; the rest of the site still builds
        if line.startswith("  - "):
            log.info("shown as unavailable: %s", line[4:])
    snippets = config.mdx_configs.setdefault("pymdownx.snippets", {})
    snippets["base_path"] = [str(out), str(ROOT)]
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for uri, text in gen_docs.pages().items():
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, content=text))
    return files


def on_serve(server: Any, config: Any, builder: Any) -> Any:
    for name in SOURCES:
        if (ROOT / name).is_dir():
            server.watch(str(ROOT / name))
    return server


def _clean() -> None:
    while _temporary:
        shutil.rmtree(_temporary.pop(), ignore_errors=True)


def on_post_build(config: Any) -> None:
    _clean()


def on_build_error(error: Exception) -> None:
    _clean()
