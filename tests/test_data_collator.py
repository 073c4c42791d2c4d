"""`MeritCollator` on real PTB-XL rows: the feature extractor per row, tokenised reports, multi-hot labels."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from merit_hf import MeritFeatureExtractor
from merit_hf.data import MeritCollator, build_ptbxl, label_names, precompute_ecg_values
from tests.conftest import BUNDLED_PTBXL


@pytest.fixture(scope="module")
def rows():
    """ecg_ids 1-12 at 500 Hz and 440-445 at 100 Hz (443 has an empty report), as numpy rows."""
    hr = build_ptbxl(BUNDLED_PTBXL, sampling_rate=500, ecg_ids=range(1, 13))
    lr = build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(440, 446))
    found = {}
    for dataset in (hr, lr):
        for split in dataset.values():
            for row in split.with_format("numpy"):
                found[int(row["ecg_id"])] = row
    return found


def test_ecg_values_are_the_feature_extractor_output(rows):
    extractor = MeritFeatureExtractor()
    batch = MeritCollator(extractor)([rows[1], rows[441]])  # 500 Hz and 100 Hz in one batch
    assert set(batch) == {"ecg_values"} and batch["ecg_values"].dtype == torch.float32
    assert batch["ecg_values"].shape == (2, 12, 2250)
    for position, ecg_id in enumerate((1, 441)):
        row = rows[ecg_id]
        expected = extractor(row["signal"], sampling_rate=int(row["sampling_rate"]), lead_names=list(row["lead_names"]),
                             return_tensors="np")["ecg_values"][0]  # fmt: skip
        np.testing.assert_allclose(batch["ecg_values"][position].numpy(), expected, rtol=1e-6)


def test_labels_and_reports(rows, tokenizer):
    collator = MeritCollator(MeritFeatureExtractor(), tokenizer=tokenizer, label_set="superclass", num_classes=5)
    batch = collator([rows[1], rows[8]])
    # ecg_id 1: NORM (index 3); ecg_id 8: IMI 35 % -> MI (index 2)
    torch.testing.assert_close(batch["labels"], torch.tensor([[0.0, 0, 0, 1, 0], [0, 0, 1, 0, 0]]))
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"].shape == batch["input_ids"].shape
    expected = tokenizer(str(rows[8]["report"]), truncation=True, max_length=128)["input_ids"]
    assert batch["input_ids"][1][: len(expected)].tolist() == expected


def test_empty_report_raises_by_default(rows, tokenizer):
    collator = MeritCollator(MeritFeatureExtractor(), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="ecg_id 443 has an empty report"):
        collator([rows[442], rows[443]])
    # without a tokenizer the report is not used, so an empty one is no problem
    assert MeritCollator(MeritFeatureExtractor())([rows[443]])["ecg_values"].shape == (1, 12, 2250)


def test_empty_report_drop_is_counted_and_logged(rows, tokenizer, caplog, monkeypatch):
    collator = MeritCollator(MeritFeatureExtractor(), tokenizer=tokenizer, label_set="rhythm", num_classes=12,
                             empty_report="drop")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="merit_hf.data.collator"):
        batch = collator([rows[442], rows[443], rows[444]])
    assert batch["ecg_values"].shape[0] == batch["labels"].shape[0] == batch["input_ids"].shape[0] == 2
    assert collator.num_dropped_empty_reports == 1
    assert "dropped ecg_id 443 (empty report); 1 dropped so far\n" in caplog.text + "\n"
    # in a DataLoader worker the count is that worker's copy's, and the warning says so
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=1))
    with caplog.at_level(logging.WARNING, logger="merit_hf.data.collator"):
        collator([rows[443]] * 2 + [rows[444]])
    assert "3 dropped so far by DataLoader worker 1" in caplog.text


def test_stored_preprocessed_values(rows):
    stored = [{"ecg_values": np.full((12, 2250), float(i), dtype=np.float32)} for i in range(2)]
    batch = MeritCollator(MeritFeatureExtractor())(stored)
    assert batch["ecg_values"][1].unique().tolist() == [1.0]


def test_arguments_are_checked():
    with pytest.raises(ValueError, match=r"num_classes is required with label_set='form'"):
        MeritCollator(MeritFeatureExtractor(), label_set="form")
    leads = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    signal = np.sin(np.linspace(0, 60, 1000, dtype=np.float32))[:, None].repeat(12, axis=1)
    row = {"signal": signal, "sampling_rate": 100, "lead_names": leads, "form": [0]}
    with pytest.raises(KeyError, match=r"row 0 of the batch has no 'diagnostic' label column .*PTB-XL label sets"):
        MeritCollator(MeritFeatureExtractor(), label_set="diagnostic", num_classes=44)([row])
    with pytest.raises(ValueError, match="empty_report must be one of"):
        MeritCollator(MeritFeatureExtractor(), empty_report="ignore")


def test_dataloader_end_to_end():
    ptbxl = build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(1, 41))
    num_classes = len(label_names(ptbxl, "subclass"))
    collator = MeritCollator(MeritFeatureExtractor(), label_set="subclass", num_classes=num_classes)
    loader = DataLoader(ptbxl["train"].with_format("numpy"), batch_size=8, collate_fn=collator)
    batches = list(loader)
    assert sum(batch["ecg_values"].shape[0] for batch in batches) == ptbxl["train"].num_rows
    assert batches[0]["labels"].shape == (8, 23) and torch.isfinite(batches[0]["ecg_values"]).all()


def test_precomputed_ecg_values_match_the_collator():
    dataset = build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(1, 9))["train"]
    extractor = MeritFeatureExtractor()
    stored = precompute_ecg_values(dataset, extractor, batch_size=4)
    assert stored.features["ecg_values"].shape == (12, 2250) and "signal" in stored.column_names
    stored_batch = MeritCollator(extractor)(list(stored.with_format("numpy")))
    fresh_batch = MeritCollator(extractor)(list(dataset.with_format("numpy")))
    torch.testing.assert_close(stored_batch["ecg_values"], fresh_batch["ecg_values"])
    batched = precompute_ecg_values(dataset, extractor, batch_size=4, feature_extraction_device="cpu")
    batched_values = MeritCollator(extractor)(list(batched.with_format("numpy")))["ecg_values"]
    torch.testing.assert_close(batched_values, fresh_batch["ecg_values"], rtol=0, atol=1e-4)  # float32 rounding


def test_feature_extraction_device_runs_the_batched_torch_path(rows):
    extractor = MeritFeatureExtractor()
    batch = [rows[1], rows[2], rows[441]]  # two rates: two groups of the batched path
    expected = MeritCollator(extractor)(batch)["ecg_values"]
    batched = MeritCollator(extractor, feature_extraction_device="cpu")(batch)["ecg_values"]
    assert batched.device.type == "cpu" and batched.dtype == torch.float32
    torch.testing.assert_close(batched, expected, rtol=0, atol=1e-4)


def test_precomputed_values_keep_the_lead_mask():
    """Rows given only leads I and II: the stored `lead_mask` column reaches the batch as the collator computes it."""
    from datasets import Dataset

    dataset = build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(1, 5))["train"].with_format("numpy")
    two_leads = Dataset.from_list(
        [
            {"signal": row["signal"][:, :2], "sampling_rate": row["sampling_rate"], "lead_names": ["I", "II"]}
            for row in dataset
        ]  # fmt: skip
    )
    extractor = MeritFeatureExtractor(missing_leads="mask")
    stored = precompute_ecg_values(two_leads, extractor, batch_size=2)
    stored_batch = MeritCollator(extractor)(list(stored.with_format("numpy")))
    fresh_batch = MeritCollator(extractor)(list(two_leads.with_format("numpy")))
    assert stored_batch["lead_mask"].tolist() == [[True, True] + [False] * 10] * len(two_leads)
    torch.testing.assert_close(stored_batch["lead_mask"], fresh_batch["lead_mask"])
    torch.testing.assert_close(stored_batch["ecg_values"], fresh_batch["ecg_values"])
    with pytest.raises(ValueError, match="precompute_ecg_values stores one window per record"):
        precompute_ecg_values(two_leads, MeritFeatureExtractor(window="sliding"))


def test_the_collator_gives_what_the_processor_gives(rows, tokenizer):
    """One rows -> batch path: the collator's batch is `MeritProcessor`'s output for the rows' signals and reports,
    and the probe's `ecg_model_inputs` (columns of rows) is the same `ecg_values`."""
    from merit_hf import MeritProcessor
    from merit_hf.evaluation.probe import ecg_model_inputs

    extractor = MeritFeatureExtractor()
    chosen = [rows[1], rows[8], rows[441]]  # 500 Hz and 100 Hz
    batch = MeritCollator(extractor, tokenizer=tokenizer, max_length=16)(chosen)
    expected = MeritProcessor(extractor, tokenizer, max_length=16)(
        ecgs=[row["signal"] for row in chosen],
        text=[str(row["report"]) for row in chosen],
        sampling_rate=[int(row["sampling_rate"]) for row in chosen],
        lead_names=[list(row["lead_names"]) for row in chosen],
    )
    assert set(batch) == set(expected) and batch["input_ids"].shape[1] <= 16
    for name, value in expected.items():
        assert torch.equal(batch[name], value), name
    columns = {name: [row[name] for row in chosen] for name in ("signal", "sampling_rate", "lead_names")}
    assert torch.equal(ecg_model_inputs(extractor, columns)["ecg_values"], batch["ecg_values"])


@pytest.mark.parametrize("device", [None, "cpu"])
def test_a_bad_record_is_named_by_its_row_not_its_place_in_the_batch(device):
    """The feature extractor names a record by its position in the list it was given: in a batch of the collator
    or of `precompute_ecg_values`' map that is "record 1" for the dataset's row 5, which is another, good record.
    The error now starts with the failing row's `ecg_id` (and, precomputing, its row in the dataset), on both paths."""
    from datasets import Dataset

    dataset = build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(1, 9))["train"].with_format("numpy")
    rows = list(dataset)
    bad = {**rows[5], "signal": rows[5]["signal"].copy()}
    bad["signal"][10, 2] = np.nan
    rows[5] = bad
    ecg_id = int(bad["ecg_id"])
    extractor = MeritFeatureExtractor()
    collator = MeritCollator(extractor, feature_extraction_device=device)
    with pytest.raises(
        ValueError, match=rf"^ecg_id {ecg_id} \(record 1 of a batch of 3\): record 1: lead III has 1 NaN"
    ):
        collator(rows[4:7])
    broken = Dataset.from_list([{key: row[key] for key in ("ecg_id", "signal", "sampling_rate", "lead_names")}
                                for row in rows])  # fmt: skip
    message = rf"^ecg_id {ecg_id}, row 5 of the dataset \(record 1 of a batch of \d+\): record 1: lead III"
    with pytest.raises(ValueError, match=message):
        precompute_ecg_values(broken, extractor, batch_size=4, feature_extraction_device=device)


def short_records(ecg_ids=range(1, 5), seconds: float = 3.0):
    """The first `seconds` of real PTB-XL records at 100 Hz: shorter than the 9 s window, so `padding=True` pads."""
    from datasets import Dataset

    dataset = build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=ecg_ids)["train"].with_format("numpy")
    cut = int(seconds * 100)
    return Dataset.from_list(
        [
            {
                "ecg_id": int(row["ecg_id"]),
                "signal": row["signal"][:cut],
                "sampling_rate": 100,
                "lead_names": list(row["lead_names"]),
            }
            for row in dataset
        ]
    )


def test_precomputed_values_keep_the_attention_mask_of_padded_records(tmp_path):
    """With `padding=True`, a 3 s record's 6 s of zero padding are marked by `ecg_attention_mask`; the stored values
    carry it to the batch (it was dropped, so the padding reached the model as signal), also after `save_to_disk`,
    Parquet and streaming. Stored rows without the mask are refused by a padding collator."""
    import datasets

    records = short_records()
    extractor = MeritFeatureExtractor(padding=True)
    stored = precompute_ecg_values(records, extractor, batch_size=2)
    assert {"ecg_attention_mask", "ecg_values_settings"} <= set(stored.column_names)
    fresh_batch = MeritCollator(extractor)(list(records.with_format("numpy")))
    assert fresh_batch["ecg_attention_mask"].sum(dim=1).tolist() == [750] * len(records)  # 3 s of 9 s at 250 Hz
    stored.save_to_disk(str(tmp_path / "saved"))
    stored.to_parquet(str(tmp_path / "stored.parquet"))
    reloaded = {
        "in memory": list(stored.with_format("numpy")),
        "save_to_disk": list(datasets.load_from_disk(str(tmp_path / "saved")).with_format("numpy")),
        "parquet": list(datasets.load_dataset("parquet", data_files=str(tmp_path / "stored.parquet"), split="train")),
        "streamed": list(
            datasets.load_dataset(
                "parquet", data_files=str(tmp_path / "stored.parquet"), split="train", streaming=True
            )
        ),
    }
    for how, rows in reloaded.items():
        batch = MeritCollator(extractor)(rows)
        assert set(batch) == {"ecg_values", "ecg_attention_mask"}, how
        assert batch["ecg_attention_mask"].dtype == fresh_batch["ecg_attention_mask"].dtype, how
        assert torch.equal(batch["ecg_attention_mask"], fresh_batch["ecg_attention_mask"]), how
        torch.testing.assert_close(batch["ecg_values"], fresh_batch["ecg_values"])
    unmasked = [
        {key: value for key, value in row.items() if key != "ecg_attention_mask"} for row in reloaded["parquet"]
    ]
    with pytest.raises(ValueError, match=r"ecg_id 1 \(row 0 of the batch\) holds stored ecg_values without "
                                         r"ecg_attention_mask, but this collator's feature extractor \(padding=True\)"):  # fmt: skip
        MeritCollator(extractor)(unmasked)
    mixed = [unmasked[0], *reloaded["parquet"][1:]]
    with pytest.raises(ValueError, match=r"without ecg_attention_mask, but this collator's feature extractor"):
        MeritCollator(extractor)(mixed)
    # precomputing again with other settings leaves no column of the first values behind
    full_length = build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(1, 3))["train"]
    again = precompute_ecg_values(precompute_ecg_values(full_length, extractor), MeritFeatureExtractor())
    assert "ecg_attention_mask" not in again.column_names
    assert set(MeritCollator(MeritFeatureExtractor())(list(again.with_format("numpy")))) == {"ecg_values"}


def test_stored_values_are_checked_against_the_collators_feature_extractor(tmp_path):
    """Values stored with another feature extractor were stacked as they were (100 Hz x 500 samples in a batch of a
    250 Hz x 2250 model). The shape is checked on every row; the settings `precompute_ecg_values` records, whatever
    the shape, also after Parquet and streaming."""
    import datasets

    dataset = build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(1, 5))["train"]
    collator = MeritCollator(MeritFeatureExtractor())  # 250 Hz, 2250 samples, zscore_lead
    other_rate = precompute_ecg_values(
        dataset, MeritFeatureExtractor(sampling_rate=100, num_samples=500, lowpass_hz=40)
    )
    ecg_id = int(other_rate[0]["ecg_id"])
    with pytest.raises(ValueError, match=rf"^MeritCollator: ecg_id {ecg_id} \(row 0 of the batch\) holds stored "
                                         r"ecg_values of shape \(12, 500\), but this collator's feature extractor "
                                         r"gives \(12, 2250\) \(12 leads, 2250 samples at 250 Hz\)\."):  # fmt: skip
        collator(list(other_rate.with_format("numpy")))
    # values stored some other way (no ecg_values_settings) get the shape check
    with pytest.raises(ValueError, match=r"^MeritCollator: row 1 of the batch holds stored ecg_values of shape "
                                         r"\(12, 2249\)"):  # fmt: skip
        collator([{"ecg_values": np.zeros((12, 2250), np.float32)}, {"ecg_values": np.zeros((12, 2249), np.float32)}])
    # the same shape from other settings: the recorded settings tell them apart, naming both values
    other_normalization = precompute_ecg_values(dataset, MeritFeatureExtractor(normalization="zscore_record"))
    other_normalization.to_parquet(str(tmp_path / "stored.parquet"))
    streamed = datasets.load_dataset("parquet", data_files=str(tmp_path / "stored.parquet"), split="train",
                                     streaming=True)  # fmt: skip
    for rows in (list(other_normalization.with_format("numpy")), list(streamed)):
        with pytest.raises(
            ValueError,
            match=rf"^MeritCollator: ecg_id {ecg_id} \(row 0 of the batch\) holds ecg_values made with other feature "
            r"extractor settings than this collator's \(stored with normalization='zscore_record', this feature "
            r"extractor has normalization='zscore_lead'\)\. Store them again",
        ):
            collator(rows)
    swapped = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V6", "V5"]  # V5 and V6 swapped
    standard_order = list(precompute_ecg_values(dataset, MeritFeatureExtractor()))
    with pytest.raises(ValueError, match=r"stored with lead_names=\[.*'V5', 'V6'\], this feature extractor has"):
        MeritCollator(MeritFeatureExtractor(lead_names=swapped))(standard_order)
    # a crop is not a setting of the values: fine_tune stores centre crops and collates them with its random-crop
    # collator (stored windows are not cut again), and a feature extractor saved and loaded back is the same
    from merit_hf.data.collator import with_crop

    centre = precompute_ecg_values(dataset, with_crop(MeritFeatureExtractor(), "center"))
    random_crops = MeritCollator(with_crop(MeritFeatureExtractor(), "random", 0), crop_seed=0)
    torch.testing.assert_close(random_crops(list(centre.with_format("numpy")))["ecg_values"],
                               collator(list(dataset.with_format("numpy")))["ecg_values"])  # fmt: skip
    MeritFeatureExtractor().save_pretrained(tmp_path / "fe")
    reloaded = MeritCollator(MeritFeatureExtractor.from_pretrained(tmp_path / "fe"))(list(centre.with_format("numpy")))
    assert reloaded["ecg_values"].shape == (len(dataset), 12, 2250)
    # a batch where only some rows hold a lead_mask is refused, not stacked without it
    masked = precompute_ecg_values(dataset, MeritFeatureExtractor(missing_leads="mask"))
    rows = list(masked.with_format("numpy"))
    rows[1] = {key: value for key, value in rows[1].items() if key not in ("lead_mask", "ecg_values_settings")}
    with pytest.raises(ValueError, match=r"row 1 of the batch\) holds stored ecg_values without lead_mask"):
        MeritCollator(MeritFeatureExtractor(missing_leads="mask"))(rows)
    with pytest.raises(ValueError, match=r"without lead_mask, but other rows of the batch hold one \(3 of 4\)"):
        collator([{key: value for key, value in row.items() if key != "ecg_values_settings"} for row in rows])
