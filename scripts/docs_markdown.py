r"""Markdown for the docs site: docstrings converted from their reST-isms, table cells and
the field tables of pydantic models.

The docstrings are written to read well in ``help()`` and in an editor, so they
use a little reST: ``:class:`X``` roles, ``::`` literal blocks, simple tables
and ``>>>`` examples.  :func:`rst_to_markdown` converts exactly those, leaves
everything else alone (double-backtick literals are already Markdown code) and
is idempotent, because mkdocstrings may hand it the same docstring twice.  It
runs in ``scripts/gen_docs.py`` for the plugin pages, and as a griffe extension
(``RstToMarkdown``, named in mkdocs.yml) over the API reference.

:func:`fields_table` renders a pydantic model's fields (type and constraints
from its JSON schema, default, description) for the plugin pages and the config
reference.
"""

from __future__ import annotations

import inspect
import json
import re
import textwrap
from typing import Any

__all__ = ["rst_to_markdown", "escape_inline", "RstToMarkdown", "cell", "table", "code", "flow", "fmt_number",
           "docstring_parts", "field_comments", "schema_type", "constraints", "fields_table"]

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|data|attr|obj|exc|const|ref):`(~?)([^`]+)`")
_BORDER = re.compile(r"^\s*=+(?:\s+=+)+\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_HTML_LIKE = re.compile(r"<(?=[A-Za-z/!?])(?!https?://)")


def _role(m: re.Match[str]) -> str:
    tilde, target = m.groups()
    return f"``{target.rsplit('.', 1)[-1] if tilde else target}``"


def escape_inline(text: str) -> str:
    """Escape ``<`` that Markdown would read as an HTML tag, outside code spans (``<G, D>``)."""
    out, last = [], 0
    for m in _CODE_SPAN.finditer(text):
        out.append(_HTML_LIKE.sub("&lt;", text[last:m.start()]))
        out.append(m.group(0))
        last = m.end()
    out.append(_HTML_LIKE.sub("&lt;", text[last:]))
    return "".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _table(lines: list[str]) -> list[str]:
    """A reST simple table (three border lines) as a Markdown table."""
    border = lines[0]
    spans = [(m.start(), m.end()) for m in re.finditer(r"=+", border)]

    def cells(line: str) -> list[str]:
        bounds = [s for s, _ in spans[1:]] + [None]
        return [line[s:e].strip() for (s, _), e in zip(spans, bounds)]

    borders = [i for i, line in enumerate(lines) if _BORDER.match(line)]
    head = [cells(line) for line in lines[borders[0] + 1:borders[1]] if line.strip()]
    body = [cells(line) for line in lines[borders[1] + 1:borders[2]] if line.strip()]
    row = lambda cs: "| " + " | ".join(c.replace("|", r"\|") for c in cs) + " |"  # noqa: E731
    header = [" ".join(parts).strip() for parts in zip(*head)] if head else [""] * len(spans)
    return ["", row(header), "|" + "---|" * len(spans), *(row(c) for c in body), ""]


def rst_to_markdown(text: str) -> str:
    """Roles to code, ``::`` blocks and ``>>>`` examples to fences, simple tables to Markdown tables."""
    text = _ROLE.sub(_role, text)
    lines = text.splitlines()
    out: list[str] = []
    i, fence = 0, None
    while i < len(lines):
        line = lines[i]
        m = _FENCE.match(line)
        if fence or m:
            out.append(line)
            if m and fence is None:
                fence = m.group(1)
            elif m and m.group(1) == fence:
                fence = None
            i += 1
            continue
        stripped = line.strip()
        if stripped.startswith(">>>"):
            pad = " " * _indent(line)
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(re.sub(r"\s*#\s*doctest:.*$", "", lines[i][len(pad):]))
                i += 1
            out += [f"{pad}```pycon", *(pad + b for b in block), f"{pad}```"]
            continue
        if _BORDER.match(line):
            j, borders = i, 0
            while j < len(lines) and lines[j].strip() and borders < 3:
                borders += bool(_BORDER.match(lines[j]))
                j += 1
            if borders == 3:
                out += _table(lines[i:j])
                i = j
                continue
        if stripped.endswith("::") and not stripped.startswith(".."):
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            base = _indent(line)
            if j < len(lines) and _indent(lines[j]) > base:
                k = j
                while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) > base):
                    k += 1
                while k > j and not lines[k - 1].strip():
                    k -= 1
                lead = line.rstrip()[:-2].rstrip()
                if lead.strip():
                    out.append(escape_inline(lead + ":"))
                pad = " " * base
                body = textwrap.dedent("\n".join(lines[j:k])).splitlines()
                out += ["", f"{pad}```text", *(pad + b if b else b for b in body), f"{pad}```", ""]
                i = k
                continue
        out.append(escape_inline(line))
        i += 1
    return "\n".join(out)


# --------------------------------------------------------------------------- markdown helpers


def cell(text: Any) -> str:
    """Text safe inside a Markdown table cell: one line, ``|`` escaped outside code spans."""
    s = " ".join(str(text).split())
    parts = re.split(r"(`+[^`]*`+)", s)
    return "".join(p if p.startswith("`") else p.replace("|", r"\|") for p in parts)


def table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def code(value: Any) -> str:
    """A config value as it is written in YAML, in a code span."""
    if isinstance(value, (dict, list)):
        return f"`{flow(value)}`"
    if isinstance(value, str) and value:
        return f"`{value}`"
    return f"`{json.dumps(value)}`"  # true, false, null, numbers, ""


def flow(mapping: dict[str, Any]) -> str:
    """``{kind: topk, k: 0.05}``: a plugin config in YAML flow style."""
    import yaml

    return yaml.safe_dump(mapping, default_flow_style=True, sort_keys=False, width=10_000).strip()


def fmt_number(x: float | None) -> str:
    if x is None:
        return "—"
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.4g}"
    return f"{x:.3e}"


def docstring_parts(obj: Any) -> tuple[str, str]:
    """``(summary line, rest as Markdown)`` of an object's own docstring."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    doc = inspect.cleandoc(doc or "")
    first, _, rest = doc.partition("\n")
    return escape_inline(first.strip()), rst_to_markdown(rest.strip())


# --------------------------------------------------------------------------- config fields from pydantic


def field_comments(model: type) -> dict[str, str]:
    """Comments that describe fields in the source, by field name: ``#:`` lines above a
    field (``MeanConfig.transport``) or a comment after it (``steps: int = 1  # why``)."""
    try:
        src = inspect.getsource(model)
    except (OSError, TypeError):
        return {}
    notes: dict[str, str] = {}
    pending: list[str] = []
    for line in src.splitlines():
        s = line.strip()
        if s.startswith("#:"):
            pending.append(s[2:].strip())
            continue
        m = re.match(r"(\w+)\s*:[^#]*(?:#\s*(.*))?$", s)
        if m and m.group(1) in getattr(model, "model_fields", {}):
            trailing = m.group(2) or ""
            if trailing.startswith(("type:", "noqa", "pragma")):
                trailing = ""
            if pending or trailing:
                notes[m.group(1)] = " ".join(pending + [trailing]).strip()
        pending = []
    return notes


def schema_type(prop: dict[str, Any], links: dict[str, str], kind_url: str | None = None) -> str:
    """A JSON-schema property as a short type: ``float``, ``auto | owner``, ``list of int``...

    ``links`` maps model names to URLs; ``kind_url`` + kind links each kind of a tagged union.
    """
    if "$ref" in prop:
        name = prop["$ref"].rsplit("/", 1)[-1]
        return f"[{name}]({links[name]})" if name in links else name
    for key in ("anyOf", "oneOf"):
        if key in prop:
            if "discriminator" in prop:
                kinds = sorted(prop["discriminator"].get("mapping", {}))
                shown = [f"[`{k}`]({kind_url}{k})" if kind_url else f"`{k}`" for k in kinds]
                return "`kind` one of: " + ", ".join(shown)
            return " or ".join(schema_type(p, links, kind_url) for p in prop[key])
    if "enum" in prop:
        return " | ".join(f"`{v}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    t = prop.get("type")
    names = {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "null", "object": "mapping"}
    if t == "array":
        return "list of " + schema_type(prop.get("items", {}), links)
    return names.get(t, t or "any")


def constraints(prop: dict[str, Any]) -> str:
    marks = {"minimum": "≥", "exclusiveMinimum": ">", "maximum": "≤", "exclusiveMaximum": "<",
             "minLength": "length ≥", "minItems": "items ≥"}
    return ", ".join(f"{sym} {prop[k]}" for k, sym in marks.items() if k in prop)


def fields_table(model: type, *, schema: dict[str, Any] | None = None, notes: dict[str, str] | None = None,
                 links: dict[str, str] | None = None, kind_urls: dict[str, str] | None = None,
                 skip: tuple[str, ...] = ("kind",)) -> str:
    """The fields of a pydantic model: type (with constraints), default, description.

    ``kind_urls``: field name -> URL prefix that links the kinds a tagged-union field accepts.
    """
    from pydantic_core import PydanticUndefined

    schema = schema or model.model_json_schema()
    comments = field_comments(model) | (notes or {})
    rows = []
    for name, prop in schema.get("properties", {}).items():
        if name in skip:
            continue
        field = model.model_fields.get(name)
        default = field.get_default(call_default_factory=True) if field is not None else prop.get("default", PydanticUndefined)
        if hasattr(default, "model_dump"):
            default = default.model_dump(mode="json")
        if default is PydanticUndefined:
            shown = "required"
        elif "$ref" in prop and isinstance(default, dict):
            shown = "its fields' defaults"
        else:
            shown = code(default)
        typ = schema_type(prop, links or {}, (kind_urls or {}).get(name))
        extra = constraints(prop)
        rows.append([f"`{name}`", typ + (f", {extra}" if extra else ""), shown,
                     prop.get("description") or comments.get(name, "")])
    if not rows:
        return "No fields besides `kind`.\n"
    return table(["field", "type", "default", "description"], rows)


try:  # the griffe extension, when griffe is installed (mkdocstrings pulls it in)
    from griffe import Extension
except ImportError:  # pragma: no cover - gen_docs.py works without griffe
    Extension = object  # type: ignore[assignment,misc]


class RstToMarkdown(Extension):  # type: ignore[misc,valid-type]
    """Griffe extension: run :func:`rst_to_markdown` over every docstring that is loaded."""

    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
