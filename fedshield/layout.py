"""Where fedshield's subpackages live: one import root, ``fedshield``, over the card's folders.

Installed, the folders ``server/``, ``client/``, ``privacy/``, ... are ``fedshield.server``,
``fedshield.client``, ... (setuptools ``package-dir`` in pyproject.toml), so nothing generic lands
at the top of site-packages. In a source checkout (``PYTHONPATH=repo``, pytest's
``pythonpath = ["."]``, ``flwr run .``, an unpacked FAB) the folders stay at the top of the
repository; :func:`install_source_finder` maps ``fedshield.<name>`` to ``<repo>/<name>`` there.

Static tools (grimp / import-linter, mypy) read files rather than import them, so they need the
installed layout on disk: :func:`build_view` writes it as a tree of symlinks
(``python -m fedshield.commands.layout view DIR``) and :func:`lint_imports` runs the import
contracts on it (``python -m fedshield.commands.layout lint-imports``, in .ci/run).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = "fedshield"
# The card's top-level folders that install under the fedshield root (pyproject package-dir; a
# test keeps both equal).
SUBPACKAGES = ("server", "client", "privacy", "simulations", "deployment", "tasks", "benchmarks")

_HERE = Path(__file__).resolve().parent


def source_root(package_dir: Path = _HERE) -> Path | None:
    """The repository root when ``package_dir`` (fedshield/) sits in a source checkout, else None.

    A source checkout has the folders beside fedshield/ (``<repo>/server/__init__.py``) and not
    inside it; an installed fedshield has them inside (``site-packages/fedshield/server``)."""
    repo = package_dir.parent
    if (package_dir / SUBPACKAGES[0]).exists():
        return None
    if all((repo / name / "__init__.py").is_file() for name in SUBPACKAGES):
        return repo
    return None


class SourceFinder(importlib.abc.MetaPathFinder):
    """Finds ``fedshield.<name>`` (a name in SUBPACKAGES) in ``<repo>/<name>``, and nothing else."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo

    def find_spec(self, fullname, path=None, target=None):
        """The spec of ``fedshield.<name>`` from the repository, or None for any other module."""
        root, _, name = fullname.partition(".")
        if root != ROOT or name not in SUBPACKAGES:
            return None
        # Deeper modules (fedshield.server.app) follow the subpackage's __path__ as usual.
        return importlib.machinery.PathFinder.find_spec(fullname, [str(self.repo)])


def install_source_finder() -> Path | None:
    """In a source checkout, make ``fedshield.<name>`` import ``<repo>/<name>``; returns the repo.

    First on ``sys.meta_path``: an editable install of *another* checkout (its setuptools finder
    maps ``fedshield.server`` to its own folder) must not win over the checkout being run."""
    repo = source_root()
    if repo is None:
        return None
    if not any(isinstance(f, SourceFinder) and f.repo == repo for f in sys.meta_path):
        sys.meta_path.insert(0, SourceFinder(repo))
    return repo


def build_view(repo: Path, dest: Path) -> Path:
    """Write the installed layout of ``repo`` under ``dest`` as symlinks; returns ``dest``.

    ``dest/fedshield/`` holds a link to every entry of ``repo/fedshield/`` plus one per
    subpackage (``dest/fedshield/server -> repo/server``). Rebuilt from scratch each time."""
    pkg = dest / ROOT
    if pkg.exists():
        for entry in pkg.iterdir():
            entry.unlink()
    pkg.mkdir(parents=True, exist_ok=True)
    for entry in (repo / ROOT).iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry.resolve())
    for name in SUBPACKAGES:
        (pkg / name).symlink_to((repo / name).resolve())
    return dest


def analysed_in_place(repo: Path) -> bool:
    """True while the contracts name the top-level folders themselves (before the rename), so
    import-linter can read the checkout as it is; False once they name only ``fedshield``."""
    with open(repo / "pyproject.toml", "rb") as fh:
        roots = tomllib.load(fh)["tool"]["importlinter"]["root_packages"]
    return roots != [ROOT]


def analysis_dir(repo: Path, scratch: Path) -> Path:
    """Where a static tool finds the packages the contracts name: ``repo`` itself before the
    rename, else the installed layout written under ``scratch``."""
    return repo if analysed_in_place(repo) else build_view(repo, scratch)


def lint_imports(repo: Path, extra: list[str]) -> int:
    """Run import-linter with ``repo``'s contracts on the installed layout; returns its status."""
    lint = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory(prefix="fedshield-view-") as tmp:
        where = analysis_dir(repo, Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(where)}
        return subprocess.call([str(lint), "--config", str(repo / "pyproject.toml"), *extra],
                               cwd=where, env=env)
