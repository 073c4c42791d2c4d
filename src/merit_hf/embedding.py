"""Embed a whole ECG dataset with a MERIT encoder.

`embed_dataset` adds the encoder's `pooler_output` as a column through `datasets.map`. A map-style dataset is
cached under a fingerprint of the weights, the feature-extractor settings and the precision, so a re-run after a crash
reuses what was done; a streamed dataset (`IterableDataset`, e.g. MIMIC-IV-ECG) is embedded lazily, batch by batch,
as it is read. The command line writes `ecg_id` plus the embedding of every record to Parquet; a streamed split is
written in parts with the stream's state, so a run that stops resumes after its last finished part (`write_embeddings_parquet`):

    python -m merit_hf.embedding --model_name_or_path quickstart_output/model --dataset data/ptbxl_sample \\
        --output_dir embeddings --precision bf16
    accelerate launch --multi_gpu --num_processes 8 -m merit_hf.embedding --model_name_or_path <checkpoint> \\
        --dataset_name mimic_iv_ecg --dataset <converted MIMIC-IV-ECG> --splits train --output_dir mimic_embeddings
    python -m merit_hf.embedding --model_name_or_path <checkpoint> --dataset_name wfdb --dataset <converted folder> \\
        --split_fractions 0.8 0.1 0.1 --split_seed 0 --keep_columns ecg_id record   # any WFDB folder, converted

`--precision auto` (the default) runs bf16 weights on a GPU and, on a CPU, bf16 where the CPU computes it natively,
else fp32 (`merit_hf.models.merit.inference_precision`). `--precision int8` is about as fast as bf16 weights on CPUs
with AVX512-BF16 and the fastest on CPUs without native bf16, at a small accuracy cost; on an AMX Xeon bf16 weights
run 1.5-1.7x as fast as int8 with freed memory kept, 1.8-2.1x without (benchmarks/README.md, "CPU inference"). For many ECGs on CPU pick a `small-p125` checkpoint. Every record is centre-cropped to the
encoder's window, as in the linear-probe protocol.
Long records (a 60 s strip, a Holter) can instead be embedded window by window and pooled per record, and records
without some leads from the leads they have:

    python -m merit_hf.embedding --model_name_or_path <checkpoint> --dataset <data> --window sliding \
        --window_pooling mean --missing_leads mask
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data.collator import RECORD_ID_COLUMNS, first_failing_record, record_ids
from .data.ptbxl_versions import DEFAULT_PTBXL_VERSION, PTBXL_VERSIONS, check_ptbxl_version_for
from .data.wfdb_folder import DEFAULT_SPLIT_FRACTIONS
from .evaluation.probe import (
    check_sampling_rate_flag,
    ecg_model_inputs,
    encoder_inputs,
    load_encoder,
    load_feature_extractor,
    record_embeddings,
)
from .models.fingerprint import model_fingerprint
from .models.merit.feature_extraction_merit import (
    MISSING_LEAD_POLICIES,
    WINDOWS,
    EcgInputError,
    MeritFeatureExtractor,
)
from .models.merit.inference_precision import PRECISIONS, inference_device, prepare_for_inference, resolve_precision
from .models.merit.pipeline_merit import WINDOW_POOLINGS, check_feature_extractor_matches, ecg_encoder_of
from .utils.arguments import parse_arguments
from .utils.launch import require_joined_processes
from .utils.throughput import ThroughputMeter

DATASET_NAMES = ("ptbxl", "mimic_iv_ecg", "wfdb")
REQUIRED_COLUMNS = ("signal", "sampling_rate", "lead_names")
# the shard layout of streamed splits: whole shards per process since stream_part, up to 64 for a folder built in
# memory; a resume key from before it (a stream position in another layout) is refused, not misread
STREAM_LAYOUT = "stream-layout-2"


def embed_dataset(
    dataset,
    model,
    feature_extractor: MeritFeatureExtractor | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    device: torch.device | str | None = None,
    column: str = "ecg_embedding",
    keep_columns: Sequence[str] = ("ecg_id",),
    weights_fingerprint: str | None = None,
    window_pooling: str = "mean",
    meter: ThroughputMeter | None = None,
    feature_extraction_device: torch.device | str | None = None,
    split: str | None = None,
):
    """`dataset` (a `datasets.Dataset` or `IterableDataset` in the merit_hf schema) with the MERIT embedding of every
    record in `column` (float32, `hidden_size` wide) and only `keep_columns` of the others.

    Args:
        model: any MERIT model (its ECG encoder is used) or a checkpoint folder / Hub id.
        feature_extractor: defaults to the checkpoint's, else the one matching the encoder config.
        precision: `"auto"` (bf16 weights on a GPU, the CPU's fastest accurate path), `"fp32"`, `"bf16"`, `"fp16"`,
            `"int8"` (CPU) or `"fp8"` (Hopper-class GPUs); see `merit_hf.models.merit.inference_precision`. The caller's model is
            never cast: a converted copy runs.
        device: defaults to CUDA when available.
        weights_fingerprint: the encoder's weight fingerprint for the map-style cache key, when the caller has it
            (the command line computes it once for all splits); computed here otherwise.
        window_pooling: `"mean"` or `"max"` of the window embeddings of a record, when the feature extractor cuts
            records into windows (`window="sliding"`); each record still gets one embedding.
        meter: a `merit_hf.utils.throughput.ThroughputMeter` that times each batch as it is embedded (the feature
            extractor as data wait, FLOPs per ECG of the encoder's forward); nothing is timed when `None`.
        feature_extraction_device: `None` (default) prepares each record with the feature extractor's scipy path on
            the CPU; `"encoder"` runs its batched torch path on the encoder's device (each process's own GPU under
            `accelerate launch`), or name a device (`"cpu"`). Equal to the scipy path within float32 rounding
            (tests/test_core_feature_extraction_torch.py); speed in benchmarks/README.md.
        split: the split's name, for errors (default: the dataset's own `split`, when it has one).

    Raises `ValueError` when the feature extractor's `sampling_rate`, `lead_names` or `num_samples` differ from the
    encoder config's (`check_feature_extractor_matches`), and `EcgInputError` for a record that breaks the input
    contract, naming the split and the row (its `ecg_id` / `record` / `study_id`) before the feature extractor's own
    message (the original error is the `__cause__`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: must be one of {list(PRECISIONS)}, got {precision!r}")
    if window_pooling not in WINDOW_POOLINGS:
        raise ValueError(f"window_pooling: must be one of {WINDOW_POOLINGS}, got {window_pooling!r}")
    if isinstance(dataset, dict):  # a DatasetDict / IterableDatasetDict, whose "columns" would be its split names
        raise TypeError(f"embed_dataset takes one split, e.g. dataset['train'], not a dict of splits {list(dataset)}")
    columns = list(dataset.column_names or (dataset.features or {}))
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise ValueError(f"the dataset has no column {missing} (it has {columns}); it must follow the merit_hf schema")
    unknown = [name for name in keep_columns if name not in columns]
    if unknown:
        raise ValueError(f"keep_columns: {unknown} are not columns of the dataset ({columns})")
    encoder, _ = load_encoder(model) if isinstance(model, (str, Path)) else (ecg_encoder_of(model), None)
    feature_extractor = feature_extractor or load_feature_extractor(model, encoder)
    check_feature_extractor_matches(feature_extractor, encoder if isinstance(model, (str, Path)) else model)
    split = split if split is not None else getattr(dataset, "split", None)
    device = inference_device(device)
    precision = resolve_precision(precision, device)  # the cache key names what ran, not "auto"
    runner = prepare_for_inference(encoder, precision, device)
    if meter is not None and meter.model is None:
        # model FLOPs are counted on the plain model: the FLOP counter does not see oneDNN's prepacked linear layers
        # or the int8 ones, so a count on `runner` missed them (and fp16, run as plain linears, counted them)
        meter.model = encoder
    extraction_device = device if feature_extraction_device == "encoder" else feature_extraction_device

    def inputs_of(rows: dict[str, list]) -> dict[str, torch.Tensor]:
        return ecg_model_inputs(feature_extractor, rows, crop="center", device=extraction_device)

    def embed(rows: dict[str, list]) -> dict[str, Any]:
        with meter.waiting() if meter is not None else contextlib.nullcontext():
            try:
                inputs = inputs_of(rows)
            except EcgInputError as error:  # it names the record by its index in this batch only
                raise _named_record_error(error, rows, split, inputs_of) from error
        if meter is not None:
            meter.count_flops_once(
                lambda batch: meter.model(**batch).pooler_output, encoder_inputs(inputs, meter.model.device), False
            )
            meter.step(len(inputs["ecg_values"]))
        with torch.inference_mode():
            pooled = record_embeddings(runner, inputs, device, window_pooling)
        return {column: pooled.float().cpu().numpy()}

    options: dict[str, Any] = {
        "batched": True,
        "batch_size": batch_size,
        "remove_columns": [name for name in columns if name not in keep_columns],
    }
    if hasattr(dataset, "_fingerprint") and len(dataset) == 0:  # `map` adds no column to an empty split
        from datasets import Dataset, Features, List, Value

        features = Features(
            {**{name: dataset.features[name] for name in keep_columns}, column: List(Value("float32"))}
        )
        return Dataset.from_dict({name: [] for name in features}, features=features, split=dataset.split)
    if hasattr(dataset, "_fingerprint"):  # map-style: a fingerprint that a re-run reproduces, so its cache is reused
        weights = weights_fingerprint or model_fingerprint(encoder)  # of the caller's weights, not the copy's
        key = [weights, feature_extractor.to_json_string(), precision, column, list(keep_columns)]
        if feature_extractor.window == "sliding":  # keys of single-window runs stay what they were
            key.append(window_pooling)
        key += [str(extraction_device)] if extraction_device is not None else []  # float32 rounding apart
        options["new_fingerprint"] = hashlib.sha1(
            json.dumps([dataset._fingerprint, key, batch_size]).encode()
        ).hexdigest()
        options["desc"] = "embedding"
    elif dataset.features is not None:
        # a stream's output types as a map-style split's (inferred there from the kept columns' features and the
        # float32 arrays); without them a streamed file held ecg_id as int64 and no `datasets` schema metadata
        from datasets import Features, List, Value

        options["features"] = Features(
            {**{name: dataset.features[name] for name in keep_columns}, column: List(Value("float32"))}
        )
    return dataset.map(embed, **options)


def _named_record_error(
    error: EcgInputError, rows: dict[str, list], split: str | None, inputs_of: Callable[[dict[str, list]], Any]
) -> EcgInputError:
    """`error` of a batch of `rows` prefixed with the split and the failing row's `RECORD_ID_COLUMNS`; the row is the
    first one that fails again on its own (`first_failing_record`)."""
    where = f"split {str(split)!r}" if split is not None else "the dataset"
    size = len(rows["signal"])
    found = first_failing_record(rows, inputs_of)
    if found is not None:
        named = ", ".join(record_ids(rows, found[0])) or "a row without an id column"
        return EcgInputError(f"{where}, {named} (record {found[0]} of a batch of {size}): {error}")
    ids = [name for name in RECORD_ID_COLUMNS if name in rows]
    named = "; ".join(f"{name} {rows[name]!r}" for name in ids) or f"{size} rows without an id column"
    return EcgInputError(f"{where}, a batch of {named}: {error}")


def write_embeddings_parquet(
    embedded, path: str | Path, batch_size: int = 1000, resume_key: str | None = None, checkpoint_every: int = 10_000
) -> int:
    """Write an embedded dataset (map-style or streamed) to one Parquet file; returns the number of rows.

    A map-style dataset is written in one go (its `datasets` cache is what a re-run reuses). A streamed one goes to
    `<path>.partial/` first: a part file every `checkpoint_every` rows, each followed by the stream's `state_dict()`
    in `progress.json`. If the job stops, the next call with the same `resume_key` (model, settings, data) resumes the
    stream after the last finished part instead of embedding everything again; a different key is an error naming the
    folder, never a file that mixes two models. The parts are joined into `path` at the end and the folder removed.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(embedded, Dataset):
        partial = path.with_name(path.name + ".partial")  # a crash leaves only this, never a file that looks complete
        check_no_unfinished_stream(path)
        embedded.to_parquet(str(partial))
        partial.replace(path)
        return len(embedded)
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every: must be >= 1, got {checkpoint_every}")
    parts = _StreamParts(path.with_name(path.name + ".partial"), resume_key)
    if parts.state is not None:
        embedded.load_state_dict(parts.state)
    writer, part_rows = None, 0
    try:
        schema = embedded.features.arrow_schema if embedded.features is not None else None
        for batch in embedded.iter(batch_size=min(batch_size, checkpoint_every)):
            table = pa.Table.from_pydict(batch, schema=schema)
            writer = writer or pq.ParquetWriter(str(parts.unfinished), table.schema)
            writer.write_table(table)
            part_rows += table.num_rows
            if part_rows >= checkpoint_every:
                writer.close()
                parts.finish_part(part_rows, embedded.state_dict())
                writer, part_rows = None, 0
    finally:
        if writer is not None:
            writer.close()
    if writer is not None:
        parts.finish_part(part_rows, embedded.state_dict())
    if parts.rows == 0:  # a shard of a split smaller than the number of processes: an empty file, as map-style
        parts.remove()
        if embedded.features is None:
            raise ValueError(
                f"{path}: the streamed split yielded no records and has no schema to write an empty file of"
            )
        scratch = path.with_name(path.name + ".partial")
        pq.write_table(embedded.features.arrow_schema.empty_table(), str(scratch))
        scratch.replace(path)
        return 0
    return parts.join_into(path)


def check_no_unfinished_stream(path: str | Path) -> None:
    """Refuse a map-style write of `path` over the `<path>.partial/` folder a stopped streamed write left (it would fail
    on the folder after embedding the whole split): resume it by streaming, or delete it."""
    unfinished = Path(path).with_name(Path(path).name + ".partial")
    if unfinished.is_dir():
        raise ValueError(
            f"{unfinished}: an unfinished streamed write of this file is there; resume it with --streaming true and the "
            "same settings, or delete the folder to write the split map-style"
        )


_SHARD_FILE = re.compile(r"(?P<stem>.+?)(?:-\d{5}-of-(?P<num_shards>\d{5}))?(?P<kind>\.parquet(?:\.partial)?|\.json)")


def other_layout_files(output_dir: Path, splits: Sequence[str], num_shards: int) -> list[Path]:
    """The files (and unfinished `.partial/` folders) of `splits`, and the `embeddings*.json` summaries, that a run
    with another number of shards wrote into `output_dir`: `test.parquet` beside `test-00000-of-00002.parquet` would
    give every record of the split twice to `load_dataset("parquet", data_dir=output_dir)`."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in sorted(output_dir.iterdir()):
        match = _SHARD_FILE.fullmatch(path.name)
        if match is None or int(match["num_shards"] or 1) == num_shards:
            continue
        if (match["stem"] == "embeddings") if match["kind"] == ".json" else (match["stem"] in splits):
            found.append(path)
    return found


def clear_other_layouts(output_dir: Path, splits: Sequence[str], num_shards: int, overwrite: bool) -> None:
    """Refuse (naming the files) or, with `overwrite`, remove `other_layout_files`; every process decides alike."""
    import shutil

    found = other_layout_files(output_dir, splits, num_shards)
    if found and not overwrite:
        names = ", ".join(path.name for path in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise FileExistsError(
            f"{output_dir}: holds embeddings of {', '.join(splits)} written as another number of shards ({names}); this "
            f"run writes {num_shards} shard(s), and the folder would then hold those records twice. Pass "
            "--overwrite_output_dir true to remove them, or choose another --output_dir."
        )
    for path in found:  # several processes may remove the same file: whichever comes second finds nothing
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def kept_splits(
    summary_file: Path,
    embedding_key: str,
    splits: Sequence[str],
    overwrite: bool,
    settings: dict[str, Any] | None = None,
    legacy_key: str | None = None,
) -> dict[str, Any]:
    """The entries of an earlier summary (`embeddings*.json`) for splits this run does not write, so that the folder's
    summary lists every split in it. Those splits must come from the same model, feature-extractor setting, precision
    and data (`embedding_key`, of `settings`; or `legacy_key`, the key a summary written before `settings` has):
    another's are refused, naming the settings that differ, or removed with `--overwrite_output_dir true` (one folder
    would otherwise mix two models' embeddings); `overwrite`, as in `clear_other_layouts`."""
    if not summary_file.is_file():
        return {}
    earlier = json.loads(summary_file.read_text())
    others = {split: entry for split, entry in earlier.get("splits", {}).items() if split not in splits}
    if not others or earlier.get("embedding_key") in (embedding_key, legacy_key):
        return others
    if not overwrite:
        files = ", ".join(Path(entry["path"]).name for _, entry in sorted(others.items()))
        raise FileExistsError(
            f"{summary_file.parent}: holds embeddings of {', '.join(sorted(others))} from another model, feature "
            f"extractor setting, precision or data ({_settings_differences(earlier, settings or {})}); embedding "
            f"{', '.join(splits)} with this one would mix two in one folder. Embed every split with one setting, or "
            f"choose another --output_dir; --overwrite_output_dir true would delete their embeddings ({files}) and "
            "keep only this run's."
        )
    for entry in others.values():
        Path(entry["path"]).unlink(missing_ok=True)
    return {}


def _settings_differences(earlier: dict[str, Any], settings: dict[str, Any]) -> str:
    """Which of `settings` (`embedding_settings`) an earlier summary has otherwise, with both values."""
    if not any(name in earlier for name in settings if name not in ("precision", "shard", "split")):
        return (
            f"model {earlier.get('model')!r}, precision {earlier.get('precision')!r}: written by an earlier merit_hf, "
            "whose embeddings.json does not record the settings to compare"
        )
    differences = []
    for name in settings:
        there, here = earlier.get(name), settings[name]
        if isinstance(there, dict) and isinstance(here, dict):
            differences += [
                f"{name}.{key} {there.get(key)!r} there, {here.get(key)!r} here"
                for key in sorted(set(there) | set(here))
                if there.get(key) != here.get(key)
            ]
        elif there != here:
            differences.append(f"{name} {there!r} there, {here!r} here")
    return "; ".join(differences) or "the same settings, another key"


class _StreamParts:
    """The `<file>.partial/` folder of a streamed write: finished parts plus `progress.json` (rows, parts, the
    stream state after the last finished part, and the key of what is being embedded)."""

    def __init__(self, folder: Path, key: str | None):
        self.folder, self.key = folder, key
        self.progress = folder / "progress.json"
        self.rows, self.parts, self.state = 0, 0, None
        if folder.is_file():  # what a crashed map-style write leaves: incomplete by construction
            folder.unlink()
        if self.progress.is_file():
            progress = json.loads(self.progress.read_text())
            if key is None:
                raise ValueError(
                    f"{folder}: an unfinished write is there; pass its resume_key to resume it, or delete it"
                )
            if progress["key"] != key:
                raise ValueError(
                    f"{folder}: an unfinished write of other embeddings is there (another model, feature-extractor "
                    "setting, precision or dataset, or a stream position from an earlier merit_hf's shard layout); delete the "
                    "folder to start this one from the beginning"
                )
            self.rows, self.parts, self.state = progress["rows"], progress["parts"], progress["state"]
            print(f"{folder}: resuming after {self.rows} rows in {self.parts} finished parts", flush=True)
        elif folder.exists() and any(folder.iterdir()):
            raise ValueError(f"{folder}: exists without progress.json, so it cannot be resumed; delete it")
        folder.mkdir(parents=True, exist_ok=True)
        self.unfinished = folder / "unfinished.parquet"  # overwritten: whatever a crash left of it is not counted

    def part(self, index: int) -> Path:
        return self.folder / f"part-{index:05d}.parquet"

    def finish_part(self, rows: int, state: dict) -> None:
        self.unfinished.replace(self.part(self.parts))
        self.rows, self.parts = self.rows + rows, self.parts + 1
        progress = {"key": self.key, "rows": self.rows, "parts": self.parts, "state": state}
        scratch = self.progress.with_suffix(".tmp")
        scratch.write_text(json.dumps(progress))
        scratch.replace(self.progress)

    def join_into(self, path: Path) -> int:
        import pyarrow.parquet as pq

        joined = self.folder / "joined.parquet"
        writer = None
        try:
            for index in range(self.parts):
                table = pq.read_table(self.part(index))
                writer = writer or pq.ParquetWriter(str(joined), table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
        rows = pq.read_metadata(joined).num_rows
        if rows != self.rows:
            raise RuntimeError(f"{self.folder}: the parts hold {rows} rows, progress.json counted {self.rows}")
        joined.replace(path)
        self.remove()
        return rows

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class EmbeddingArguments:
    """What to embed, with which model, and where the Parquet files go."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A MERIT checkpoint (any class). Required."}
    )
    dataset: str = field(
        default="data/ptbxl_sample",
        metadata={
            "help": "A PTB-XL folder, a converted dataset (folder or Hub id) or, with mimic_iv_ecg / wfdb, theirs."
        },
    )
    dataset_name: str = field(
        default="ptbxl",
        metadata={
            "help": "'ptbxl', 'mimic_iv_ecg' or 'wfdb' (a folder converted by the repository's dataset_scripts/wfdb or merit_hf.data.convert_wfdb_folder)."
        },
    )
    sampling_rate: int = field(default=100, metadata={"help": "Which PTB-XL records to read (100 or 500 Hz)."})
    splits: list[str] = field(default_factory=lambda: ["train", "validation", "test"])
    streaming: bool = field(default=False, metadata={"help": "Stream the splits (always on for MIMIC-IV-ECG)."})
    output_dir: str = field(default="embeddings", metadata={"help": "One `<split>.parquet` per split."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Remove the files of these splits that another shard layout wrote into --output_dir (refused "
            "otherwise: the folder would hold those records twice), and the other splits' files there when another "
            "model, precision or input setting embedded them. A rerun in the same layout replaces its files."
        },
    )
    batch_size: int = field(default=64)
    precision: str = field(
        default="auto",
        metadata={
            "help": "'auto' (bf16 weights on a GPU; on CPU bf16 or fp32 from what the CPU reports), 'fp32', "
            "'bf16', 'fp16', 'int8' (CPU) or 'fp8' (Hopper-class GPU, needs torchao)."
        },
    )
    keep_columns: list[str] = field(default_factory=lambda: ["ecg_id"], metadata={"help": "Columns kept beside it."})
    use_cpu: bool = field(
        default=False, metadata={"help": "Embed on CPU even with a GPU (with `accelerate launch`: CPU processes)."}
    )
    num_shards: int | None = field(
        default=None, metadata={"help": "Split every split into N shards (default: the number of launched processes)."}
    )
    shard_index: int | None = field(
        default=None, metadata={"help": "Which shard this process embeds (default: its process index)."}
    )
    checkpoint_every: int = field(
        default=10_000,
        metadata={"help": "Streamed splits: rows per finished part; a stopped run resumes after the last one."},
    )
    window: str | None = field(
        default=None,
        metadata={
            "help": "'single': one centre window per record; 'sliding': every window of the record, pooled per "
            "record (--window_stride, --window_pooling). Default: the checkpoint's feature-extractor setting."
        },
    )
    window_stride: int | None = field(
        default=None,
        metadata={"help": "With --window sliding: samples (at the model's rate) between windows; default one window."},
    )
    window_pooling: str = field(default="mean", metadata={"help": "'mean' or 'max' of a record's window embeddings."})
    missing_leads: str | None = field(
        default=None,
        metadata={
            "help": "'mask': a record without some of the model's leads is embedded from the leads it has (the "
            "missing ones are left out); 'raise'. Default: the checkpoint's feature-extractor setting."
        },
    )
    nan_policy: str | None = field(
        default=None,
        metadata={
            "help": "'interpolate': short NaN/inf gaps are filled linearly (within the feature extractor's "
            "max_nan_gap_s and max_nan_fraction); 'raise'. Default: the checkpoint's feature-extractor setting."
        },
    )
    split_column: str | None = field(
        default=None, metadata={"help": "wfdb: a column of train / validation / test (else a seeded split)."}
    )
    split_fractions: list[float] = field(
        default_factory=lambda: list(DEFAULT_SPLIT_FRACTIONS),
        metadata={"help": "wfdb: train, validation, test fractions of the seeded split (patients kept whole)."},
    )
    split_seed: int = field(default=0, metadata={"help": "wfdb: the seed of that split."})
    ptbxl_version: str = field(
        default=DEFAULT_PTBXL_VERSION,
        metadata={
            "help": f"ptbxl, one of {PTBXL_VERSIONS}: '1.0.3' rows follow PTB-XL v1.0.3 (its duplicates dropped, "
            "consensus labels), whatever metadata version the folder holds; 'as_is' the rows as stored."
        },
    )
    feature_extraction_device: str | None = field(
        default=None,
        metadata={
            "help": "Default: the feature extractor's scipy path, record by record on the CPU. 'encoder': its batched "
            "torch path on the embedding device (each process's GPU); or a device such as 'cpu'."
        },
    )

    def __post_init__(self):
        if self.dataset_name not in DATASET_NAMES:
            raise ValueError(f"dataset_name: must be one of {DATASET_NAMES}, got {self.dataset_name!r}")
        check_ptbxl_version_for(self.dataset_name, self.ptbxl_version)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every: must be >= 1, got {self.checkpoint_every}")
        for name, value, allowed in (
            ("window", self.window, WINDOWS),
            ("window_pooling", self.window_pooling, WINDOW_POOLINGS),
            ("missing_leads", self.missing_leads, MISSING_LEAD_POLICIES),
        ):
            if value is not None and value not in allowed:
                raise ValueError(f"{name}: must be one of {allowed}, got {value!r}")
        if self.window_stride is not None and self.window != "sliding":
            raise ValueError("window_stride: only with --window sliding")
        if self.window == "single":  # else checked on the checkpoint's window, once it is loaded (`main`)
            check_window_pooling(self.window_pooling, "single", "--window single gives each record one window")
        if self.dataset_name != "wfdb":  # the loaders of the other datasets have their own, fixed splits
            given = [
                f"--{name}"
                for name, value, default in (
                    ("split_column", self.split_column, None),
                    ("split_fractions", list(self.split_fractions), list(DEFAULT_SPLIT_FRACTIONS)),
                    ("split_seed", self.split_seed, 0),
                )
                if value != default
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: only with --dataset_name wfdb (a folder split here); {self.dataset_name} "
                    "has its own train / validation / test splits, which these would not change"
                )
        check_sampling_rate_flag(self.dataset_name, self.sampling_rate, type(self).__dataclass_fields__)
        if (self.num_shards is None) != (self.shard_index is None):
            raise ValueError("num_shards and shard_index go together: give both or neither")
        if self.num_shards is not None and self.num_shards < 1:
            raise ValueError(
                f"num_shards: must be >= 1 (the number of parts each split is cut into), got {self.num_shards}"
            )
        if self.num_shards is not None and not 0 <= self.shard_index < self.num_shards:
            raise ValueError(
                f"shard_index: must be in [0, {self.num_shards}) for --num_shards {self.num_shards}, got {self.shard_index}"
            )
        if self.feature_extraction_device not in (None, "encoder"):
            try:
                torch.device(self.feature_extraction_device)
            except RuntimeError as error:
                raise ValueError(
                    f"feature_extraction_device: must be 'encoder' or a torch device such as 'cpu' or 'cuda:0', got "
                    f"{self.feature_extraction_device!r}"
                ) from error


def check_window_pooling(window_pooling: str, window: str, why: str) -> None:
    """Refuse a `--window_pooling` other than the default where there are no windows to pool: `window` is not
    "sliding" (`why` says where that comes from), so each record gets one window."""
    if window != "sliding" and window_pooling != "mean":
        raise ValueError(
            f"window_pooling: {window_pooling!r} pools the windows of --window sliding, and {why}; pass --window "
            "sliding, or leave --window_pooling out"
        )


def load_splits(arguments: EmbeddingArguments, shard_index: int = 0, num_shards: int = 1) -> dict[str, Any]:
    """The requested splits, streamed or map-style, each cut to the `shard_index`-th of `num_shards` parts
    (`split_dataset_by_node`, through the loaders' own `rank` / `world_size` where they have them)."""
    from .data import load_dataset

    node = {"rank": shard_index, "world_size": num_shards} if num_shards > 1 else {}
    everything = load_dataset(
        arguments.dataset_name,
        arguments.dataset,
        streaming=arguments.streaming or None,  # None: the loader's default (MIMIC-IV-ECG always streams)
        sampling_rate=arguments.sampling_rate,
        drop_unlabeled=False,
        split_column=arguments.split_column,
        split_fractions=arguments.split_fractions,
        seed=arguments.split_seed,
        ptbxl_version=arguments.ptbxl_version,
        **node,
    )
    unknown = [split for split in arguments.splits if split not in everything]
    if unknown:
        raise ValueError(f"splits {unknown}: {arguments.dataset} has {sorted(everything)}")
    return {split: everything[split] for split in arguments.splits}


# the lead-swap check warns about or refuses a record, never changes its values
_NOT_INPUT_SETTINGS = (
    "feature_extractor_type", "auto_map", "processor_class", "crop", "seed", "lead_swap_policy",
    "max_limb_lead_residual",
)  # fmt: skip


def dataset_identity(dataset: str) -> str:
    """`--dataset` as an absolute path when it is a local folder or file (however it was spelled), else as given (a
    Hub id)."""
    path = Path(dataset).expanduser()
    return str(path.resolve()) if path.exists() else dataset


def embedding_settings(
    arguments: EmbeddingArguments,
    feature_extractor: MeritFeatureExtractor,
    weights: str,
    precision: str,
    shard_index: int,
    num_shards: int,
) -> dict[str, Any]:
    """What decides the records and inputs a run embeds, and so its embeddings: recorded in `embeddings.json`, and
    what every split of one folder must share (`kept_splits`). Whether a split was streamed is not among them (the
    files are identical), nor the batch size."""
    settings: dict[str, Any] = {
        "weights_fingerprint": weights,
        "precision": precision,
        "dataset_path": dataset_identity(arguments.dataset),
        "dataset_name": arguments.dataset_name,
    }
    if arguments.dataset_name == "ptbxl":  # which records: the 100 or 500 Hz files, v1.0.3's rows or the folder's
        settings.update(sampling_rate=arguments.sampling_rate, ptbxl_version=arguments.ptbxl_version)
    if arguments.dataset_name == "wfdb":  # which records each split holds: the probe's --split_* must match
        settings["split"] = {
            "split_column": arguments.split_column,
            "split_fractions": list(arguments.split_fractions),
            "split_seed": arguments.split_seed,
        }
    settings["keep_columns"] = list(arguments.keep_columns)
    # the window, stride, missing-lead and NaN settings (the command line's overrides included), filters, leads; not
    # the crop and its seed (records are centre-cropped here whatever the checkpoint saved) nor the class's names
    settings["feature_extractor"] = {
        name: value for name, value in feature_extractor.to_dict().items() if name not in _NOT_INPUT_SETTINGS
    }
    if feature_extractor.window == "sliding":
        settings["window_pooling"] = arguments.window_pooling
    if arguments.feature_extraction_device is not None:
        settings["feature_extraction_device"] = arguments.feature_extraction_device
    settings["shard"] = {"index": shard_index, "num_shards": num_shards}
    return settings


def with_input_settings(feature_extractor: MeritFeatureExtractor, arguments: EmbeddingArguments):
    """A copy of the checkpoint's feature extractor with the command line's window, missing-lead and NaN settings."""
    settings = {"window": arguments.window, "window_stride": arguments.window_stride}
    settings["missing_leads"] = arguments.missing_leads
    settings["nan_policy"] = arguments.nan_policy
    settings = {name: value for name, value in settings.items() if value is not None}
    if not settings:
        return feature_extractor
    adjusted = copy.deepcopy(feature_extractor)
    for name, value in settings.items():
        setattr(adjusted, name, value)
    adjusted._validate_settings()
    return adjusted


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Embed every split of `--dataset`; returns `{split: {"path", "rows"}}` (also `output_dir/embeddings.json`)."""
    (arguments,) = parse_arguments((EmbeddingArguments,), sys.argv[1:] if argv is None else argv)
    if arguments.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required")
    from accelerate import PartialState

    state = PartialState(cpu=arguments.use_cpu)  # under `accelerate launch`: one shard per process and device
    if arguments.num_shards is None:
        require_joined_processes(state.num_processes)
    num_shards = arguments.num_shards if arguments.num_shards is not None else state.num_processes
    shard_index = arguments.shard_index if arguments.shard_index is not None else state.process_index
    encoder, name = load_encoder(arguments.model_name_or_path)
    feature_extractor = with_input_settings(load_feature_extractor(arguments.model_name_or_path, encoder), arguments)
    check_feature_extractor_matches(feature_extractor, encoder)  # before any split is read
    check_window_pooling(
        arguments.window_pooling,
        feature_extractor.window,
        f"the checkpoint's feature extractor has window {feature_extractor.window!r} (one window per record)",
    )
    output_dir = Path(arguments.output_dir)
    suffix = f"-{shard_index:05d}-of-{num_shards:05d}" if num_shards > 1 else ""
    weights = model_fingerprint(encoder)  # once: the cache key of every map-style split and the resume key
    precision = resolve_precision(arguments.precision, state.device)
    what = [weights, feature_extractor.to_json_string(), precision, arguments.dataset]
    what += [arguments.dataset_name, arguments.sampling_rate, arguments.keep_columns, shard_index, num_shards]
    if feature_extractor.window == "sliding":
        what.append(arguments.window_pooling)
    if arguments.dataset_name == "wfdb":  # the split decides which records a split file holds
        what += [arguments.split_column, arguments.split_fractions, arguments.split_seed]
    if arguments.dataset_name == "ptbxl" and arguments.ptbxl_version != "1.0.3":  # which rows; old keys stay valid
        what.append(arguments.ptbxl_version)
    what += [arguments.feature_extraction_device] if arguments.feature_extraction_device is not None else []
    if arguments.streaming or arguments.dataset_name == "mimic_iv_ecg":
        # a saved stream position is only valid in the shard layout it was saved in (merit_hf.data.streams)
        what.append(STREAM_LAYOUT)
    settings = embedding_settings(arguments, feature_extractor, weights, precision, shard_index, num_shards)
    splits = load_splits(arguments, shard_index, num_shards)
    clear_other_layouts(output_dir, list(splits), num_shards, arguments.overwrite_output_dir)
    # what every split of the folder must share: not how it was read (streamed or not) nor how its path was spelled
    embedding_key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    written = kept_splits(
        output_dir / f"embeddings{suffix}.json",
        embedding_key,
        list(splits),
        arguments.overwrite_output_dir,
        settings=settings,
        legacy_key=hashlib.sha1(json.dumps(what).encode()).hexdigest(),  # the key of summaries before `settings`
    )
    for split, dataset in splits.items():
        path = output_dir / f"{split}{suffix}.parquet"
        if hasattr(dataset, "_fingerprint"):  # map-style: refused before the split is embedded, not after
            check_no_unfinished_stream(path)
        meter = ThroughputMeter(state.device)
        embedded = embed_dataset(
            dataset,
            encoder,
            feature_extractor,
            batch_size=arguments.batch_size,
            precision=precision,
            device=state.device,
            keep_columns=arguments.keep_columns,
            weights_fingerprint=weights,
            window_pooling=arguments.window_pooling,
            meter=meter,
            feature_extraction_device=arguments.feature_extraction_device,
            split=split,
        )
        resume_key = hashlib.sha1(json.dumps([*what, split]).encode()).hexdigest()
        rows = write_embeddings_parquet(
            embedded, path, resume_key=resume_key, checkpoint_every=arguments.checkpoint_every
        )
        written[split] = {"path": str(path), "rows": rows}
        print(f"{split}: {rows} embeddings -> {path}", flush=True)
        totals = meter.totals()
        if totals["steps_measured"]:  # nothing was embedded when the datasets cache already held the split
            written[split]["throughput"] = totals
            shown = ", ".join(f"{key} {value:.4g}" for key, value in totals.items() if not isinstance(value, str))
            print(f"{split}: {shown}", flush=True)
    summary = {
        "embedding_key": embedding_key,
        "model": name,
        "dataset": arguments.dataset,
        "precision_requested": arguments.precision,
        "hidden_size": encoder.config.hidden_size,
        "window": feature_extractor.window,
        **settings,
        "splits": written,
    }
    (output_dir / f"embeddings{suffix}.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
