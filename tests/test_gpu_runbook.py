"""`benchmarks/gpu_runbook.sh` is ready for the GPU machine: valid bash, every step's script and flags exist, the
test files it names exist, and the steps fit the time of one device-tool call.

The runbook runs on a machine lent for 15 minutes, where a renamed flag costs the whole run; here, without network
or GPU, each `step NAME BUDGET COMMAND` line of its `run_steps` is parsed by the script's own argument parser and
stopped right there (`tests/test_docs_commands.py`'s `parse_as_script`), flags forwarded to the pretraining script
included. Nothing is measured, read or written.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.test_docs_commands import _forwarded, _parse_command, joined_shell_lines, parse_as_script

RUNBOOK = REPO_ROOT / "benchmarks" / "gpu_runbook.sh"
WHEEL_PLANNER = REPO_ROOT / "benchmarks" / "gpu_runbook_wheels.py"
# Before the first step `run` sets up a bare machine (nvidia-smi, the wheels' plan and install, imports, the text
# tower, the data): about 40-70 s, not measured; `step` keeps 15 s back before the deadline.
SETUP_S = 70
STEP_RESERVE_S = 15
# in order of value: issue 14's inference rows, feature extraction on CUDA, issue 18's end to end, the memory / MFU
# rows with selective checkpointing; fine-tuning precision last, where a short deadline cuts first
FIRST_STEPS = ["encoder", "feature_extraction", "e2e", "memory_selective"]


def runbook_steps(text: str | None = None) -> list[tuple[int, str, int, list[str]]]:
    """`(line, name, budget_s, command words)` of every `step` line of `run_steps`, continuation lines joined."""
    text = RUNBOOK.read_text() if text is None else text
    body = re.search(r"^run_steps\(\) \{\n(.*?)^\}", text, re.S | re.M)
    assert body, "gpu_runbook.sh has no run_steps() { ... } function"
    first = text[: body.start(1)].count("\n") + 1
    steps = []
    for start, joined in joined_shell_lines(body.group(1).splitlines(), first):
        words = shlex.split(joined, comments=True)
        assert words[0] == "step" and len(words) > 3, f"gpu_runbook.sh:{start}: not `step NAME BUDGET COMMAND`"
        steps.append((start, words[1], int(words[2]), words[3:]))
    return steps


def python_target(words: list[str]) -> tuple[str, list[str]]:
    """`[env VAR=value ...] python3 (script.py | -m module) args` -> (target, args) as test_docs_commands reads them."""
    while words[0] == "env" or re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    assert re.fullmatch(r"python3?", words[0]), f"not a python command: {words}"
    if words[1] == "-m":
        return f"-m {words[2]}", words[3:]
    return words[1], words[2:]


STEPS = runbook_steps()
SCRIPT_STEPS = [s for s in STEPS if not python_target(s[3])[0].startswith("-m pytest")]
TEST_STEPS = [s for s in STEPS if python_target(s[3])[0].startswith("-m pytest")]


def default_deadline_s() -> int:
    """`run`'s deadline without RUNBOOK_DEADLINE_S: the tool's limit less the margin for the last pack."""
    text = RUNBOOK.read_text()
    limit = int(re.search(r"^TIMEOUT_S=(\d+)", text, re.M).group(1))
    margin = int(re.search(r"^DEADLINE_MARGIN_S=(\d+)", text, re.M).group(1))
    assert 'DEADLINE="${RUNBOOK_DEADLINE_S:-$((TIMEOUT_S - DEADLINE_MARGIN_S))}"' in text
    return limit - margin


def test_runbook_is_valid_bash_and_has_its_steps():
    """The budgets were 525 s against a 560 s deadline that the setup (40-70 s) also counts against, so the last
    steps were cut or skipped whatever their value. Now the valuable steps come first, and with the setup every
    step but the last (fine-tuning precision, which writes each row as it finishes) fits the default deadline."""
    done = subprocess.run(["bash", "-n", str(RUNBOOK)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    names = [name for _, name, _, _ in STEPS]
    assert len(set(names)) == len(names)
    assert {"tests", "tests_slow", "e2e_norms"} <= set(names)
    assert names[: len(FIRST_STEPS)] == FIRST_STEPS and names[-1] == "finetune_precision"
    budgets = [budget for _, _, budget, _ in STEPS]
    assert SETUP_S + sum(budgets[:-1]) + STEP_RESERVE_S <= default_deadline_s(), "the steps exceed the deadline"


def _parse_step(line: int, words: list[str]):
    target, argv = python_target(words)
    command = _parse_command("benchmarks/gpu_runbook.sh", line, shlex.join(words))
    assert command is not None and command.target == target, f"gpu_runbook.sh:{line}: {words}"
    assert (REPO_ROOT / target).is_file(), f"gpu_runbook.sh:{line}: {target} does not exist"
    parsed = parse_as_script(target, argv)
    for forwarded_target, forwarded_argv in _forwarded(command, parsed):
        parse_as_script(forwarded_target, forwarded_argv)
    return parsed


@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
@pytest.mark.parametrize("line, name, budget, words", SCRIPT_STEPS, ids=[s[1] for s in SCRIPT_STEPS])
def test_step_script_and_flags_exist(line, name, budget, words, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    try:
        _parse_step(line, words)
    except SystemExit as exit_:
        pytest.fail(f"gpu_runbook.sh:{line} ({name}) exits ({exit_.code}): {capsys.readouterr().err.strip()[-600:]}")


def test_the_end_to_end_step_forwards_a_text_tower_the_device_has(monkeypatch):
    """No download is possible there: the text tower is the folder `run` writes, not the config's package name, and
    the data the archive `run` unpacks."""
    monkeypatch.chdir(REPO_ROOT)
    end_to_end = [s for s in STEPS if s[1].startswith("e2e")]
    assert end_to_end
    for line, _, _, words in end_to_end:
        parsed = _parse_step(line, words)
        assert parsed.end_to_end and parsed.config == "configs/base.yaml" and parsed.data_dir == "/tmp/ptbxl_2k"
        assert parsed.e2e_flags == ["--text_model_name_or_path", "/tmp/minilm_random"]
        assert "cuda" in (parsed.output or "cuda")  # `run` packs benchmarks/results/*cuda*.json
    assert "make_text_tower python3 /tmp/minilm_random" in RUNBOOK.read_text()  # what `run` writes before the steps
    assert "unpack_data python3 /tmp" in RUNBOOK.read_text()


@pytest.mark.parametrize("line, name, budget, words", TEST_STEPS, ids=[s[1] for s in TEST_STEPS])
def test_step_test_files_exist(line, name, budget, words):
    _, argv = python_target(words)
    paths = [word for word in argv if word.startswith("tests/")]
    assert paths, f"gpu_runbook.sh:{line}: names no test file"
    for path in paths:
        file, _, function = path.partition("::")
        assert (REPO_ROOT / file).is_file(), f"gpu_runbook.sh:{line}: {file} does not exist"
        if function:
            assert f"def {function.split('[')[0]}(" in (REPO_ROOT / file).read_text(), f"{path}: no such test"


def test_a_broken_step_is_caught(monkeypatch):
    """The checks can fail: an unknown flag, a variant the script does not offer, a missing test file."""
    monkeypatch.chdir(REPO_ROOT)
    text = RUNBOOK.read_text()
    broken = runbook_steps(text.replace("--skip_hubert", "--skip_hubert_rows"))
    ((line, _, _, words),) = [s for s in broken if s[1] == "encoder"]
    with pytest.raises(SystemExit):
        _parse_step(line, words)
    broken = runbook_steps(text.replace('"ecg_values precomputed"', '"ecg_values cached"'))
    ((line, _, _, words),) = [s for s in broken if s[1] == "e2e"]
    with pytest.raises(SystemExit):
        _parse_step(line, words)
    broken = runbook_steps(text.replace("--e2e_flags --text_model_name_or_path", "--e2e_flags --text_model_path"))
    ((line, _, _, words),) = [s for s in broken if s[1] == "e2e"]
    with pytest.raises(ValueError, match="unknown flag"):
        _parse_step(line, words)
    broken = runbook_steps(text.replace("tests/test_eval_probe.py", "tests/test_eval_probes.py"))
    with pytest.raises(AssertionError, match="does not exist"):
        test_step_test_files_exist(*[s for s in broken if s[1] == "tests"][0])


def test_wheel_planner_follows_requirements_and_names_what_is_missing(tmp_path):
    """`gpu_runbook_wheels.py plan` on made-up wheels: a carried dependency is installed only where the interpreter
    lacks a fitting version, and a requirement nothing satisfies is named (exit 1)."""
    import zipfile

    def wheel(name, version, *requires):
        with zipfile.ZipFile(tmp_path / f"{name}-{version}-py3-none-any.whl", "w") as archive:
            lines = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
            archive.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")

    wheel("transformers", "5.25.0", "pytest>=1", "no-such-package-here>=1", "numpy>=1")
    wheel("no_such_package_here", "1.0")
    wheel("pytest", "9.2.0")
    done = subprocess.run([sys.executable, str(WHEEL_PLANNER), "plan", str(tmp_path)], capture_output=True, text=True)
    chosen = sorted(line.rsplit("/", 1)[-1] for line in done.stdout.splitlines())
    # transformers always; the missing package from its wheel; pytest and numpy are this interpreter's own
    assert chosen == ["no_such_package_here-1.0-py3-none-any.whl", "transformers-5.25.0-py3-none-any.whl"]
    assert done.returncode == 1 and "UNMET: no wheel of huggingface-hub" in done.stderr  # an ALWAYS one not carried
    wheel("datasets", "5.2.0", "another-missing-one>=2")
    done = subprocess.run([sys.executable, str(WHEEL_PLANNER), "plan", str(tmp_path)], capture_output=True, text=True)
    assert "UNMET: datasets needs another-missing-one>=2: the device has none and no carried wheel fits" in done.stderr


def test_the_device_call_fits_the_tool():
    """The call names its deadline; a shorter call (the session's device time left) gets a deadline to match."""
    done = subprocess.run(["bash", str(RUNBOOK), "call"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0 and len(done.stdout) < 2000
    assert f'"command": "RUNBOOK_DEADLINE_S={default_deadline_s()} bash benchmarks/gpu_runbook.sh run"' in done.stdout
    assert '".whl", ".gpudata"' in done.stdout and '"timeout_s": 600}' in done.stdout
    done = subprocess.run(["bash", str(RUNBOOK), "call", "450"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert '"command": "RUNBOOK_DEADLINE_S=410 bash' in done.stdout and '"timeout_s": 450}' in done.stdout
    for wrong in ("700", "30", "soon"):
        done = subprocess.run(["bash", str(RUNBOOK), "call", wrong], capture_output=True, text=True, cwd=REPO_ROOT)
        assert done.returncode == 2 and "TIMEOUT_S must be" in done.stderr, wrong


def test_the_tests_step_goes_on_after_a_failure():
    """`-x` stopped the whole step at the first failure of its six files, in the one GPU call there is."""
    ((_, _, _, words),) = [s for s in STEPS if s[1] == "tests"]
    assert "--maxfail=10" in words and "-x" not in words


def test_the_memory_step_measures_selective_checkpointing(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    ((line, _, _, words),) = [s for s in STEPS if s[1] == "memory_selective"]
    parsed = _parse_step(line, words)
    assert parsed.memory_options and {"selective", "compile + selective"} <= set(parsed.options)
    assert "cuda" in parsed.output


def test_tests_launch_accelerate_through_their_interpreter():
    """The launcher tests ran the `accelerate` console script beside `sys.executable`, which pip on the GPU machine
    puts in another bin/ than its python3's. They run `python -m accelerate.commands.launch` now."""
    from tests.conftest import ACCELERATE_LAUNCH

    beside = ".with_name(" + '"accelerate")'  # split: this file would match itself
    for folder in ("tests", "benchmarks"):
        for path in (REPO_ROOT / folder).glob("*.py"):
            assert beside not in path.read_text(), path
    done = subprocess.run([*ACCELERATE_LAUNCH, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--num_processes" in done.stdout, done.stderr[-2000:]
