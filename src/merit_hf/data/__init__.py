"""PTB-XL and MIMIC-IV-ECG as `datasets`: strict WFDB reading, SCP label sets, reports, converters, loaders, collator.

- `wfdb_records`: one record read and validated (leads, rate, units, NaN/inf, header/data agreement);
- `labels`: SCP-ECG statements -> `superclass` / `subclass` / `form` / `rhythm` / `all`, `multi_hot`;
- `reports`: report cleaning, PTB-XL language tags, MIMIC `report_0..report_17` joining;
- `conversion`: rows in memory or as resumable Parquet shards, and the conversion report;
- `ptbxl`, `mimic_iv_ecg`: the two dataset builders; `wfdb_folder`: any folder of WFDB records (leads and rate as
  recorded, labels and reports from CSV files); `loading`: runtime loaders; `collator`: `MeritCollator`.
"""

from ..models.merit.feature_extraction_merit import EcgInputError
from ..models.wfdb_io import read_ecg_record
from .collator import MeritCollator, precompute_ecg_values
from .conversion import ConversionReport, RecordFailure
from .labels import (
    DEFAULT_LABEL_THRESHOLD,
    LABEL_SETS,
    ScpCodeError,
    ScpStatements,
    label_names,
    multi_hot,
    parse_scp_codes,
)
from .loading import label_fraction_subset, load_mimic_iv_ecg, load_ptbxl, load_wfdb_dataset
from .mimic_iv_ecg import LEAD_NAMES_MIMIC, build_mimic_iv_ecg, convert_mimic_iv_ecg, mimic_iv_ecg_features
from .ptbxl import LEAD_NAMES_PTBXL, PTBXL_SPLITS, build_ptbxl, convert_ptbxl, ptbxl_features, read_ptbxl_database
from .reports import clean_report, join_mimic_report, report_language
from .wfdb_folder import WfdbFolderSpec, build_wfdb_dataset, convert_wfdb_folder, split_wfdb_dataset

__all__ = [
    "DEFAULT_LABEL_THRESHOLD",
    "LABEL_SETS",
    "LEAD_NAMES_MIMIC",
    "LEAD_NAMES_PTBXL",
    "PTBXL_SPLITS",
    "ConversionReport",
    "EcgInputError",
    "MeritCollator",
    "RecordFailure",
    "ScpCodeError",
    "ScpStatements",
    "WfdbFolderSpec",
    "build_mimic_iv_ecg",
    "build_ptbxl",
    "build_wfdb_dataset",
    "clean_report",
    "convert_mimic_iv_ecg",
    "convert_ptbxl",
    "convert_wfdb_folder",
    "join_mimic_report",
    "label_fraction_subset",
    "label_names",
    "load_mimic_iv_ecg",
    "load_ptbxl",
    "load_wfdb_dataset",
    "mimic_iv_ecg_features",
    "multi_hot",
    "parse_scp_codes",
    "precompute_ecg_values",
    "ptbxl_features",
    "read_ecg_record",
    "read_ptbxl_database",
    "report_language",
    "split_wfdb_dataset",
]
