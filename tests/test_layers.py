"""The layer order and the package graph: import-linter's contracts hold and no package cycles.

A "package" here is a child of the fedshield import root (``fedshield.config``,
``fedshield.cli``, ...) or one of the card's folders (``server``, ``client``, ...), which install
as ``fedshield.server``, ``fedshield.client``, ... (fedshield/layout.py).
"""

import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from fedshield.layout import SUBPACKAGES, analysis_dir

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LINTER = PYPROJECT["tool"]["importlinter"]

EDGES_SCRIPT = """
import json, sys, grimp
graph = grimp.build_graph(*json.loads(sys.argv[1]), exclude_type_checking_imports=True)
print(json.dumps(sorted([m, i] for m in graph.modules
                        for i in graph.find_modules_directly_imported_by(m))))
"""


def package_of(module: str) -> str:
    """``fedshield.server.app`` -> ``fedshield.server``; ``server.app`` -> ``server``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "fedshield" and len(parts) > 1 else parts[0]


def package_cycles(edges) -> list[list[str]]:
    """The strongly connected components of more than one package (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        pa, pb = package_of(a), package_of(b)
        graph.setdefault(pa, set())
        graph.setdefault(pb, set())
        if pa != pb:
            graph[pa].add(pb)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def layer_ignores() -> set[tuple[str, str]]:
    """The layers contract's ignore_imports: cycles another change removes (named there)."""
    (layers,) = [c for c in LINTER["contracts"] if c["type"] == "layers"]
    return {tuple(x.strip() for x in line.split("->")) for line in layers.get("ignore_imports", [])}


def static_python(where: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(where)}
    return subprocess.run([sys.executable, *args], cwd=where, env=env, capture_output=True,
                          text=True, timeout=300)


def test_package_cycles_are_found_and_named():
    edges = [("fedshield.server.app", "fedshield.config"),
             ("fedshield.config", "fedshield.privacy.central"),
             ("fedshield.privacy.central", "fedshield.server.aggregation"),
             ("fedshield.client.app", "fedshield.server.flat"),
             ("fedshield.cli", "fedshield.simulations.runner"),
             ("fedshield.simulations.runner", "fedshield.server.app")]
    in_cycle = ("fedshield.config", "fedshield.privacy.central", "fedshield.server.app")
    assert package_cycles(edges) == [sorted(package_of(m) for m in in_cycle)]
    # The same modules under the installed root are the same packages.
    renamed = [("fedshield.server.app", "fedshield.client.x"),
               ("fedshield.client.y", "fedshield.server.z")]
    assert package_cycles(renamed) == [["fedshield.client", "fedshield.server"]]
    # A cycle inside one package is not a package cycle.
    assert package_cycles([("fedshield.server.app", "fedshield.server.secagg"),
                           ("fedshield.server.secagg", "fedshield.server.app")]) == []


def test_no_import_cycles_between_packages():
    roots = LINTER["root_packages"]
    with tempfile.TemporaryDirectory() as tmp:
        proc = static_python(analysis_dir(ROOT, Path(tmp)), "-c", EDGES_SCRIPT, json.dumps(roots))
    assert proc.returncode == 0, proc.stderr[-3000:]
    edges = [tuple(e) for e in json.loads(proc.stdout)]
    assert len(edges) > 300  # the whole project was read, not an empty view
    ignored = layer_ignores()
    assert ignored <= set(edges), "an ignore_imports line names an import that no longer exists"
    assert package_cycles(e for e in edges if e not in ignored) == []


@pytest.mark.timeout(300)
def test_import_linter_contracts_hold():
    # The same command as .ci/run: the layers, no Flower in the math, no deployment/ in the apps,
    # no cycles between the children of fedshield.
    proc = static_python(ROOT, "-m", "fedshield.commands.layout", "lint-imports")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"Contracts: {len(LINTER['contracts'])} kept, 0 broken." in proc.stdout


def test_ci_runs_the_contracts():
    assert "fedshield.commands.layout lint-imports" in (ROOT / ".ci" / "run").read_text()


def test_the_layout_names_every_folder_that_installs_under_fedshield():
    # The source finder and the symlink view use SUBPACKAGES; they must be the card's folders
    # that hold Python packages, every one of them.
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"fedshield", "tests"}
    assert set(SUBPACKAGES) == folders


def test_the_wheel_lists_every_package():
    # Before the rename: setuptools finds the folders; after it: an explicit list under the
    # fedshield root that must name every folder holding an __init__.py.
    setuptools = PYPROJECT["tool"]["setuptools"]
    if isinstance(setuptools["packages"], dict):  # [tool.setuptools.packages.find]
        assert "server*" in setuptools["packages"]["find"]["include"]
        return
    found = {"fedshield"} | {
        "fedshield." + ".".join(p.parent.relative_to(ROOT / "fedshield").parts)
        for p in (ROOT / "fedshield").rglob("*/__init__.py")} | {
        "fedshield." + ".".join(p.parent.relative_to(ROOT).parts)
        for name in SUBPACKAGES for p in (ROOT / name).rglob("__init__.py")}
    assert set(setuptools["packages"]) == found
    assert setuptools["package-dir"] == {"fedshield": "fedshield",
                                         **{f"fedshield.{n}": n for n in SUBPACKAGES}}


INSTALLED_CHECK = """
import importlib, json
found = {}
for name in json.loads(__import__("sys").argv[1]):
    try:
        found[name] = importlib.import_module(name).__file__
    except ModuleNotFoundError:
        found[name] = None
print(json.dumps(found))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_wheel_installs_one_import_root(tmp_path):
    # Build from a copy (pip reuses a build/ folder left in the checkout), install into a fresh
    # venv that borrows only this environment's dependencies, and import from outside the repo.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "runs", ".fedshield", "__pycache__", "*_cache",
        "results"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(wheels)], check=True, timeout=300)
    (wheel,) = wheels.glob("fedshield-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    if LINTER["root_packages"] != ["fedshield"]:  # before the rename: the collision itself
        assert set(SUBPACKAGES) <= tops
        return
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fedshield"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site_dir,) = venv.glob("lib/python*/site-packages")
    (site_dir / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site_dir), str(wheel)], check=True, timeout=300)
    names = ["fedshield.server.app", "fedshield.client.app", "fedshield.flower",
             *[n for n in SUBPACKAGES if n != "benchmarks"]]  # Opacus ships a `benchmarks`
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", INSTALLED_CHECK,
                           json.dumps(names)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    assert all(str(site_dir) in found[n] for n in names[:3]), found
    assert all(found[n] is None for n in names[3:]), found
