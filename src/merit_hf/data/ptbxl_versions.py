"""Which PTB-XL metadata version the labels follow: v1.0.3's changes applied to older `ptbxl_database.csv` files.

PTB-XL's records are the same in every version; the metadata is not. v1.0.1's `ptbxl_database.csv` (the one bundled
in `data/ptbxl_sample` and `shared/data/ptbxl_2k`) still holds 38 duplicate ECGs that v1.0.3 drops, and 16 kept twins
whose `scp_codes` v1.0.3 replaces by a consensus of the twins (13 of them differ from the row's v1.0.1 codes, e.g.
ecg_id 1371 loses IVCD, 3802 becomes IMI + ASMI + IVCD). v1.0.2 had dropped 36 of the 38 (its log gives no
consensus); v1.0.3 supersedes it. The changes are vendored in `ptbxl_v1_0_3_changes.json` (parsed from PTB-XL's
official v1.0.3 change log by `dataset_scripts/ptbxl/v1_0_3_changes.py`; CC BY 4.0, Wagner et al. 2020).

`ptbxl_version` (an option of `build_ptbxl`, `convert_ptbxl`, `load_ptbxl` and `load_dataset("ptbxl", ...)`):

- `"1.0.3"` (default): drop the duplicates the metadata still holds and write the consensus `scp_codes` into the kept
  twins, so the label columns (`superclass`, `subclass`, ...) follow them; and store ages above 89 as 300, as v1.0.2
  began to for privacy ("Change 0" of its change log; v1.0.1 still holds the real ages, 204 rows). Metadata that is
  already v1.0.3 is left as it is (a no-op). What changed is logged and written into each split's `info.description`.
- `"as_is"`: the rows exactly as the CSV (or the converted dataset) has them, e.g. the raw v1.0.1 rows.

A converted dataset (Parquet shards, `save_to_disk` folder, Hub id) carries labels computed at conversion: with
`"1.0.3"` its duplicates are dropped the same way, but a kept twin whose `scp_codes` are not v1.0.3's cannot be
relabelled without `scp_statements.csv`, so it raises, naming the record and the remedy (convert again: the
converter applies v1.0.3's changes by default; or load with `ptbxl_version="as_is"`).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from .conversion import parse_number
from .labels import parse_scp_codes
from .streams import column_values, filter_stream

logger = logging.getLogger(__name__)

PTBXL_VERSIONS = ("1.0.3", "as_is")
AGE_OVER_89 = 300  # what PTB-XL stores for patients older than 89 since v1.0.2
DEFAULT_PTBXL_VERSION = "1.0.3"
CHANGES_FILE = Path(__file__).with_name("ptbxl_v1_0_3_changes.json")
_SUMMARY_STARTS = ("PTB-XL labels follow", "PTB-XL metadata as is")


@dataclass(frozen=True)
class PtbxlChanges:
    """PTB-XL v1.0.3's changes to older metadata: `dropped` (dropped ecg_id -> the kept ecg_id it duplicates) and
    `consensus` (kept ecg_id -> its v1.0.3 `scp_codes`)."""

    dropped: dict[int, int]
    consensus: dict[int, dict[str, float]]
    source: str = ""

    @classmethod
    def from_json(cls, path: str | Path = CHANGES_FILE) -> PtbxlChanges:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(
            dropped={int(ecg_id): int(kept) for ecg_id, kept in table["dropped"].items()},
            consensus={int(ecg_id): dict(codes) for ecg_id, codes in table["consensus_scp_codes"].items()},
            source=str(path),
        )


@functools.cache
def ptbxl_v1_0_3_changes() -> PtbxlChanges:
    """The vendored table (`ptbxl_v1_0_3_changes.json`), read once."""
    return PtbxlChanges.from_json(CHANGES_FILE)


@dataclass
class PtbxlVersionReport:
    """What `apply_ptbxl_version` changed: the dropped duplicates and the relabelled kept twins (before, after)."""

    version: str
    dropped: list[int] = field(default_factory=list)
    relabeled: dict[int, tuple[dict[str, float], dict[str, float]]] = field(default_factory=dict)
    ages_capped: list[int] = field(default_factory=list)  # ecg_ids whose age over 89 became 300

    @property
    def changed(self) -> bool:
        return bool(self.dropped or self.relabeled or self.ages_capped)

    def summary(self) -> str:
        """One sentence, for the log and the datasets' `info.description`."""
        if self.version == "as_is":
            return "PTB-XL metadata as is (ptbxl_version='as_is'): no duplicate dropped, no label changed"
        if not self.changed:
            return "PTB-XL labels follow v1.0.3 (ptbxl_version='1.0.3'): the metadata already matched v1.0.3"
        relabeled = ", ".join(
            f"{ecg_id} {sorted(before)} -> {sorted(after)}"
            for ecg_id, (before, after) in sorted(self.relabeled.items())
        )
        dropped = ", ".join(map(str, self.dropped))
        return (
            f"PTB-XL labels follow v1.0.3 (ptbxl_version='1.0.3'): dropped {len(self.dropped)} of v1.0.3's 38 "
            f"duplicate ECGs ({f'ecg_id {dropped}' if dropped else 'none was in the metadata'}); wrote v1.0.3's "
            f"consensus scp_codes into {len(self.relabeled)} kept twin(s) ({relabeled or 'none needed it'}); "
            f"stored the age of {len(self.ages_capped)} patient(s) over 89 as 300, as v1.0.2 and later do; "
            "ptbxl_version='as_is' keeps the metadata's own rows"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ptbxl_version": self.version,
            "dropped_ecg_ids": list(self.dropped),
            "relabeled": {str(ecg_id): {"before": b, "after": a} for ecg_id, (b, a) in sorted(self.relabeled.items())},
            "ages_capped_ecg_ids": list(self.ages_capped),
        }


def check_ptbxl_version(version: str) -> str:
    if version not in PTBXL_VERSIONS:
        raise ValueError(
            f"ptbxl_version must be one of {PTBXL_VERSIONS} ('1.0.3': labels follow PTB-XL v1.0.3, duplicates "
            f"dropped; 'as_is': the metadata's rows unchanged), got {version!r}"
        )
    return version


def check_ptbxl_version_for(dataset_name: str, ptbxl_version: str) -> None:
    """Refuse a `ptbxl_version` other than the default for a dataset that is not PTB-XL: MIMIC-IV-ECG and WFDB folders
    have no PTB-XL versions, so `--ptbxl_version as_is` with them was accepted and changed nothing."""
    check_ptbxl_version(ptbxl_version)
    if dataset_name != "ptbxl" and ptbxl_version != DEFAULT_PTBXL_VERSION:
        raise ValueError(
            f"--ptbxl_version {ptbxl_version}: only with --dataset_name ptbxl (which PTB-XL version's rows and labels "
            f"to read); {dataset_name} has no PTB-XL versions, so it would change nothing: leave --ptbxl_version out"
        )


def apply_ptbxl_version(
    rows: Iterable[dict[str, Any]], version: str = DEFAULT_PTBXL_VERSION, source: str = "ptbxl_database.csv"
) -> tuple[list[dict[str, Any]], PtbxlVersionReport]:
    """`ptbxl_database.csv` rows (dicts with `ecg_id` and `scp_codes`) as `version` has them, and what changed.

    With `"1.0.3"`, rows of v1.0.3's dropped duplicates are left out and a kept twin whose codes differ from v1.0.3's
    consensus gets the consensus as its `scp_codes` (JSON; `parse_scp_codes` reads both forms), and an `age` above 89
    becomes 300 (`AGE_OVER_89`); the counts are logged. Rows already as v1.0.3 has them pass unchanged, so applying it
    twice changes nothing."""
    report = PtbxlVersionReport(check_ptbxl_version(version))
    rows = list(rows)
    if version == "as_is":
        return rows, report
    changes = ptbxl_v1_0_3_changes()
    kept = []
    for row in rows:
        ecg_id = int(row["ecg_id"])
        if ecg_id in changes.dropped:
            report.dropped.append(ecg_id)
            continue
        consensus = changes.consensus.get(ecg_id)
        if consensus is not None:
            codes = parse_scp_codes(str(row["scp_codes"]), record=f"{source} (ecg_id {ecg_id})")
            if codes != consensus:
                report.relabeled[ecg_id] = (codes, dict(consensus))
                row = {**row, "scp_codes": json.dumps(consensus)}
        age = parse_number(row.get("age"), float)  # text stays text, for the record reader to refuse by name
        if isinstance(age, float) and 89 < age != AGE_OVER_89:
            report.ages_capped.append(ecg_id)
            row = {**row, "age": float(AGE_OVER_89)}
        kept.append(row)
    report.dropped.sort()
    if report.changed:
        logger.info("%s: %s", source, report.summary())
    return kept, report


def apply_ptbxl_version_to_dataset(dataset, version: str = DEFAULT_PTBXL_VERSION, source: str = "dataset"):
    """A converted PTB-XL split (`Dataset` or `IterableDataset`) as `version` has it: v1.0.3's duplicates dropped.

    Its label columns were computed at conversion, so a kept twin whose `scp_codes` are not v1.0.3's consensus raises
    (a `Dataset` at once; an `IterableDataset` when that row is read) instead of keeping stale labels. A table without
    `ecg_id` cannot be matched to PTB-XL's changes: it is returned as it is, with a warning."""
    from datasets import IterableDataset

    if check_ptbxl_version(version) == "as_is":
        return dataset
    columns = set(dataset.column_names or ())
    if "ecg_id" not in columns:
        logger.warning("%s: no ecg_id column, so PTB-XL v1.0.3's changes cannot be applied; rows as stored", source)
        return dataset
    changes = ptbxl_v1_0_3_changes()
    if isinstance(dataset, IterableDataset):
        logger.info(
            "%s: streaming; v1.0.3's %d duplicate ECGs are left out and ages over 89 stored as %d as rows are read",
            source,
            len(changes.dropped),
            AGE_OVER_89,
        )
        keep = PtbxlV103Rows(source, with_scp_codes="scp_codes" in columns)
        transform = cap_ages if "age" in columns else None
        return filter_stream(dataset, keep, transform=transform)  # on Arrow batches: the rows after it stay Arrow
    ecg_ids = dataset["ecg_id"][:]
    relabel = [index for index, ecg_id in enumerate(ecg_ids) if int(ecg_id) in changes.consensus]
    if relabel and "scp_codes" in columns:
        for index, scp_codes in zip(relabel, dataset.select(relabel)["scp_codes"][:]):
            check_consensus(ecg_ids[index], scp_codes, source)
    keep = [index for index, ecg_id in enumerate(ecg_ids) if int(ecg_id) not in changes.dropped]
    report = PtbxlVersionReport(version, dropped=sorted(int(ecg_ids[i]) for i in set(range(len(ecg_ids))) - set(keep)))
    if report.dropped:
        dataset = dataset.select(keep)
    if "age" in columns:  # a dataset converted with ptbxl_version="as_is" kept ages over 89
        ages = dataset["age"][:]
        capped = cap_ages({"age": ages})["age"]
        report.ages_capped = [int(i) for i, a, c in zip(dataset["ecg_id"][:], ages, capped) if c == AGE_OVER_89 != a]
        if report.ages_capped:  # one column replaced in memory; the others stay memory-mapped
            order, age_feature = dataset.column_names, dataset.features["age"]
            dataset = dataset.remove_columns("age").add_column("age", capped, feature=age_feature)
            dataset = dataset.select_columns(order)
    if report.changed:
        logger.info("%s: %s", source, report.summary())
    describe(dataset, report)
    return dataset


def check_consensus(ecg_id: int, scp_codes: str | None, source: str) -> None:
    """Raise for a converted row that v1.0.3 relabels by consensus and whose `scp_codes` (so its label columns,
    computed at conversion) are not the consensus."""
    consensus = ptbxl_v1_0_3_changes().consensus.get(int(ecg_id))
    if consensus is None or scp_codes is None:
        return
    if parse_scp_codes(scp_codes, record=f"{source} (ecg_id {ecg_id})") != consensus:
        raise ValueError(
            f"{source}: ecg_id {ecg_id} has scp_codes {scp_codes} but PTB-XL v1.0.3 gives it {consensus} (a kept "
            "duplicate relabelled by consensus), and its label columns were computed at conversion: convert the "
            "dataset again (dataset_scripts/ptbxl/convert.py in the merit_hf repository, or "
            "merit_hf.data.convert_ptbxl, applies v1.0.3's changes) or load it with ptbxl_version='as_is'"
        )


@dataclass(frozen=True)
class PtbxlV103Rows:
    """`keep` of a streamed converted split as v1.0.3 has it: its rows not dropped as duplicates, each relabelled twin
    checked (`check_consensus`) as it is read. A module-level class, not a closure: a DataLoader worker started with
    `spawn` (macOS and Windows' default) gets the stream pickled, and a local function cannot be."""

    source: str
    with_scp_codes: bool = True

    def __call__(self, batch) -> list[bool]:
        dropped = ptbxl_v1_0_3_changes().dropped
        ecg_ids = column_values(batch, "ecg_id")
        scp_codes = column_values(batch, "scp_codes") if self.with_scp_codes else [None] * len(ecg_ids)
        for ecg_id, codes in zip(ecg_ids, scp_codes):
            check_consensus(ecg_id, codes, self.source)
        return [int(ecg_id) not in dropped for ecg_id in ecg_ids]


def cap_ages(batch):
    """`batch` (an Arrow table or a dict of lists) with each age over 89 stored as `AGE_OVER_89`, as v1.0.2 and later
    store it; missing ages stay missing."""
    ages = column_values(batch, "age")
    capped = [AGE_OVER_89 if isinstance(age, (int, float)) and 89 < age != AGE_OVER_89 else age for age in ages]
    if isinstance(batch, dict):
        return {**batch, "age": capped}
    index = batch.schema.get_field_index("age")
    return batch.set_column(index, batch.schema.field(index), pa.array(capped, type=batch.schema.field(index).type))


def describe(dataset, report: PtbxlVersionReport) -> None:
    """Write `report.summary()` into `dataset.info.description` (kept by `save_to_disk`), after any description the
    dataset already has, so that the version a dataset's labels follow travels with it."""
    info = dataset.info
    previous = [line for line in (info.description or "").splitlines() if not line.startswith(_SUMMARY_STARTS)]
    info.description = "\n".join([*previous, report.summary()])


__all__ = [
    "CHANGES_FILE",
    "DEFAULT_PTBXL_VERSION",
    "PTBXL_VERSIONS",
    "PtbxlChanges",
    "PtbxlVersionReport",
    "apply_ptbxl_version",
    "apply_ptbxl_version_to_dataset",
    "check_ptbxl_version",
    "ptbxl_v1_0_3_changes",
]
