"""Regenerate `src/merit_hf/data/ptbxl_v1_0_3_changes.json` from PTB-XL's official v1.0.3 change log.

    python dataset_scripts/ptbxl/v1_0_3_changes.py --changelog <ptb-xl>/ptbxl_v103_changelog.txt          # write
    python dataset_scripts/ptbxl/v1_0_3_changes.py --changelog <ptb-xl>/ptbxl_v103_changelog.txt --check  # compare

What the log says, and why only v1.0.3's log is parsed: v1.0.2 dropped 36 duplicate ECGs (its log,
`ptbxl_v102_changelog.txt`, lists for a pair the dropped twin's codes as "Before" and the kept twin's as "After", as
they are in v1.0.1's `ptbxl_database.csv`). v1.0.3 supersedes it: it drops 38 (two of v1.0.2's pairs are triplicates:
11814/11815 -> 11816 and 3800/3801 -> 3802, where v1.0.2 had kept 11815 and 3801) and, per change, writes a
`consensus: {code: likelihood}` into the kept row: the statements all twins share, at their lowest likelihood (for
3802 derived from 3801 and 3800 only, as the log prints). A change without a `consensus:` line keeps the kept row's
codes. The waveforms are the same in every version.

The JSON holds, besides the parsed changes, the two maps the loaders use (`dropped`: dropped ecg_id -> the kept
ecg_id it duplicates; `consensus_scp_codes`: kept ecg_id -> its v1.0.3 codes), the log's sha256, the source, the
licence (CC BY 4.0) and the citation. `tests/test_data_ptbxl_versions.py` asserts the vendored file equals what
`parse_changelog` makes of the log and checks every id and fold against v1.0.1's full `ptbxl_database.csv`.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUT = REPO_ROOT / "src" / "merit_hf" / "data" / "ptbxl_v1_0_3_changes.json"
NUM_DROPPED = 38  # "Dropped ecg_ids [38 in total]", the log's own count

SOURCE = (
    "PTB-XL v1.0.3's official change log, ptbxl_v103_changelog.txt (PTB-XL on PhysioNet, "
    "https://physionet.org/content/ptb-xl/1.0.3/), parsed by dataset_scripts/ptbxl/v1_0_3_changes.py"
)
LICENSE = "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/), as PTB-XL"
CITATION = (
    "Wagner, P., Strodthoff, N., Bousseljot, R.-D., Kreiseler, D., Lunze, F. I., Samek, W., Schaeffter, T. (2020). "
    "PTB-XL, a large publicly available electrocardiography dataset. Scientific Data 7, 154. "
    "https://doi.org/10.1038/s41597-020-0495-6"
)
DESCRIPTION = (
    "What PTB-XL v1.0.3 changes in v1.0.1's ptbxl_database.csv (the records are the same in every version): it drops "
    "38 duplicate ECGs (`dropped`: dropped ecg_id -> the kept ecg_id it duplicates) and gives some kept twins a "
    "consensus label (`consensus_scp_codes`: kept ecg_id -> its scp_codes in v1.0.3, replacing the row's own). "
    "v1.0.3 supersedes v1.0.2 (36 drops). `changes` is the log, change by change. Read by "
    "merit_hf.data.ptbxl_versions (load_dataset('ptbxl', ..., ptbxl_version='1.0.3'))."
)

_CHANGE = re.compile(r"#### Change (\d+)")
_ROW = re.compile(r"->(drop|keep) row with ecg_id=(\d+) \[strat_fold=(\d+)\]")
_TOTAL = re.compile(r"Dropped ecg_ids \[(\d+) in total\] =\[([\d, ]*)\]")


def parse_changelog(text: str) -> dict[str, Any]:
    """The changes of PTB-XL's v1.0.3 change log as the JSON written next to the loaders; raises `ValueError` on a
    line it does not understand or on a log that contradicts itself (its total, a twice-dropped id)."""
    changes: list[dict[str, Any]] = []
    group, declared = None, None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        where = f"changelog line {number}"
        if not line or set(line) == {"#"}:
            continue
        if line.startswith("###") and line.endswith("###"):
            group = line.strip("# ").lower()  # "duplicates" / "triplicates"
        elif match := _CHANGE.fullmatch(line):
            changes.append({"change": int(match[1]), "group": group, "note": None, "drop": [], "keep": None})
        elif line.startswith("!!!"):
            _current(changes, where)["note"] = line.removeprefix("!!!").strip()
        elif match := _ROW.fullmatch(line):
            row = {"ecg_id": int(match[2]), "strat_fold": int(match[3])}
            change = _current(changes, where)
            if match[1] == "drop":
                change["drop"].append(row)
            elif change["keep"] is not None:
                raise ValueError(f"{where}: change {change['change']} keeps two rows")
            else:
                change["keep"] = row
        elif line.startswith("consensus label derived from:"):
            value = ast.literal_eval("[" + line.removeprefix("consensus label derived from:").strip() + "]")
            _current(changes, where)["consensus_derived_from"] = [_codes(item, where) for item in value]
        elif line.startswith("consensus:"):
            _current(changes, where)["consensus_scp_codes"] = _codes(
                ast.literal_eval(line.removeprefix("consensus:").strip()), where
            )
        elif match := _TOTAL.fullmatch(line):
            declared = (int(match[1]), [int(value) for value in match[2].split(",") if value.strip()])
        else:
            raise ValueError(f"{where}: not understood: {line!r}")
    for change in changes:
        if change["keep"] is None or not change["drop"]:
            raise ValueError(f"change {change['change']}: needs one kept row and at least one dropped row")
        change.setdefault("consensus_scp_codes", None)
        change.setdefault("consensus_derived_from", None)
    dropped = {row["ecg_id"]: change["keep"]["ecg_id"] for change in changes for row in change["drop"]}
    if len(dropped) != sum(len(change["drop"]) for change in changes):
        raise ValueError("an ecg_id is dropped by two changes")
    if declared is None:
        raise ValueError("no 'Dropped ecg_ids [N in total] =[...]' line")
    if declared[0] != len(dropped) or sorted(declared[1]) != sorted(dropped):
        raise ValueError(f"the log's total ({declared[0]} ids) differs from its changes ({len(dropped)} ids)")
    consensus = {
        change["keep"]["ecg_id"]: change["consensus_scp_codes"]
        for change in changes
        if change["consensus_scp_codes"] is not None
    }
    return {
        "name": "PTB-XL v1.0.3 changes to ptbxl_database.csv",
        "version": "1.0.3",
        "description": DESCRIPTION,
        "source": SOURCE,
        "changelog_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "license": LICENSE,
        "citation": CITATION,
        "num_dropped": len(dropped),
        "num_consensus": len(consensus),
        "dropped": {str(ecg_id): dropped[ecg_id] for ecg_id in sorted(dropped)},
        "consensus_scp_codes": {str(ecg_id): consensus[ecg_id] for ecg_id in sorted(consensus)},
        "changes": changes,
    }


def render(table: dict[str, Any]) -> str:
    """The file's text: one dropped id, consensus or change per line, so that a diff reads change by change."""
    lines = []
    for key, value in table.items():
        if isinstance(value, dict):
            items = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in value.items()]
            lines.append(f" {json.dumps(key)}: {{\n" + ",\n".join(items) + "\n }")
        elif isinstance(value, list):
            items = [f"  {json.dumps(item, ensure_ascii=False)}" for item in value]
            lines.append(f" {json.dumps(key)}: [\n" + ",\n".join(items) + "\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _current(changes: list[dict[str, Any]], where: str) -> dict[str, Any]:
    if not changes:
        raise ValueError(f"{where}: a row before the first '#### Change'")
    return changes[-1]


def _codes(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a dict of SCP code -> likelihood, got {value!r}")
    return {str(code): float(likelihood) for code, likelihood in value.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changelog", required=True, help="PTB-XL's ptbxl_v103_changelog.txt")
    parser.add_argument("--output", default=str(OUTPUT), help="the JSON to write (default: the package's)")
    parser.add_argument("--check", action="store_true", help="only compare with --output; exit 1 if it differs")
    args = parser.parse_args(argv)
    table = parse_changelog(Path(args.changelog).read_text(encoding="utf-8"))
    if table["num_dropped"] != NUM_DROPPED:
        raise ValueError(f"{args.changelog}: {table['num_dropped']} dropped ids, v1.0.3 drops {NUM_DROPPED}")
    text, output = render(table), Path(args.output)
    if args.check:
        same = output.is_file() and output.read_text(encoding="utf-8") == text
        print(f"{output}: {'up to date' if same else 'differs from the change log; regenerate it'}")
        return 0 if same else 1
    output.write_text(text, encoding="utf-8")
    print(f"{output}: {table['num_dropped']} dropped ids, {table['num_consensus']} consensus relabels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
