"""The README's and the docs' cheap examples are checked, so a broken example fails CI.

Every shell command in the code blocks of README.md, docs/*.md and benchmarks/RESULTS.md (and in
inline code that starts with ``fedshield``/``flwr run``/``make``) is extracted:

- ``fedshield ...``: the command exists, its ``--help`` works, its options parse, and a config
  file with ``--set`` overrides loads and validates;
- ``flwr run --run-config "..."``: the string is parsed and fused with pyproject's run config
  exactly as Flower does, and the result is a valid config; digits examples also pass pre-flight;
- ``python benchmarks/X.py ...``: the script and config exist and load, the options exist;
- ``make T``: the Makefile has target T;
- ``flower-superlink``/``flower-supernode``/``flwr X`` (Flower's own CLIs): the command exists
  and every option it is given is one its ``--help`` lists.

TOML blocks parse. Commands with placeholders (CONFIG, runs/X, RUN_ID, [...]) are only checked
for their ``--help``.
"""

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from fedshield import schema, validation
from fedshield.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# Every page a user reads, including the generated benchmark results the docs site includes.
PAGES = {p.relative_to(ROOT).as_posix(): p.read_text()
         for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                   ROOT / "benchmarks" / "RESULTS.md"]}
README = PAGES["README.md"]
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$|runs/X\b|<|\[|\.\.\.|^-?[A-Z]$|=[A-Z]+$|^N$")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block and of every 4-space indented block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^\s*```(\w*)", line)
        if fence:
            indent = len(line) - len(line.lstrip())
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            blocks.append((fence.group(1), "\n".join(x[indent:] for x in lines[i + 1:j])))
            i = j + 1
            continue
        if line.startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            blocks.append(("indented", "\n".join(x[4:] for x in lines[i:j])))
            i = j
            continue
        i += 1
    return blocks


COMMAND = re.compile(
    r"^(\S+=\S+\s+)*(\.venv/bin/)?(fedshield|flwr|python|flower-superlink|flower-supernode) "
    r"|^make [a-z]")


INLINE = re.compile(
    r"^(\.venv/bin/)?fedshield [a-z]+ |^flwr run |^python benchmarks/|^make [a-z-]+$")


def commands(text: str = README) -> list[str]:
    """Shell commands (continuations joined) from code blocks and inline code of one page."""
    found = []
    for lang, body in code_blocks(text):
        if lang not in ("", "sh", "bash", "indented"):
            continue
        joined = re.sub(r"\\\n\s*", " ", body)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            if COMMAND.match(line):
                found.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
    for span in re.findall(r"``(.+?)``|`([^`]+)`", prose):
        code = (span[0] or span[1]).strip()
        if INLINE.match(code):
            found.append(code)
    return sorted(set(found))


def argv(command: str) -> list[str]:
    tokens = shlex.split(command, comments=True)
    while tokens and re.match(r"^\w+=", tokens[0]):  # leading VAR=value assignments
        tokens.pop(0)
    tokens[0] = Path(tokens[0]).name
    for stop in (">", "|", "&&"):  # shell redirections and pipes are not the command's arguments
        if stop in tokens:
            tokens = tokens[:tokens.index(stop)]
    return tokens


COMMANDS = sorted({c for text in PAGES.values() for c in commands(text)})
FEDSHIELD = [c for c in COMMANDS if argv(c)[0] == "fedshield"]
FLWR_RUN = [c for c in COMMANDS if argv(c)[:2] == ["flwr", "run"] and "--run-config" in argv(c)]
PYTHON = [c for c in COMMANDS if argv(c)[:1] == ["python"] and argv(c)[1].startswith("benchmarks/")]
MAKE = [c for c in COMMANDS if argv(c)[0] == "make"]
FLOWER = [c for c in COMMANDS if argv(c)[0] in ("flower-superlink", "flower-supernode")
          or (argv(c)[0] == "flwr" and c not in FLWR_RUN)]


def test_the_readme_and_docs_have_examples_of_each_kind():
    assert len(FEDSHIELD) >= 20 and len(FLWR_RUN) >= 2 and len(PYTHON) >= 3, COMMANDS
    assert len(MAKE) >= 4 and len(FLOWER) >= 4, COMMANDS
    readme = commands(README)
    assert sum(argv(c)[0] == "fedshield" for c in readme) >= 10, readme
    assert {"make run", "make test"} <= {" ".join(argv(c)) for c in readme}, readme


def test_the_readme_stays_short():
    assert len(README.splitlines()) <= 200, "README.md is over 200 lines: move detail to docs/"


def cli_group() -> click.Group:
    from fedshield.cli import app

    return typer.main.get_command(app)


def resolve(tokens: list[str]) -> tuple[list[str], click.Command, list[str]]:
    """(command path, click command, remaining args) for ``fedshield ...`` tokens."""
    cmd, path, rest = cli_group(), [], tokens[1:]
    while isinstance(cmd, click.Group) and rest and rest[0] in cmd.commands:
        cmd = cmd.commands[rest[0]]
        path.append(rest.pop(0))
    return path, cmd, rest


@pytest.mark.parametrize("command", FEDSHIELD)
def test_fedshield_commands_exist_and_parse(command):
    path, cmd, rest = resolve(argv(command))
    assert path and not isinstance(cmd, click.Group), f"{command}: no such command"
    from fedshield.cli import app

    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    if any(PLACEHOLDER.search(t) for t in rest):
        return  # a template, e.g. CONFIG or runs/X: the command and its --help are checked
    ctx = cmd.make_context("fedshield " + " ".join(path), list(rest))  # unknown options raise
    config = next((v for v in ctx.params.values() if isinstance(v, str) and v.endswith(".toml")),
                  None)
    if config:
        sets = ctx.params.get("set_") or []
        cfg = validation.load(ROOT / config, sets)  # raises ConfigError for a broken example
        assert isinstance(cfg, schema.Config)


def fused_run_config(run_config: str) -> dict:
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    return get_fused_config_from_dir(ROOT, parse_config_args([run_config]))


@pytest.mark.parametrize("command", FLWR_RUN)
def test_flwr_run_examples_give_valid_configs(command, tmp_path):
    tokens = argv(command)
    run_config = tokens[tokens.index("--run-config") + 1]
    cfg = validation.from_run_config(fused_run_config(run_config))
    if cfg.task.name == "digits":  # cheap: the ServerApp's whole pre-flight, strictly
        from dataclasses import replace

        from fedshield.server.preflight import preflight

        preflight(replace(cfg, output_dir=str(tmp_path)), partitions="refuse")


def test_the_old_digits_flwr_run_example_is_refused_before_training():
    """The README's former example (the default model on digits) is refused by the config
    check the ServerApp runs first, so the Flower run ends failed instead of training."""
    with pytest.raises(ConfigError, match="task.model = 'scatter_linear' is not a model"):
        validation.from_run_config(fused_run_config("task.name='digits' federation.rounds=3"))


@pytest.mark.parametrize("command", PYTHON)
def test_python_benchmark_commands_name_existing_files(command):
    tokens = argv(command)
    script = ROOT / tokens[1]
    assert script.is_file(), tokens[1]
    source = script.read_text()
    for option in (t.split("=")[0] for t in tokens[2:] if t.startswith("--")):
        assert f'"{option}"' in source, f"{command}: {script.name} has no option {option}"
    for config in (t for t in tokens[2:] if t.endswith(".toml") and not PLACEHOLDER.search(t)):
        validation.load(ROOT / config)


def test_toml_blocks_parse_and_config_paths_exist():
    import tomllib

    blocks = [body for text in PAGES.values() for lang, body in code_blocks(text)
              if lang == "toml"]
    assert blocks
    for body in blocks:
        tomllib.loads(body)
    paths = {p for text in PAGES.values() for p in re.findall(r"configs/[\w.-]+\.toml", text)}
    for path in sorted(paths):
        validation.load(ROOT / path)


def make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.M))


@pytest.mark.parametrize("command", MAKE)
def test_make_commands_name_makefile_targets(command):
    targets = [t for t in argv(command)[1:] if not re.match(r"^\w+=", t)]
    assert targets and set(targets) <= make_targets(), f"{command}: not a Makefile target"


@cache
def help_text(*program: str) -> str:
    """``--help`` of one of Flower's CLIs, run from this interpreter's environment."""
    exe = Path(sys.executable).with_name(program[0])
    result = subprocess.run([str(exe), *program[1:], "--help"], capture_output=True, text=True,
                            timeout=120, env={"PATH": str(exe.parent), "NO_COLOR": "1",
                                              "COLUMNS": "300", "TERM": "dumb"})
    assert result.returncode == 0, f"{' '.join(program)} --help: {result.stderr[-2000:]}"
    return result.stdout


@pytest.mark.parametrize("command", FLOWER)
def test_flower_commands_exist_and_take_these_options(command):
    tokens = argv(command)
    program = tokens[:1]
    if tokens[0] == "flwr":  # subcommands: `flwr ls`, `flwr supernode register`, ...
        program = [t for t in tokens[:3] if not t.startswith("-") and re.match(r"^[a-z]+$", t)]
        program = ["flwr", *program[1:3]] if len(program) > 2 and program[1] == "supernode" \
            else ["flwr", *program[1:2]]
    text = help_text(*program)
    for option in (t.split("=")[0] for t in tokens if t.startswith("--")):
        assert option in text, f"{command}: {' '.join(program)} has no option {option}"


def table_rows(text: str) -> list[list[str]]:
    """The body rows of a rich table: the cells between the vertical bars, stripped."""
    return [[c.strip() for c in line.strip().strip("│").split("│")]
            for line in text.splitlines() if line.strip().startswith("│")]


def test_the_planner_example_prints_the_output_the_docs_show():
    """The one example whose output the docs show is run, and its table must match."""
    page = PAGES["docs/dp-training.md"]
    block = next(body for _, body in code_blocks(page) if "$ fedshield privacy plan" in body)
    command = re.sub(r"\\\n\s*", " ", block).splitlines()[0].removeprefix("$ ")
    shown = table_rows(block)
    assert len(shown) >= 3, block
    from fedshield.cli import app

    result = CliRunner().invoke(app, argv(command)[1:], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert table_rows(result.output) == shown, result.output
