"""Which of the wheels that `benchmarks/gpu_runbook.sh` carries to the GPU machine it installs there, and whether the
requirements of the installed ones are met (standard library + `packaging`, which every pip has).

    python3 benchmarks/gpu_runbook_wheels.py plan .whl                  # on the device: the wheels to install
    python3 benchmarks/gpu_runbook_wheels.py plan .whl --simulate       # here: the same against the device as known
    python3 benchmarks/gpu_runbook_wheels.py verify .whl /tmp/site      # after installing: unmet requirements

`plan` always installs the wheels of `ALWAYS` (the versions the project needs), those of `IF_MISSING` where the device
has none; any other carried wheel (a dependency of those) only where the interpreter lacks a version that satisfies
what the installed wheels require, so that the device's own packages stay in use wherever they fit. It follows the requirements transitively and exits 1 naming any
requirement neither the device nor a carried wheel satisfies. `--simulate` plans against `DEVICE` below (what the
device is known to have: the versions the GPU sessions' brief lists, and the packages implied by them) instead
of this interpreter, assuming the worst where a version is unknown: that is how `gpu_runbook.sh check` verifies here
that the wheel set is complete. Report lines go to stderr, the wheel paths to install to stdout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # a bare interpreter: pip vendors packaging
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

# What the project needs at these versions: always installed, over the device's own where it has one.
ALWAYS = ("transformers", "huggingface-hub", "kernels", "datasets", "wfdb", "torchdata", "torchao", "peft",
          "accelerate")  # fmt: skip
# Installed where the device has none (the runbook runs the tests), with what they require.
IF_MISSING = ("pytest",)
# Requirements left unmet on purpose, with the reason (the code paths the runbook exercises never import them).
IGNORED = {
    "soundfile": "wfdb imports it only to read FLAC-compressed signals (PTB-XL's are not)",
    "cffi": "soundfile's",
    "hf-xet": "Xet transfers only (nothing is downloaded or uploaded there)",
    "typer": "transformers' command line only",
}
UNKNOWN = "present, version unknown"
# The device as known (session briefs): Python 3.12.3, torch 2.11.0 (CUDA) and these. `UNKNOWN` where only the name is
# known; what transformers 5.17.0, huggingface_hub 1.33.0 and accelerate 1.15.0 require is there too, at versions
# that satisfy them (their Requires-Dist, read from their wheels).
PRESENT = ("peft", "numpy", "scipy", "pandas", "pyarrow", "scikit-learn", "tensorboard", "pyyaml", "tqdm", "aiohttp",
           "fsspec", "xxhash", "matplotlib", "httpx", "anyio", "idna", "h11", "certifi", "httpcore", "typer",
           "psutil")  # fmt: skip
DEVICE = {
    "python": "3.12.3",
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "tokenizers": "0.23.2",
    "safetensors": "0.8.0",
    **dict.fromkeys(PRESENT, UNKNOWN),
    # lower bounds known from the installed packages' own requirements
    "click": ">=8.4.2",
    "hf-xet": ">=1.6.0,<2",
    "regex": ">=2025.10.22",
    "packaging": ">=20.9",
    "filelock": ">=3.10.0",
    "typing-extensions": ">=4.1.0",
}
# Known absent there (the brief): datasets, wfdb, torchdata, torchao, dill, multiprocess, kernels, soundfile. Any
# name in neither dict counts as absent too (the worst case).


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_wheels(folder: Path) -> dict[str, dict]:
    """`{name: {"version", "path", "requires"}}` of the wheels in `folder`; two versions of one name are refused."""
    wheels = {}
    for path in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(path) as archive:
            metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = Parser().parsestr(archive.read(metadata_name).decode("utf-8"))
        name = canonical(metadata["Name"])
        if name in wheels:
            raise SystemExit(f"{folder}: two wheels of {name}: {wheels[name]['path'].name} and {path.name}")
        wheels[name] = {
            "version": metadata["Version"],
            "path": path,
            "requires": metadata.get_all("Requires-Dist") or [],
        }
    return wheels


def requirements(requires: list[str], environment: dict) -> list[Requirement]:
    """The requirements whose marker holds on the device (no extras asked for)."""
    kept = []
    for text in requires:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({**environment, "extra": ""}):
            kept.append(requirement)
    return kept


def satisfies(have: str | None, requirement: Requirement, simulate: bool) -> bool | None:
    """True / False, or None where the device has the package at a version not known here."""
    if have is None:
        return False
    if have == UNKNOWN or (simulate and have.startswith((">", "<", "=", "~", "!"))):
        if not requirement.specifier:
            return True
        if have != UNKNOWN:  # a known lower bound: enough if every version it allows is allowed
            floor = re.match(r">=\s*([^,]+)", have)
            if (
                floor
                and requirement.specifier.contains(floor.group(1), prereleases=True)
                and not any(spec.operator in ("<", "<=", "==", "~=", "!=") for spec in requirement.specifier)
            ):
                return True
        return None
    return requirement.specifier.contains(have, prereleases=True)


def device_version(name: str, simulate: bool) -> str | None:
    if simulate:
        return DEVICE.get(name)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def plan(folder: Path, simulate: bool) -> tuple[list[dict], list[str], list[str]]:
    """(wheels to install, problems, notes)."""
    wheels = read_wheels(folder)
    environment = default_environment()
    if simulate:
        environment.update(python_version="3.12", python_full_version="3.12.3", platform_machine="x86_64",
                           sys_platform="linux", platform_system="Linux", implementation_name="cpython")  # fmt: skip
    missing = [name for name in ALWAYS if name not in wheels]
    problems = [f"no wheel of {name} in {folder}" for name in missing]
    install = {name for name in ALWAYS if name in wheels}
    notes: list[str] = []
    for name in IF_MISSING:
        if device_version(name, simulate) is None:
            if name in wheels:
                install.add(name)
                notes.append(f"{name} {wheels[name]['version']}: the device has none")
            else:
                problems.append(f"the device has no {name} and no wheel of it is carried")
    changed = True
    while changed:
        changed = False
        for owner in sorted(install):
            for requirement in requirements(wheels[owner]["requires"], environment):
                name = canonical(requirement.name)
                if name in install:
                    if not requirement.specifier.contains(wheels[name]["version"], prereleases=True):
                        problems.append(f"{owner} needs {requirement}; the carried wheel is {wheels[name]['version']}")
                    continue
                have = device_version(name, simulate)
                verdict = satisfies(have, requirement, simulate)
                if verdict:
                    continue
                carried = wheels.get(name)
                if carried and requirement.specifier.contains(carried["version"], prereleases=True):
                    install.add(name)
                    notes.append(f"{name} {carried['version']}: {owner} needs {requirement}, the device has "
                                 f"{have or 'none'}")  # fmt: skip
                    changed = True
                elif name in IGNORED:
                    notes.append(f"{name} left out ({owner} lists it): {IGNORED[name]}")
                elif verdict is None:
                    notes.append(f"assumed: the device's {name} ({have}) satisfies {owner}'s {requirement}")
                else:
                    problems.append(f"{owner} needs {requirement}: the device has {have or 'none'} and no carried "
                                    f"wheel fits")  # fmt: skip
    notes = sorted(set(notes))
    for name in sorted(set(wheels) - install):
        notes.append(f"not installed: {name} {wheels[name]['version']} (not needed there)")
    return [wheels[name] for name in sorted(install)], sorted(set(problems)), notes


def verify(folder: Path, target: Path) -> list[str]:
    """Requirements of the wheels installed in `target`, checked against `target` first, then this interpreter."""
    sys.path.insert(0, str(target))
    wheels = read_wheels(folder)
    environment = default_environment()
    installed = {canonical(d.metadata["Name"]): d for d in importlib.metadata.distributions(path=[str(target)])}
    problems = []
    for name, distribution in sorted(installed.items()):
        if name in wheels and Version(distribution.version) != Version(wheels[name]["version"]):
            problems.append(f"{target}: {name} {distribution.version}, the wheel is {wheels[name]['version']}")
        for requirement in requirements(distribution.requires or [], environment):
            required = canonical(requirement.name)
            if required in IGNORED:
                continue
            try:
                have = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                problems.append(f"{name} needs {requirement}: not installed")
                continue
            if not requirement.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {requirement}: {have} is installed")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    planning = commands.add_parser("plan", help="the carried wheels to install on this interpreter (or --simulate)")
    planning.add_argument("wheels", type=Path)
    planning.add_argument("--simulate", action="store_true", help="plan against DEVICE, not this interpreter")
    checking = commands.add_parser("verify", help="unmet requirements of what was installed into TARGET")
    checking.add_argument("wheels", type=Path)
    checking.add_argument("target", type=Path)
    args = parser.parse_args()
    if args.command == "plan":
        chosen, problems, notes = plan(args.wheels, args.simulate)
        for line in notes:
            print(f"  {line}", file=sys.stderr)
        for line in problems:
            print(f"  UNMET: {line}", file=sys.stderr)
        for wheel in chosen:
            print(wheel["path"])
        sys.exit(1 if problems else 0)
    problems = verify(args.wheels, args.target)
    for line in problems:
        print(f"  UNMET: {line}", file=sys.stderr)
    print(f"  {'no unmet requirement' if not problems else f'{len(problems)} unmet'} among the wheels installed in "
          f"{args.target}", file=sys.stderr)  # fmt: skip
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
