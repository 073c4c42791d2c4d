"""The results JSON that every evaluation run writes, and that model cards (`model-index`) are rendered from.

Schema `merit_hf.results/v1` (one file per run: one task, one label set, one label fraction, one seed):

```json
{
  "schema": "merit_hf.results/v1",
  "task": "linear-probe" | "fine-tune" | "zero-shot" | "robustness",
  "dataset": {
    "name": "ptb-xl", "version": "1.0.3", "source": "<folder or Hub id>",
    "sampling_rate": 500, "label_threshold": 0.0,
    "split": "test", "splits": "PTB-XL strat_fold 1-8 train, 9 validation, 10 test",
    "num_records": {"train": 17084, "validation": 2146, "test": 2158, "in_splits": {"train": ..., ...}},
    "train_label_counts": {"CD": ..., ...}
  },
  "label_set": "superclass", "label_names": ["CD", "HYP", "MI", "NORM", "STTC"],
  "label_fraction": 0.01, "seed": 0,
  "protocol": {...every hyper-parameter of the harness..., "feature_extractor": {"sampling_rate": 250, ...}},
  "metric_definitions": {"macro_auroc": "...", "macro_f1": "...", ...},
  "model": {
    "name_or_path": "org/merit-ecg", "init": "pretrained",
    "weights_fingerprint": {"ecg_encoder": "3f2a9c0d1b7e4a65"},
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

`model.weights_fingerprint` names the weights the numbers are of (`merit_hf.models.fingerprint.weights_fingerprint`,
a hash of the tensors): `ecg_encoder`, the MERIT ECG encoder that was evaluated (for fine-tuning, the one it started
from); `two_tower` (zero-shot), the whole two-tower model, text tower included; `adapter` and `fine_tuned_ecg_encoder`
(LoRA fine-tuning), the saved adapter file's tensors and the encoder of the merged model. A model card rendered from
the file checks them against the folder's weights (`merit_hf.hub.cards`). Files written before merit_hf recorded it
have none; a card says that their numbers could not be checked.

`dataset.source` is the folder or Hub id that merit_hf's PTB-XL loaders read the data from, as it was given (a
PhysioNet folder built in memory, a converted or `save_to_disk` folder, a Hub id: `merit_hf.data.build_ptbxl` and
`load_ptbxl` write it, and the `label_threshold` the labels were computed with where it is known, into the splits'
`info.description`), else the folder of the data's cache files; `null` when neither says.
`dataset.sampling_rate` is the rate of the dataset's records, in Hz, as their `sampling_rate` column has it (a sorted
list when they differ), before the feature extractor resamples them; `protocol.feature_extractor` is what that feature
extractor does (`feature_extractor_settings`). Files written before these keys existed lack them; readers take them as
unknown.

Metric values are fractions in [0, 1] (multiply by 100 for the papers' percentages); `null` means undefined (for
example AUROC of a class absent from the test split, listed in `absent_classes`). `baseline` is `null` only when a
run was asked to skip it. Robustness files add `"shifts": {shift name: {"model": {...}, "baseline": {...},
"description": "..."}}`, each entry in the `model` layout above.

In Python a results file is an `EvaluationResults`: `build_results` makes one, `write_results` writes it in the layout
above and `read_results` reads one back (any v1 file, old ones included), and `merit_hf.hub.cards` renders model cards
from it. Its parts are typed: `results.model` and `results.baseline` are `ResultEntry`s whose `metrics` map names to
`MetricValue`s, and `results.shifts` maps a shift name to a `ShiftResult`. `format_metric` is the one way a metric is
written in a table or a printout (`0.831 [0.759, 0.897]`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .metrics import METRIC_DEFINITIONS

SCHEMA = "merit_hf.results/v1"
DATASET_NAME = "ptb-xl"
PTBXL_VERSION = "1.0.3"
TASKS = ("linear-probe", "fine-tune", "zero-shot", "robustness")


@dataclass(frozen=True)
class MetricValue:
    """One metric of one entry: its value (`None` when undefined) and, when the evaluation bootstrapped it, the 95%
    interval `ci = (low, high)` (`None` when no bootstrap ran; either bound `None` when it was undefined)."""

    value: float | None
    ci: tuple[float | None, float | None] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricValue:
        ci = (data.get("ci_low"), data.get("ci_high")) if "ci_low" in data or "ci_high" in data else None
        return cls(value=data.get("value"), ci=ci)

    def to_dict(self) -> dict[str, Any]:
        if self.ci is None:
            return {"value": self.value}
        return {"value": self.value, "ci_low": self.ci[0], "ci_high": self.ci[1]}


def format_metric(metric: MetricValue | None) -> str:
    """A metric as every table and printout of merit_hf writes it: `0.831 [0.759, 0.897]` (value and 95% bootstrap
    interval), `0.831` without an interval, `n/a` when the value is undefined or the metric was not computed."""
    if metric is None or metric.value is None:
        return "n/a"
    if metric.ci is None or None in metric.ci:
        return f"{metric.value:.3f}"
    return f"{metric.value:.3f} [{metric.ci[0]:.3f}, {metric.ci[1]:.3f}]"


@dataclass
class ResultEntry:
    """The test-split numbers of one encoder in one setting (`classification_metrics`' layout), with its identity
    (`name_or_path`, `init`) where the entry has one: the top-level `model` / `baseline` entries do, shift entries
    do not. `per_class` maps a class to `{"auroc", "f1", "num_positive"}`; `weights_fingerprint` (the `model` entry of
    files written since merit_hf recorded it) maps what was hashed to its `weights_fingerprint`; `extra` keeps any other
    field (the probe's `training`) in its place."""

    metrics: dict[str, MetricValue]
    num_records: int | None = None
    name_or_path: str | None = None
    init: str | None = None
    weights_fingerprint: dict[str, str] | None = None
    per_class: dict[str, dict[str, Any]] | None = None
    absent_classes: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResultEntry:
        known = (
            "name_or_path",
            "init",
            "weights_fingerprint",
            "metrics",
            "per_class",
            "absent_classes",
            "num_records",
        )
        if not isinstance(data.get("metrics"), Mapping):
            raise ValueError(f"a results entry needs a 'metrics' mapping; it has {sorted(data)}")
        return cls(
            metrics={name: MetricValue.from_dict(value) for name, value in data["metrics"].items()},
            num_records=data.get("num_records"),
            name_or_path=data.get("name_or_path"),
            init=data.get("init"),
            weights_fingerprint=dict(data["weights_fingerprint"]) if data.get("weights_fingerprint") else None,
            per_class=data.get("per_class"),
            absent_classes=data.get("absent_classes"),
            extra={key: value for key, value in data.items() if key not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout, fields in the order the harness has always written them; absent fields stay absent."""
        data = {"name_or_path": self.name_or_path, "init": self.init}
        data = {key: value for key, value in data.items() if value is not None}
        if self.weights_fingerprint is not None:
            data["weights_fingerprint"] = self.weights_fingerprint
        data["metrics"] = {name: metric.to_dict() for name, metric in self.metrics.items()}
        if self.per_class is not None:
            data["per_class"] = self.per_class
        if self.absent_classes is not None:
            data["absent_classes"] = self.absent_classes
        if self.num_records is not None:
            data["num_records"] = self.num_records
        return {**data, **self.extra}


@dataclass
class ShiftResult:
    """One robustness shift: its kind (`input`, `group`, `subgroup`), what it does, and the entry of each encoder."""

    kind: str
    description: str
    model: ResultEntry | None = None
    baseline: ResultEntry | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShiftResult:
        return cls(
            kind=data["kind"],
            description=data["description"],
            model=ResultEntry.from_dict(data["model"]) if data.get("model") is not None else None,
            baseline=ResultEntry.from_dict(data["baseline"]) if data.get("baseline") is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "description": self.description}
        for role in ("model", "baseline"):
            if getattr(self, role) is not None:
                data[role] = getattr(self, role).to_dict()
        return data


@dataclass
class EvaluationResults:
    """One evaluation run (one task, label set, label fraction and seed): what `build_results` makes, `write_results`
    writes and `read_results` reads, in the `merit_hf.results/v1` layout of this module's docstring.

    The model's entry is always there; `baseline` is the random-init encoder under the same harness (`None` only when
    the run was asked to skip it), so every number can be read next to the one it must beat. `extra` keeps the
    top-level fields of a file that this class does not name, so a file read and written again is unchanged.

    Example:

    ```python
    >>> results = read_results("benchmarks/results/evaluation/quickstart/linear-probe_superclass_1_seed0.json")
    >>> format_metric(results.model.metrics["macro_auroc"]), format_metric(results.baseline.metrics["macro_auroc"])
    ('0.825 [0.750, 0.894]', '0.725 [0.616, 0.819]')
    ```
    """

    task: str
    dataset: dict[str, Any]
    label_set: str
    label_names: list[str]
    label_fraction: float | None
    seed: int
    protocol: dict[str, Any]
    model: ResultEntry
    baseline: ResultEntry | None = None
    shifts: dict[str, ShiftResult] | None = None
    metric_definitions: dict[str, str] = field(default_factory=lambda: dict(METRIC_DEFINITIONS))
    environment: dict[str, str | None] = field(default_factory=dict)
    created: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path | None = None) -> EvaluationResults:
        """Read the v1 layout; a `ValueError` naming `source` (the file) for any other schema or a missing field."""
        where = f"{source}: " if source is not None else ""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{where}not a {SCHEMA} results file (schema {data.get('schema')!r})")
        missing = [name for name in ("task", "label_set", "model") if data.get(name) is None]
        if missing:
            raise ValueError(f"{where}the results file has no {', '.join(missing)}")
        known = (
            "schema", "task", "dataset", "label_set", "label_names", "label_fraction", "seed", "protocol",
            "metric_definitions", "model", "baseline", "shifts", "environment", "created",
        )  # fmt: skip
        try:
            return cls(
                task=data["task"],
                dataset=dict(data.get("dataset") or {}),
                label_set=data["label_set"],
                label_names=list(data.get("label_names") or []),
                label_fraction=data.get("label_fraction"),
                seed=data.get("seed"),
                protocol=data.get("protocol") or {},
                model=ResultEntry.from_dict(data["model"]),
                baseline=ResultEntry.from_dict(data["baseline"]) if data.get("baseline") is not None else None,
                shifts=(
                    {name: ShiftResult.from_dict(shift) for name, shift in data["shifts"].items()}
                    if data.get("shifts") is not None
                    else None
                ),
                metric_definitions=dict(data.get("metric_definitions") or {}),
                environment=dict(data.get("environment") or {}),
                created=data.get("created"),
                extra={key: value for key, value in data.items() if key not in known},
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}malformed {SCHEMA} results file: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout, keys in the order `build_results` has always written them."""
        data = {
            "schema": SCHEMA,
            "task": self.task,
            "dataset": self.dataset,
            "label_set": self.label_set,
            "label_names": self.label_names,
            "label_fraction": self.label_fraction,
            "seed": self.seed,
            "protocol": self.protocol,
            "metric_definitions": self.metric_definitions,
            "model": self.model.to_dict(),
            "baseline": self.baseline.to_dict() if self.baseline is not None else None,
        }
        if self.shifts is not None:
            data["shifts"] = {name: shift.to_dict() for name, shift in self.shifts.items()}
        return {**data, **self.extra, "environment": self.environment, "created": self.created}

    def __getitem__(self, key: str) -> Any:
        """Read access in the JSON layout (`results["model"]["metrics"]["macro_auroc"]["value"]`), as the harness
        returned plain dicts in 0.1; kept for one release, use the attributes."""
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        """`dict.get` over the JSON layout (see `__getitem__`); kept for one release."""
        return self.to_dict().get(key, default)


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


def _records_sampling_rate(dataset_dict) -> int | float | list | None:
    """The `sampling_rate` of the records in every split (Hz): one number, a sorted list when they differ, `None`
    without that column."""
    from datasets import Dataset

    found = set()
    for split in dataset_dict.values():
        if isinstance(split, Dataset) and "sampling_rate" in split.column_names:
            found.update(split.select_columns(["sampling_rate"])[:]["sampling_rate"])
    rates = sorted(int(rate) if float(rate).is_integer() else float(rate) for rate in found if rate is not None)
    return (rates[0] if len(rates) == 1 else rates) if rates else None


# What of a feature extractor's settings decides the model's input (`feature_extractor_settings`); its checks of the
# records (amplitude limits, NaN policy, ...) refuse records but do not change those it keeps.
FEATURE_EXTRACTOR_SETTINGS = (
    "lead_names",
    "sampling_rate",
    "num_samples",
    "window",
    "window_stride",
    "padding",
    "highpass_hz",
    "lowpass_hz",
    "filter_order",
    "normalization",
    "derive_limb_leads",
)


def feature_extractor_settings(feature_extractor) -> dict[str, Any]:
    """The settings of `feature_extractor` (a `MeritFeatureExtractor`) that a results JSON records under
    `protocol.feature_extractor`: the leads, the rate records are resampled to, the window (`num_samples`, single or
    sliding), padding, the band-pass filter and the normalisation. The crop is the protocol's (centre crop for
    features and evaluation, a random crop per epoch for fine-tuning's training records), named in the protocol's
    `features` / `head`, not the extractor's saved default."""
    settings = feature_extractor.to_dict()
    return {name: settings[name] for name in FEATURE_EXTRACTOR_SETTINGS if name in settings}


AS_IS_VERSION = "as_is: the metadata's own rows and labels (ptbxl_version='as_is'), not v1.0.3's"
_WFDB_DESCRIPTION = re.compile(r"WFDB folder (?P<name>.+?): (?P<splits>train / validation / test by .+)")


def described_dataset(dataset_dict) -> dict[str, Any]:
    """What the splits' `info.description` says of the data, overriding the PTB-XL v1.0.3 defaults: a WFDB folder's
    name and how it was split (`load_wfdb_dataset` writes it), or PTB-XL read with `ptbxl_version="as_is"` (the
    loaders write it); and the folder or Hub id PTB-XL was read from, with its `label_threshold` where known
    (`build_ptbxl` and `load_ptbxl` write them, `merit_hf.data.ptbxl.describe_source`: `source` and
    `label_threshold`); `{}` when it says none of these."""
    from ..data.ptbxl import described_source

    lines = [
        line
        for split in dataset_dict.values()
        for line in (getattr(getattr(split, "info", None), "description", None) or "").splitlines()
    ]
    source = next((found for split in dataset_dict.values() if (found := described_source(split))), {})
    described = {key: source[key] for key in ("source", "label_threshold") if key in source}
    for line in lines:
        if match := _WFDB_DESCRIPTION.fullmatch(line):
            return {**described, "name": match["name"], "version": None, "splits": f"WFDB folder: {match['splits']}"}
    if any(line.startswith("PTB-XL metadata as is") for line in lines):
        return {**described, "version": AS_IS_VERSION}
    return described


def results_dataset(dataset_dict, dataset_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `dataset` entry of a results JSON of `dataset_dict` (`build_results`), with `dataset_extra` added."""
    described = described_dataset(dataset_dict)
    # where merit_hf's loaders read the data from, as given; else the folder of its cache files
    source = described.get("source") or _dataset_source(dataset_dict)
    sampling_rate = _records_sampling_rate(dataset_dict)
    return {
        "name": DATASET_NAME,
        "version": PTBXL_VERSION,
        "source": source,
        **({"sampling_rate": sampling_rate} if sampling_rate is not None else {}),
        "split": "test",
        "splits": "PTB-XL strat_fold 1-8 train, 9 validation, 10 test",
        **{key: value for key, value in described.items() if key != "source"},
        **(dataset_extra or {}),
    }


def build_results(
    task: str,
    dataset_dict,
    label_set: str,
    label_names: list[str],
    label_fraction: float | None,
    seed: int,
    protocol: dict[str, Any],
    model: Mapping[str, Any],
    baseline: Mapping[str, Any] | None = None,
    dataset_extra: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    shifts: Mapping[str, Mapping[str, Any]] | None = None,
) -> EvaluationResults:
    """Assemble one run's `EvaluationResults` from the harness's entries (`classification_metrics` layout plus
    `name_or_path` / `init`) and, for robustness, its `shifts` (`{name: {"kind", "description", "model",
    "baseline"}}`); `extra` adds other top-level fields."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return EvaluationResults(
        task=task,
        dataset=results_dataset(dataset_dict, dataset_extra),
        label_set=label_set,
        label_names=list(label_names),
        label_fraction=label_fraction,
        seed=seed,
        protocol=protocol,
        metric_definitions=dict(METRIC_DEFINITIONS),
        model=ResultEntry.from_dict(model),
        baseline=ResultEntry.from_dict(baseline) if baseline is not None else None,
        shifts={name: ShiftResult.from_dict(shift) for name, shift in shifts.items()} if shifts is not None else None,
        extra=dict(extra or {}),
        environment=environment(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def encoder_identity(role: str, model_name: str, seed: int, encoder=None) -> dict[str, Any]:
    """`name_or_path` and `init` of a results entry: the evaluated model (`role="model"`), or its random-init twin
    drawn with `seed` (`role="baseline"`, `merit_hf.evaluation.probe.random_init_like`). With `encoder` (the evaluated
    MERIT ECG encoder), the model's entry also records `weights_fingerprint: {"ecg_encoder": ...}`, which ties the
    numbers to those weights (a model card checks it against its folder)."""
    if role == "model":
        identity: dict[str, Any] = {"name_or_path": model_name, "init": "pretrained"}
        if encoder is not None:
            from ..models.fingerprint import weights_fingerprint

            identity["weights_fingerprint"] = {"ecg_encoder": weights_fingerprint(encoder)}
        return identity
    return {"name_or_path": "random-init", "init": f"random (seed {seed}, same config)"}


def metric_cell(entry: ResultEntry | Mapping[str, Any] | None, metric: str) -> str:
    """One metric of a results entry for a markdown table (`format_metric`); `n/a` when the entry or metric is
    missing. The entry may also be in its JSON layout (a loaded file's `["model"]`)."""
    if isinstance(entry, Mapping):
        entry = ResultEntry.from_dict(entry) if entry else None
    return format_metric(entry.metrics.get(metric) if entry is not None else None)


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


def json_safe(value: Any) -> Any:
    """`value` as a results JSON holds it: NaN/inf `None`, numpy scalars plain numbers, tuples lists, keys strings
    (what a value read back from a written file compares equal to)."""
    return json.loads(json.dumps(_json_safe(value), allow_nan=False))


def write_json_whole(path: str | Path, value: Any, indent: int = 2) -> Path:
    """Write `value` as indented JSON with `json_safe`'s conversions (NaN/inf `null`, numpy scalars plain numbers)
    that appears whole or not at all (written beside `path`, then renamed): a run killed while writing leaves no
    truncated file, which a resumed fine-tune would otherwise find (`--resume_from_checkpoint`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(_json_safe(value), indent=indent, allow_nan=False) + "\n", encoding="utf-8")
    partial.replace(path)
    return path


def write_results(results: EvaluationResults, path: str | Path) -> Path:
    """Write `results` as indented JSON in the v1 layout (NaN/inf become `null`, numpy scalars plain numbers), whole
    or not at all (`write_json_whole`)."""
    return write_json_whole(path, results.to_dict())


def read_results(path: str | Path) -> EvaluationResults:
    """Read a results JSON (any `merit_hf.results/v1` file, including those written before `EvaluationResults`);
    `ValueError` naming the file for another schema or a malformed one."""
    return EvaluationResults.from_dict(json.loads(Path(path).read_text(encoding="utf-8")), source=path)


__all__ = [
    "DATASET_NAME",
    "SCHEMA",
    "TASKS",
    "EvaluationResults",
    "MetricValue",
    "ResultEntry",
    "ShiftResult",
    "build_results",
    "encoder_identity",
    "environment",
    "feature_extractor_settings",
    "format_metric",
    "json_safe",
    "metric_cell",
    "read_results",
    "results_dataset",
    "write_results",
]
