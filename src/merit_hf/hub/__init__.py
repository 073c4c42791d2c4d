"""Sharing (an app layer): `push` (checks and uploads model and dataset folders), `cards` (model and dataset cards
rendered from results JSONs). `python -m merit_hf.hub push ...` is the command line."""

from .push import (
    DEFAULT_IGNORE_PATTERNS,
    HubFolderError,
    HubPushError,
    PushResult,
    check_dataset_folder,
    check_model_folder,
    clear_local_name_or_path,
    leak_problems,
    main,
    pickle_problems,
    push_dataset,
    push_folder,
    push_model,
    pushed_files,
)

__all__ = [
    "DEFAULT_IGNORE_PATTERNS",
    "HubFolderError",
    "HubPushError",
    "PushResult",
    "check_dataset_folder",
    "check_model_folder",
    "clear_local_name_or_path",
    "leak_problems",
    "main",
    "pickle_problems",
    "push_dataset",
    "push_folder",
    "push_model",
    "pushed_files",
]
