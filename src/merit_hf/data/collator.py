"""`MeritCollator`: dataset rows -> a model batch (`ecg_values`, tokenised `report`, multi-hot `labels`).

The one way rows become tensors: `MeritCollator.model_inputs` hands the rows' signals, rates and lead names (and
reports) to `MeritProcessor`, the object saved with every checkpoint, so training, the probe, zero-shot evaluation,
the embedding CLI and `precompute_ecg_values` feed the model exactly what a user of the Hub folder gets."""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..models.merit.feature_extraction_merit import EcgInputError
from ..models.merit.processing_merit import MeritProcessor
from .labels import LABEL_SETS, multi_hot
from .reports import has_report

logger = logging.getLogger(__name__)

EMPTY_REPORT_POLICIES = ("raise", "drop")
RECORD_ID_COLUMNS = ("ecg_id", "record", "study_id")  # what names a row in an error, whichever the dataset has
ECG_VALUES_SETTINGS_COLUMN = "ecg_values_settings"  # what `precompute_ecg_values` stores beside `ecg_values`
PRECOMPUTED_COLUMNS = ("ecg_values", "ecg_attention_mask", "lead_mask", ECG_VALUES_SETTINGS_COLUMN)
# The feature extractor settings that decide the values a record gets: the output grid, the filters, the
# normalisation and the repairs. Left out: `crop` / `seed` (a stored window is not cut again, so the training and
# evaluation collators of one model, which differ only in their crop, both read values stored once), `window` (only
# "single" can be stored) and the limits (`max_amplitude_mv`, ...), which decide whether a record is refused, not
# what its values are.
ECG_VALUES_SETTINGS = (
    "lead_names",
    "sampling_rate",
    "num_samples",
    "highpass_hz",
    "lowpass_hz",
    "filter_order",
    "normalization",
    "padding",
    "missing_leads",
    "derive_limb_leads",
    "flat_lead_policy",
    "nan_policy",
)


class MeritCollator:
    r"""
    Collates rows of a `merit_hf.data` dataset for `DataLoader` / `Trainer`.

    Each row's `signal` `(num_samples, num_leads)` goes through the feature extractor with that row's `sampling_rate`
    and `lead_names`, so PTB-XL at 100 or 500 Hz and MIMIC-IV-ECG can be mixed; with a tokenizer, ECGs and reports go
    through `MeritProcessor` together (`model_inputs`). Rows that already hold a pre-processed `ecg_values`
    `(num_leads, num_samples)` (e.g. from `precompute_ecg_values` with the same feature extractor) are stacked as
    they are, with their stored `ecg_attention_mask` and `lead_mask`, once they are checked against the feature
    extractor (`check_stored_ecg_values`): each row's shape must be the one it gives, a row's `ecg_values_settings`
    (written by `precompute_ecg_values`) must equal its settings, and every row must hold the masks it returns.

    Args:
        feature_extractor (`MeritFeatureExtractor`): the model's input contract.
        tokenizer (*optional*): tokenises `report`; its outputs (`input_ids`, `attention_mask`, ...) join the batch.
        label_set (`str`, *optional*): a `List(ClassLabel)` column (a PTB-XL label set of `LABEL_SETS`, or a label
            column of a converted WFDB folder); adds `labels` `(batch, num_classes)` float32 multi-hot. Without it,
            rows that already hold multi-hot `labels` (`merit_hf.training.classification.add_trainer_columns`) have
            them stacked.
        num_classes (`int`, *optional*): required with `label_set`: `len(label_names(dataset, label_set))`.
        max_length (`int`, defaults to 128): reports are truncated to this many tokens.
        empty_report (`str`, defaults to `"raise"`): what a row with an empty `report` does when a tokenizer is
            given: `"raise"` (`ValueError` naming the `ecg_id`) or `"drop"` (the row leaves the batch with a logged
            warning, counted in `num_dropped_empty_reports`; with DataLoader workers each worker counts in its own
            copy of the collator and its warnings say which worker, so the attribute of the main process's collator
            stays 0). Rows are never silently dropped; to drop them before training instead,
            `dataset.filter(lambda row: row["report"] != "")`.
        feature_extraction_device (`str` or `torch.device`, *optional*): run the feature extractor's batched torch
            path there (`"cpu"`, `"cuda"`; see `MeritFeatureExtractor.__call__`'s `device`) instead of its per-record
            scipy path (the default). `ecg_values` then stays on that device; with `"cuda"` use it in the main
            process (`num_workers=0`): CUDA cannot run in forked DataLoader workers.
        crop_seed (`int`, *optional*): with a `crop="random"` feature extractor, cut each record's window at a
            position drawn from `(crop_seed, epoch, ecg_id)`: the same whatever the number of processes or DataLoader
            workers and whatever the record is batched with, the same after a resume, and new each epoch
            (`set_epoch`; the epoch is held in shared memory, so workers, persistent ones too, read the current one).
            Without it a random crop comes from the feature extractor's own generator.

    Example:

    ```python
    >>> from torch.utils.data import DataLoader
    >>> from merit_hf import MeritFeatureExtractor
    >>> from merit_hf.data import MeritCollator, build_ptbxl, label_names
    >>> ptbxl = build_ptbxl("data/ptbxl_sample").with_format("numpy")
    >>> collator = MeritCollator(MeritFeatureExtractor(), label_set="superclass", num_classes=5)
    >>> batch = next(iter(DataLoader(ptbxl["train"], batch_size=8, collate_fn=collator)))
    >>> batch["ecg_values"].shape, batch["labels"].shape
    (torch.Size([8, 12, 2250]), torch.Size([8, 5]))
    ```"""

    def __init__(
        self,
        feature_extractor,
        tokenizer=None,
        label_set: str | None = None,
        num_classes: int | None = None,
        max_length: int = 128,
        empty_report: str = "raise",
        feature_extraction_device: str | torch.device | None = None,
        crop_seed: int | None = None,
    ):
        if label_set is not None and (num_classes is None or num_classes < 1):
            raise ValueError(
                f"MeritCollator.num_classes is required with label_set={label_set!r}: pass "
                f"len(label_names(dataset, {label_set!r}))"
            )
        if empty_report not in EMPTY_REPORT_POLICIES:
            raise ValueError(
                f"MeritCollator.empty_report must be one of {EMPTY_REPORT_POLICIES}, got {empty_report!r}"
            )
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.label_set = label_set
        self.num_classes = num_classes
        self.max_length = max_length
        self.empty_report = empty_report
        self.num_dropped_empty_reports = 0
        self.feature_extraction_device = feature_extraction_device
        self.crop_seed = crop_seed
        # shared with DataLoader workers; only with crop_seed (a shared value pickles only into new processes)
        self._epoch = None if crop_seed is None else multiprocessing.Value("q", 0, lock=False)
        self.processor = (
            None if tokenizer is None else MeritProcessor(feature_extractor, tokenizer, max_length=max_length)
        )

    def __call__(
        self, rows: Sequence[Mapping[str, Any]], crop_seeds: Callable[[Mapping[str, Any]], Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """The batch of `rows`. `crop_seeds`: a function of a row giving the seed of its random crop (the feature
        extractor's `crop_seeds`; by default `(crop_seed, epoch, ecg_id)` when the collator has a `crop_seed`); stored
        `ecg_values` are not cropped again."""
        if crop_seeds is None and self.crop_seed is not None:
            key = (self.crop_seed, self._epoch.value)
            crop_seeds = lambda row: (*key, int(row["ecg_id"]))  # noqa: E731
        rows = list(rows)
        if self.tokenizer is not None:
            rows = self._handle_empty_reports(rows)
        if not rows:
            raise ValueError("MeritCollator: no rows left to collate (every report in the batch was empty)")
        reports = [str(row["report"]) for row in rows] if self.tokenizer is not None else None
        if all("ecg_values" in row for row in rows):
            batch = self.stored_ecg_values(rows)
            if reports is not None:
                batch.update(self.processor(text=reports, return_tensors="pt"))
        else:
            columns = {name: [row[name] for row in rows] for name in ("signal", "sampling_rate", "lead_names")}
            try:
                batch = self.model_inputs(
                    columns["signal"],
                    columns["sampling_rate"],
                    columns["lead_names"],
                    reports=reports,
                    crop_seeds=None if crop_seeds is None else [crop_seeds(row) for row in rows],
                )
            except EcgInputError as error:  # it names the record by its position in this batch only
                ids = {
                    name: [row[name] for row in rows] for name in RECORD_ID_COLUMNS if all(name in row for row in rows)
                }
                raise self.named_record_error(error, {**columns, **ids}) from error
        if self.label_set is not None:
            missing = [position for position, row in enumerate(rows) if self.label_set not in row]
            if missing:
                raise KeyError(
                    f"MeritCollator: row {missing[0]} of the batch has no {self.label_set!r} label column (it has "
                    f"{sorted(rows[missing[0]])}); PTB-XL label sets are {LABEL_SETS}"
                )
            indices = [[int(index) for index in row[self.label_set]] for row in rows]
            batch["labels"] = torch.from_numpy(np.stack([multi_hot(row, self.num_classes) for row in indices]))
        elif all("labels" in row for row in rows):
            batch["labels"] = torch.from_numpy(np.stack([np.asarray(row["labels"], dtype=np.float32) for row in rows]))
        return batch

    def model_inputs(
        self,
        signals: Sequence[Any],
        sampling_rates: Sequence[float],
        lead_names: Sequence[Sequence[str]],
        reports: Sequence[str] | None = None,
        crop: str | None = None,
        crop_seeds: Sequence[Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The model's inputs for records given as columns (each `signal` `(num_samples, num_leads)`, its rate and
        lead names): `ecg_values` (and `lead_mask` / `record_index` / `ecg_attention_mask` when the feature extractor's
        settings give them) from the feature extractor, on `feature_extraction_device` when set; with `reports`, also
        the tokenised reports, both through `MeritProcessor`. `crop` overrides the feature extractor's for this call;
        `crop_seeds` (one per record) seed its random crops.
        Signals keep their dtype (dataset rows are float32; a robustness transform's float64 output stays float64)."""
        ecgs = {
            "sampling_rate": [float(rate) for rate in sampling_rates],
            "lead_names": [list(leads) for leads in lead_names],
            "crop": crop,
            "return_tensors": "pt",
        }
        if crop_seeds is not None:
            ecgs["crop_seeds"] = crop_seeds
        if self.feature_extraction_device is not None:
            ecgs["device"] = self.feature_extraction_device
        signals = [np.asarray(signal) for signal in signals]
        if reports is None:
            return dict(self.feature_extractor(signals, **ecgs))
        if self.processor is None:
            raise ValueError("MeritCollator: reports need a tokenizer; pass tokenizer= to tokenise them")
        return dict(self.processor(ecgs=signals, text=list(reports), **ecgs))

    def set_epoch(self, epoch: int) -> None:
        """The epoch that keys the random crops (`crop_seed`); without a `crop_seed` it has nothing to key."""
        if self._epoch is not None:
            self._epoch.value = epoch

    def named_record_error(
        self, error: EcgInputError, rows: Mapping[str, Sequence[Any]], dataset_rows: Sequence[int] | None = None
    ) -> EcgInputError:
        """`error`, which the feature extractor raised for a batch of `rows` (columns `signal`, `sampling_rate`,
        `lead_names` and any of `RECORD_ID_COLUMNS`) and which names a record by its position in the batch only,
        prefixed with the `RECORD_ID_COLUMNS` (and `dataset_rows`: the rows' indices in their dataset) of the row
        that caused it (`first_failing_record`). `error` itself when no row fails alone."""
        found = first_failing_record(
            rows,
            lambda one: self.feature_extractor(
                [np.asarray(one["signal"][0])],
                sampling_rate=[float(one["sampling_rate"][0])],
                lead_names=[list(one["lead_names"][0])],
            ),
        )
        if found is None:
            return error
        position = found[0]
        named = record_ids(rows, position)
        if dataset_rows is not None:
            named.append(f"row {dataset_rows[position]} of the dataset")
        return EcgInputError(
            f"{', '.join(named) or 'a row without an id column'} (record {position} of a batch of "
            f"{len(rows['signal'])}): {error}"
        )

    def stored_ecg_values(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """The batch of `rows` that hold pre-processed `ecg_values`: the values and their stored masks
        (`ecg_attention_mask`, `lead_mask`) stacked, once `check_stored_ecg_values` has accepted them."""
        self.check_stored_ecg_values(rows)
        values = np.stack([np.asarray(row["ecg_values"], dtype=np.float32) for row in rows])
        batch = {"ecg_values": torch.from_numpy(values)}
        for name, dtype in (("ecg_attention_mask", np.int64), ("lead_mask", bool)):  # the feature extractor's dtypes
            if rows[0].get(name) is not None:  # every row has it (checked)
                batch[name] = torch.from_numpy(np.stack([np.asarray(row[name], dtype=dtype) for row in rows]))
        return batch

    def check_stored_ecg_values(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Refuse (`ValueError`, naming the row by its `RECORD_ID_COLUMNS`) stored `ecg_values` that this collator's
        feature extractor would not have given: a shape other than its `(num_leads, num_samples)`; an
        `ecg_values_settings` (what `precompute_ecg_values` records) other than its own, naming the settings that
        differ; or rows without a mask it returns (`ecg_attention_mask` with `padding=True`, `lead_mask` with
        `missing_leads="mask"`: unmasked zero padding or missing leads would reach the model as signal), and a batch
        where only some rows hold a mask. Rows without `ecg_values_settings` (values stored some other way) get the
        shape and mask checks only."""
        extractor = self.feature_extractor
        expected = (len(extractor.lead_names), int(extractor.num_samples))
        own_settings = None
        for position, row in enumerate(rows):
            shape = tuple(np.shape(row["ecg_values"]))
            if shape != expected:
                raise ValueError(
                    f"MeritCollator: {_row_name(row, position)} holds stored ecg_values of shape {shape}, but this "
                    f"collator's feature extractor gives {expected} ({len(extractor.lead_names)} leads, "
                    f"{extractor.num_samples} samples at {extractor.sampling_rate} Hz). The values were made with "
                    "other settings: store them again with this feature extractor (precompute_ecg_values), or drop "
                    "the ecg_values column to compute them from the signals."
                )
            stored = row.get(ECG_VALUES_SETTINGS_COLUMN)
            if stored is None:
                continue
            own_settings = ecg_values_settings(extractor) if own_settings is None else own_settings
            difference = "" if stored == own_settings else settings_difference(stored, own_settings)
            if difference:
                raise ValueError(
                    f"MeritCollator: {_row_name(row, position)} holds ecg_values made with other feature extractor "
                    f"settings than this collator's ({difference}). Store them again with this feature extractor "
                    "(precompute_ecg_values), or drop the ecg_values column to compute them from the signals."
                )
        masks = (
            ("ecg_attention_mask", extractor.padding, "padding=True", "zero padding"),
            ("lead_mask", extractor.missing_leads == "mask", 'missing_leads="mask"', "missing leads' zeros"),
        )
        for name, returned, setting, hidden in masks:
            lacking = [position for position, row in enumerate(rows) if row.get(name) is None]
            if not lacking or (len(lacking) == len(rows) and not returned):
                continue
            position = lacking[0]
            why = (
                f"this collator's feature extractor ({setting}) returns one"
                if returned
                else f"other rows of the batch hold one ({len(rows) - len(lacking)} of {len(rows)})"
            )
            raise ValueError(
                f"MeritCollator: {_row_name(rows[position], position)} holds stored ecg_values without {name}, "
                f"but {why}; without it the {hidden} would reach the model as signal. Store the values with "
                f"precompute_ecg_values, which keeps the {name} column, or add that column yourself."
            )

    def _handle_empty_reports(self, rows: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        kept = []
        for position, row in enumerate(rows):
            if has_report(row.get("report")):
                kept.append(row)
                continue
            record = f"ecg_id {row['ecg_id']}" if "ecg_id" in row else f"row {position} of the batch"
            if self.empty_report == "raise":
                raise ValueError(
                    f"MeritCollator: {record} has an empty report; filter such rows out or use empty_report='drop'"
                )
            self.num_dropped_empty_reports += 1
            worker = torch.utils.data.get_worker_info()  # each DataLoader worker counts in its own copy
            counter = "" if worker is None else f" by DataLoader worker {worker.id}"
            logger.warning("MeritCollator: dropped %s (empty report); %d dropped so far%s", record,
                           self.num_dropped_empty_reports, counter)  # fmt: skip
        return kept


def precompute_ecg_values(
    dataset,
    feature_extractor,
    batch_size: int = 64,
    num_proc: int | None = None,
    feature_extraction_device: str | torch.device | None = None,
):
    """Store the feature extractor's output as an `ecg_values` column `Array2D((num_leads, num_samples), float32)`,
    which `MeritCollator` then stacks without recomputing (the `signal` column is kept). Beside it: with
    `padding=True`, an `ecg_attention_mask` column (`num_samples` int8: 1 on signal, 0 on the zero padding of a
    shorter record); with `missing_leads="mask"`, a `lead_mask` column (`num_leads` bools); and always
    `ecg_values_settings`, a string of the feature extractor settings that decide the values (`ecg_values_settings`),
    which `MeritCollator` compares with its own feature extractor's before it uses the values. Being columns, they
    survive `save_to_disk`, Parquet and streaming. `feature_extraction_device`: as `MeritCollator`'s (the batched
    torch path; the values are moved back to the CPU to be stored).

    Worth it when the same records are read for many epochs: resampling and filtering cost more than reading. The
    stored values are fixed, so a `crop="random"` augmentation of the feature extractor no longer varies per epoch.
    """
    from datasets import Array2D, List, Value

    if feature_extractor.window == "sliding":
        raise ValueError(
            "precompute_ecg_values stores one window per record; use a feature extractor with window='single'"
        )
    num_leads, num_samples = len(feature_extractor.lead_names), feature_extractor.num_samples
    earlier = [name for name in PRECOMPUTED_COLUMNS if name in dataset.column_names]
    if earlier:  # values stored before, maybe with other settings: none of their columns may outlive them
        dataset = dataset.remove_columns(earlier)
    features = dataset.features.copy()
    features["ecg_values"] = Array2D(shape=(num_leads, num_samples), dtype="float32")
    stored = ["ecg_values"]
    if feature_extractor.padding:  # the feature extractor returns ecg_attention_mask
        features["ecg_attention_mask"] = List(Value("int8"), length=num_samples)
        stored.append("ecg_attention_mask")
    if feature_extractor.missing_leads == "mask":
        features["lead_mask"] = List(Value("bool"), length=num_leads)
        stored.append("lead_mask")
    features[ECG_VALUES_SETTINGS_COLUMN] = Value("string")
    settings = ecg_values_settings(feature_extractor)

    collator = MeritCollator(feature_extractor, feature_extraction_device=feature_extraction_device)

    def add_values(batch: dict, indices: list[int]) -> dict:
        try:
            extracted = collator.model_inputs(batch["signal"], batch["sampling_rate"], batch["lead_names"])
        except EcgInputError as error:  # it names the record by its position in this batch only
            raise collator.named_record_error(error, batch, indices) from error
        columns = {name: extracted[name].cpu().numpy() for name in stored}
        if "ecg_attention_mask" in columns:
            columns["ecg_attention_mask"] = columns["ecg_attention_mask"].astype(np.int8)
        return {**columns, ECG_VALUES_SETTINGS_COLUMN: [settings] * len(indices)}

    return (
        dataset.with_format("numpy")
        .map(add_values, batched=True, with_indices=True, batch_size=batch_size, num_proc=num_proc, features=features)
        .with_format(None)
    )


def ecg_values_settings(feature_extractor) -> str:
    """The settings of `feature_extractor` that decide the `ecg_values` it gives a record (`ECG_VALUES_SETTINGS`), as
    a short JSON string: what `precompute_ecg_values` stores with the values in its `ecg_values_settings` column, and
    what `MeritCollator` compares with its own feature extractor's before it stacks stored values."""
    settings = {name: getattr(feature_extractor, name) for name in ECG_VALUES_SETTINGS}
    settings["lead_names"] = list(settings["lead_names"])
    return json.dumps(settings, separators=(",", ":"))


def settings_difference(stored: Any, own: str) -> str:
    """How the `ecg_values_settings` `stored` with some values differ from `own` (this feature extractor's), for
    messages: `"stored with name=value, this feature extractor has name=value"` for each setting that differs; `""`
    when none does."""
    own_settings = json.loads(own)
    try:
        stored_settings = json.loads(stored)
    except (TypeError, ValueError):
        stored_settings = None
    if not isinstance(stored_settings, dict):
        return (
            f"the stored ecg_values_settings {stored!r} is not what precompute_ecg_values writes; this feature "
            f"extractor has {own}"
        )
    names = [name for name in own_settings if stored_settings.get(name, "not recorded") != own_settings[name]]
    names += [name for name in stored_settings if name not in own_settings]
    return "; ".join(
        f"stored with {name}={stored_settings.get(name, 'not recorded')!r}, "
        f"this feature extractor has {name}={own_settings.get(name, 'not recorded')!r}"
        for name in names
    )


def first_failing_record(
    rows: Mapping[str, Sequence[Any]], run_alone: Callable[[Mapping[str, Sequence[Any]]], Any]
) -> tuple[int, EcgInputError] | None:
    """`(position, error)` of the first row of the batch `rows` (columns of one length, `signal` among them) that
    raises `EcgInputError` when `run_alone` gets it as a batch of one (every column cut to that row); `None` when no
    row fails alone. Run only once a whole batch has failed, whose error names a record by its place in the batch:
    the collator, `precompute_ecg_values`, the embedding command line and report examples name it by its ids."""
    for position in range(len(rows["signal"])):
        try:
            run_alone({name: values[position : position + 1] for name, values in rows.items()})
        except EcgInputError as error:
            return position, error
    return None


def record_ids(rows: Mapping[str, Sequence[Any]], position: int) -> list[str]:
    """The `RECORD_ID_COLUMNS` the batch `rows` has, of its row `position`, as `"name value"` for messages."""
    return [f"{name} {_plain(rows[name][position])!r}" for name in RECORD_ID_COLUMNS if name in rows]


def _row_name(row: Mapping[str, Any], position: int) -> str:
    """A row of a batch as messages name it: its `RECORD_ID_COLUMNS`, and its position in the batch."""
    named = record_ids({name: [value] for name, value in row.items()}, 0)  # a batch of this one row
    return f"{', '.join(named)} (row {position} of the batch)" if named else f"row {position} of the batch"


def _plain(value: Any) -> Any:
    """A numpy scalar (rows in the numpy format) as the Python value it holds, for messages."""
    return value.item() if isinstance(value, np.generic) else value


def with_crop(feature_extractor, crop: str, seed: int | None = None):
    """A copy of `feature_extractor` that cuts `crop` windows (`"random"`: from a generator seeded with `seed`, or
    from the `crop_seeds` a call gives), for the training and evaluation collators of one model."""
    return type(feature_extractor).from_dict({**feature_extractor.to_dict(), "crop": crop, "seed": seed})


__all__ = [
    "ECG_VALUES_SETTINGS",
    "MeritCollator",
    "ecg_values_settings",
    "first_failing_record",
    "precompute_ecg_values",
    "record_ids",
    "with_crop",
]
