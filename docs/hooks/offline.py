"""mkdocs hook: the site shows its math without a network.

MathJax 3 ships with the site instead of coming from a CDN.  ``on_files`` copies,
from the ``django-static-mathjax`` distribution (MathJax's own release files on
PyPI, with no dependencies; it is in the ``docs`` extra), the TeX-to-HTML component
``tex-chtml.js`` that mkdocs.yml loads, the TeX extensions it may autoload and its
web fonts, to ``assets/mathjax/`` of the site.  MathJax finds the extensions and
fonts next to its own script, so every page renders its math from the site alone.

The rest of what the site needs is local too: mkdocs.yml turns off the theme's
web fonts (``theme.font: false``) and the pipeline diagram is an SVG file
(``docs/img/pipeline.svg``), not a mermaid fence.  ``tests/test_docs.py`` checks
that no built page loads a script, stylesheet or font from another site.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

#: where the site serves MathJax from (mkdocs.yml's extra_javascript names DEST/tex-chtml.js)
DEST = "assets/mathjax"
#: what is copied, relative to MathJax's es5/ directory
SHIPPED = ("tex-chtml.js", "input/tex/extensions", "output/chtml/fonts/woff-v2")
DISTRIBUTION = "django-static-mathjax"


def mathjax_dir() -> Path:
    """MathJax's ``es5/`` directory in the installed ``django-static-mathjax``."""
    from mkdocs.exceptions import PluginError

    spec = importlib.util.find_spec("mathjax")
    es5 = Path(next(iter(spec.submodule_search_locations or []), "")) / "static" / "mathjax" / "es5" if spec else None
    if es5 is None or not (es5 / "tex-chtml.js").is_file():
        raise PluginError(f"MathJax is not installed: pip install {DISTRIBUTION} (or pip install -e '.[docs]'); "
                          "the site ships it instead of loading it from a CDN")
    return es5


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    es5 = mathjax_dir()
    for item in SHIPPED:
        src = es5 / item
        for path in sorted(src.rglob("*")) if src.is_dir() else [src]:
            if path.is_file():
                uri = f"{DEST}/{path.relative_to(es5).as_posix()}"
                if files.get_file_from_path(uri) is None:
                    files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
