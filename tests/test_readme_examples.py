"""The README's cheap examples are checked, so a broken example fails CI.

Every shell command in the README's code blocks (and in inline code that starts with
``fedshield``/``flwr run``) is extracted. For ``fedshield`` commands: the command exists, its
``--help`` works, its options parse, and a config file with ``--set`` overrides loads and
validates. For ``flwr run --run-config "..."``: the string is parsed and fused with pyproject's
run config exactly as Flower does, and the result is a valid config; digits examples also pass
pre-flight. ``python benchmarks/X.py CONFIG`` commands: the script and config exist and load.
TOML blocks parse. Commands with placeholders (CONFIG, runs/X, RUN_ID, [...]) are only checked
for their ``--help``.
"""

import re
import shlex
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from fedshield import schema, validation
from fedshield.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
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


def commands() -> list[str]:
    """Shell commands (continuations joined) from code blocks and inline code."""
    found = []
    for lang, body in code_blocks(README):
        if lang not in ("", "sh", "bash", "indented"):
            continue
        joined = re.sub(r"\\\n\s*", " ", body)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            if re.match(r"^(\S+=\S+\s+)*(\.venv/bin/)?(fedshield|flwr|python) ", line):
                found.append(line)
    prose = re.sub(r"```.*?```", "", README, flags=re.S).replace("\n", " ")
    for span in re.findall(r"``(.+?)``|`([^`]+)`", prose):
        text = (span[0] or span[1]).strip()
        if re.match(r"^(\.venv/bin/)?fedshield [a-z]+ |^flwr run |^python benchmarks/", text):
            found.append(text)
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


COMMANDS = commands()
FEDSHIELD = [c for c in COMMANDS if argv(c)[0] == "fedshield"]
FLWR_RUN = [c for c in COMMANDS if argv(c)[:2] == ["flwr", "run"] and "--run-config" in argv(c)]
PYTHON = [c for c in COMMANDS if argv(c)[:1] == ["python"] and argv(c)[1].startswith("benchmarks/")]


def test_the_readme_has_examples_of_each_kind():
    assert len(FEDSHIELD) >= 20 and len(FLWR_RUN) >= 2 and len(PYTHON) >= 3, COMMANDS


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

        from fedshield.preflight import preflight

        preflight(replace(cfg, output_dir=str(tmp_path)), partitions="refuse")


def test_the_old_digits_flwr_run_example_is_refused_before_training():
    """The README's former example (default model tanh_cnn on digits) is refused by the config
    check the ServerApp runs first, so the Flower run ends failed instead of training."""
    with pytest.raises(ConfigError, match="task.model = 'tanh_cnn' is not a model"):
        validation.from_run_config(fused_run_config("task.name='digits' federation.rounds=3"))


@pytest.mark.parametrize("command", PYTHON)
def test_python_benchmark_commands_name_existing_files(command):
    tokens = argv(command)
    assert (ROOT / tokens[1]).is_file(), tokens[1]
    for config in (t for t in tokens[2:] if t.endswith(".toml") and not PLACEHOLDER.search(t)):
        validation.load(ROOT / config)


def test_toml_blocks_parse_and_config_paths_exist():
    import tomllib

    blocks = [body for lang, body in code_blocks(README) if lang == "toml"]
    assert blocks
    for body in blocks:
        tomllib.loads(body)
    for path in sorted(set(re.findall(r"configs/[\w.-]+\.toml", README))):
        validation.load(ROOT / path)
