"""The docs site's own checks that `mkdocs build --strict` does not make: the generated
configuration reference covers the schema, README links resolve, Python examples compile."""

import ast
import dataclasses
import importlib.util
import re
from pathlib import Path

import yaml

from fedshield import schema, validation

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "docs" / "hooks" / "config_reference.py"


def hook():
    spec = importlib.util.spec_from_file_location("config_reference", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_reference_lists_every_key_with_its_default():
    text = hook().reference_markdown()
    flat = schema.Config().flat()
    assert flat
    for key, default in flat.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row, f"{key} is missing from the configuration reference"
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        assert shown in row, (key, default, row)


def test_the_reference_names_default_toml_where_it_differs_from_the_schema():
    text = hook().reference_markdown()
    shipped = validation.load(ROOT / "configs" / "default.toml").flat()
    differing = [k for k, v in schema.Config().flat().items() if shipped[k] != v]
    for key in differing:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
        assert "configs/default.toml" in row, row


def test_the_comment_above_a_field_is_its_meaning():
    @dataclasses.dataclass
    class Section:
        # What a learning rate is.
        lr: float = 0.1
        steps: int = 3

    comments = hook().field_comments(Section)
    assert comments == {"lr": "What a learning rate is.", "steps": ""}


def test_every_docs_page_is_in_the_nav_and_the_hook_is_registered():
    # mkdocs.yml uses no custom YAML tags, so the plain loader reads it.
    site = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            for value in item.values():
                yield from pages(value) if isinstance(value, list) else [value]

    listed = set(pages(site["nav"]))
    assert listed == {p.name for p in (ROOT / "docs").glob("*.md")}
    assert site["hooks"] == ["docs/hooks/config_reference.py"] and site["theme"]["font"] is False


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    links = [t for t in re.findall(r"\]\(([^)#]+)", readme) if "://" not in t]
    assert links
    missing = [t for t in links if not (ROOT / t).exists()]
    assert not missing, missing


def test_python_examples_in_readme_and_docs_compile():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [(p.name, m) for p in pages
              for m in re.findall(r"```python\n(.*?)```", p.read_text(), flags=re.S)]
    assert blocks
    for name, code in blocks:
        ast.parse(code, filename=name)
