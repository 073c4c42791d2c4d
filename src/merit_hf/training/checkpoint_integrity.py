"""Whether a file of a training checkpoint reads back whole, before anything is loaded from it.

Pretraining's Accelerate checkpoints and fine-tuning's `Trainer` checkpoints are resumed only after every file passed
this check: a truncated or corrupt file would otherwise stop a resume half-way with a bare torch or safetensors error
or, for a damaged RNG state, let it go on without that state (Accelerate and the Trainer log that at INFO only), so that
the resumed run silently differs from an uninterrupted one. Nothing is unpickled: torch.save's zip archives are read
against their CRCs (which `torch.load` does not check), a safetensors file's header against its size, and the JSON
files are parsed.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

# torch.save writes zip archives under these names: Accelerate's `.bin` / `.pkl`, the Trainer's `.pt` / `.pth` / `.bin`
TORCH_SAVE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


def checkpoint_file_problem(file: Path) -> str | None:
    """What is wrong with one checkpoint file, by its kind, or `None`; files of other kinds are not read."""
    if file.suffix == ".json":
        try:
            json.loads(file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            return f"is not valid JSON ({error}): truncated or corrupt"
    elif file.suffix == ".safetensors":
        try:
            with safe_open(file, framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            return f"is not a complete safetensors file ({error})"
    elif file.suffix in TORCH_SAVE_SUFFIXES:
        if not zipfile.is_zipfile(file):
            return "is not a complete torch.save archive (no zip directory at its end): truncated or corrupt"
        try:
            with zipfile.ZipFile(file) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            return f"is a damaged torch.save archive ({error})"
        if damaged is not None:
            return f"is corrupt: its entry {damaged} does not read back intact (zip CRC or header)"
    return None


def damaged_files(folder: Path) -> dict[str, str]:
    """`{file name: problem}` of the files directly in `folder` that do not read back whole
    (`checkpoint_file_problem`)."""
    return {
        file.name: problem
        for file in sorted(folder.iterdir())
        if file.is_file() and (problem := checkpoint_file_problem(file))
    }


__all__ = ["TORCH_SAVE_SUFFIXES", "checkpoint_file_problem", "damaged_files"]
