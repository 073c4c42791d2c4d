"""Linear probe, label fractions, fine-tuning and the probe script, on synthetic features and a small synthetic
dataset in the `merit_hf.data` PTB-XL schema (the real records are exercised by the benchmark, not the tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features, List, Value

from merit_hf import MeritModel
from merit_hf.evaluation.metrics import macro_auroc
from merit_hf.evaluation.results import SCHEMA, read_results
from merit_hf.training.probe import (
    ProbeArguments,
    fit_linear_probe,
    label_fraction_rows,
    label_matrix,
    load_dataset_dict,
    main,
    random_init_like,
    run_fine_tune,
    run_linear_probe,
)

from .conftest import BUNDLED_PTBXL, tiny_merit_config

LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
CLASSES = ["CD", "HYP", "MI", "NORM", "STTC"]


def synthetic_ptbxl(sizes=(24, 10, 12), seed: int = 0) -> DatasetDict:
    """Records in the PTB-XL schema (100 Hz, 1000 x 12, mV): a 1.2 Hz 'heartbeat' whose amplitude depends on the
    first class, plus noise; devices, sites, ages and sexes vary so every robustness group is populated."""
    features = Features(
        {
            "ecg_id": Value("int32"),
            "signal": Array2D(shape=(1000, 12), dtype="float32"),
            "lead_names": List(Value("string")),
            "sampling_rate": Value("int32"),
            "superclass": List(ClassLabel(names=CLASSES)),
            "age": Value("float32"),
            "sex": ClassLabel(names=["male", "female"]),
            "device": Value("string"),
            "site": Value("int32"),
        }
    )
    rng = np.random.default_rng(seed)
    time = np.arange(1000) / 100
    splits, ecg_id = {}, 0
    for split, size in zip(("train", "validation", "test"), sizes):
        rows = []
        for index in range(size):
            classes = sorted({index % 5, (index * 3 + 1) % 5}) if index % 4 else [index % 5]
            amplitude = 0.5 + 0.3 * classes[0]
            signal = amplitude * np.sin(2 * np.pi * 1.2 * time)[:, None] + 0.05 * rng.standard_normal((1000, 12))
            rows.append(
                {
                    "ecg_id": ecg_id,
                    "signal": signal.astype(np.float32),
                    "lead_names": LEADS,
                    "sampling_rate": 100,
                    "superclass": classes,
                    "age": float(20 + 7 * index),
                    "sex": index % 2,
                    "device": "CS-12   E" if index % 3 else "AT-6 C 5.5",
                    "site": index % 2,
                }
            )
            ecg_id += 1
        splits[split] = Dataset.from_list(rows, features=features)
    return DatasetDict(splits)


@pytest.fixture(scope="module")
def ptbxl_like() -> DatasetDict:
    return synthetic_ptbxl()


@pytest.mark.slow
def test_probe_recovers_a_planted_linear_signal():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(16, 3))
    features = rng.normal(size=(600, 16)) * rng.uniform(0.5, 5, size=16)  # unequal scales: standardisation matters
    labels = ((features / features.std(axis=0)) @ weights > 0).astype(np.float32)
    probe = fit_linear_probe(
        features[:400], labels[:400], features[400:500], labels[400:500], learning_rate=0.05, max_epochs=30, seed=0
    )
    assert macro_auroc(labels[500:], probe.decision_function(features[500:])) > 0.98
    noise = rng.normal(size=features.shape)
    chance = fit_linear_probe(noise[:400], labels[:400], noise[400:500], labels[400:500], max_epochs=10, seed=0)
    assert macro_auroc(labels[500:], chance.decision_function(noise[500:])) < 0.65


def test_early_stopping_stops_after_patience_epochs_without_gain():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(200, 8))
    labels = (rng.random((200, 2)) > 0.5).astype(np.float32)  # no signal: validation AUROC stops improving
    probe = fit_linear_probe(features[:100], labels[:100], features[100:], labels[100:], max_epochs=100, patience=3)
    assert probe.epochs_run == probe.best_epoch + 3 < 100


def test_probe_without_a_validation_auroc_keeps_the_last_epoch_not_the_initialisation():
    """Every validation record holds both classes, so the validation AUROC is undefined in every epoch: the probe
    returned its untrained initialisation (best_epoch 0, test AUROC 0.59 on this planted signal)."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 8))
    labels = (features[:, :2] > 0).astype(np.float32)
    validation_features, validation_labels = rng.normal(size=(20, 8)), np.ones((20, 2), np.float32)
    probe = fit_linear_probe(
        features[:200], labels[:200], validation_features, validation_labels, learning_rate=0.05, max_epochs=30
    )
    assert probe.best_epoch == probe.epochs_run == 30
    assert macro_auroc(labels[200:], probe.decision_function(features[200:])) > 0.95


def test_label_fractions_are_reproducible_nested_and_stratified():
    rng = np.random.default_rng(0)
    rows = []
    for index in range(1000):
        rare = index % 50 == 0  # class 4 is rare: 20 records
        rows.append([4] if rare else [int(rng.integers(0, 4))])
    dataset = Dataset.from_dict(
        {"superclass": rows}, features=Features({"superclass": List(ClassLabel(names=CLASSES))})
    )
    ten = label_fraction_rows(dataset, "superclass", 0.1, seed=0)
    assert len(ten) == 100
    np.testing.assert_array_equal(ten, label_fraction_rows(dataset, "superclass", 0.1, seed=0))
    assert not np.array_equal(ten, label_fraction_rows(dataset, "superclass", 0.1, seed=1))
    labels = label_matrix(dataset, "superclass")
    assert labels[ten, 4].sum() == 2  # 10 % of the 20 rare records, not left to chance
    one = label_fraction_rows(dataset, "superclass", 0.01, seed=0)
    assert len(one) == 10 and set(one) <= set(ten)
    np.testing.assert_array_equal(label_fraction_rows(dataset, "superclass", 1.0), np.arange(1000))


def test_random_init_baseline_is_seeded_and_differs_from_the_model():
    model = MeritModel(tiny_merit_config())
    first = random_init_like(model.ecg_model, seed=5)
    second = random_init_like(model.ecg_model, seed=5)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), name
    assert first.config.to_dict() == model.ecg_model.config.to_dict()
    assert any(
        not np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(first.state_dict().values(), random_init_like(model.ecg_model, seed=6).state_dict().values())
    )


@pytest.mark.slow
def test_run_linear_probe_writes_results_with_baseline(ptbxl_like, tmp_path):
    torch.manual_seed(123)  # not the baseline's seed 0: the two encoders must differ
    model = MeritModel(tiny_merit_config()).eval()
    arguments = ProbeArguments(max_epochs=5, num_bootstrap=20, cache_dir=str(tmp_path / "c"))
    results = run_linear_probe(
        model, ptbxl_like, "superclass", 0.5, seed=0, arguments=arguments, output_file=tmp_path / "r.json"
    )
    saved = read_results(tmp_path / "r.json")
    assert saved["schema"] == SCHEMA and saved["task"] == "linear-probe"
    assert saved["dataset"]["name"] == "ptb-xl" and saved["dataset"]["split"] == "test"
    assert saved["label_set"] == "superclass" and saved["label_fraction"] == 0.5
    assert saved["dataset"]["num_records"]["train"] == 12
    assert saved["dataset"]["classes_without_training_positives"] == []
    for role in ("model", "baseline"):
        metrics = saved[role]["metrics"]
        assert set(metrics) == {"macro_auroc", "macro_f1", "macro_f1_max_over_thresholds"}
        assert 0 <= metrics["macro_auroc"]["value"] <= 1
        assert metrics["macro_auroc"]["ci_low"] <= metrics["macro_auroc"]["ci_high"]
        assert list(saved[role]["per_class"]) == CLASSES
    assert saved["baseline"]["name_or_path"] == "random-init"
    assert results["model"]["metrics"] == saved["model"]["metrics"]
    assert len(list((tmp_path / "c").glob("features_*.npy"))) == 6  # 3 splits x (model, baseline), cached


def test_results_say_which_ptbxl_rows_were_scored():
    """The results JSON read "PTB-XL v1.0.3" whatever the data: PTB-XL built as is (duplicates and v1.0.1 labels
    kept) now says so from the data's own description, from Python as from the command line."""
    from merit_hf.data import build_ptbxl
    from merit_hf.evaluation.results import AS_IS_VERSION

    arguments = ProbeArguments(num_bootstrap=0, max_epochs=1)
    encoder = MeritModel(tiny_merit_config()).eval()
    for version, expected in (("as_is", AS_IS_VERSION), ("1.0.3", "1.0.3")):
        data = build_ptbxl(BUNDLED_PTBXL, ecg_ids=range(1, 201), ptbxl_version=version)
        results = run_linear_probe(encoder, data, "superclass", baseline=False, arguments=arguments)
        assert results.dataset["version"] == expected and results.dataset["name"] == "ptb-xl"


def test_probe_script_from_yaml(ptbxl_like, tmp_path):
    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    MeritModel(tiny_merit_config()).save_pretrained(model_dir)
    ptbxl_like.save_to_disk(str(data_dir))
    config = {
        "model_name_or_path": str(model_dir),
        "dataset": str(data_dir),
        "label_sets": "superclass",  # a YAML scalar for a list field: one label set
        "label_fractions": ["1e0"],  # a string, as PyYAML reads an unquoted 1e0
        "max_epochs": 3,
        "num_bootstrap": 0,
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "probe.yaml").write_text(yaml.safe_dump(config))
    summary = main([str(tmp_path / "probe.yaml"), "--seeds", "1"])
    assert list(summary) == ["linear-probe_superclass_1_seed1"]
    assert set(summary["linear-probe_superclass_1_seed1"]) == {"model", "baseline"}
    saved = read_results(tmp_path / "out" / "linear-probe_superclass_1_seed1.json")
    assert saved["model"]["name_or_path"] == str(model_dir) and saved["seed"] == 1
    with pytest.raises(ValueError, match="label_sets"):
        main([str(tmp_path / "probe.yaml"), "--label_sets", "diagnostic"])
    # A second run under the same names (another model, say) refuses before computing, naming the file, and keeps
    # the first run's results; --overwrite_output_dir true replaces them.
    before = (tmp_path / "out" / "linear-probe_superclass_1_seed1.json").read_bytes()
    with pytest.raises(FileExistsError, match=r"linear-probe_superclass_1_seed1\.json.*--overwrite_output_dir true"):
        main([str(tmp_path / "probe.yaml"), "--seeds", "1", "--model_name_or_path", str(tmp_path / "missing")])
    assert (tmp_path / "out" / "linear-probe_superclass_1_seed1.json").read_bytes() == before
    assert main([str(tmp_path / "probe.yaml"), "--seeds", "2"]) != {}  # another seed: another file, no refusal
    main([str(tmp_path / "probe.yaml"), "--seeds", "1", "--baseline", "false", "--overwrite_output_dir", "true"])
    assert not read_results(tmp_path / "out" / "linear-probe_superclass_1_seed1.json").to_dict().get("baseline")


@pytest.mark.slow
def test_fine_tune_runs_and_reports_both_encoders():
    model = MeritModel(tiny_merit_config()).eval()
    arguments = ProbeArguments(mode="finetune", finetune_max_epochs=1, batch_size=8, num_bootstrap=0)
    results = run_fine_tune(model, synthetic_ptbxl(sizes=(8, 6, 6)), "superclass", 1.0, seed=0, arguments=arguments)
    assert results["task"] == "fine-tune"
    assert results["model"]["training"]["epochs_run"] == 1
    assert results.dataset["sampling_rate"] == 100 and results.protocol["feature_extractor"]["window"] == "single"
    assert results["baseline"]["metrics"]["macro_auroc"]["value"] is not None


@pytest.mark.parametrize("name", ["batch_size", "max_epochs", "patience", "finetune_max_epochs", "finetune_patience"])
def test_counts_below_one_are_refused_naming_the_setting(name):
    """A patience of 0 would stop fine-tuning after its first epoch; every count setting must be at least 1."""
    with pytest.raises(ValueError, match=f"^{name}: must be >= 1, got 0$"):
        ProbeArguments(**{name: 0})


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("num_bootstrap", "-1", r"^num_bootstrap: must be >= 0 \(0: no confidence intervals\), got -1$"),
        ("learning_rate", "0", r"^learning_rate: must be a finite number > 0, got 0\.0$"),
        ("learning_rate", "nan", r"^learning_rate: must be a finite number > 0, got nan$"),
        ("finetune_learning_rate", "-1e-4", r"^finetune_learning_rate: must be a finite number > 0, got -0\.0001$"),
        ("finetune_learning_rate", "0", r"^finetune_learning_rate: must be a finite number > 0, got 0\.0$"),
        ("finetune_learning_rate", "inf", r"^finetune_learning_rate: must be a finite number > 0, got inf$"),
        ("weight_decay", "-0.1", r"^weight_decay: must be a finite number >= 0, got -0\.1$"),
        ("weight_decay", "nan", r"^weight_decay: must be a finite number >= 0, got nan$"),
    ],
)
def test_evaluation_settings_are_refused_when_the_flags_are_parsed(flag, value, message, tmp_path):
    """`--num_bootstrap -1` was accepted and raised only when the bootstrap ran, after a whole fine-tune, naming no
    flag; a negative learning rate raised torch's "Invalid learning rate" and 0 trained nothing, silently. Each is now
    refused when the command line is parsed, naming the flag, before the model (missing here) is looked for."""
    with pytest.raises(ValueError, match=message):
        main(["--model_name_or_path", str(tmp_path / "missing"), "--mode", "finetune", f"--{flag}={value}"])
    ProbeArguments(mode="finetune", num_bootstrap=0, weight_decay=0.0, learning_rate=1e-5)  # the edges that are fine


def test_sampling_rate_for_a_dataset_it_does_not_apply_to_is_refused(tmp_path):
    """`--sampling_rate` picks PTB-XL's 100 or 500 Hz records; with `--dataset_name wfdb` it was accepted and changed
    nothing (a WFDB folder's records keep their recorded rates)."""
    with pytest.raises(ValueError, match=r"^--sampling_rate 500: only with --dataset_name ptbxl .* wfdb records are"):
        main(["--model_name_or_path", str(tmp_path / "missing"), "--dataset_name", "wfdb", "--sampling_rate", "500"])
    assert ProbeArguments(dataset_name="wfdb").sampling_rate == 100  # the default, which PTB-XL alone reads
    assert ProbeArguments(sampling_rate=500).sampling_rate == 500


def test_a_ptbxl_version_for_another_dataset_is_refused(tmp_path):
    """`--ptbxl_version as_is` with `--dataset_name wfdb` (or mimic_iv_ecg) was accepted and changed nothing."""
    with pytest.raises(
        ValueError, match=r"^--ptbxl_version as_is: only with --dataset_name ptbxl .* wfdb has no PTB-XL"
    ):
        main(["--model_name_or_path", str(tmp_path / "missing"), "--dataset_name", "wfdb", "--ptbxl_version", "as_is"])
    assert ProbeArguments(dataset_name="wfdb").ptbxl_version == "1.0.3"  # the default is not refused
    assert ProbeArguments(ptbxl_version="as_is").ptbxl_version == "as_is"


def test_a_negative_bootstrap_count_set_after_parsing_is_refused_before_fine_tuning(ptbxl_like, monkeypatch):
    from merit_hf.training import finetune

    monkeypatch.setattr(finetune, "fine_tune", lambda *args, **kwargs: pytest.fail("fine-tuned before refusing"))
    arguments = ProbeArguments(mode="finetune")
    arguments.num_bootstrap = -1
    with pytest.raises(ValueError, match="^num_bootstrap: must be >= 0"):
        run_fine_tune(MeritModel(tiny_merit_config()), ptbxl_like, "superclass", arguments=arguments)


def test_results_say_where_the_records_came_from_at_which_rate_and_how_they_were_read(tmp_path):
    """The results JSON of PTB-XL read from a PhysioNet folder said `"source": null`, and no file said at which rate
    the records were (100 or 500 Hz), with which label threshold their labels were made, or what the feature extractor
    did to them: two runs at 100 and 500 Hz could not be told apart. A folder as given, the records' rate, the
    threshold and the feature extractor's settings are now recorded; a copy saved to disk is named by its own folder
    and keeps the threshold, and converted shards are named by their folder (not the datasets cache they were read
    into) with the threshold of their conversion."""
    from merit_hf.data import build_ptbxl, convert_ptbxl
    from merit_hf.evaluation.probe import load_feature_extractor

    arguments = ProbeArguments(num_bootstrap=0, max_epochs=1)
    encoder = MeritModel(tiny_merit_config()).eval()
    extractor = load_feature_extractor(encoder, encoder.ecg_model)
    data = build_ptbxl(BUNDLED_PTBXL, ecg_ids=range(1, 201), label_threshold=50)
    results = run_linear_probe(encoder, data, "superclass", baseline=False, arguments=arguments)
    assert results.dataset["source"] == str(BUNDLED_PTBXL)
    assert results.dataset["sampling_rate"] == 100 and results.dataset["label_threshold"] == 50.0
    recorded = results.protocol["feature_extractor"]
    assert recorded["sampling_rate"] == extractor.sampling_rate and recorded["num_samples"] == extractor.num_samples
    assert (recorded["highpass_hz"], recorded["lowpass_hz"], recorded["normalization"], recorded["window"]) == (
        extractor.highpass_hz,
        extractor.lowpass_hz,
        extractor.normalization,
        extractor.window,
    )
    data.save_to_disk(str(tmp_path / "saved"))
    convert_ptbxl(BUNDLED_PTBXL, tmp_path / "converted", ecg_ids=range(1, 201), label_threshold=35)
    for folder, threshold in (("saved", 50.0), ("converted", 35.0)):
        loaded = load_dataset_dict(tmp_path / folder)
        results = run_linear_probe(encoder, loaded, "superclass", baseline=False, arguments=arguments)
        assert results.dataset["source"] == str(tmp_path / folder)  # not the datasets cache the shards went to
        assert results.dataset["label_threshold"] == threshold and results.dataset["sampling_rate"] == 100


def test_the_records_left_out_are_named_in_english_for_every_label_set(ptbxl_like):
    from merit_hf.evaluation.probe import a_label_of, dataset_info, probe_rows

    assert [a_label_of(name) for name in ("superclass", "all", "arrhythmia")] == [
        "a superclass label",
        "a label of set 'all'",
        "an arrhythmia label",
    ]
    info = dataset_info(ptbxl_like, "superclass", probe_rows(ptbxl_like, "superclass"))
    assert info["unlabeled_records"] == "records without a superclass label are left out of every split"


def test_probe_features_are_computed_on_the_gpu_when_there_is_one(ptbxl_like, monkeypatch):
    """On a GPU machine the frozen features were computed on the CPU the encoder was loaded on (the full PTB-XL
    through ViT-B at a few ECGs/s); they now go to the GPU, in fp32, unless `--use_cpu true`. The probe and the
    robustness evaluation both ask `feature_device`."""
    from merit_hf.evaluation import probe as probe_module
    from merit_hf.evaluation.probe import feature_device, probe_features

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert feature_device(ProbeArguments()) == torch.device("cuda")
    assert feature_device(ProbeArguments(use_cpu=True)) == torch.device("cpu")
    devices = []
    monkeypatch.setattr(probe_module, "extract_features", lambda *args, device=None, **kwargs: devices.append(device))
    probe_features(MeritModel(tiny_merit_config()).ecg_model, None, ptbxl_like, arguments=ProbeArguments())
    assert devices == [torch.device("cuda")] * 6  # 3 splits x (model, baseline)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert feature_device(ProbeArguments()) == torch.device("cpu")


def test_features_on_the_gpu_leave_a_given_model_where_it_was(ptbxl_like, monkeypatch):
    """`run_linear_probe(model)` on a GPU machine: the features are computed on the GPU, and the model's ECG encoder
    (for a two-tower model, its `ecg_model`) goes back to the CPU it was on. It stayed on the GPU, the rest of the model
    on the CPU, so the caller's next `model(...)` failed on mixed devices. A model in training mode stays in it (its
    encoder was left in eval mode: no dropout for the rest of a training loop)."""
    from merit_hf.evaluation import probe as probe_module

    model = MeritModel(tiny_merit_config()).train()
    moves, original_to = [], torch.nn.Module.to

    def to(self, *args, **kwargs):  # every move of a module to a device; one to "cuda" stays on this CPU
        if args and isinstance(args[0], (str, torch.device)):
            moves.append((self, torch.device(args[0]).type))
            if moves[-1][1] == "cuda":
                return self
        return original_to(self, *args, **kwargs)

    embeddings = probe_module.record_embeddings
    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        probe_module, "record_embeddings", lambda encoder, inputs, device: embeddings(encoder, inputs, "cpu")
    )
    run_linear_probe(
        model, ptbxl_like, "superclass", baseline=False, arguments=ProbeArguments(max_epochs=1, num_bootstrap=0)
    )
    # each split's features on the GPU, then the encoder back on the CPU
    assert moves == [(model.ecg_model, "cuda"), (model.ecg_model, "cpu")] * 3
    assert all(module.training for module in model.modules())
