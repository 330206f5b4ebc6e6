"""The documentation site: it builds in strict mode, and it covers every public symbol,
every built-in plugin and every preset.

The build is ``bash scripts/docs.sh`` itself (generate the reference fragments, then
``mkdocs build --strict`` into a temporary directory), so what CI checks is the one
command a developer runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import commlmo
from commlmo import registry
from commlmo.errors import PluginLoadError
from commlmo.plugin import FAMILIES
from commlmo.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "docs" / "_generated"
#: modules the API reference documents, besides the top-level ``commlmo``
API_MODULES = ["commlmo.plugin", "commlmo.registry", "commlmo.config", "commlmo.comm",
               "commlmo.transport", "commlmo.testing"]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


gen_docs = _load("gen_docs", ROOT / "scripts" / "gen_docs.py")
docs_markdown = _load("docs_markdown", ROOT / "scripts" / "docs_markdown.py")


def _builtin_entry_points() -> list[tuple[str, str]]:
    """``(family, name)`` of every plugin commlmo's own distribution registers (no import)."""
    dist = metadata.distribution("commlmo")
    groups = {group: family for family, group in FAMILIES.items()}
    return sorted((groups[ep.group], ep.name) for ep in dist.entry_points if ep.group in groups)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"{module} is not installed; pip install -e '.[docs]' to build the docs")
    out = tmp_path_factory.mktemp("site")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "docs.sh"), str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, PYTHON=sys.executable, NO_MKDOCS_2_WARNING="1"))
    assert res.returncode == 0, f"docs build failed:\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}"
    return out


def test_site_builds_strictly_with_every_page_of_the_nav(site):
    import yaml

    class Loader(yaml.SafeLoader):  # mkdocs.yml names a Python function with !!python/name
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/name:", lambda loader, suffix, node: suffix)
    nav = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)["nav"]

    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from pages(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from pages(value)

    listed = list(pages(nav))
    assert len(listed) > 20
    for page in listed:
        html = site / (page[:-3] + "/index.html" if not page.endswith("index.md") else page[:-2] + "html")
        assert html.is_file(), f"{page} is in the nav but {html} was not built"


def test_every_builtin_plugin_has_a_generated_section_and_an_anchor(site):
    for family, name in _builtin_entry_points():
        fragment = (GENERATED / "plugins" / f"{family}.md").read_text()
        assert f"### `{name}` {{ #{name} }}" in fragment, f"{family} {name} is missing from the generated docs"
        page = gen_docs.FAMILIES[family][0]
        html = (site / page.removesuffix(".md") / "index.html").read_text()
        assert f'id="{name}"' in html, f"{family} {name} has no anchor on {page}"
    assert sum(1 for _ in _builtin_entry_points()) >= 20


def test_every_preset_has_its_row_its_guidance_and_its_resolved_config(site):
    table = (GENERATED / "presets" / "table.md").read_text()
    page = (ROOT / "docs" / "presets.md").read_text()
    html = (site / "presets" / "index.html").read_text()
    for name in PRESETS:
        assert f"[`{name}`](#{name})" in table, f"preset {name} is missing from the generated table"
        assert f"### `{name}` {{ #{name} }}" in page, f"preset {name} has no hand-written guidance in docs/presets.md"
        assert f'--8<-- "presets/{name}.md"' in page, f"docs/presets.md does not include {name}'s resolved config"
        assert f'id="{name}"' in html
    sections = re.findall(r"^### `(\w+)`", page, flags=re.M)
    assert sorted(sections) == sorted(PRESETS), "docs/presets.md describes a preset that no longer exists"


def _public_symbols() -> list[tuple[str, object]]:
    found = [(f"commlmo.{n}", getattr(commlmo, n)) for n in commlmo.__all__]
    for module_name in API_MODULES:
        module = importlib.import_module(module_name)
        found += [(f"{module_name}.{n}", getattr(module, n)) for n in getattr(module, "__all__", [])]
    # classes and functions carry docstrings; data (PRESETS, FAMILIES, __version__) is described by its module
    return [(name, obj) for name, obj in found if inspect.isclass(obj) or inspect.isfunction(obj)]


@pytest.mark.parametrize(("name", "obj"), _public_symbols(), ids=lambda x: x if isinstance(x, str) else "")
def test_public_symbol_has_a_docstring(name, obj):
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    assert doc and doc.strip(), f"{name} has no docstring of its own; the API reference would show nothing"


@pytest.mark.parametrize(("family", "name"), _builtin_entry_points(), ids=lambda x: x)
def test_builtin_plugin_class_has_a_docstring(family, name):
    try:
        cls = registry.get(family, name)
    except PluginLoadError as exc:  # the registry tests own this failure; here there is nothing to read
        pytest.skip(f"does not import: {exc}")
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    assert doc, f"{family} plugin {name} ({cls.__module__}.{cls.__qualname__}) has no docstring"
    assert cls.summary(), f"{family} plugin {name} has no summary line for `commlmo plugins`"


def test_every_core_config_field_is_described():
    assert gen_docs.core_notes_problems() == []


def test_concepts_page_spells_out_exactly_the_signmuon_preset():
    import yaml

    text = (ROOT / "docs" / "concepts.md").read_text()
    block = re.search(r'=== "spelled out"\n\n    ```yaml\n(.*?)\n    ```', text, flags=re.S)
    assert block, "the 'spelled out' tab of docs/concepts.md moved; update this test"
    spelled = yaml.safe_load("\n".join(line[4:] for line in block.group(1).splitlines()))
    try:
        preset = commlmo.load_config("signmuon")
    except commlmo.CommlmoError as exc:
        pytest.skip(f"signmuon does not load in this checkout: {exc}")
    assert commlmo.load_config(spelled).model_dump() == preset.model_dump() | {"preset": None}


def test_third_party_compressor_example_meets_its_contract():
    from commlmo.testing import check_compressor

    example = _load("bf16_compressor", ROOT / "docs" / "examples" / "bf16_compressor.py")
    check_compressor(example.BFloat16(), max_examples=25)


def test_docstring_markup_becomes_markdown_and_conversion_is_idempotent():
    doc = inspect.cleandoc('''
        Uses :class:`~commlmo.plugin.Payload` and :func:`commlmo.load_config`; ``<G, D>`` and <G, D>.

        Each step::

            c_i = C(v_i - g_i)

        ====  =====
        a     b
        ====  =====
        1     x | y
        ====  =====

        >>> import commlmo
        >>> commlmo.build_optimizer(model)   # doctest: +SKIP
    ''')
    md = docs_markdown.rst_to_markdown(doc)
    assert "``Payload``" in md and "``commlmo.load_config``" in md and ":class:" not in md
    assert "``<G, D>`` and &lt;G, D>." in md
    assert "Each step:\n\n```text\nc_i = C(v_i - g_i)\n```" in md
    assert "| a | b |\n|---|---|\n| 1 | x \\| y |" in md
    assert "```pycon\n>>> import commlmo\n>>> commlmo.build_optimizer(model)\n```" in md
    assert docs_markdown.rst_to_markdown(md) == md
