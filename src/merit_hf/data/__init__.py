"""PTB-XL and MIMIC-IV-ECG as `datasets`: strict WFDB reading, SCP label sets, reports, converters, loaders, collator.

- `read_ecg_record` (`merit_hf.models.wfdb_io`): one record read and validated by the input contract;
- `labels`: SCP-ECG statements -> `superclass` / `subclass` / `form` / `rhythm` / `all`, `multi_hot`;
- `reports`: report cleaning, PTB-XL language tags, MIMIC `report_0..report_17` joining;
- `conversion`: rows in memory or as resumable Parquet shards, and the conversion report;
- `ptbxl`, `mimic_iv_ecg`: the two dataset builders (`ptbxl_versions`: PTB-XL v1.0.3's changes applied to older
  metadata); `wfdb_folder`: any folder of WFDB records (leads and rate as recorded, labels and reports from CSV files);
  `loading`: runtime loaders behind one `load_dataset(name, path)`; `collator`: `MeritCollator`, the one rows -> batch
  path.
"""

from ..models.merit.feature_extraction_merit import EcgInputError, EcgLeadSwapWarning
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
from .loading import (
    DATASET_NAMES,
    label_fraction_subset,
    load_dataset,
    load_mimic_iv_ecg,
    load_ptbxl,
    load_wfdb_dataset,
)
from .mimic_iv_ecg import LEAD_NAMES_MIMIC, build_mimic_iv_ecg, convert_mimic_iv_ecg, mimic_iv_ecg_features
from .ptbxl import (
    LEAD_NAMES_PTBXL,
    PTBXL_SPLITS,
    build_ptbxl,
    convert_ptbxl,
    is_physionet_ptbxl,
    ptbxl_features,
    read_ptbxl_database,
)
from .ptbxl_versions import DEFAULT_PTBXL_VERSION, PTBXL_VERSIONS, apply_ptbxl_version, ptbxl_v1_0_3_changes
from .reports import (
    clean_report,
    drop_empty_reports,
    has_report,
    join_mimic_report,
    report_language,
    split_ptbxl_edit_note,
)
from .wfdb_folder import WfdbFolderSpec, build_wfdb_dataset, convert_wfdb_folder, split_wfdb_dataset

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_LABEL_THRESHOLD",
    "DEFAULT_PTBXL_VERSION",
    "LABEL_SETS",
    "LEAD_NAMES_MIMIC",
    "LEAD_NAMES_PTBXL",
    "PTBXL_SPLITS",
    "PTBXL_VERSIONS",
    "ConversionReport",
    "EcgInputError",
    "EcgLeadSwapWarning",
    "MeritCollator",
    "RecordFailure",
    "ScpCodeError",
    "ScpStatements",
    "WfdbFolderSpec",
    "apply_ptbxl_version",
    "build_mimic_iv_ecg",
    "build_ptbxl",
    "build_wfdb_dataset",
    "clean_report",
    "convert_mimic_iv_ecg",
    "convert_ptbxl",
    "convert_wfdb_folder",
    "drop_empty_reports",
    "has_report",
    "is_physionet_ptbxl",
    "join_mimic_report",
    "label_fraction_subset",
    "label_names",
    "load_dataset",
    "load_mimic_iv_ecg",
    "load_ptbxl",
    "load_wfdb_dataset",
    "mimic_iv_ecg_features",
    "multi_hot",
    "parse_scp_codes",
    "precompute_ecg_values",
    "ptbxl_features",
    "ptbxl_v1_0_3_changes",
    "read_ecg_record",
    "read_ptbxl_database",
    "report_language",
    "split_ptbxl_edit_note",
    "split_wfdb_dataset",
]
