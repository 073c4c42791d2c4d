"""merit_hf as a pip-installed wheel, run outside a clone: the training configs ship in the package and are named as
`tiny` or by their documented path `configs/tiny.yaml`; every file the package reads at run time is in the wheel; the
quick-start without the clone's PTB-XL sample says where to get records.

The end-to-end test builds the wheel from a copy of the source tree, installs it with --no-deps into a throwaway
virtual environment that sees this environment's dependencies, and runs the jobs there from a folder outside the
repository, with PYTHONPATH unset, so neither `src/` nor `tests/` can stand in for a file the wheel lacks.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from merit_hf.training.pretrain import ARGUMENT_CLASSES
from merit_hf.utils.arguments import PACKAGED_CONFIGS_DIR, packaged_config_names, parse_arguments, resolve_config_path
from tests.conftest import BUNDLED_PTBXL, REPO_ROOT, tiny_text_config, train_tiny_tokenizer

PACKAGE_DIR = REPO_ROOT / "src" / "merit_hf"
REPOSITORY_ONLY = ("tests", "benchmarks", "dataset_scripts", "spaces_demo")  # top-level folders a wheel does not hold
SHIPPED_RESULTS = (
    REPO_ROOT / "benchmarks" / "results" / "evaluation" / "quickstart" / "linear-probe_superclass_1_seed0.json"
)


# ----------------------------------------------------------------------------------------------------------------------
# Configs by name


def test_packaged_configs_are_the_repository_configs():
    """One copy: `merit_hf/configs` is the top-level `configs/` (a link), so what the README edits is what ships."""
    documented = sorted(path.name for path in (REPO_ROOT / "configs").glob("*.yaml"))
    assert documented and packaged_config_names() == [Path(name).stem for name in documented]
    for name in documented:
        assert (PACKAGED_CONFIGS_DIR / name).read_bytes() == (REPO_ROOT / "configs" / name).read_bytes(), name


@pytest.mark.parametrize("name", ["tiny", "tiny.yaml", "configs/tiny.yaml", "./configs/tiny.yaml"])
def test_config_named_outside_a_clone_is_the_packaged_copy(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(name) == PACKAGED_CONFIGS_DIR / "tiny.yaml"
    model_args, data_args, train_args = parse_arguments(ARGUMENT_CLASSES, [name, "--max_steps", "3"])
    assert train_args.max_steps == 3 and train_args.per_device_train_batch_size == 8  # the flag wins, YAML kept
    assert data_args.data_dir == "data/ptbxl_sample" and model_args.ecg_config["hidden_size"] == 32


def test_a_config_that_exists_in_the_working_directory_wins(tmp_path, monkeypatch):
    """The exact behaviour before packaged configs: a path that exists is read, whatever its name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("max_steps: 7\n")
    (tmp_path / "tiny").write_text("max_steps: 9\n")
    assert resolve_config_path("configs/tiny.yaml") == Path("configs/tiny.yaml")
    assert parse_arguments(ARGUMENT_CLASSES, ["configs/tiny.yaml"])[2].max_steps == 7
    assert parse_arguments(ARGUMENT_CLASSES, ["tiny"])[2].max_steps == 9
    packaged_steps = yaml.safe_load((PACKAGED_CONFIGS_DIR / "tiny.yaml").read_text())["max_steps"]
    assert parse_arguments(ARGUMENT_CLASSES, ["tiny.yaml"])[2].max_steps == packaged_steps  # the packaged one


@pytest.mark.parametrize(
    ("name", "hint"),
    [("configs/tinny.yaml", "; did you mean 'tiny'?"), ("other/tiny.yaml", "; did you mean 'tiny'?"), ("zzz", "")],
)
def test_missing_config_names_the_packaged_ones(name, hint, tmp_path, monkeypatch):
    """A typo, or a folder other than `configs/` (never silently swapped for a packaged file of the same name)."""
    monkeypatch.chdir(tmp_path)
    names = packaged_config_names()
    assert {"tiny", "base", "quickstart", "probe_quickstart", "report_smollm2"} <= set(names)
    with pytest.raises(FileNotFoundError) as raised:
        parse_arguments(ARGUMENT_CLASSES, [name, "--max_steps", "3"])
    assert str(raised.value) == (
        f"{name}: config file not found (no such file in {tmp_path}, and merit_hf's packaged configs are {names}: "
        f"name one as `tiny` or `configs/tiny.yaml`{hint})"
    )


def test_quickstart_without_a_clone_says_where_to_get_records(tmp_path, monkeypatch):
    """A pip install has no data/ptbxl_sample: the quick-start stops before writing anything, naming --data_dir and
    PTB-XL's PhysioNet address; a --data_dir that holds no PTB-XL gets the same advice."""
    from merit_hf import quickstart

    monkeypatch.setattr(quickstart, "BUNDLED_PTBXL", tmp_path / "site-packages" / "data" / "ptbxl_sample")
    output_dir = tmp_path / "quickstart_output"
    for flags, start in (([], "no --data_dir given"), (["--data_dir", str(tmp_path)], f"{tmp_path}: no PTB-XL")):
        with pytest.raises(FileNotFoundError) as raised:
            quickstart.main([*flags, "--output_dir", str(output_dir)])
        message = str(raised.value)
        assert message.startswith(start) and "--data_dir takes a PTB-XL folder" in message
        assert "https://physionet.org/content/ptb-xl/1.0.3/" in message and "data/ptbxl_sample" in message
    assert not output_dir.exists()


def test_a_missing_dataset_folder_is_named_with_where_the_sample_lives(tmp_path, monkeypatch):
    """The configs' `data_dir: data/ptbxl_sample` outside a clone: not a Hub error about a repository `data`."""
    from merit_hf.data import load_dataset

    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"^data/ptbxl_sample: no such folder in .*in a clone of the repository"
    ) as raised:
        load_dataset("ptbxl", "data/ptbxl_sample")
    assert "commands' --dataset, pretraining's --data_dir, report LoRA's --ptbxl_dir" in str(raised.value)


def test_the_package_imports_nothing_that_only_a_clone_has():
    """`import tests...` or `benchmarks...` from src would work in a clone (the repository root is on sys.path under
    pytest) and fail from a wheel."""
    offenders = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(REPO_ROOT)}: {name}" for name in names if name.split(".")[0] in REPOSITORY_ONLY
            ]
    assert offenders == []


@pytest.mark.parametrize("requirements", ["pyproject.toml", "spaces_demo/requirements.txt"])
def test_numpy_floor_is_one_that_pyarrow_runs_with(requirements):
    """pyarrow 26, which `datasets` pulls in, declares no NumPy requirement but stops at import with "pyarrow requires
    NumPy 2.0 or newer": a floor below 2 lets pip keep a NumPy 1 with which `merit_hf.data` cannot be imported."""
    text = (REPO_ROOT / requirements).read_text()
    if requirements.endswith(".toml"):
        lines = tomllib.loads(text)["project"]["dependencies"]
    else:
        # a local wheel (`./merit_hf-...whl`) is a path, not a requirement specifier
        lines = [line for line in text.splitlines() if line and not line.startswith(("#", "-", "./"))]
    (numpy,) = [Requirement(line) for line in lines if Requirement(line).name == "numpy"]
    assert not numpy.specifier.contains("1.26.4") and numpy.specifier.contains("2.0.0"), numpy


# ----------------------------------------------------------------------------------------------------------------------
# The wheel, installed, outside the clone


def copy_source_tree(source: Path, folders: tuple[str, ...] = ("src", "configs")) -> Path:
    """A copy of what a build reads (links kept as links, as git checks them out), so a stale `build/` in the checkout
    cannot add files that the sources no longer have."""
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in folders:
        shutil.copytree(REPO_ROOT / folder, source / folder, symlinks=True, ignore=ignore)
    return source


def build_wheel(tmp_path: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the source tree."""
    source = copy_source_tree(tmp_path / "source")
    # offline, use this environment's setuptools; without it, pip fetches the build requirements (CI: from PyPI)
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path / "dist")]
    subprocess.run([*command, str(source)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("merit_hf-*.whl")
    return wheel


@pytest.mark.slow
def test_sdist_holds_the_licence_and_no_tests(tmp_path):
    """setuptools adds `tests/test*.py` to an sdist by default, without the conftest, helpers and data they need:
    MANIFEST.in prunes the folder (the tests run from a clone). The licence text ships."""
    source = copy_source_tree(tmp_path / "source", folders=("src", "configs", "tests"))
    build = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")],
        cwd=source, check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    archive = tmp_path / "dist" / done.stdout.strip().splitlines()[-1]
    top = archive.name.removesuffix(".tar.gz")
    with tarfile.open(archive) as sdist:
        names = {name.removeprefix(f"{top}/") for name in sdist.getnames()}
        assert sdist.extractfile(f"{top}/LICENSE").read() == (REPO_ROOT / "LICENSE").read_bytes()
    assert sorted(name for name in names if name.split("/")[0] == "tests") == []
    assert {"README.md", "pyproject.toml", "src/merit_hf/__init__.py", "src/merit_hf/configs/tiny.yaml"} <= names


def install_in_throwaway_venv(wheel: Path, venv: Path) -> Path:
    """A venv holding only the wheel (installed before this environment's packages are visible, so pip neither sees
    nor touches an editable merit_hf there), then a `.pth` line that adds this environment's site-packages after its
    own: merit_hf comes from the wheel, its dependencies from here."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(own) / "dependencies_of_the_test_environment.pth").write_text("\n".join(ours) + "\n")
    return python


def run_outside_the_clone(python: Path, args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(cwd / "hf_home"))
    done = subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, f"{' '.join(args)}:\n{done.stderr[-4000:]}"
    return done


_LOAD_AND_CLASSIFY = r"""
import json, sys
import merit_hf
from transformers import AutoModel, pipeline
folder, record = sys.argv[1:3]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
classify = pipeline("zero-shot-ecg-classification", model=folder, trust_remote_code=True)
scores = classify(record, candidate_labels=["NORM", "MI", "CD"], class_descriptions="superclass")
print(json.dumps({"merit_hf": merit_hf.__file__, "model_class": type(model).__name__,
                  "labels": sorted(score["label"] for score in scores)}))
"""


@pytest.mark.slow
def test_wheel_installed_outside_the_clone_trains_loads_and_classifies(tmp_path):
    """What a pip user does first: pretrain from the packaged `tiny` config, load the folder with trust_remote_code,
    zero-shot classify with the shipped PTB-XL prompts, render a model card; and the quick-start's advice without data.
    Every non-Python file in the package (configs, templates, prompts, JSON) must be in the wheel."""
    from merit_hf.data import build_ptbxl

    wheel = build_wheel(tmp_path)
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    package_files = {
        f"merit_hf/{(Path(folder) / name).relative_to(PACKAGE_DIR)}"
        for folder, _, names in os.walk(PACKAGE_DIR, followlinks=True)  # through the configs link
        for name in names
        if Path(name).suffix not in (".py", ".pyc")
    }
    assert {f"merit_hf/configs/{name}.yaml" for name in packaged_config_names()} <= package_files
    assert sorted(package_files - in_wheel) == []
    dist_info = wheel.name.split("-py3")[0] + ".dist-info"
    assert {name.split("/")[0] for name in in_wheel} == {"merit_hf", dist_info}
    # the licence text itself (Apache-2.0 §4(a)), declared in the metadata
    assert zipfile.ZipFile(wheel).read(f"{dist_info}/licenses/LICENSE") == (REPO_ROOT / "LICENSE").read_bytes()
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert "License-File: LICENSE" in metadata.splitlines()

    python = install_in_throwaway_venv(wheel, tmp_path / "venv")
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    assert REPO_ROOT not in run_dir.resolve().parents
    assets = tmp_path / "assets"
    tokenizer = train_tiny_tokenizer(assets / "text")
    from transformers import BertModel

    BertModel(tiny_text_config(vocab_size=len(tokenizer))).save_pretrained(assets / "text")
    build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(1, 161), ptbxl_version="as_is").save_to_disk(
        str(assets / "ptbxl")
    )

    flags = ["--max_steps", "2", "--save_steps", "2", "--eval_steps", "2", "--ptbxl_version", "as_is"]
    flags += ["--text_model_name_or_path", str(assets / "text"), "--data_dir", str(assets / "ptbxl")]
    flags += ["--output_dir", "pretrain-tiny", "--report_to", "none", "--disable_tqdm", "true"]
    run_outside_the_clone(python, ["-m", "merit_hf.training.pretrain", "tiny", *flags], run_dir)
    results = json.loads((run_dir / "pretrain-tiny" / "train_results.json").read_text())
    assert results["global_step"] == 2 and "eval_loss" in results
    model_dir = run_dir / "pretrain-tiny" / "model"

    record = BUNDLED_PTBXL / "records100" / "00000" / "00001_lr"
    done = run_outside_the_clone(python, ["-c", _LOAD_AND_CLASSIFY, str(model_dir), str(record)], run_dir)
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["merit_hf"].startswith(str(tmp_path / "venv")), loaded["merit_hf"]  # the wheel, not src/
    assert loaded["model_class"] == "MeritModel" and loaded["labels"] == ["CD", "MI", "NORM"]

    # the shipped results are of the quick-start's weights, not this 2-step model's: refused unless asked for, and
    # then the card says so
    card = ["model", str(SHIPPED_RESULTS), "--repo-id", "org/merit-tiny", "--model-folder", str(model_dir)]
    done = run_outside_the_clone(python, ["-m", "merit_hf.hub.cards", *card, "-o", "card.md"], run_dir, check=False)
    assert done.returncode != 0 and "the results are not of this folder's weights" in done.stderr
    run_outside_the_clone(
        python, ["-m", "merit_hf.hub.cards", *card, "--allow-weights-mismatch", "-o", "card.md"], run_dir
    )
    rendered = (run_dir / "card.md").read_text()
    assert "org/merit-tiny" in rendered and "these are not this checkpoint's numbers" in rendered

    done = run_outside_the_clone(python, ["-m", "merit_hf.quickstart"], run_dir, check=False)
    assert done.returncode != 0 and "no --data_dir given" in done.stderr and "physionet.org" in done.stderr
    assert not (run_dir / "quickstart_output").exists()
