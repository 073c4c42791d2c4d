"""Every command line the documentation shows is accepted by the script it calls.

A README command that fails on its first line is what a new user meets first, and nothing else checks them: flags are
renamed, a validation is added in a `__post_init__`, and the documented line breaks silently. Here every shell command
in the repository's Markdown that runs a merit_hf module, a benchmark or a dataset script is parsed by that script's
own argument parser (dataclass `__post_init__` checks included) and stopped right there: nothing is trained, read or
written. Flags a script forwards to another one (`report_generation.py` to `report_lora`, `pretrain_throughput.py
--e2e_flags` and the quick-start's extra flags to `pretrain`) are parsed by that one too.

The Python names the documentation cites (`merit_hf.training.finetune`, `merit_hf.zero_shot_classify`, ...) must
import.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import HfArgumentParser

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [
        REPO_ROOT / "README.md",
        REPO_ROOT / "benchmarks" / "README.md",
        *REPO_ROOT.glob("dataset_scripts/*/README.md"),
        *REPO_ROOT.glob("model_cards/*.md"),
        REPO_ROOT / "spaces_demo" / "README.md",
    ]
)
SHELL_FENCES = ("bash", "sh", "shell", "console")
# where a command shows a placeholder (`<checkpoint>`), this stands in: parsing must not need the file
PLACEHOLDER = "placeholder_path"
# the Gradio app starts a server and takes no flags; tests/test_space_demo.py runs it
NOT_PARSED = ("spaces_demo/app.py",)


@dataclass(frozen=True)
class DocumentedCommand:
    document: str
    line: int
    text: str
    target: str  # "-m merit_hf.x" or a script path relative to the repository
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.document}:{self.line}"


def documented_commands() -> list[DocumentedCommand]:
    """The shell commands of fenced `bash`/`sh` blocks that run a Python module or script of this repository."""
    return _documented(inline=False)


def inline_commands() -> list[DocumentedCommand]:
    """Commands written inline in the prose (`` `python -m merit_hf.hub push ... --results <JSON>` ``) with at least
    one argument; often a fragment (`` `python -m merit_hf.embedding --precision` ``), so only their flags are
    checked."""
    return _documented(inline=True)


def _documented(inline: bool) -> list[DocumentedCommand]:
    commands = []
    for path in DOCUMENTS:
        if not path.is_file():
            continue
        relative = str(path.relative_to(REPO_ROOT))
        fence, start, block, prose = None, 0, [], []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("```"):
                if fence is None:
                    fence, start, block = line.strip()[3:].strip(), number, []
                else:
                    if fence in SHELL_FENCES and not inline:
                        commands += _commands_of_block(relative, start, block)
                    fence = None
            elif fence is not None:
                block.append(line)
            else:
                prose.append((number, line))
        if inline:
            commands += _inline_commands(relative, prose)
    return commands


INLINE_COMMAND = re.compile(r"`((?:python3?|accelerate launch) [^`]+)`")


def _inline_commands(document: str, prose: list[tuple[int, str]]) -> list[DocumentedCommand]:
    """Inline code spans of the prose that are commands; a span may run over a line break."""
    text = "\n".join(line for _, line in prose)
    starts = [0]
    for _, line in prose:
        starts.append(starts[-1] + len(line) + 1)
    commands = []
    for match in INLINE_COMMAND.finditer(text):
        line = prose[max(index for index, start in enumerate(starts[:-1]) if start <= match.start())][0]
        command = _parse_command(document, line, " ".join(match.group(1).split()))
        if command is not None and command.argv:
            commands.append(command)
    return commands


def joined_shell_lines(lines: list[str], first_line: int) -> list[tuple[int, str]]:
    """`(line number, text)` of every shell command in `lines` (numbered from `first_line`), its continuation lines
    (ending in a backslash) joined; blank lines and comment lines left out."""
    joined, pending, start = [], "", first_line
    for number, line in enumerate(lines, first_line):
        if not pending:
            start = number
        stripped = line.strip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text, pending = (pending + stripped).strip(), ""
        if text and not text.startswith("#"):
            joined.append((start, text))
    return joined


def _commands_of_block(document: str, start: int, lines: list[str]) -> list[DocumentedCommand]:
    commands = []
    for first, text in joined_shell_lines(lines, start + 1):
        for part in text.split("&&"):
            command = _parse_command(document, first, part.strip())
            if command is not None:
                commands.append(command)
    return commands


def _parse_command(document: str, line: int, text: str) -> DocumentedCommand | None:
    """`[VAR=value ...] [nice -n N] python|accelerate launch [...] (-m module | script.py) args [# comment]`."""
    words = shlex.split(re.sub(r"<[^<>]+>", PLACEHOLDER, text), comments=True)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words.pop(0)
    if words[:1] == ["nice"]:
        words = words[3:] if words[1:2] == ["-n"] else words[1:]
    if not words:
        return None
    if words[0] == "accelerate" and words[1:2] == ["launch"]:
        rest = words[2:]
        if "-m" in rest:
            index = rest.index("-m")
            return _command(document, line, text, "-m " + rest[index + 1], rest[index + 2 :])
        scripts = [i for i, word in enumerate(rest) if word.endswith(".py")]
        return _command(document, line, text, rest[scripts[0]], rest[scripts[0] + 1 :]) if scripts else None
    if not re.fullmatch(r"(\S*/)?python3?", words[0]):
        return None
    if words[1:2] == ["-m"]:
        if not words[2].startswith("merit_hf"):
            return None  # pytest and the like
        return _command(document, line, text, "-m " + words[2], words[3:])
    if len(words) > 1 and words[1].endswith(".py"):
        return _command(document, line, text, words[1], words[2:])
    return None


def _command(document, line, text, target, argv) -> DocumentedCommand:
    return DocumentedCommand(document, line, text, target, tuple(argv))


COMMANDS = documented_commands()
INLINE_COMMANDS = inline_commands()


class _Parsed(Exception):
    """Raised right after a script's outermost argument parsing returns: the script stops there."""

    def __init__(self, result):
        super().__init__("parsed")
        self.result = result


@contextlib.contextmanager
def _stop_after_parsing():
    """Wrap argparse's and HfArgumentParser's entry points so that the first complete parse (the outermost call:
    `parse_args` calls `parse_known_args`, `parse_args_into_dataclasses` calls both) raises `_Parsed`."""
    originals = {
        (argparse.ArgumentParser, "parse_args"): argparse.ArgumentParser.parse_args,
        (argparse.ArgumentParser, "parse_known_args"): argparse.ArgumentParser.parse_known_args,
        (HfArgumentParser, "parse_args_into_dataclasses"): HfArgumentParser.parse_args_into_dataclasses,
    }
    depth = [0]

    def wrap(original):
        def wrapper(self, *args, **kwargs):
            depth[0] += 1
            try:
                result = original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise _Parsed(result)
            return result

        return wrapper

    for (owner, name), original in originals.items():
        setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def parse_as_script(target: str, argv: list[str]):
    """Run `target` (`-m module` or a script path) with `argv` until its first complete argument parse; return what
    that parse returned. A parser error (SystemExit) or a validation error propagates."""
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    try:
        with _stop_after_parsing():
            if target.startswith("-m "):
                sys.argv = [target[3:], *argv]
                runpy.run_module(target[3:], run_name="__main__", alter_sys=True)
            else:
                script = REPO_ROOT / target
                sys.argv = [str(script), *argv]
                sys.path.insert(0, str(script.parent))
                runpy.run_path(str(script), run_name="__main__")
    except _Parsed as parsed:
        return parsed.result
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    raise AssertionError(f"{target} ran to the end without parsing arguments")


def _forwarded(command: DocumentedCommand, parsed) -> list[tuple[str, list[str]]]:
    """(target, argv) of the flags this command's script hands on to another script."""
    if command.target == "benchmarks/report_generation.py":
        _, extra = parsed
        # the benchmark adds its own data and output flags to these; a config is always given first
        return [("-m merit_hf.training.report_lora", ["configs/report_smollm2.yaml", *extra])] if extra else []
    if command.target == "benchmarks/pretrain_throughput.py" and parsed.end_to_end and parsed.e2e_flags:
        return [("-m merit_hf.training.pretrain", [parsed.config, *parsed.e2e_flags])]
    if command.target == "-m merit_hf.quickstart":
        _, extra = parsed
        return [("-m merit_hf.training.pretrain", ["configs/quickstart.yaml", *extra])] if extra else []
    return []


def _is_fragment(command: DocumentedCommand) -> bool:
    """`python -m merit_hf.training.probe ... --mode finetune`: a flag shown against an elided command."""
    return "..." in command.argv


def test_the_documentation_shows_commands():
    """The extraction itself: the README's quick-start and pretraining lines are found (a broken parser here would
    make every other test in this file vacuous)."""
    targets = {command.target for command in COMMANDS}
    assert {"-m merit_hf.quickstart", "-m merit_hf.training.pretrain", "-m merit_hf.embedding"} <= targets
    assert any(command.target.startswith("benchmarks/") for command in COMMANDS)
    assert any(command.target == "-m merit_hf.hub" and command.argv[:1] == ("push",) for command in INLINE_COMMANDS)
    assert len(COMMANDS) >= 40


# runpy warns that the module was imported (by an earlier command) before it runs as __main__: harmless here
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
@pytest.mark.parametrize("command", [c for c in COMMANDS if not _is_fragment(c)], ids=str)
def test_documented_command_parses(command: DocumentedCommand, monkeypatch, capsys):
    if command.target in NOT_PARSED:
        assert (REPO_ROOT / command.target).is_file(), f"{command}: {command.target} does not exist"
        return
    if not command.target.startswith("-m "):
        assert (REPO_ROOT / command.target).is_file(), f"{command}: {command.target} does not exist"
    monkeypatch.chdir(REPO_ROOT)
    try:
        parsed = parse_as_script(command.target, list(command.argv))
        for target, argv in _forwarded(command, parsed):
            parse_as_script(target, argv)
    except SystemExit as exit_:
        pytest.fail(f"{command}: `{command.text}` exits ({exit_.code}): {capsys.readouterr().err.strip()[-600:]}")
    except Exception as error:  # a dataclass validation, an unknown flag, a missing config
        pytest.fail(f"{command}: `{command.text}` is refused: {type(error).__name__}: {error}")


@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
@pytest.mark.parametrize("target", sorted({c.target for c in COMMANDS} - set(NOT_PARSED)))
def test_documented_script_help(target: str, monkeypatch, capsys):
    """`--help` of every documented script prints its usage and exits 0 (a stray `%` in a help text breaks it)."""
    monkeypatch.chdir(REPO_ROOT)
    argv = ["push", "--help"] if target == "-m merit_hf.hub" else ["--help"]
    with pytest.raises(SystemExit) as exit_:
        parse_as_script(target, argv)
    assert exit_.value.code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "usage:" in out
    if target.startswith("-m merit_hf.training.") or target == "-m merit_hf.embedding":  # a YAML config comes first
        assert f"usage: python {target} [CONFIG] [--flag value ...]" in out
        # only the packaged configs this command accepts, by name (`embedding tiny` is refused: unknown arguments)
        configs = PACKAGED_CONFIGS_BY_COMMAND[target]
        sentence = f"by name: {configs}." if configs else "merit_hf packages no config for this command."
        assert sentence in " ".join(out.split())


PACKAGED_CONFIGS_BY_COMMAND = {
    "-m merit_hf.training.pretrain": "base, quickstart, tiny",
    "-m merit_hf.training.probe": "probe_ptbxl_full, probe_quickstart",
    "-m merit_hf.training.report_lora": "report_smollm2, report_tiny",
    "-m merit_hf.embedding": "",
}


@pytest.mark.parametrize("command", [c for c in COMMANDS if _is_fragment(c)], ids=str)
def test_documented_fragment_flags_exist(command: DocumentedCommand):
    """`... --mode finetune` cannot be parsed whole; its flags must at least be the script's."""
    if not command.target.startswith("-m merit_hf."):
        pytest.fail(f"{command}: elided command of an unknown script {command.target}")
    flags = [word.split("=", 1)[0] for word in command.argv if word.startswith("--")]
    module = importlib.import_module(command.target[3:])
    classes = getattr(module, "ARGUMENT_CLASSES", None) or [
        value for name, value in vars(module).items() if name.endswith("Arguments") and isinstance(value, type)
    ]
    known = {option for action in HfArgumentParser(list(classes))._actions for option in action.option_strings}
    assert set(flags) <= known, f"{command}: {sorted(set(flags) - known)} are not flags of {command.target}"


def test_a_broken_command_is_caught(monkeypatch):
    """The check can fail: a renamed flag and a combination a `__post_init__` refuses are both reported."""
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(ValueError, match="unknown flag"):
        parse_as_script("-m merit_hf.training.pretrain", ["configs/tiny.yaml", "--no_such_flag", "1"])
    with pytest.raises(ValueError, match="train_crop center"):
        parse_as_script("-m merit_hf.training.pretrain", ["configs/tiny.yaml", "--precompute_ecg_values", "true"])
    with pytest.raises(SystemExit):
        parse_as_script("benchmarks/cpu_inference.py", ["--no_such_flag"])


@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
@pytest.mark.parametrize("command", INLINE_COMMANDS, ids=str)
def test_inline_command_flags_exist(command: DocumentedCommand, monkeypatch, capsys):
    """Every flag a command in the prose names is one its script lists in `--help` (of its subcommand, for
    `merit_hf.hub push` / `merit_hf.hub.cards check`)."""
    monkeypatch.chdir(REPO_ROOT)
    words = [word.strip("[]") for word in command.argv if word != "..."]
    flags = sorted({word.split("=", 1)[0] for word in words if word.startswith("--")})
    first = words[0] if words and not words[0].startswith("-") else None
    subcommand = [first] if first in ("push", "check", "model") else []
    with pytest.raises(SystemExit) as exit_:
        parse_as_script(command.target, [*subcommand, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "usage:" in out, f"{command}: --help of {command.target} fails"
    listed = set(re.findall(r"--[A-Za-z0-9_-]+", out))
    assert set(flags) <= listed, f"{command}: `{command.text}` names {sorted(set(flags) - listed)}, not flags of it"


# `merit_hf.results/v1` is a schema name, not a Python one
DOTTED_NAME = re.compile(r"\bmerit_hf(?:\.[A-Za-z_][A-Za-z0-9_]*)+(?![\w/])")


def _resolve(dotted: str):
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            value = getattr(value, attribute)
        return value
    raise ModuleNotFoundError(dotted)


def test_documented_python_names_exist():
    """Every `merit_hf.a.b` the documentation names imports (a module) or is an attribute of one."""
    missing = {}
    for path in DOCUMENTS:
        if not path.is_file():
            continue
        for name in sorted(set(DOTTED_NAME.findall(path.read_text(encoding="utf-8")))):
            name = name.rstrip(".")
            if name.endswith((".py", ".yaml", ".json", ".md")):
                continue
            try:
                _resolve(name)
            except (ImportError, AttributeError) as error:
                missing[name] = f"{path.relative_to(REPO_ROOT)}: {type(error).__name__}: {error}"
    assert not missing, "\n".join(missing.values())
