"""The results JSON that every evaluation run writes, and that model cards (`model-index`) are rendered from.

Schema `merit_hf.results/v1` (one file per run: one task, one label set, one label fraction, one seed):

```json
{
  "schema": "merit_hf.results/v1",
  "task": "linear-probe" | "fine-tune" | "zero-shot" | "robustness",
  "dataset": {
    "name": "ptb-xl", "version": "1.0.3", "source": "<folder or Hub id>",
    "split": "test", "splits": "PTB-XL strat_fold 1-8 train, 9 validation, 10 test",
    "num_records": {"train": 17084, "validation": 2146, "test": 2158, "in_splits": {"train": ..., ...}},
    "train_label_counts": {"CD": ..., ...}
  },
  "label_set": "superclass", "label_names": ["CD", "HYP", "MI", "NORM", "STTC"],
  "label_fraction": 0.01, "seed": 0,
  "protocol": {...every hyper-parameter of the harness...},
  "metric_definitions": {"macro_auroc": "...", "macro_f1": "...", ...},
  "model": {
    "name_or_path": "org/merit-ecg", "init": "pretrained",
    "metrics": {"macro_auroc": {"value": 0.91, "ci_low": 0.90, "ci_high": 0.92},
                "macro_f1": {...}, "macro_f1_max_over_thresholds": {...}},
    "per_class": {"CD": {"auroc": 0.9, "f1": 0.7, "num_positive": 496}, ...},
    "absent_classes": [], "num_records": 2158
  },
  "baseline": {same layout as "model", "name_or_path": "random-init", "init": "random (seed 0, same config)"},
  "environment": {"merit_hf": "0.1.0", "torch": "...", "transformers": "...", "scikit-learn": "..."},
  "created": "2026-11-25T11:00:00+00:00"
}
```

Metric values are fractions in [0, 1] (multiply by 100 for the papers' percentages); `null` means undefined (for
example AUROC of a class absent from the test split, listed in `absent_classes`). `baseline` is `null` only when a
run was asked to skip it. Robustness files add `"shifts": {shift name: {"model": {...}, "baseline": {...},
"description": "..."}}`, each entry in the `model` layout above.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .metrics import METRIC_DEFINITIONS

SCHEMA = "merit_hf.results/v1"
DATASET_NAME = "ptb-xl"
PTBXL_VERSION = "1.0.3"
TASKS = ("linear-probe", "fine-tune", "zero-shot", "robustness")


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment() -> dict[str, str | None]:
    return {name: _package_version(name) for name in ("merit_hf", "torch", "transformers", "datasets", "scikit-learn")}


def _dataset_source(dataset_dict) -> str | None:
    for split in ("test", "train"):
        if split in dataset_dict:
            files = getattr(dataset_dict[split], "cache_files", None) or []
            if files:
                return str(Path(files[0]["filename"]).parent)
    return None


def build_results(
    task: str,
    dataset_dict,
    label_set: str,
    label_names: list[str],
    label_fraction: float | None,
    seed: int,
    protocol: dict[str, Any],
    model: dict[str, Any],
    baseline: dict[str, Any] | None,
    dataset_extra: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble one results dict in the schema above."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    dataset = {
        "name": DATASET_NAME,
        "version": PTBXL_VERSION,
        "source": _dataset_source(dataset_dict),
        "split": "test",
        "splits": "PTB-XL strat_fold 1-8 train, 9 validation, 10 test",
        **(dataset_extra or {}),
    }
    results = {
        "schema": SCHEMA,
        "task": task,
        "dataset": dataset,
        "label_set": label_set,
        "label_names": list(label_names),
        "label_fraction": label_fraction,
        "seed": seed,
        "protocol": protocol,
        "metric_definitions": METRIC_DEFINITIONS,
        "model": model,
        "baseline": baseline,
        **(extra or {}),
        "environment": environment(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return results


def encoder_identity(role: str, model_name: str, seed: int) -> dict[str, str]:
    """`name_or_path` and `init` of a results entry: the evaluated model (`role="model"`), or its random-init twin
    drawn with `seed` (`role="baseline"`, `merit_hf.training.probe.random_init_like`)."""
    if role == "model":
        return {"name_or_path": model_name, "init": "pretrained"}
    return {"name_or_path": "random-init", "init": f"random (seed {seed}, same config)"}


def metric_cell(entry: dict[str, Any] | None, metric: str) -> str:
    """One metric of a results entry for a markdown table: `0.750 [0.663, 0.827]`, `0.750` or `n/a`."""
    value = ((entry or {}).get("metrics") or {}).get(metric) or {}
    if value.get("value") is None:
        return "n/a"
    if value.get("ci_low") is None:
        return f"{value['value']:.3f}"
    return f"{value['value']:.3f} [{value['ci_low']:.3f}, {value['ci_high']:.3f}]"


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write `results` as indented JSON (NaN/inf become `null`, numpy scalars plain numbers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    """Read a results JSON and check its schema tag."""
    results = json.loads(Path(path).read_text(encoding="utf-8"))
    if results.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} results file (schema {results.get('schema')!r})")
    return results


__all__ = [
    "DATASET_NAME",
    "SCHEMA",
    "TASKS",
    "build_results",
    "encoder_identity",
    "environment",
    "metric_cell",
    "read_results",
    "write_results",
]
