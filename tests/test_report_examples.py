"""`merit_hf.training.report_examples`: report-generation examples prepared a chunk at a time into a memory-mapped
Arrow cache. The same tensors as the feature extractor run on all records at once (bundled PTB-XL, a tiny MIMIC-IV-ECG
folder and its conversion), chunks bounded, memory independent of the number of records, the cache reused, rebuilt
when a setting changes, and never read when half-written; two processes share one cache."""

from __future__ import annotations

import json
import re
import threading
import tracemalloc

import numpy as np
import pytest
import torch
from datasets import Array2D, Features, IterableDataset, List, Value

from merit_hf import MeritFeatureExtractor
from merit_hf.training import report_examples as report_examples_module
from merit_hf.training.report_examples import ReportExamples, feature_extractor_settings, prepare_report_examples
from tests.conftest import (
    BUNDLED_PTBXL,
    TINY_REPORTS,
    tiny_ecg_config,
    train_tiny_tokenizer,
    with_limb_leads_derived,
)
from tests.test_data_mimic import mimic_root  # noqa: F401  (fixture: a MIMIC-IV-ECG folder in the PhysioNet layout)

ECG_CONFIG = {"sampling_rate": 100, "num_samples": 1000, "patch_size": 50}
LEADS = list(tiny_ecg_config().lead_names)


class CountingExtractor(MeritFeatureExtractor):
    """Records how many ECGs each call is given."""

    calls: list[int]

    def __call__(self, ecgs, *args, **kwargs):
        self.calls.append(len(ecgs))
        return super().__call__(ecgs, *args, **kwargs)

    def to_dict(self):  # the settings, as the plain feature extractor's (the cache key reads them)
        return {key: value for key, value in super().to_dict().items() if key != "calls"}


def counting_extractor(**settings) -> CountingExtractor:
    extractor = CountingExtractor.from_model_config(tiny_ecg_config(**ECG_CONFIG), **settings)
    extractor.calls = []
    return extractor


def synthetic_rows(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"ecg_id": 1000 + index, "report": TINY_REPORTS[index % len(TINY_REPORTS)], "sampling_rate": 100,
             "lead_names": LEADS, "signal": with_limb_leads_derived(rng.normal(scale=0.3, size=(1000, 12))).astype(np.float32)}
            for index in range(count)]  # fmt: skip


def synthetic_stream(count: int) -> IterableDataset:
    """`count` records made as they are read: the source itself holds nothing."""
    features = Features({"ecg_id": Value("int64"), "report": Value("string"), "sampling_rate": Value("int32"),
                         "lead_names": List(Value("string")), "signal": Array2D((1000, 12), "float32")})  # fmt: skip

    def generate(count):
        rng = np.random.default_rng(0)
        for index in range(count):
            yield {"ecg_id": index, "report": "sinus rhythm", "sampling_rate": 100, "lead_names": LEADS,
                   "signal": with_limb_leads_derived(rng.normal(scale=0.3, size=(1000, 12))).astype(np.float32)}  # fmt: skip

    return IterableDataset.from_generator(generate, features=features, gen_kwargs={"count": count})


def all_at_once(rows: list[dict], extractor: MeritFeatureExtractor) -> torch.Tensor:
    """What report_lora computed before the cache: the feature extractor on every record in one call."""
    return MeritFeatureExtractor.__call__(
        extractor,
        [row["signal"] for row in rows],
        sampling_rate=[float(row["sampling_rate"]) for row in rows],
        lead_names=[list(row["lead_names"]) for row in rows],
        return_tensors="pt",
        crop="center",
    )["ecg_values"]


@pytest.fixture(scope="module")
def bundled_rows():
    from merit_hf.training.report_lora import load_ptbxl_rows, read_ptbxl_reports

    rows, _ = read_ptbxl_reports(load_ptbxl_rows(BUNDLED_PTBXL, sampling_rate=100), folds=range(1, 11), limit=23)
    return rows


def test_bundled_ptbxl_examples_equal_the_in_memory_path(bundled_rows, tmp_path):
    """Chunks of 5 (the last one partial) give bit-identical ecg_values, reports, ids and filenames, in order."""
    from merit_hf.training.report_lora import report_examples

    extractor = counting_extractor()
    examples = ReportExamples(bundled_rows, extractor, cache_dir=tmp_path, chunk_size=5)
    rows = report_examples(bundled_rows)
    assert len(examples) == len(rows) == 23 and extractor.calls == [5, 5, 5, 5, 3]
    assert torch.equal(examples.ecg_values, all_at_once(rows, extractor))
    assert examples.reports == [row["report"] for row in rows]
    assert examples.dataset["ecg_id"][:] == [int(row["ecg_id"]) for row in rows]
    assert examples.dataset["filename"][:] == [row["filename"] for row in rows]
    items = examples.__getitems__([4, 0, 22])
    assert [item["index"] for item in items] == [4, 0, 22] and items[2]["report"] == rows[22]["report"]
    assert (
        torch.equal(items[0]["ecg_values"], examples[4]["ecg_values"])
        and items[0]["ecg_values"].dtype == torch.float32
    )


def test_chunks_and_written_batches_never_exceed_the_chunk_size(monkeypatch, tmp_path):
    from datasets.arrow_writer import ArrowWriter

    written = []
    write_batch = ArrowWriter.write_batch

    def recording(self, batch, *args, **kwargs):
        written.append(len(batch["ecg_values"]))
        return write_batch(self, batch, *args, **kwargs)

    monkeypatch.setattr(ArrowWriter, "write_batch", recording)
    extractor = counting_extractor()
    examples = ReportExamples(synthetic_stream(30), extractor, cache_dir=tmp_path, chunk_size=8, fingerprint="s30")
    assert len(examples) == 30 and max(extractor.calls) <= 8 and max(written) <= 8 and sum(written) == 30


def test_peak_memory_is_bounded_by_the_chunk_not_the_number_of_records(tmp_path):
    """tracemalloc's peak (numpy and Arrow allocations included) while 48 or 144 streamed records are prepared in
    chunks of 4 is about the same, and a fraction of preparing the 144 in one chunk."""

    def peak(count: int, chunk_size: int) -> int:
        stream = synthetic_stream(count)
        tracemalloc.start()
        prepare_report_examples(stream, counting_extractor(), tmp_path / f"{count}-{chunk_size}", None, chunk_size,
                                fingerprint=f"{count}")  # fmt: skip
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    small, large, whole = peak(48, 4), peak(144, 4), peak(144, 144)
    assert large < 1.5 * small, (small, large)
    assert 4 * large < whole, (large, whole)  # 144 records' ecg_values alone are 6.9 MB


def test_the_cache_is_reused_and_rebuilt_when_the_data_limit_or_settings_change(tmp_path):
    rows = synthetic_rows(6)
    first = ReportExamples(rows, counting_extractor(), cache_dir=tmp_path, chunk_size=4)
    again = counting_extractor()
    reused = ReportExamples(rows, again, cache_dir=tmp_path, chunk_size=2)  # the chunk size changes nothing
    assert again.calls == [] and torch.equal(reused.ecg_values, first.ecg_values)
    assert len(list(tmp_path.glob("report-examples-*"))) == 1
    cropped = counting_extractor(crop="random", seed=3)  # examples are centre crops whatever the extractor's crop
    ReportExamples(rows, cropped, cache_dir=tmp_path)
    assert cropped.calls == []
    for changed, kwargs in (
        (counting_extractor(highpass_hz=1.0), {}),  # a setting the values depend on
        (counting_extractor(), {"limit": 5}),
        (counting_extractor(), {"examples": synthetic_rows(6, seed=1)}),  # other signals
    ):
        built = ReportExamples(kwargs.pop("examples", rows), changed, cache_dir=tmp_path, **kwargs)
        assert sum(changed.calls) == len(built) == 6 - ("limit" in kwargs)
        assert torch.equal(built.ecg_values, first.ecg_values[:5]) == ("limit" in kwargs)
    assert len(list(tmp_path.glob("report-examples-*"))) == 4
    record = json.loads(next(tmp_path.glob("report-examples-*/report_examples.json")).read_text())
    assert record["num_rows"] in (5, 6) and record["format_version"] == 1


def test_a_failed_or_killed_build_is_not_read_as_finished(monkeypatch, tmp_path):
    rows = synthetic_rows(10)
    expected = ReportExamples(rows, counting_extractor(), chunk_size=4).ecg_values  # a temporary folder

    class Killed(BaseException):
        pass

    calls = {"count": 0}
    extract = report_examples_module._extract

    def dies_on_the_second_chunk(batch, extractor):
        calls["count"] += 1
        if calls["count"] == 2:
            raise Killed
        return extract(batch, extractor)

    monkeypatch.setattr(report_examples_module, "_extract", dies_on_the_second_chunk)
    with pytest.raises(Killed):
        ReportExamples(rows, counting_extractor(), cache_dir=tmp_path, chunk_size=4)
    (folder,) = tmp_path.glob("report-examples-*")
    assert sorted(path.name for path in folder.iterdir()) == []  # no part, no marker, no partial file
    monkeypatch.setattr(report_examples_module, "_extract", extract)

    # killed after its part was written, before the folder was marked finished: the part is kept, the marker written
    write_finished = report_examples_module._write_finished
    monkeypatch.setattr(
        report_examples_module, "_write_finished", lambda *args, **kwargs: (_ for _ in ()).throw(Killed)
    )
    with pytest.raises(Killed):
        ReportExamples(rows, counting_extractor(), cache_dir=tmp_path, chunk_size=4)
    assert [path.name for path in folder.iterdir()] == ["part-00000-of-00001.arrow"]
    monkeypatch.setattr(report_examples_module, "_write_finished", write_finished)
    (folder / "part-00000-of-00001.arrow.incomplete-99-dead").write_bytes(b"left by a SIGKILL")
    resumed = counting_extractor()
    assert torch.equal(ReportExamples(rows, resumed, cache_dir=tmp_path).ecg_values, expected)
    assert resumed.calls == []

    # a finished folder whose part was cut short afterwards is rebuilt, not read
    part = folder / "part-00000-of-00001.arrow"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    rebuilt = counting_extractor()
    assert torch.equal(ReportExamples(rows, rebuilt, cache_dir=tmp_path).ecg_values, expected)
    assert sum(rebuilt.calls) == 10


def test_a_record_that_breaks_the_contract_is_named_by_its_ecg_id(tmp_path):
    from merit_hf.data import EcgInputError

    rows = synthetic_rows(5)
    rows[3]["signal"][:, 2] = np.nan
    with pytest.raises(EcgInputError, match=r"^ecg_id 1003: (?!record).*NaN"):
        ReportExamples(rows, counting_extractor(), cache_dir=tmp_path, chunk_size=4)
    assert not list(tmp_path.glob("report-examples-*/*.arrow*"))


@pytest.mark.parametrize("source", ["list", "dataset", "list_without_ecg_id"])
def test_rows_without_report_text_are_refused_by_name_and_count_before_anything_is_cached(tmp_path, source):
    """A report of None was cached as the text "None" and NaN as "nan" (training targets and scored references that
    pass for real ones), and "" failed only in the middle of training. Every such row is counted, and the first is
    named, before a record goes through the feature extractor."""
    from datasets import Dataset

    rows = synthetic_rows(6)
    for index, report in ((1, None), (2, ""), (3, float("nan")), (5, " \n ")):
        rows[index]["report"] = report
    if source == "list_without_ecg_id":
        rows = [{key: value for key, value in row.items() if key != "ecg_id"} for row in rows]
    first = "row 1" if source == "list_without_ecg_id" else "ecg_id 1001"
    count = "4 of the 6 rows"
    if source == "dataset":  # an Arrow string column holds no NaN: a null instead
        rows[3]["report"] = None
        rows = Dataset.from_list(rows)
    extractor = counting_extractor()
    message = (
        rf"^Report examples need report text, but {count} given have none .*; the first is {first} \(report None\)"
    )
    with pytest.raises(ValueError, match=message):
        ReportExamples(rows, extractor, cache_dir=tmp_path, chunk_size=2)
    assert extractor.calls == [] and not list(tmp_path.glob("report-examples-*"))
    assert len(ReportExamples(rows, counting_extractor(), limit=1)) == 1  # the rows before the first are fine


def test_a_stream_row_without_report_text_is_refused_as_it_is_read(tmp_path):
    """A stream cannot be counted ahead: its chunk is refused, naming the first such row, and nothing is cached."""
    features = Features({"ecg_id": Value("int64"), "report": Value("string"), "sampling_rate": Value("int32"),
                         "lead_names": List(Value("string")), "signal": Array2D((1000, 12), "float32")})  # fmt: skip

    def generate():
        for index, report in enumerate(["sinus rhythm", "normal ecg", "", None, "sinus rhythm"]):
            yield {"ecg_id": index, "report": report, "sampling_rate": 100, "lead_names": LEADS,
                   "signal": np.zeros((1000, 12), np.float32)}  # fmt: skip

    stream = IterableDataset.from_generator(generate, features=features)
    message = r"^Report examples need report text, but 2 of the 5 rows of a chunk read from a stream .* ecg_id 2 "
    with pytest.raises(ValueError, match=message):
        ReportExamples(stream, counting_extractor(), cache_dir=tmp_path, chunk_size=5, fingerprint="stream")
    assert not list(tmp_path.glob("report-examples-*/*.arrow*"))


def test_a_missing_column_is_named_with_the_optional_ones():
    rows = [{key: value for key, value in row.items() if key != "report"} for row in synthetic_rows(1)]
    message = (
        "report examples need the columns ['report', 'signal', 'sampling_rate', 'lead_names'] (ecg_id and filename "
        "are optional); missing ['report']"
    )
    with pytest.raises(KeyError, match=re.escape(message)):
        ReportExamples(rows, counting_extractor())


def test_sliding_windows_are_refused():
    with pytest.raises(ValueError, match="one window per record; use a feature extractor with window='single'"):
        ReportExamples(synthetic_rows(2), counting_extractor(window="sliding"))


def test_shuffled_ecgs_are_a_derangement_of_row_indices_not_a_copy(tmp_path):
    examples = ReportExamples(synthetic_rows(7), counting_extractor(), cache_dir=tmp_path)
    shuffled = examples.with_shuffled_ecgs(seed=0)
    assert shuffled.dataset is examples.dataset and shuffled._ecg_rows.dtype == np.int64
    assert sorted(shuffled._ecg_rows) == list(range(7)) and all(shuffled._ecg_rows != np.arange(7))
    values = examples.ecg_values
    for index in range(7):
        item = shuffled[index]
        assert item["report"] == examples[index]["report"] and item["index"] == index
        assert torch.equal(item["ecg_values"], values[shuffled._ecg_rows[index]])
    assert torch.equal(shuffled.ecg_values, values[torch.from_numpy(shuffled._ecg_rows)])
    twice = shuffled.with_shuffled_ecgs(seed=1)  # a derangement of the shuffled pairs
    assert all(twice._ecg_rows != shuffled._ecg_rows) and examples._ecg_rows is None


def run_two_processes(monkeypatch, rows, cache_dirs, limit=None, fingerprint=None) -> dict:
    """`ReportExamples(rows, ...)` in two processes (threads standing in for them: the barriers, the broadcast and the
    gather are Accelerate's calls), process r caching under `cache_dirs[r]`: `{rank: (examples, extractor)}`. `rows`
    may be a function of the rank, for a stream: each process has its own (one `IterableDataset` iterated by two
    threads at once is not safe)."""
    import accelerate.utils

    barrier, shared, results = threading.Barrier(2), {}, {}
    local = threading.local()

    def broadcast(objects, from_process=0):
        if local.rank == from_process:
            shared["value"] = objects[0]
        barrier.wait()
        value = shared["value"]
        barrier.wait()
        return [value]

    def gather(objects):
        shared[local.rank] = list(objects)
        barrier.wait()
        gathered = shared[0] + shared[1]
        barrier.wait()
        return gathered

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    monkeypatch.setattr(accelerate.utils, "gather_object", gather)

    class Process:
        def __init__(self, rank):
            self.process_index, self.num_processes = rank, 2

        def wait_for_everyone(self):
            barrier.wait()

    def run(rank):
        local.rank = rank
        extractor = counting_extractor()
        source = rows(rank) if callable(rows) else rows
        examples = ReportExamples(source, extractor, cache_dirs[rank], chunk_size=2, process=Process(rank), limit=limit,
                                  fingerprint=fingerprint)  # fmt: skip
        results[rank] = (examples, extractor)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_two_processes_prepare_one_shared_cache(monkeypatch, tmp_path):
    """Two processes each prepare every second row; both read the whole set back in source order, and one process
    then reuses it."""
    rows = synthetic_rows(9)
    results = run_two_processes(monkeypatch, rows, [tmp_path, tmp_path])
    expected = all_at_once(rows, counting_extractor())
    for rank in (0, 1):
        examples, extractor = results[rank]
        assert sum(extractor.calls) == (5, 4)[rank]  # rows 0, 2, 4, 6, 8 and 1, 3, 5, 7
        assert torch.equal(examples.ecg_values, expected) and examples.reports == [row["report"] for row in rows]
    (folder,) = tmp_path.glob("report-examples-*")
    assert sorted(path.name for path in folder.iterdir()) == [
        "part-00000-of-00002.arrow", "part-00001-of-00002.arrow", "report_examples.json"]  # fmt: skip
    assert sorted(path.name for path in tmp_path.iterdir()) == [folder.name]  # no probe file left behind
    alone = counting_extractor()
    assert torch.equal(ReportExamples(rows, alone, tmp_path).ecg_values, expected) and alone.calls == []


def test_processes_read_their_own_shards_of_a_stream(monkeypatch, tmp_path):
    """A stream split between processes (no limit) is read by whole shards, each record by one process only; before,
    each process read all of it (all of MIMIC-IV-ECG, on every GPU) and kept every second row. The cache equals the
    one-process build, row for row, in the stream's order."""
    rows = synthetic_rows(11)
    shards = [[0, 1, 2], [3, 4], [5, 6, 7], [8], [9, 10]]
    reads: dict[int, list[int]] = {}

    def generate(shards):  # a shard is given its share of the list: here one list of row indices
        for index in (index for shard in shards for index in shard):
            reads.setdefault(threading.get_ident(), []).append(index)
            yield rows[index]

    features = Features({"ecg_id": Value("int64"), "report": Value("string"), "sampling_rate": Value("int32"),
                         "lead_names": List(Value("string")), "signal": Array2D((1000, 12), "float32")})  # fmt: skip

    def make_stream(rank=0):
        return IterableDataset.from_generator(generate, features=features, gen_kwargs={"shards": shards})

    stream = make_stream()
    assert stream.num_shards == 5
    results = run_two_processes(monkeypatch, make_stream, [tmp_path, tmp_path], fingerprint="the same stream")
    expected = all_at_once(rows, counting_extractor())
    by_process = sorted(reads.values(), key=lambda read: read[0])
    assert by_process == [[0, 1, 2, 5, 6, 7, 9, 10], [3, 4, 8]]  # shards 0, 2, 4 and 1, 3: each row read once
    for rank in (0, 1):
        examples, extractor = results[rank]
        assert sum(extractor.calls) == (8, 3)[rank]
        assert torch.equal(examples.ecg_values, expected) and examples.reports == [row["report"] for row in rows]
        assert examples.dataset["ecg_id"][:] == [row["ecg_id"] for row in rows]

    reads.clear()
    alone = ReportExamples(stream, counting_extractor(), tmp_path / "alone", fingerprint="the same stream")
    assert torch.equal(alone.ecg_values, expected) and sum(len(read) for read in reads.values()) == 11

    reads.clear()  # with a limit the first rows are wanted: read in order, by every process, up to the limit
    limited = [make_stream().take(4), make_stream().take(4)]
    results = run_two_processes(monkeypatch, limited.__getitem__, [tmp_path / "limited"] * 2, limit=4, fingerprint="4")
    for rank in (0, 1):
        examples, extractor = results[rank]
        assert torch.equal(examples.ecg_values, expected[:4]) and sum(extractor.calls) == 2


def test_processes_on_nodes_with_their_own_cache_folders_each_build_the_whole_set(monkeypatch, tmp_path):
    """Two nodes whose cache folders are on their own disks (the default `$HF_DATASETS_CACHE` often is): each
    node's processes build the whole set in their folder. The main process used to wait for a part that the other
    node had written to its own disk ("expected 2 part file(s)")."""
    rows = synthetic_rows(9)
    results = run_two_processes(monkeypatch, rows, [tmp_path / "node0", tmp_path / "node1"])
    expected = all_at_once(rows, counting_extractor())
    for rank in (0, 1):
        examples, extractor = results[rank]
        assert sum(extractor.calls) == 9
        assert torch.equal(examples.ecg_values, expected)
        (folder,) = (tmp_path / f"node{rank}").glob("report-examples-*")
        assert sorted(path.name for path in folder.iterdir()) == ["part-00000-of-00001.arrow", "report_examples.json"]


def test_processes_that_disagree_on_the_examples_are_refused_naming_what_differs(monkeypatch, tmp_path):
    """Saving a processor adds `auto_map` to its feature extractor in place, on the main process only; that made the
    processes compute different cache keys for the same examples (report_lora's eval set failed on 2 processes).
    It no longer changes the key, and a setting that does differ is named, by every process."""
    from merit_hf import MeritProcessor

    extractor = counting_extractor()
    before = feature_extractor_settings(extractor)
    MeritProcessor(extractor, train_tiny_tokenizer(tmp_path / "tokenizer"), ecg_seq_length=12).save_pretrained(
        tmp_path / "saved"
    )
    assert "auto_map" in extractor.to_dict() and feature_extractor_settings(extractor) == before

    rows = synthetic_rows(3)
    original = ReportExamples.__init__

    def differing(self, examples, feature_extractor, *args, process=None, **kwargs):
        if process.process_index == 1:
            feature_extractor.highpass_hz = 0.5
        original(self, examples, feature_extractor, *args, process=process, **kwargs)

    monkeypatch.setattr(ReportExamples, "__init__", differing)
    errors = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(threading, "excepthook", lambda hook: errors.setdefault(hook.thread.name, hook.exc_value))
        run_two_processes(monkeypatch, rows, [tmp_path / "cache", tmp_path / "cache"])
    assert len(errors) == 2
    for error in errors.values():
        assert "disagree on the examples' cache key" in str(error) and "'highpass_hz': (0.67, 0.5)" in str(error)


def test_mimic_examples_stream_each_record_once_from_both_layouts(mimic_root, monkeypatch, tmp_path):  # noqa: F811
    """MIMIC-IV-ECG through report_lora's reader: the PhysioNet folder is read record by record (each record with a
    report once, the others never) and its conversion streamed; both give the tensors of the in-memory build."""
    from merit_hf.data import build_mimic_iv_ecg, convert_mimic_iv_ecg
    from merit_hf.data.mimic_iv_ecg import MimicRecordReader
    from merit_hf.training.report_lora import mimic_reports_fingerprint, read_mimic_reports

    rows = [dict(row) for row in build_mimic_iv_ecg(mimic_root).with_format("numpy") if row["report"]]
    assert 1 < len(rows) < 6
    expected = all_at_once(rows, counting_extractor())
    read = []
    reader_call = MimicRecordReader.__call__
    monkeypatch.setattr(MimicRecordReader, "__call__", lambda self, task: read.append(task["study_id"]) or
                        reader_call(self, task))  # fmt: skip
    fingerprint = mimic_reports_fingerprint(mimic_root)
    examples = ReportExamples(read_mimic_reports(mimic_root), counting_extractor(), tmp_path, chunk_size=2,
                              fingerprint=fingerprint)  # fmt: skip
    assert read == [row["ecg_id"] for row in rows]  # once each, in order, nothing without a report
    assert torch.equal(examples.ecg_values, expected) and examples.reports == [row["report"] for row in rows]
    assert examples.dataset["ecg_id"][:] == [row["ecg_id"] for row in rows]
    again = counting_extractor()
    ReportExamples(read_mimic_reports(mimic_root), again, tmp_path, fingerprint=fingerprint)
    assert again.calls == [] and len(read) == len(rows)  # reused: the cache is looked up before any record is read

    convert_mimic_iv_ecg(mimic_root, tmp_path / "converted")
    converted = tmp_path / "converted"
    assert mimic_reports_fingerprint(converted) != fingerprint
    streamed = ReportExamples(read_mimic_reports(converted, limit=2), counting_extractor(), tmp_path, limit=2,
                              fingerprint=mimic_reports_fingerprint(converted))  # fmt: skip
    assert torch.equal(streamed.ecg_values, expected[:2])

    # two processes, no limit: each reads its own shards of the conversion (row groups where the files are too few)
    # and of the PhysioNet folder (one record a shard), and both get the one-process examples
    for source in (converted, mimic_root):
        read.clear()
        split = run_two_processes(
            monkeypatch,
            lambda rank, source=source: read_mimic_reports(source),
            [tmp_path / "two" / source.name] * 2,
            fingerprint=mimic_reports_fingerprint(source),
        )
        for rank in (0, 1):
            assert torch.equal(split[rank][0].ecg_values, expected)
        assert sum(split[0][1].calls) + sum(split[1][1].calls) == len(rows)
    assert sorted(read) == sorted(row["ecg_id"] for row in rows)  # the PhysioNet records: each read by one process


def test_caches_are_listed_and_those_unused_for_a_while_pruned(tmp_path, capsys):
    """Every setting change builds a new cache folder and nothing removed the old ones (all of MIMIC-IV-ECG is ~86
    GB). `prune_report_examples` removes those not built or used for N days: finished ones by their last use (a reuse
    counts), an unfinished build by its last write; `list` and `prune --dry_run` remove nothing."""
    import os
    import time

    from merit_hf.training.report_examples import cached_report_examples, main, prune_report_examples

    rows = synthetic_rows(3)
    ReportExamples(rows, counting_extractor(), tmp_path)
    ReportExamples(rows[:2], counting_extractor(), tmp_path)
    abandoned = tmp_path / "report-examples-abandoned"
    abandoned.mkdir()
    (abandoned / "part-00000-of-00001.arrow.incomplete-1-x").write_bytes(b"\0" * 10)
    entries = cached_report_examples(tmp_path)
    assert sorted((entry["finished"], entry["num_rows"]) for entry in entries) == [(False, None), (True, 2), (True, 3)]
    month_ago = time.time() - 31 * 86400
    for entry in entries:  # all three last used a month ago
        for path in [entry["path"], *entry["path"].iterdir()]:
            os.utime(path, (month_ago, month_ago))
    ReportExamples(rows, counting_extractor(), tmp_path)  # the 3-row cache is reused today

    assert main(["prune", "--cache_dir", str(tmp_path), "--dry_run"]) and len(cached_report_examples(tmp_path)) == 3
    assert "would remove" in capsys.readouterr().out
    removed = prune_report_examples(tmp_path, older_than_days=30)
    assert sorted((entry["finished"], entry["num_rows"]) for entry in removed) == [(False, None), (True, 2)]
    (kept,) = cached_report_examples(tmp_path)
    assert kept["num_rows"] == 3 and kept["size_bytes"] > 3 * 12 * 1000 * 4  # the ECG values are in it
    again = counting_extractor()
    assert len(ReportExamples(rows, again, tmp_path)) == 3 and again.calls == []  # still reused
    with pytest.raises(ValueError, match="older_than_days"):
        prune_report_examples(tmp_path, older_than_days=-1)


def test_more_sources_than_the_positions_can_number_are_refused_by_name():
    """A row's position is (source << 56) + ...: from 128 sources on it would overflow int64 in numpy."""
    from merit_hf.training.report_examples import MAX_PARTS

    rows = synthetic_rows(1)
    with pytest.raises(ValueError, match=f"{MAX_PARTS + 1} sources; at most {MAX_PARTS}"):
        prepare_report_examples([rows] * (MAX_PARTS + 1), counting_extractor())


def test_a_cache_on_a_read_only_filesystem_is_still_reused(tmp_path, monkeypatch):
    """A reuse marks the folder as used (`os.utime`); where that is refused (a read-only shared cache), the examples
    are read all the same."""
    import os

    rows = synthetic_rows(2)
    ReportExamples(rows, counting_extractor(), tmp_path)

    def refused(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(os, "utime", refused)
    again = counting_extractor()
    assert len(ReportExamples(rows, again, tmp_path)) == 2 and again.calls == []
