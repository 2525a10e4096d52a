"""mkdocs hook: the configuration reference, generated from the schema dataclasses at build time.

``docs/configuration.md`` holds a ``<!-- config-reference -->`` marker; this hook replaces it with
one table per section of ``fedshield.config.Config``: each key, its type, its default, what a
valid value is, and the comment the schema writes above the field. Generated at build time, the
page cannot drift from the schema.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

MARKER = "<!-- config-reference -->"
ROOT = Path(__file__).resolve().parents[2]


def field_comments(cls: type) -> dict[str, str]:
    """The ``#`` comment lines written directly above each field of a dataclass, joined."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in textwrap.dedent(inspect.getsource(cls)).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^\s{4}(\w+)\s*:", line)
        if match:
            comments[match.group(1)] = " ".join(pending)
        pending = []
    return comments


def shown(value: Any) -> str:
    """A value as TOML would spell it, in inline code."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def escape(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\n", " ")


def section_table(section: Any, prefix: str, default_toml: dict[str, Any]) -> list[str]:
    """Rows ``| key | type | default | valid values | meaning |`` for one config section.

    ``section`` is the section as ``Config()`` holds it: a key a file leaves out takes its value."""
    cls = type(section)
    comments = field_comments(cls)
    rows = ["| key | type | default | valid values | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:  # a nested section: its own table
            continue
        key = f"{prefix}{f.name}"
        default = getattr(section, f.name)
        default_cell = shown(default)
        if key in default_toml and default_toml[key] != default:
            default_cell += f" (`configs/default.toml`: {shown(default_toml[key])})"
        choices = f.metadata.get("choices") or ()
        valid = ", ".join(shown(c) for c in choices) if choices else f.metadata.get("why", "")
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append("| " + " | ".join([f"`{key}`", f"`{type_name}`", default_cell,
                                       escape(valid or "any"),
                                       escape(comments.get(f.name, ""))]) + " |")
    return rows


def reference_markdown() -> str:
    """The whole reference: top-level keys, then one section per nested table."""
    from fedshield import schema, validation

    default_toml = validation.load(ROOT / "configs" / "default.toml").flat()
    out = ["## Top-level keys", ""]
    config = schema.Config()
    out += section_table(config, "", default_toml)
    for f in dataclasses.fields(schema.Config):
        if f.default_factory is dataclasses.MISSING:
            continue
        section = type(getattr(config, f.name))
        doc = (inspect.getdoc(section) or "").split("\n\n")[0]
        out += ["", f"## [{f.name}]", ""]
        if doc and not doc.startswith(section.__name__ + "("):  # skip dataclass' own signature
            out += [doc, ""]
        out += section_table(getattr(config, f.name), f"{f.name}.", default_toml)
    return "\n".join(out) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs event: fill the marker on the configuration page."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference_markdown())
