"""Embedding a whole dataset: map-style and streamed give the linear probe's features, the map-style cache is reused
by a re-run, bf16 stays close to fp32, bad settings and bad records are named, a feature extractor that disagrees with
the model is refused, and the command line writes loadable Parquet."""

import json
import re

import numpy as np
import pytest
import torch

from merit_hf import MeritEcgModel, MeritFeatureExtractor, MeritForPreTraining
from merit_hf.embedding import embed_dataset, main
from merit_hf.models.merit.inference_precision import prepare_for_inference
from merit_hf.training.probe import extract_features
from tests.conftest import BUNDLED_PTBXL, tiny_ecg_config, tiny_merit_config

LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


@pytest.fixture(scope="module")
def splits():
    from merit_hf.data import build_ptbxl

    return build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(1, 61))


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return MeritEcgModel(tiny_ecg_config()).eval()


def test_the_model_fingerprint_changes_with_any_weight_and_only_with_the_weights(encoder):
    import copy

    from merit_hf.models.fingerprint import model_fingerprint

    fingerprint = model_fingerprint(encoder)
    assert len(fingerprint) == 16 and model_fingerprint(copy.deepcopy(encoder)) == fingerprint
    changed = copy.deepcopy(encoder)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(changed) != fingerprint
    other_config = MeritEcgModel(tiny_ecg_config(mask_ratio=0.5))  # same tensors' shapes, another config
    other_config.load_state_dict(encoder.state_dict())
    assert model_fingerprint(other_config) != fingerprint


@pytest.mark.slow
def test_map_style_and_streamed_give_the_probe_features(splits, encoder):
    feature_extractor = MeritFeatureExtractor.from_model_config(encoder.config)
    split = splits["train"]
    expected = extract_features(encoder, feature_extractor, split, batch_size=16)
    embedded = embed_dataset(split, encoder, feature_extractor, batch_size=7, device="cpu", precision="fp32")
    assert embedded.column_names == ["ecg_id", "ecg_embedding"]
    assert embedded["ecg_id"] == split["ecg_id"]
    np.testing.assert_allclose(np.asarray(embedded["ecg_embedding"]), expected, rtol=1e-4, atol=1e-5)
    streamed = embed_dataset(
        split.to_iterable_dataset(), encoder, feature_extractor, batch_size=5, device="cpu", precision="fp32"
    )
    rows = list(streamed)
    assert [row["ecg_id"] for row in rows] == split["ecg_id"]
    np.testing.assert_allclose(np.stack([row["ecg_embedding"] for row in rows]), expected, rtol=1e-4, atol=1e-5)


def test_streamed_and_map_style_files_have_one_schema(splits, encoder, tmp_path):
    """Shards written either way can be read together: ecg_id int32 and the `datasets` schema metadata in both."""
    import pyarrow.parquet as pq

    from merit_hf.embedding import write_embeddings_parquet

    split = splits["test"]
    kwargs = {"batch_size": 8, "device": "cpu", "precision": "fp32"}
    write_embeddings_parquet(embed_dataset(split, encoder, **kwargs), tmp_path / "map.parquet")
    streamed = embed_dataset(split.to_iterable_dataset(), encoder, **kwargs)
    write_embeddings_parquet(streamed, tmp_path / "stream.parquet", resume_key="k", checkpoint_every=4)
    map_schema, stream_schema = (pq.read_schema(tmp_path / f"{name}.parquet") for name in ("map", "stream"))
    assert stream_schema.field("ecg_id").type == map_schema.field("ecg_id").type == "int32"
    assert stream_schema.remove_metadata() == map_schema.remove_metadata()
    assert b"huggingface" in stream_schema.metadata and b"huggingface" in map_schema.metadata


def test_a_rerun_reuses_the_cached_embeddings(splits, encoder, tmp_path):
    from datasets import load_from_disk

    splits["test"].save_to_disk(str(tmp_path / "test"))
    split = load_from_disk(str(tmp_path / "test"))
    first = embed_dataset(split, encoder, batch_size=8, device="cpu", precision="fp32")
    calls = []
    bf16_copy = prepare_for_inference(encoder, "bf16", "cpu")  # the copy embed_dataset runs for bf16 (cached)
    hooks = [module.register_forward_hook(lambda *args: calls.append(1)) for module in (encoder, bf16_copy)]
    try:
        second = embed_dataset(split, encoder, batch_size=8, device="cpu", precision="fp32")
        assert not calls, "the cached embeddings were computed again"
        assert second._fingerprint == first._fingerprint and second["ecg_embedding"] == first["ecg_embedding"]
        embed_dataset(split, encoder, batch_size=8, device="cpu", precision="bf16")
        assert calls, "another precision must not reuse the fp32 cache"
    finally:
        for hook in hooks:
            hook.remove()


def test_model_flops_per_ecg_do_not_depend_on_the_precision(splits, encoder):
    """The FLOP counter does not see oneDNN's prepacked or int8 linear layers: counted on the prepared model, fp32,
    bf16 and int8 missed the linear layers and fp16 (plain linears) had them. Counted on the plain model, all agree."""
    from merit_hf.utils.throughput import ThroughputMeter, count_flops_per_sample

    split = splits["test"].select(range(4))
    counts = {}
    for precision in ("fp32", "bf16", "fp16", "int8"):
        meter = ThroughputMeter("cpu")
        list(embed_dataset(split, encoder, batch_size=4, device="cpu", precision=precision, meter=meter)["ecg_id"])
        counts[precision] = meter.flops_per_sample
    inputs = {"ecg_values": torch.randn(2, 12, encoder.config.num_samples)}
    plain = count_flops_per_sample(encoder, lambda batch: encoder(**batch).pooler_output, inputs, backward=False)
    assert counts == dict.fromkeys(counts, plain), counts


@pytest.mark.slow
def test_bf16_embeddings_stay_close(splits, encoder):
    full = np.asarray(embed_dataset(splits["test"], encoder, device="cpu", precision="fp32")["ecg_embedding"])
    weights = {name: value.clone() for name, value in encoder.state_dict().items()}
    for precision in ("bf16", "int8"):
        low = np.asarray(embed_dataset(splits["test"], encoder, device="cpu", precision=precision)["ecg_embedding"])
        cosine = (full * low).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(low, axis=1)
        assert cosine.min() > 0.99 and not np.array_equal(full, low), precision
    # the caller's encoder is never cast or quantised: a converted copy ran
    assert all(torch.equal(value, weights[name]) for name, value in encoder.state_dict().items())
    assert encoder.layers[0].mlp.fc1.weight.dtype == torch.float32


def test_auto_precision_is_resolved_before_it_keys_the_cache(splits, encoder, monkeypatch):
    """'auto' is whatever it resolves to on this machine: the same cache as that precision named explicitly."""
    from merit_hf import embedding

    monkeypatch.setattr(embedding, "resolve_precision", lambda precision, device: "fp32")
    auto = embed_dataset(splits["test"], encoder, device="cpu")
    explicit = embed_dataset(splits["test"], encoder, device="cpu", precision="fp32")
    assert auto._fingerprint == explicit._fingerprint


def test_bad_settings_are_named(splits, encoder):
    with pytest.raises(TypeError, match=r"takes one split, e.g. dataset\['train'\], not a dict of splits \['train'"):
        embed_dataset(splits, encoder, device="cpu")
    with pytest.raises(ValueError, match="precision: must be one of"):
        embed_dataset(splits["test"], encoder, precision="fp64")
    with pytest.raises(ValueError, match="precision 'fp8' needs a CUDA GPU with FP8 tensor cores"):
        embed_dataset(splits["test"], encoder, precision="fp8", device="cpu")
    with pytest.raises(ValueError, match=r"the dataset has no column \['signal'\]"):
        embed_dataset(splits["test"].remove_columns("signal"), encoder)
    with pytest.raises(ValueError, match=r"keep_columns: \['record_id'\] are not columns"):
        embed_dataset(splits["test"], encoder, keep_columns=["record_id"])
    with pytest.raises(ValueError, match="--model_name_or_path is required"):
        main(["--output_dir", "unused"])


def test_an_empty_split_is_written_as_an_empty_file_with_the_schema(splits, encoder, tmp_path):
    """The part of a split that a process gets when there are more processes than records is empty: it was an error
    (a stream) or an IndexError (map-style), and killed the launch. It is now a file of no rows, and the same schema."""
    import pyarrow.parquet as pq

    from merit_hf.embedding import write_embeddings_parquet

    streamed = embed_dataset(splits["test"].to_iterable_dataset().filter(lambda row: False), encoder, device="cpu")
    mapped = embed_dataset(splits["test"].select([]), encoder, device="cpu")
    full = embed_dataset(splits["test"], encoder, device="cpu", precision="fp32")
    assert write_embeddings_parquet(streamed, tmp_path / "streamed.parquet") == 0
    assert write_embeddings_parquet(mapped, tmp_path / "mapped.parquet") == 0
    assert write_embeddings_parquet(full, tmp_path / "full.parquet") == len(splits["test"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["full.parquet", "mapped.parquet", "streamed.parquet"]
    schema = pq.read_schema(tmp_path / "full.parquet")
    for name in ("streamed", "mapped"):
        assert pq.read_schema(tmp_path / f"{name}.parquet").equals(schema), name
        assert pq.read_metadata(tmp_path / f"{name}.parquet").num_rows == 0


def test_more_shards_than_records_leaves_the_last_shards_empty(tmp_path):
    """--num_shards 70 (an 8-GPU launch on a small split does the same): the shards past the split's 66 records died
    with a bare IndexError (map-style) or "the streamed split yielded no records". They now write an empty file, and
    the folder still loads every record once."""
    from datasets import load_dataset

    torch.manual_seed(0)
    MeritEcgModel(tiny_ecg_config()).save_pretrained(tmp_path / "model")
    common = ["--model_name_or_path", str(tmp_path / "model"), "--dataset", str(BUNDLED_PTBXL), "--splits", "test",
              "--precision", "fp32", "--num_shards", "70"]  # fmt: skip
    for streaming in ("false", "true"):
        out = tmp_path / f"streaming_{streaming}"
        summary = main([*common, "--streaming", streaming, "--output_dir", str(out), "--shard_index", "69"])
        assert summary["splits"]["test"]["rows"] == 0 and summary["shard"] == {"index": 69, "num_shards": 70}
        assert (out / "test-00069-of-00070.parquet").is_file() and (out / "embeddings-00069-of-00070.json").is_file()
    first = main([*common, "--output_dir", str(tmp_path / "streaming_false"), "--shard_index", "0"])
    loaded = load_dataset("parquet", data_files=str(tmp_path / "streaming_false" / "test-*.parquet"), split="train")
    assert len(loaded) == first["splits"]["test"]["rows"] == 1 and len(loaded[0]["ecg_embedding"]) == 32


@pytest.mark.slow
def test_command_line_writes_parquet_per_split(tmp_path):
    from datasets import load_dataset

    torch.manual_seed(0)
    folder = tmp_path / "model"
    model = MeritForPreTraining(tiny_merit_config())
    model.save_pretrained(folder)
    MeritFeatureExtractor.from_model_config(model.config.ecg_config).save_pretrained(folder)
    out = tmp_path / "embeddings"
    summary = main(["--model_name_or_path", str(folder), "--dataset", str(BUNDLED_PTBXL), "--splits", "validation",
                    "test", "--output_dir", str(out), "--precision", "bf16", "--batch_size", "32"])  # fmt: skip
    assert json.loads((out / "embeddings.json").read_text()) == summary
    assert summary["hidden_size"] == model.config.ecg_config.hidden_size
    for split in ("validation", "test"):
        table = load_dataset("parquet", data_files=str(out / f"{split}.parquet"), split="train")
        assert len(table) == summary["splits"][split]["rows"] > 0
        assert len(table[0]["ecg_embedding"]) == model.config.ecg_config.hidden_size
        throughput = summary["splits"][split]["throughput"]  # merit_hf.utils.throughput, per split
        assert throughput["ecgs_seen"] == len(table) and throughput["flops_per_ecg"] > 0
        assert throughput["ecgs_per_second"] * throughput["measured_seconds"] == pytest.approx(len(table))
    streamed = main(["--model_name_or_path", str(folder), "--dataset", str(BUNDLED_PTBXL), "--splits", "test",
                     "--output_dir", str(tmp_path / "streamed"), "--precision", "bf16", "--batch_size", "32",
                     "--streaming", "true"])  # fmt: skip
    a = load_dataset("parquet", data_files=str(out / "test.parquet"), split="train")
    b = load_dataset("parquet", data_files=streamed["splits"]["test"]["path"], split="train")
    assert a["ecg_id"] == b["ecg_id"]
    np.testing.assert_allclose(np.asarray(a["ecg_embedding"]), np.asarray(b["ecg_embedding"]), rtol=1e-5, atol=1e-6)
    assert not list((tmp_path / "streamed").glob("*.partial"))


@pytest.mark.slow
def test_long_and_reduced_lead_records_get_one_embedding_each(splits, encoder):
    """A 60 s record (six real 10 s records one after the other), a 10 s one and a lead-II-only one: with
    `window="sliding"` each record's windows are embedded and pooled back into one row, the missing leads left out."""
    from datasets import Dataset

    train = splits["train"].with_format("numpy")
    leads = list(train[0]["lead_names"])
    minute = np.concatenate([train[i]["signal"] for i in range(6)])
    rows = [
        {"ecg_id": 1, "signal": minute, "sampling_rate": 100.0, "lead_names": leads},
        {"ecg_id": 2, "signal": train[6]["signal"], "sampling_rate": 100.0, "lead_names": leads},
        {"ecg_id": 3, "signal": train[7]["signal"][:, 1:2], "sampling_rate": 100.0, "lead_names": ["II"]},
    ]
    dataset = Dataset.from_list(rows)
    extractor = MeritFeatureExtractor.from_model_config(encoder.config, window="sliding", missing_leads="mask")
    inputs = extractor([row["signal"] for row in rows], sampling_rate=100, lead_names=[r["lead_names"] for r in rows],
                       return_tensors="pt")  # fmt: skip
    assert inputs["record_index"].tolist() == [0] * 7 + [1] * 2 + [2] * 2
    with torch.no_grad():
        windows = encoder(inputs["ecg_values"], lead_mask=inputs["lead_mask"]).pooler_output
    for pooling, reduce in (("mean", torch.mean), ("max", torch.amax)):
        embedded = embed_dataset(
            dataset, encoder, extractor, batch_size=2, device="cpu", window_pooling=pooling, precision="fp32"
        )
        expected = torch.stack([reduce(windows[rows], dim=0) for rows in (slice(0, 7), slice(7, 9), slice(9, 11))])
        assert embedded["ecg_id"] == [1, 2, 3]
        np.testing.assert_allclose(np.asarray(embedded["ecg_embedding"]), expected.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"window_pooling: must be one of \('mean', 'max'\), got 'sum'"):
        embed_dataset(dataset, encoder, extractor, window_pooling="sum")


@pytest.mark.slow
def test_command_line_embeds_long_records_window_by_window(tmp_path):
    from datasets import load_dataset

    torch.manual_seed(0)
    folder = tmp_path / "model"
    MeritEcgModel(tiny_ecg_config()).save_pretrained(folder)
    MeritFeatureExtractor.from_model_config(tiny_ecg_config()).save_pretrained(folder)
    common = ["--model_name_or_path", str(folder), "--dataset", str(BUNDLED_PTBXL), "--splits", "test"]
    single = main([*common, "--output_dir", str(tmp_path / "single")])
    sliding = main([*common, "--output_dir", str(tmp_path / "sliding"), "--window", "sliding", "--window_stride", "125",
                    "--window_pooling", "max", "--missing_leads", "mask"])  # fmt: skip
    assert (single["window"], sliding["window"], sliding["window_pooling"]) == ("single", "sliding", "max")
    a = load_dataset("parquet", data_files=single["splits"]["test"]["path"], split="train")
    b = load_dataset("parquet", data_files=sliding["splits"]["test"]["path"], split="train")
    assert a["ecg_id"] == b["ecg_id"] and len(b) > 0
    assert not np.allclose(np.asarray(a["ecg_embedding"]), np.asarray(b["ecg_embedding"]))
    with pytest.raises(ValueError, match="window_stride: only with --window sliding"):
        main([*common, "--output_dir", str(tmp_path / "bad"), "--window_stride", "125"])


@pytest.mark.slow
@pytest.mark.parametrize("streaming", ["false", "true"])
def test_shards_together_give_the_whole_split(tmp_path, streaming):
    """What `accelerate launch --num_processes N` does: process i embeds shard i of N and writes its own file."""
    from datasets import load_dataset

    torch.manual_seed(0)
    folder = tmp_path / "model"
    MeritEcgModel(tiny_ecg_config()).save_pretrained(folder)
    common = ["--model_name_or_path", str(folder), "--dataset", str(BUNDLED_PTBXL), "--splits", "test",
              "--streaming", streaming, "--precision", "fp32"]  # fmt: skip
    whole = main([*common, "--output_dir", str(tmp_path / "whole")])
    for index in (0, 1):
        shard = main(
            [*common, "--output_dir", str(tmp_path / "sharded"), "--num_shards", "2", "--shard_index", str(index)]
        )
        # each process embeds its own records only (a stream of one Parquet shard is split record by record)
        test = shard["splits"]["test"]
        assert test["throughput"]["ecgs_seen"] == test["rows"] < whole["splits"]["test"]["rows"], streaming
    files = sorted(str(path) for path in (tmp_path / "sharded").glob("test-*-of-00002.parquet"))
    assert len(files) == 2 and len(list((tmp_path / "sharded").glob("embeddings-*.json"))) == 2
    sharded = load_dataset("parquet", data_files=files, split="train")
    full = load_dataset("parquet", data_files=whole["splits"]["test"]["path"], split="train")
    order = np.argsort(sharded["ecg_id"])
    assert sorted(sharded["ecg_id"]) == sorted(full["ecg_id"]) and len(full) == whole["splits"]["test"]["rows"]
    reference = np.asarray(full["ecg_embedding"])[np.argsort(full["ecg_id"])]
    np.testing.assert_allclose(np.asarray(sharded["ecg_embedding"])[order], reference, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="num_shards and shard_index go together"):
        main([*common, "--output_dir", str(tmp_path / "bad"), "--num_shards", "2"])


def test_a_rerun_in_another_shard_layout_is_refused_or_clears_the_old_files(tmp_path):
    """One process, then two into the same folder, left test.parquet beside test-0000i-of-00002.parquet, and the
    folder loaded every record twice. Now refused before anything is written, naming the files; with
    --overwrite_output_dir true the other layout's files of these splits (and its summary) go, other splits stay."""
    from datasets import load_dataset

    torch.manual_seed(0)
    folder = tmp_path / "model"
    MeritEcgModel(tiny_ecg_config()).save_pretrained(folder)
    out = tmp_path / "emb"
    common = ["--model_name_or_path", str(folder), "--dataset", str(BUNDLED_PTBXL), "--splits", "test",
              "--precision", "fp32", "--output_dir", str(out)]  # fmt: skip
    whole = main(common)
    (out / "validation.parquet").write_bytes(b"another split: kept")
    (out / "test-00001-of-00003.parquet.partial").mkdir()  # an unfinished stream of a third layout
    before = sorted(path.name for path in out.iterdir())
    with pytest.raises(
        FileExistsError,
        match=r"emb: holds embeddings of test written as another number of shards "
        r"\(embeddings.json, test-00001-of-00003.parquet.partial, test.parquet\).*--overwrite_output_dir",
    ):
        main([*common, "--num_shards", "2", "--shard_index", "0"])
    assert sorted(path.name for path in out.iterdir()) == before
    for index in (0, 1):
        main([*common, "--num_shards", "2", "--shard_index", str(index), "--overwrite_output_dir", "true"])
    assert sorted(path.name for path in out.iterdir()) == [
        "embeddings-00000-of-00002.json", "embeddings-00001-of-00002.json", "test-00000-of-00002.parquet",
        "test-00001-of-00002.parquet", "validation.parquet",
    ]  # fmt: skip
    loaded = load_dataset("parquet", data_files=str(out / "test-*.parquet"), split="train")
    assert sorted(loaded["ecg_id"]) == sorted(set(loaded["ecg_id"])) and len(loaded) == whole["splits"]["test"]["rows"]
    main([*common, "--num_shards", "2", "--shard_index", "0"])  # the same layout again: its own file is replaced


def test_a_folder_never_mixes_two_models_embeddings(tmp_path):
    """Embedding one split with another model left the other splits' files of the first in the folder, and the summary
    listed only the new split. The summary now lists every split of the folder; another model's are refused, or
    removed on request."""
    torch.manual_seed(0)
    for name in ("a", "b"):
        MeritEcgModel(tiny_ecg_config()).save_pretrained(tmp_path / name)
    out = tmp_path / "emb"

    def embed(model, split, *flags):
        return main(["--model_name_or_path", str(tmp_path / model), "--dataset", str(BUNDLED_PTBXL), "--splits", split,
                     "--precision", "fp32", "--output_dir", str(out), *flags])  # fmt: skip

    embed("a", "test")
    assert set(embed("a", "validation")["splits"]) == {"test", "validation"}  # the same model: listed together
    assert set(json.loads((out / "embeddings.json").read_text())["splits"]) == {"test", "validation"}
    with pytest.raises(FileExistsError, match=r"emb: holds embeddings of validation from another model.*"
                       r"weights_fingerprint '\w+' there, '\w+' here\); embedding test with this one would mix two in one "
                       r"folder.*--overwrite_output_dir true would delete their embeddings \(validation.parquet\)"):  # fmt: skip
        embed("b", "test")
    assert (out / "validation.parquet").is_file()
    summary = embed("b", "test", "--overwrite_output_dir", "true")
    assert set(summary["splits"]) == {"test"} and not (out / "validation.parquet").exists()


def test_a_split_streamed_or_named_by_another_path_joins_the_folder(tmp_path, monkeypatch):
    """The same model and precision were refused as "another model" when one split was streamed and the other not, or
    the dataset was named once by its absolute and once by a relative path, and the suggested --overwrite_output_dir
    deleted the other split's valid embeddings. Only what decides the embeddings must agree now; a difference is
    named, and the flag's advice says what it deletes."""
    import os

    torch.manual_seed(0)
    MeritEcgModel(tiny_ecg_config()).save_pretrained(tmp_path / "model")
    out = tmp_path / "emb"

    def embed(split, dataset, *flags):
        return main(["--model_name_or_path", str(tmp_path / "model"), "--dataset", dataset, "--splits", split,
                     "--output_dir", str(out), *flags])  # fmt: skip

    embed("test", str(BUNDLED_PTBXL), "--precision", "fp32")
    monkeypatch.chdir(BUNDLED_PTBXL.parent)
    relative = os.path.relpath(BUNDLED_PTBXL)
    summary = embed("validation", relative, "--precision", "fp32", "--streaming", "true")
    assert set(summary["splits"]) == {"test", "validation"} and summary["dataset"] == relative
    assert summary["dataset_path"] == str(BUNDLED_PTBXL.resolve())
    with pytest.raises(FileExistsError, match=r"\(precision 'fp32' there, 'bf16' here\); embedding train with this one.*"
                       r"another --output_dir; --overwrite_output_dir true would delete their embeddings \(test.parquet, "
                       r"validation.parquet\)"):  # fmt: skip
        embed("train", relative, "--precision", "bf16")
    assert (out / "test.parquet").is_file() and (out / "validation.parquet").is_file()


def test_the_summary_records_which_records_and_inputs_were_embedded(tmp_path):
    """embeddings.json of a default run and of a --ptbxl_version as_is one (other rows) were the same in every field
    but an opaque key; it now records the dataset, rate, version, kept columns and the feature-extractor settings."""
    torch.manual_seed(0)
    MeritEcgModel(tiny_ecg_config()).save_pretrained(tmp_path / "model")
    common = ["--model_name_or_path", str(tmp_path / "model"), "--dataset", str(BUNDLED_PTBXL), "--splits", "test",
              "--precision", "fp32"]  # fmt: skip
    default = main([*common, "--output_dir", str(tmp_path / "default")])
    as_is = main([*common, "--output_dir", str(tmp_path / "as_is"), "--ptbxl_version", "as_is",
                  "--missing_leads", "mask", "--keep_columns", "ecg_id", "patient_id"])  # fmt: skip
    assert json.loads((tmp_path / "as_is" / "embeddings.json").read_text()) == as_is
    assert default["dataset_name"] == "ptbxl" and default["sampling_rate"] == 100
    assert (default["ptbxl_version"], as_is["ptbxl_version"]) == ("1.0.3", "as_is")
    assert (default["keep_columns"], as_is["keep_columns"]) == (["ecg_id"], ["ecg_id", "patient_id"])
    assert (
        default["feature_extractor"]["missing_leads"] == "raise"
        and as_is["feature_extractor"]["missing_leads"] == "mask"
    )
    for name in ("window", "window_stride", "nan_policy", "num_samples", "sampling_rate", "lowpass_hz"):
        assert name in default["feature_extractor"], name
    assert default["weights_fingerprint"] == as_is["weights_fingerprint"]
    differing = {name for name in default if default[name] != as_is[name]}
    assert differing == {"embedding_key", "ptbxl_version", "keep_columns", "feature_extractor", "splits"}


def test_flags_that_would_do_nothing_or_fail_late_are_refused_at_parsing(tmp_path, monkeypatch):
    """--window_pooling without sliding windows and --split_* with PTB-XL were accepted and did nothing;
    --num_shards 0 said "shard_index must be in [0, 0)"; --feature_extraction_device gpu0 failed after the model and
    data had loaded, without naming the flag."""
    import merit_hf.embedding as embedding

    common = ["--model_name_or_path", "not loaded", "--output_dir", str(tmp_path / "unused")]
    for flags, message in (
        (["--window", "single", "--window_pooling", "max"], r"window_pooling: 'max' pools the windows of --window sliding"),
        (["--split_fractions", "0.5", "0.25", "0.25"], r"--split_fractions: only with --dataset_name wfdb"),
        (["--split_seed", "3", "--split_column", "fold"], r"--split_column, --split_seed: only with --dataset_name wfdb"),
        (["--dataset_name", "wfdb", "--sampling_rate", "500"], r"--sampling_rate 500: only with --dataset_name ptbxl .*wfdb records are read at their recorded rates"),
        (["--dataset_name", "mimic_iv_ecg", "--sampling_rate", "500"], r"--sampling_rate 500: only with --dataset_name ptbxl .*mimic_iv_ecg records"),
        (["--dataset_name", "mimic_iv_ecg", "--ptbxl_version", "as_is"], r"--ptbxl_version as_is: only with --dataset_name ptbxl .*mimic_iv_ecg has no"),
        (["--num_shards", "0", "--shard_index", "0"], r"num_shards: must be >= 1 .*got 0"),
        (["--num_shards", "2", "--shard_index", "2"], r"shard_index: must be in \[0, 2\) for --num_shards 2, got 2"),
        (["--feature_extraction_device", "gpu0"], r"feature_extraction_device: must be 'encoder' or a torch device .*'gpu0'"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            main([*common, *flags])
    torch.manual_seed(0)
    MeritEcgModel(tiny_ecg_config()).save_pretrained(tmp_path / "model")  # its feature extractor: window "single"
    monkeypatch.setattr(embedding, "load_splits", lambda *args: pytest.fail("data read before refusing"))
    with pytest.raises(
        ValueError, match=r"window_pooling: 'max' .* the checkpoint's feature extractor has window 'single'"
    ):
        main(
            ["--model_name_or_path", str(tmp_path / "model"), "--window_pooling", "max", "--output_dir", str(tmp_path)]
        )


@pytest.mark.slow
def test_accelerate_launch_embeds_one_shard_per_process(tmp_path):
    import subprocess

    from datasets import load_dataset

    from tests.conftest import ACCELERATE_LAUNCH, REPO_ROOT
    from tests.test_pretrain import free_port, subprocess_env

    torch.manual_seed(0)
    folder = tmp_path / "model"
    MeritEcgModel(tiny_ecg_config()).save_pretrained(folder)
    common = ["--model_name_or_path", str(folder), "--dataset", str(BUNDLED_PTBXL), "--splits", "test",
              "--precision", "fp32"]  # fmt: skip
    whole = main([*common, "--output_dir", str(tmp_path / "whole")])
    launch = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "merit_hf.embedding"]  # fmt: skip
    done = subprocess.run([*launch, *common, "--output_dir", str(tmp_path / "launched"), "--use_cpu", "true"],
                          env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(str(path) for path in (tmp_path / "launched").glob("test-*-of-00002.parquet"))
    assert len(files) == 2
    launched = load_dataset("parquet", data_files=files, split="train")
    full = load_dataset("parquet", data_files=whole["splits"]["test"]["path"], split="train")
    assert sorted(launched["ecg_id"]) == sorted(full["ecg_id"])
    reference = np.asarray(full["ecg_embedding"])[np.argsort(full["ecg_id"])]
    np.testing.assert_allclose(
        np.asarray(launched["ecg_embedding"])[np.argsort(launched["ecg_id"])], reference, rtol=1e-4, atol=1e-5
    )


@pytest.mark.slow
def test_command_line_reads_a_converted_dataset(splits, encoder, tmp_path):
    """A converted (`save_to_disk`) PTB-XL goes through `load_ptbxl`, all records kept, sharded by its `rank`."""
    from datasets import load_dataset

    splits.save_to_disk(str(tmp_path / "converted"))
    encoder.save_pretrained(tmp_path / "model")
    common = ["--model_name_or_path", str(tmp_path / "model"), "--dataset", str(tmp_path / "converted"),
              "--splits", "test", "--sampling_rate", "100"]  # fmt: skip
    whole = main([*common, "--output_dir", str(tmp_path / "whole")])
    assert whole["splits"]["test"]["rows"] == len(splits["test"])
    half = main([*common, "--output_dir", str(tmp_path / "half"), "--num_shards", "2", "--shard_index", "1"])
    table = load_dataset("parquet", data_files=half["splits"]["test"]["path"], split="train")
    assert table["ecg_id"] == splits["test"]["ecg_id"][len(splits["test"]) - len(table) :]
    assert 0 < len(table) < len(splits["test"])


def _stream(num_rows: int, fail_at: int | None, seen: list):
    """A streamed 'embedded' dataset of `num_rows` rows in two shards; its map raises at ecg_id `fail_at`."""
    from datasets import Dataset, IterableDataset

    shards = [Dataset.from_dict({"ecg_id": list(range(start, stop))}) for start, stop in ((0, 23), (23, num_rows))]
    stream = IterableDataset.from_generator(
        lambda shards: (row for shard in shards for row in shard), gen_kwargs={"shards": shards}
    )

    def embed(rows):
        seen.extend(rows["ecg_id"])
        if fail_at is not None and fail_at in rows["ecg_id"]:
            raise RuntimeError("the job stopped")
        return {"ecg_embedding": [[float(i), -float(i)] for i in rows["ecg_id"]]}

    return stream.map(embed, batched=True, batch_size=4)


def test_a_stopped_streamed_write_resumes_after_its_last_part(tmp_path):
    import pyarrow.parquet as pq

    from merit_hf.embedding import write_embeddings_parquet

    path, seen = tmp_path / "train.parquet", []
    with pytest.raises(RuntimeError, match="the job stopped"):
        write_embeddings_parquet(_stream(50, 37, seen), path, batch_size=5, resume_key="a", checkpoint_every=10)
    assert not path.exists()
    progress = json.loads((tmp_path / "train.parquet.partial" / "progress.json").read_text())
    assert progress["rows"] == 30 and progress["parts"] == 3
    with pytest.raises(ValueError, match=r"train\.parquet\.partial: an unfinished write of other embeddings"):
        write_embeddings_parquet(_stream(50, None, []), path, resume_key="b", checkpoint_every=10)
    from datasets import Dataset

    with pytest.raises(ValueError, match=r"train\.parquet\.partial: an unfinished streamed write .* --streaming true"):
        write_embeddings_parquet(Dataset.from_dict({"ecg_id": [1]}), path)  # map-style: no IsADirectoryError
    seen = []
    assert (
        write_embeddings_parquet(_stream(50, None, seen), path, batch_size=5, resume_key="a", checkpoint_every=10)
        == 50
    )
    assert min(seen) >= 28, "the resumed run embedded rows of the finished parts again"
    table = pq.read_table(path).to_pydict()
    assert table["ecg_id"] == list(range(50))
    assert table["ecg_embedding"] == [[float(i), -float(i)] for i in range(50)]
    assert not (tmp_path / "train.parquet.partial").exists()


@pytest.mark.slow
def test_a_streamed_command_line_run_resumes(tmp_path, monkeypatch):
    from datasets import load_dataset

    torch.manual_seed(0)
    folder = tmp_path / "model"
    MeritEcgModel(tiny_ecg_config()).save_pretrained(folder)
    common = ["--model_name_or_path", str(folder), "--dataset", str(BUNDLED_PTBXL), "--splits", "train",
              "--streaming", "true", "--batch_size", "16", "--checkpoint_every", "64",
              "--precision", "fp32"]  # fmt: skip
    whole = main([*common, "--output_dir", str(tmp_path / "whole")])
    calls, forward = [], MeritEcgModel.forward

    def stop_after_five_batches(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MeritEcgModel, "forward", stop_after_five_batches)
    with pytest.raises(KeyboardInterrupt):
        main([*common, "--output_dir", str(tmp_path / "resumed")])
    assert json.loads((tmp_path / "resumed" / "train.parquet.partial" / "progress.json").read_text())["rows"] == 64
    with pytest.raises(ValueError, match="an unfinished write of other embeddings"):
        main([*common, "--output_dir", str(tmp_path / "resumed"), "--precision", "bf16"])
    calls.clear()
    calls.extend([0] * 1000)  # past the stop: count the batches the resumed run embeds
    resumed = main([*common, "--output_dir", str(tmp_path / "resumed")])
    rows = whole["splits"]["train"]["rows"]
    assert resumed["splits"]["train"]["rows"] == rows
    # `datasets` restarts a batched map at the start of the batch it stopped in: at most one batch is embedded twice;
    # the throughput meter runs one more forward pass to count the encoder's FLOPs per ECG.
    assert len(calls) - 1000 <= -(-(rows - 64) // 16) + 2, "the resumed run did not start after the finished part"
    a = load_dataset("parquet", data_files=whole["splits"]["train"]["path"], split="train")
    b = load_dataset("parquet", data_files=resumed["splits"]["train"]["path"], split="train")
    assert a["ecg_id"] == b["ecg_id"]
    np.testing.assert_allclose(np.asarray(a["ecg_embedding"]), np.asarray(b["ecg_embedding"]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_batched_feature_extraction_on_the_encoder_device(splits, encoder, tmp_path):
    """`feature_extraction_device="encoder"` (the torch path, here on the CPU) embeds as the scipy path does, under
    its own cache key; the command line passes it through."""
    split = splits["test"]
    scipy_path = embed_dataset(split, encoder, precision="fp32", device="cpu")  # "auto" may be bf16 on this CPU
    torch_path = embed_dataset(split, encoder, precision="fp32", device="cpu", feature_extraction_device="encoder")
    assert torch_path._fingerprint != scipy_path._fingerprint
    np.testing.assert_allclose(
        np.asarray(torch_path["ecg_embedding"]), np.asarray(scipy_path["ecg_embedding"]), rtol=1e-4, atol=1e-5
    )
    folder = tmp_path / "model"
    model = MeritForPreTraining(tiny_merit_config())
    model.save_pretrained(folder)
    summary = main(["--model_name_or_path", str(folder), "--dataset", str(BUNDLED_PTBXL), "--splits", "validation",
                    "--output_dir", str(tmp_path / "out"), "--feature_extraction_device", "encoder"])  # fmt: skip
    assert summary["splits"]["validation"]["rows"] > 0


def test_a_feature_extractor_that_disagrees_with_the_encoder_raises(splits, encoder, tmp_path):
    """A saved preprocessor_config.json whose rate or lead order is not config.json's is refused, naming the folder,
    the field and both values, by `embed_dataset` and by the command line (before any split is read)."""
    with pytest.raises(ValueError, match="MeritEcgModel: the feature extractor's sampling_rate 500 does not match "
                                         "the model config's sampling_rate 250"):  # fmt: skip
        embed_dataset(splits["test"], encoder, MeritFeatureExtractor(sampling_rate=500))
    folder = tmp_path / "model"
    encoder.save_pretrained(folder)
    MeritFeatureExtractor.from_model_config(encoder.config).save_pretrained(folder)
    config_file = folder / "preprocessor_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "lead_names": LEADS[::-1]}))
    message = re.escape(f"{folder}: the feature extractor's lead_names ['V6', 'V5', ")
    with pytest.raises(ValueError, match=message + r".* does not match the model config's lead_names \['I', 'II', "):
        embed_dataset(splits["test"], str(folder), device="cpu")
    with pytest.raises(ValueError, match=message):
        main(["--model_name_or_path", str(folder), "--dataset", "no/such/dataset", "--output_dir", str(tmp_path)])


def test_a_bad_record_is_named_by_its_split_and_id(splits, encoder):
    """The feature extractor names a record by its index in the batch; `embed_dataset` adds the split and the row's
    id columns, map-style and streamed, and keeps the feature extractor's error as the cause."""
    from datasets import Dataset

    from merit_hf.data import EcgInputError

    train = splits["train"].with_format("numpy")
    rows = [
        {"ecg_id": 11, "record": "a", "signal": train[0]["signal"], "sampling_rate": 100.0, "lead_names": LEADS},
        {"ecg_id": 12, "record": "b", "signal": train[1]["signal"][:, 4:], "sampling_rate": 100.0,
         "lead_names": LEADS[4:]},
        {"ecg_id": 13, "record": "c", "signal": train[2]["signal"], "sampling_rate": 100.0, "lead_names": LEADS},
    ]  # fmt: skip
    dataset = Dataset.from_list(rows)
    message = r"record 1: 8 leads given, 12 expected; missing \['I', 'II', 'III', 'aVR'\]"
    with pytest.raises(EcgInputError, match=r"^split 'train', ecg_id 12, record 'b' \(record 1 of a batch of 3\): "
                                            + message) as raised:  # fmt: skip
        embed_dataset(dataset, encoder, batch_size=3, device="cpu", split="train")
    assert isinstance(raised.value.__cause__, EcgInputError) and re.match(message, str(raised.value.__cause__))
    streamed = embed_dataset(dataset.to_iterable_dataset(), encoder, batch_size=3, device="cpu")
    with pytest.raises(EcgInputError, match=r"^the dataset, ecg_id 12, record 'b' \(record 1 of a batch of 3\)"):
        list(streamed)


def test_nan_policy_is_a_command_line_setting_like_the_other_input_repairs():
    """The NaN error says `nan_policy='interpolate'` repairs gaps: the command line can ask for it."""
    from merit_hf.embedding import EmbeddingArguments, with_input_settings

    checkpoint = MeritFeatureExtractor()
    adjusted = with_input_settings(
        checkpoint, EmbeddingArguments(model_name_or_path="m", dataset="d", nan_policy="interpolate")
    )
    assert (adjusted.nan_policy, checkpoint.nan_policy) == ("interpolate", "raise")
    with pytest.raises(ValueError, match="nan_policy: must be one of"):
        with_input_settings(checkpoint, EmbeddingArguments(model_name_or_path="m", dataset="d", nan_policy="zero"))


def test_command_line_names_the_split_and_record_of_a_bad_wfdb_record(splits, encoder, tmp_path):
    """`--dataset_name wfdb`: a converted folder with one 8-lead record fails naming the split and the record."""
    import wfdb

    from merit_hf.data import EcgInputError, WfdbFolderSpec, convert_wfdb_folder

    signal = splits["train"].with_format("numpy")[0]["signal"][:, 4:].astype(np.float64)
    (tmp_path / "export" / "ward").mkdir(parents=True)
    wfdb.wrsamp("eight", fs=100, units=["mV"] * 8, sig_name=LEADS[4:], p_signal=signal, fmt=["16"] * 8,
                adc_gain=[1000.0] * 8, baseline=[0] * 8, write_dir=str(tmp_path / "export" / "ward"))  # fmt: skip
    convert_wfdb_folder(WfdbFolderSpec(str(tmp_path / "export")), tmp_path / "converted")
    encoder.save_pretrained(tmp_path / "model")
    with pytest.raises(EcgInputError, match=r"^split 'train', ecg_id 0, record 'ward/eight' \(record 0 of a batch of "
                                            r"1\): record 0: 8 leads given, 12 expected"):  # fmt: skip
        main(["--model_name_or_path", str(tmp_path / "model"), "--dataset_name", "wfdb", "--dataset",
              str(tmp_path / "converted"), "--split_fractions", "1", "0", "0", "--splits", "train", "--keep_columns",
              "ecg_id", "record", "--output_dir", str(tmp_path / "embeddings")])  # fmt: skip
