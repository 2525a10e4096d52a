"""``python -m fedshield.commands.layout view DIR | lint-imports [ARGS]`` (fedshield/layout.py).

``view`` writes the installed layout (``fedshield/server``, ...) of this checkout as symlinks, for
static tools that read files; ``lint-imports`` runs the import contracts of pyproject.toml on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedshield.layout import build_view, lint_imports, source_root


def main(argv: list[str]) -> int:
    """``view DIR``: write the installed layout; ``lint-imports [ARGS]``: check the contracts."""
    repo = source_root()
    if repo is None:
        print("fedshield is not running from a source checkout: nothing to lay out",
              file=sys.stderr)
        return 2
    if argv[:1] == ["view"] and len(argv) == 2:
        print(build_view(repo, Path(argv[1]).resolve()))
        return 0
    if argv[:1] == ["lint-imports"]:
        return lint_imports(repo, argv[1:])
    print("usage: python -m fedshield.commands.layout view DIR | lint-imports [OPTIONS]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
