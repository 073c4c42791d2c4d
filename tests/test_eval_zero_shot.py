"""Zero-shot classification: scores per requested label in order, prompt ensembling, errors, the prompt file, the
registered pipeline, long records cut into windows, a feature extractor that disagrees with the model."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import DatasetDict
from transformers import pipeline

from merit_hf import MeritFeatureExtractor, MeritModel, MeritProcessor, zero_shot_classify
from merit_hf.evaluation.zero_shot import evaluate_zero_shot, random_ecg_tower_like
from merit_hf.models.merit import ZERO_SHOT_ECG_TASK, ZeroShotEcgClassificationPipeline
from merit_hf.models.merit.pipeline_merit import PTBXL_PROMPTS_PATH, class_prompts, load_class_descriptions

from .conftest import BUNDLED_PTBXL, tiny_merit_config
from .test_eval_probe import synthetic_ptbxl

LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]


@pytest.fixture
def model_and_processor(tokenizer):
    model = MeritModel(tiny_merit_config()).eval()
    feature_extractor = MeritFeatureExtractor.from_model_config(model.config.ecg_config)
    return model, MeritProcessor(feature_extractor, tokenizer)


def _ecgs(count=2, seed=0):
    rng = np.random.default_rng(seed)
    time = np.arange(2500) / 250
    return [
        0.8 * np.sin(2 * np.pi * 1.1 * time)[:, None] + 0.05 * rng.standard_normal((2500, 12)) for _ in range(count)
    ]


def test_scores_for_exactly_the_requested_labels_in_order(model_and_processor):
    model, processor = model_and_processor
    labels = ["sinus rhythm", "atrial fibrillation", "left bundle branch block"]
    out = zero_shot_classify(model, processor, _ecgs(), labels, sampling_rate=250, lead_names=LEADS)
    assert out["labels"] == labels and out["scores"].shape == (2, 3)
    assert np.all(np.abs(out["scores"]) <= 1 + 1e-6)  # cosine similarities
    reversed_out = zero_shot_classify(model, processor, _ecgs(), labels[::-1], sampling_rate=250, lead_names=LEADS)
    np.testing.assert_allclose(reversed_out["scores"], out["scores"][:, ::-1], atol=1e-6)
    # per-class scores: adding a label leaves the others unchanged (no softmax across labels)
    more = zero_shot_classify(
        model, processor, _ecgs(), [*labels, "sinus bradycardia"], sampling_rate=250, lead_names=LEADS
    )
    np.testing.assert_allclose(more["scores"][:, :3], out["scores"], atol=1e-6)
    single = zero_shot_classify(
        model, processor, _ecgs(), labels, multi_label=False, sampling_rate=250, lead_names=LEADS
    )
    np.testing.assert_allclose(single["scores"].sum(axis=1), 1.0, atol=1e-5)


def test_scores_equal_the_hand_computed_ensemble(model_and_processor, tokenizer):
    model, processor = model_and_processor
    descriptions = {"NORM": ["normal ecg", "sinus rhythm normal ecg"], "MI": ["inferior myocardial infarction"]}
    templates = ["{}", "ecg: {}"]
    out = zero_shot_classify(
        model,
        processor,
        _ecgs(1),
        ["MI", "NORM"],
        templates,
        class_descriptions=descriptions,
        sampling_rate=250,
        lead_names=LEADS,
        precision="fp32",  # the hand computation below runs the fp32 model
    )
    with torch.no_grad():
        ecg_values = processor.feature_extractor(_ecgs(1), sampling_rate=250, lead_names=LEADS, return_tensors="pt")
        ecg = F.normalize(model.get_ecg_features(ecg_values["ecg_values"]).pooler_output, dim=-1)
        expected = []
        for label in ["MI", "NORM"]:
            texts = [template.format(text) for text in descriptions[label] for template in templates]
            tokens = tokenizer(texts, padding=True, return_tensors="pt")
            text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
            expected.append(F.normalize(text.mean(dim=0), dim=-1))
        expected = (ecg @ torch.stack(expected).T).numpy()
    np.testing.assert_allclose(out["scores"], expected, atol=1e-5)


def test_a_tokenizer_beyond_the_text_towers_vocabulary_is_named(model_and_processor):
    """Tokens added without `resize_token_embeddings` (or another model's tokenizer): the embedding's bare "index out
    of range" became an error naming the token id and the table's size, in zero-shot and in the model's own call."""
    model, processor = model_and_processor
    table = model.text_model.get_input_embeddings().num_embeddings
    processor.tokenizer.add_tokens(["qtcprolonged"])
    assert len(processor.tokenizer) > table
    with pytest.raises(ValueError, match=rf"token id {table} is beyond the text tower's {table} embeddings"):
        zero_shot_classify(model, processor, _ecgs(1), ["qtcprolonged", "MI"], sampling_rate=250, lead_names=LEADS)
    tokens = processor.tokenizer(["qtcprolonged"], return_tensors="pt")
    with pytest.raises(ValueError, match=rf"token id {table} is beyond the text tower's {table} embeddings"):
        model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
    # a label the vocabulary covers still works with the enlarged tokenizer
    assert zero_shot_classify(model, processor, _ecgs(1), ["MI"], sampling_rate=250, lead_names=LEADS)["scores"].shape


def test_a_description_given_as_one_string_is_one_description_not_its_letters():
    one = class_prompts(["MI"], "an ECG showing {}", class_descriptions={"MI": "myocardial infarction"})
    assert one == [["an ECG showing myocardial infarction"]]
    assert one == class_prompts(["MI"], "an ECG showing {}", class_descriptions={"MI": ["myocardial infarction"]})
    for bad in ("", "  ", [""], [None]):
        with pytest.raises(ValueError, match="label 'MI' has"):
            class_prompts(["MI"], class_descriptions={"MI": bad})


@pytest.mark.parametrize("precision", ["auto", "bf16", "int8"])
def test_every_cpu_precision_scores_close_to_fp32_and_leaves_the_model_alone(model_and_processor, precision):
    model, processor = model_and_processor
    weight = model.ecg_model.layers[0].mlp.fc1.weight
    kwargs = {"sampling_rate": 250, "lead_names": LEADS, "class_descriptions": "superclass"}
    reference = zero_shot_classify(model, processor, _ecgs(), ["NORM", "MI", "CD"], precision="fp32", **kwargs)
    low = zero_shot_classify(model, processor, _ecgs(), ["NORM", "MI", "CD"], precision=precision, **kwargs)
    np.testing.assert_allclose(low["scores"], reference["scores"], atol=0.02)
    assert model.ecg_model.layers[0].mlp.fc1.weight is weight and weight.dtype == torch.float32
    classifier = pipeline(ZERO_SHOT_ECG_TASK, model=model, processor=processor, device="cpu", precision=precision)
    output = classifier(_ecgs(1)[0], candidate_labels=["NORM", "MI", "CD"], **kwargs)
    scores = {item["label"]: item["score"] for item in output}
    np.testing.assert_allclose([scores[label] for label in ["NORM", "MI", "CD"]], reference["scores"][0], atol=0.02)
    with pytest.raises(ValueError, match="precision 'fp8' needs a CUDA GPU"):
        classifier(_ecgs(1)[0], candidate_labels=["NORM"], precision="fp8", **kwargs)


def test_clear_errors(model_and_processor):
    model, processor = model_and_processor
    kwargs = {"sampling_rate": 250, "lead_names": LEADS}
    with pytest.raises(ValueError, match="unknown label 'MIX'.*know \\['CD', 'HYP', 'MI', 'NORM', 'STTC'\\]"):
        zero_shot_classify(model, processor, _ecgs(1), ["MI", "MIX"], class_descriptions="superclass", **kwargs)
    with pytest.raises(ValueError, match="candidate_labels is empty"):
        zero_shot_classify(model, processor, _ecgs(1), [], **kwargs)
    with pytest.raises(ValueError, match="has no '\\{\\}' placeholder"):
        zero_shot_classify(model, processor, _ecgs(1), ["MI"], hypothesis_template="an ECG showing", **kwargs)
    with pytest.raises(ValueError, match="duplicates \\['MI'\\]"):
        zero_shot_classify(model, processor, _ecgs(1), ["MI", "MI"], **kwargs)
    with pytest.raises(ValueError, match="no label set 'diagnostic'"):
        load_class_descriptions("diagnostic")
    with pytest.raises(TypeError, match="needs MERIT's two towers"):
        zero_shot_classify(model.ecg_model, processor, _ecgs(1), ["MI"], **kwargs)


def test_prompt_file_covers_every_ptbxl_label_set():
    with open(BUNDLED_PTBXL / "scp_statements.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    flag = lambda value: value.strip() not in ("", "0", "0.0")  # noqa: E731
    expected = {
        "superclass": sorted({row["diagnostic_class"] for row in rows if row["diagnostic_class"]}),
        "subclass": sorted({row["diagnostic_subclass"] for row in rows if row["diagnostic_subclass"]}),
        "form": sorted(row[""] for row in rows if flag(row["form"])),
        "rhythm": sorted(row[""] for row in rows if flag(row["rhythm"])),
        "all": sorted(row[""] for row in rows),
    }
    assert {name: len(names) for name, names in expected.items()} == {
        "superclass": 5,
        "subclass": 23,
        "form": 19,
        "rhythm": 12,
        "all": 71,
    }
    for label_set, names in expected.items():
        descriptions = load_class_descriptions(label_set, PTBXL_PROMPTS_PATH)
        assert list(descriptions) == names, label_set
        assert all(len(texts) >= 2 and all(text.strip() for text in texts) for texts in descriptions.values())
    assert class_prompts(["AFIB"], ["{}", "ecg: {}"], "rhythm") == [
        [
            "atrial fibrillation",
            "ecg: atrial fibrillation",
            "irregularly irregular rhythm without p waves, atrial fibrillation",
            "ecg: irregularly irregular rhythm without p waves, atrial fibrillation",
        ]
    ]


def test_registered_pipeline_from_a_saved_folder(model_and_processor, tmp_path):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # the folder declares the task in config.custom_pipelines (its own pipeline_merit.py), which transformers runs
    # only with trust_remote_code=True, with or without merit_hf imported
    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline(ZERO_SHOT_ECG_TASK, model=str(tmp_path), device="cpu")
    classifier = pipeline(ZERO_SHOT_ECG_TASK, model=str(tmp_path), device="cpu", trust_remote_code=True)
    assert type(classifier).__name__ == ZeroShotEcgClassificationPipeline.__name__
    ecg = _ecgs(1)[0]
    output = classifier(
        ecg,
        candidate_labels=["NORM", "MI", "CD"],
        class_descriptions="superclass",
        sampling_rate=250,
        lead_names=LEADS,
    )
    assert sorted(item["label"] for item in output) == ["CD", "MI", "NORM"]
    scores = [item["score"] for item in output]
    assert scores == sorted(scores, reverse=True)
    direct = zero_shot_classify(
        model,
        processor,
        ecg,
        ["NORM", "MI", "CD"],
        class_descriptions="superclass",
        sampling_rate=250,
        lead_names=LEADS,
    )
    np.testing.assert_allclose(
        [{item["label"]: item["score"] for item in output}[label] for label in direct["labels"]],
        direct["scores"][0],
        atol=1e-5,
    )
    batch = classifier([ecg, ecg], candidate_labels=["NORM", "MI"], sampling_rate=250, lead_names=LEADS)
    assert len(batch) == 2 and batch[0] == batch[1]
    record = BUNDLED_PTBXL / "records100" / "00000" / "00001_lr"
    assert len(classifier(str(record), candidate_labels=["SR", "AFIB"], class_descriptions="rhythm")) == 2


@pytest.mark.parametrize("multi_label", [True, False])
def test_pipeline_batch_size_gives_the_unbatched_result(model_and_processor, multi_label):
    model, processor = model_and_processor
    classifier = pipeline(ZERO_SHOT_ECG_TASK, model=model, processor=processor, device="cpu")
    ecgs, labels = _ecgs(3, seed=1), ["NORM", "MI", "CD"]  # batch_size=2: one full batch, then a partial one
    kwargs = {"multi_label": multi_label, "sampling_rate": 250, "lead_names": LEADS}
    one_by_one = classifier(ecgs, candidate_labels=labels, batch_size=1, **kwargs)
    batched = classifier(ecgs, candidate_labels=labels, batch_size=2, **kwargs)
    assert len(batched) == len(one_by_one) == 3
    for single, batch in zip(one_by_one, batched):
        assert [item["label"] for item in batch] == [item["label"] for item in single]
        np.testing.assert_allclose([item["score"] for item in batch], [item["score"] for item in single], atol=1e-5)
    direct = zero_shot_classify(model, processor, ecgs, labels, **kwargs)
    assert {item["label"]: item["score"] for item in batched[2]} == pytest.approx(
        dict(zip(labels, direct["scores"][2].tolist())), abs=1e-5
    )
    assert one_by_one[0] != one_by_one[1]  # the records differ, so a mix-up would show


def test_zero_shot_evaluation_on_a_dataset_with_a_random_ecg_tower_baseline(model_and_processor, tmp_path):
    model, processor = model_and_processor
    baseline = random_ecg_tower_like(model, seed=3)
    changed = {
        name for name, weight in model.state_dict().items() if not torch.equal(weight, baseline.state_dict()[name])
    }
    assert changed and all(name.startswith(("ecg_model.", "ecg_projection.")) for name in changed)
    assert "ecg_projection.fc1.weight" in changed and "ecg_model.layers.0.mlp.fc1.weight" in changed
    data = synthetic_ptbxl(sizes=(2, 8, 10))
    described = {"name": "my-ecgs", "version": None, "splits": "WFDB folder: by column 'fold'"}  # not PTB-XL
    results = evaluate_zero_shot(
        model, data, "superclass", processor=processor, num_bootstrap=10, output_file=tmp_path / "zs.json",
        dataset_extra=described,
    )  # fmt: skip
    assert results["task"] == "zero-shot" and results["label_names"] == ["CD", "HYP", "MI", "NORM", "STTC"]
    assert {key: results["dataset"][key] for key in described} == described
    assert results.dataset["sampling_rate"] == 100
    assert results.protocol["feature_extractor"]["num_samples"] == processor.feature_extractor.num_samples
    assert (
        results.dataset["unlabeled_records"]
        == "records without a superclass label are left out of validation and test"
    )
    for role in ("model", "baseline"):
        assert set(results[role]["metrics"]) == {"macro_auroc", "macro_f1", "macro_f1_max_over_thresholds"}
        assert results[role]["num_records"] == 10
    assert results["baseline"]["name_or_path"] == "random-init ECG tower"
    assert results["model"]["name_or_path"] == (model.name_or_path or "MeritModel")  # not the module's repr
    from merit_hf.evaluation.zero_shot import zero_shot_fingerprints  # the weights the numbers are of

    assert (
        results.model.weights_fingerprint == zero_shot_fingerprints(model)
        and results.baseline.weights_fingerprint is None
    )


def test_a_given_model_keeps_its_training_mode_and_device_after_a_zero_shot_evaluation(model_and_processor):
    """evaluate_zero_shot switched a given model to eval mode (and moved it to `device=`) for good: a training loop
    that evaluates between epochs lost its dropout for the rest of the run. Scores still come from eval mode."""
    model, processor = model_and_processor
    data = synthetic_ptbxl(sizes=(2, 4, 4))
    model.eval()
    reference = evaluate_zero_shot(model, data, processor=processor, baseline=False, num_bootstrap=5)
    model.train()
    moved = []
    original_to = model.to

    def to(*args, **kwargs):
        moved.append(args or kwargs)
        return original_to(*args, **kwargs)

    model.to = to
    try:
        again = evaluate_zero_shot(model, data, processor=processor, baseline=False, num_bootstrap=5, device="cpu")
    finally:
        del model.to
    assert model.training and all(module.training for module in model.modules())
    assert moved == [("cpu",), (torch.device("cpu"),)]  # to the device asked for, then back where it was
    assert again["model"]["metrics"] == reference["model"]["metrics"]  # dropout was off while scoring


def test_zero_shot_evaluation_needs_no_labelled_training_records(model_and_processor):
    """Zero-shot uses validation (F1 thresholds) and test only: a dataset whose train split has no labelled record,
    or no train split at all (a test-only conversion), is scored exactly as one that has them."""
    model, processor = model_and_processor
    data = synthetic_ptbxl(sizes=(2, 4, 4))
    reference = evaluate_zero_shot(model, data, processor=processor, baseline=False, num_bootstrap=5)
    unlabeled_train = DatasetDict({**data, "train": data["train"].map(lambda row: {"superclass": []})})
    without_train = DatasetDict({split: data[split] for split in ("validation", "test")})
    for variant in (unlabeled_train, without_train):
        results = evaluate_zero_shot(model, variant, processor=processor, baseline=False, num_bootstrap=5)
        assert results["model"]["metrics"] == reference["model"]["metrics"]
        counts = results.dataset["num_records"]
        assert counts == ({"train": 0} if "train" in variant else {}) | {"validation": 4, "test": 4}
    assert reference.dataset["num_records"]["train"] == 2  # labelled training records, as the probe counts them
    # the shipped prompts by their place in the package, not this machine's path (results go into Hub cards)
    assert reference.protocol["prompts"] == "merit_hf/models/merit/prompts/ptbxl_prompts.json"
    with pytest.raises(ValueError, match=r"no validation split \(the dataset has \['test'\]\)"):
        evaluate_zero_shot(model, DatasetDict({"test": data["test"]}), processor=processor, baseline=False)


def test_a_long_record_is_scored_from_the_mean_of_its_window_embeddings(model_and_processor, tokenizer):
    """`window="sliding"`: one row of scores per record, from the projection of the mean of its windows' encoder
    embeddings (the embedding command line's record embedding), missing leads left out; the pipeline agrees, one
    record at a time or batched."""
    model, processor = model_and_processor
    processor.feature_extractor = MeritFeatureExtractor.from_model_config(
        model.config.ecg_config, window="sliding", missing_leads="mask"
    )
    minute = np.concatenate(_ecgs(6, seed=2))[:, :3]  # 60 s at 250 Hz: 7 windows of 9 s; 10 s: 2 windows
    ecgs, leads, labels = [minute, _ecgs(1, seed=3)[0][:, :3]], LEADS[:3], ["sinus rhythm", "atrial fibrillation"]
    windows = processor.feature_extractor(ecgs, sampling_rate=250, lead_names=leads, return_tensors="pt")
    assert windows["record_index"].tolist() == [0] * 7 + [1] * 2 and not windows["lead_mask"][:, 3:].any()
    with torch.no_grad():
        pooled = model.ecg_model(windows["ecg_values"], lead_mask=windows["lead_mask"]).pooler_output
        ecg = F.normalize(model.ecg_projection(torch.stack([pooled[:7].mean(dim=0), pooled[7:].mean(dim=0)])), dim=-1)
        tokens = tokenizer(labels, padding=True, return_tensors="pt")
        text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    expected = (ecg @ text.T).numpy()
    out = zero_shot_classify(model, processor, ecgs, labels, sampling_rate=250, lead_names=leads, precision="fp32")
    np.testing.assert_allclose(out["scores"], expected, atol=1e-5)
    classifier = pipeline(ZERO_SHOT_ECG_TASK, model=model, processor=processor, device="cpu", precision="fp32")
    for batch_size in (1, 2):
        outputs = classifier(ecgs, candidate_labels=labels, sampling_rate=250, lead_names=leads, batch_size=batch_size)
        for output, row in zip(outputs, expected, strict=True):
            scores = {item["label"]: item["score"] for item in output}
            np.testing.assert_allclose([scores[label] for label in labels], row, atol=1e-5)


def test_a_processor_that_disagrees_with_the_model_raises(model_and_processor, tmp_path):
    """processor_config.json's feature extractor with the leads reversed: the pipeline, `zero_shot_classify` and
    `evaluate_zero_shot` refuse it, naming the model, the field and both values."""
    model, processor = model_and_processor
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config_file = tmp_path / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["feature_extractor"]["lead_names"] = LEADS[::-1]
    config_file.write_text(json.dumps(config))
    message = re.escape(f"{tmp_path}: the feature extractor's lead_names ['V6', 'V5', ")
    with pytest.raises(ValueError, match=message + ".*does not match the model config's lead_names \\['I', 'II', "):
        pipeline(ZERO_SHOT_ECG_TASK, model=str(tmp_path), device="cpu", trust_remote_code=True)
    model, processor = MeritModel.from_pretrained(tmp_path).eval(), MeritProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        zero_shot_classify(model, processor, _ecgs(1), ["MI"], sampling_rate=250, lead_names=LEADS)
    with pytest.raises(ValueError, match=message):
        evaluate_zero_shot(model, synthetic_ptbxl(sizes=(2, 2, 2)), processor=processor, baseline=False)


def test_non_finite_ecg_values_raise_naming_the_rows(model_and_processor):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match=r"ecg_values rows \[0\] hold NaN or inf values"):
        zero_shot_classify(
            model, processor, ecg_values=torch.full((1, 12, 2250), float("nan")), candidate_labels=["MI"]
        )
    ecg_values = torch.zeros(3, 12, 2250)
    ecg_values[1, 4, 7], ecg_values[2, 0, 0] = float("inf"), float("nan")
    with pytest.raises(ValueError, match=r"ecg_values rows \[1, 2\] hold NaN or inf values"):
        zero_shot_classify(model, processor, ecg_values=ecg_values, candidate_labels=["MI"])


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{} and {}", r"has the placeholders \['\{\}', '\{\}'\]; it needs exactly one '\{\}'"),
        ("an ECG showing {label}", r"has the placeholders \['\{label\}'\]; it needs exactly one '\{\}'"),
        ("{0} or {1}", r"has the placeholders \['\{0\}', '\{1\}'\]"),
        ("an ECG showing {{}}", r"has no '\{\}' placeholder"),
        ("an ECG showing {", r"is not a format string \(Single '\{' encountered in format string\)"),
    ],
)
def test_a_hypothesis_template_needs_exactly_one_placeholder(model_and_processor, template, message):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match=f"hypothesis_template {re.escape(repr(template))} {message}"):
        zero_shot_classify(model, processor, _ecgs(1), ["MI"], hypothesis_template=template, sampling_rate=250,
                           lead_names=LEADS)  # fmt: skip
    assert class_prompts(["MI"], "{{ECG}}: {}") == [["{ECG}: MI"]]


def test_dataset_scores_leave_masked_leads_out_and_pool_windows_as_zero_shot_classify(model_and_processor):
    """The evaluation's scores of a dataset of long 3-lead records are `zero_shot_classify`'s: missing leads left
    out, one row per record (its windows pooled), whatever the batch size."""
    from datasets import Dataset

    from merit_hf.evaluation.zero_shot import _dataset_scores

    model, processor = model_and_processor
    processor.feature_extractor = MeritFeatureExtractor.from_model_config(
        model.config.ecg_config, window="sliding", missing_leads="mask"
    )
    signals = [np.concatenate(_ecgs(2, seed=seed))[:, :3].astype(np.float32) for seed in range(3)]  # 20 s each
    rows = [{"signal": signal, "sampling_rate": 250, "lead_names": LEADS[:3]} for signal in signals]
    labels = ["NORM", "MI", "CD"]
    expected = zero_shot_classify(model, processor, signals, labels, class_descriptions="superclass",
                                  sampling_rate=250, lead_names=LEADS[:3], precision="fp32")["scores"]  # fmt: skip
    assert expected.shape == (3, 3)
    prompts = class_prompts(labels, class_descriptions="superclass")
    for batch_size in (2, 3):
        scores = _dataset_scores(model, processor, Dataset.from_list(rows), prompts, batch_size)
        np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_inference_cuts_the_centre_even_with_a_random_crop_feature_extractor(model_and_processor):
    """A folder saved with its training feature extractor (`crop="random"`) still scores deterministically: every
    pipeline and `zero_shot_classify` cut the centre (the scores equal a centre-crop extractor's)."""
    from merit_hf import MeritForEcgClassification
    from merit_hf.models.merit.pipeline_merit import MeritEcgClassificationPipeline, MeritEcgFeatureExtractionPipeline

    model, processor = model_and_processor
    ecgs = _ecgs(2)  # 10 s at 250 Hz, longer than the tiny window: room for random crops
    centre = processor.feature_extractor
    random_crops = MeritFeatureExtractor.from_dict({**centre.to_dict(), "crop": "random", "seed": None})
    shuffled = MeritProcessor(random_crops, processor.tokenizer)
    labels = ["normal ecg", "atrial fibrillation"]
    kwargs = {"sampling_rate": 250, "lead_names": LEADS, "candidate_labels": labels, "precision": "fp32"}
    expected = zero_shot_classify(model, processor, ecgs, **kwargs)["scores"]
    for _ in range(2):
        np.testing.assert_array_equal(zero_shot_classify(model, shuffled, ecgs, **kwargs)["scores"], expected)
    classifier = pipeline(ZERO_SHOT_ECG_TASK, model=model, processor=shuffled, device="cpu", precision="fp32")
    first = classifier(ecgs[0], sampling_rate=250, lead_names=LEADS, candidate_labels=labels)
    assert classifier(ecgs[0], sampling_rate=250, lead_names=LEADS, candidate_labels=labels) == first
    torch.manual_seed(0)
    head = MeritForEcgClassification(tiny_merit_config(id2label={0: "A", 1: "B"})).eval()
    for pipeline_class in (MeritEcgClassificationPipeline, MeritEcgFeatureExtractionPipeline):
        runs = [
            pipeline_class(model=head, feature_extractor=extractor)(ecgs[0], sampling_rate=250, lead_names=LEADS)
            for extractor in (random_crops, random_crops, centre)
        ]
        assert runs[0] == runs[1] == runs[2], pipeline_class.__name__


def test_zero_shot_evaluation_of_a_saved_folder_runs_on_the_gpu_when_there_is_one(model_and_processor, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    """`benchmarks/evaluation.py` hands `evaluate_zero_shot` a folder: the model was loaded on the CPU and stayed
    there on a GPU machine. It now goes to the GPU when there is one (the harness passes `--use_cpu`'s choice)."""
    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    moved, original = [], torch.nn.Module.to

    def to(self, *args, **kwargs):  # record the move to "cuda" and stay on the CPU, which this machine has
        if args and str(args[0]) == "cuda":
            moved.append(type(self).__name__)
            return self
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    data = synthetic_ptbxl(sizes=(2, 8, 10))
    evaluate_zero_shot(str(tmp_path / "saved"), data, "superclass", num_bootstrap=5, baseline=False)
    assert moved == [type(model).__name__]
    moved.clear()
    evaluate_zero_shot(str(tmp_path / "saved"), data, "superclass", num_bootstrap=5, baseline=False, device="cpu")
    assert moved == []


def test_the_pipeline_uses_a_feature_extractor_given_to_it(model_and_processor, tmp_path):
    """`pipeline(..., feature_extractor=...)`, as the other ECG pipelines take it, wins over the processor's (a model in
    memory) and the folder's: a 30 s record is scored from all its windows (`window="sliding"`), not its centre, and
    missing leads are left out (`missing_leads="mask"`) instead of refused. The caller's processor is left alone, and
    a `processor=` given with a folder wins over the folder's."""
    model, processor = model_and_processor
    sliding = MeritFeatureExtractor.from_model_config(model.config.ecg_config, window="sliding", missing_leads="mask")
    windowed = MeritProcessor(sliding, processor.tokenizer)
    record, labels = np.concatenate(_ecgs(3, seed=4)), ["sinus rhythm", "atrial fibrillation", "MI"]
    kwargs = {"sampling_rate": 250, "lead_names": LEADS, "candidate_labels": labels, "precision": "fp32"}
    centre = zero_shot_classify(model, processor, record, **kwargs)["scores"][0]
    expected = zero_shot_classify(model, windowed, record, **kwargs)["scores"][0]
    three_leads = {**kwargs, "lead_names": LEADS[:3]}
    expected_three = zero_shot_classify(model, windowed, record[:, :3], **three_leads)["scores"][0]
    assert not np.allclose(expected, centre, atol=1e-3)  # the windows' mean differs from the centre crop
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    sliding.save_pretrained(tmp_path / "sliding")
    folder = {"model": str(tmp_path), "trust_remote_code": True}

    def scores(classifier, ecg, **call):
        by_label = {item["label"]: item["score"] for item in classifier(ecg, **call)}
        return [by_label[label] for label in labels]

    for source in ({"model": model, "processor": processor, "feature_extractor": sliding},
                   {**folder, "feature_extractor": sliding}, {**folder, "processor": windowed},
                   {**folder, "feature_extractor": str(tmp_path / "sliding")}):  # fmt: skip
        classifier = pipeline(ZERO_SHOT_ECG_TASK, device="cpu", **source)
        np.testing.assert_allclose(scores(classifier, record, **kwargs), expected, atol=1e-5)
        np.testing.assert_allclose(scores(classifier, record[:, :3], **three_leads), expected_three, atol=1e-5)
        assert classifier.processor.feature_extractor is classifier.feature_extractor
    assert processor.feature_extractor.window == "single"
    for source in ({"model": model, "processor": processor}, folder):  # no feature_extractor=: the processor's
        np.testing.assert_allclose(scores(pipeline(ZERO_SHOT_ECG_TASK, device="cpu", **source), record, **kwargs),
                                   centre, atol=1e-5)  # fmt: skip


def test_the_pipeline_recomputes_class_embeddings_after_the_text_tower_changes(model_and_processor):
    """A pipeline on a model in memory (scored between training steps) keeps class embeddings only while the text
    tower's weights stay as they were: after an in-place change its scores are `zero_shot_classify`'s again."""
    model, processor = model_and_processor
    classifier = pipeline(ZERO_SHOT_ECG_TASK, model=model, processor=processor, device="cpu")
    ecg, labels = _ecgs(1, seed=5)[0], ["sinus rhythm", "atrial fibrillation"]
    kwargs = {"sampling_rate": 250, "lead_names": LEADS, "candidate_labels": labels, "precision": "fp32"}

    def scores():
        return [{item["label"]: item["score"] for item in classifier(ecg, **kwargs)}[label] for label in labels]

    before = scores()
    np.testing.assert_allclose(before, zero_shot_classify(model, processor, ecg, **kwargs)["scores"][0], atol=1e-5)
    assert scores() == before  # unchanged weights: the same (cached) class embeddings
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an optimizer step, in place, on one weight of the text encoder
        weight = model.text_model.encoder.layer[0].output.dense.weight
        weight.add_(torch.randn(weight.shape, generator=generator))
    after = scores()
    assert not np.allclose(after, before, atol=1e-3)
    np.testing.assert_allclose(after, zero_shot_classify(model, processor, ecg, **kwargs)["scores"][0], atol=1e-5)
