"""ECG pipelines from a saved folder with only `trust_remote_code=True`, in a process that cannot import merit_hf:
the card's `feature-extraction` task (and `ecg-feature-extraction`) gives the encoder's embedding, `ecg-classification`
a fine-tuned classifier's per-class scores; both equal what the model computes in this process. So does
`zero-shot-ecg-classification` from a two-tower folder, with free-text labels and PTB-XL label sets. In this process:
masked leads are left out, the windows of a long record are pooled, and a feature extractor that disagrees with the
model's config is refused."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import pipeline

import merit_hf
from merit_hf import (
    MeritEcgModel,
    MeritFeatureExtractor,
    MeritForEcgClassification,
    MeritForPreTraining,
    MeritProcessor,
    zero_shot_classify,
)
from merit_hf.models.merit.pipeline_merit import PTBXL_PROMPTS_PATH
from tests.conftest import BUNDLED_PTBXL, run_in_fresh_process, tiny_ecg_config, tiny_merit_config
from tests.test_core_remote_code import BLOCK_MERIT_HF

RECORD = BUNDLED_PTBXL / "records100" / "00000" / "00001_lr"
LABELS = {0: "CD", 1: "MI", 2: "NORM"}
LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
FRESH_PROCESS_PREAMBLE = """
import numpy as np
from transformers import pipeline
try:
    import merit_hf  # noqa: F401
    raise SystemExit("merit_hf should not be importable here")
except ImportError:
    pass
"""


def _run_without_merit_hf(tmp_path, body: str, marker: str) -> None:
    """Run `body` (after `import numpy as np` and `from transformers import pipeline`) in a fresh Python process
    that cannot import merit_hf, with an empty HF cache; it must print `marker`."""
    run_in_fresh_process(BLOCK_MERIT_HF + FRESH_PROCESS_PREAMBLE + textwrap.dedent(body), tmp_path, marker)


@pytest.mark.slow
def test_pipelines_from_saved_folders_without_merit_hf(tmp_path):
    torch.manual_seed(0)
    feature_extractor = MeritFeatureExtractor.from_model_config(tiny_merit_config().ecg_config)
    encoder_folder, classifier_folder = tmp_path / "merit", tmp_path / "classifier"
    pretraining = MeritForPreTraining(tiny_merit_config()).eval()
    pretraining.save_pretrained(encoder_folder)
    feature_extractor.save_pretrained(encoder_folder)
    classifier = MeritForEcgClassification.from_pretrained(encoder_folder, id2label=LABELS).eval()
    with torch.no_grad():
        classifier.classifier.bias.copy_(torch.tensor([-1.0, 0.5, 2.0]))  # distinct scores, a known order
    classifier.save_pretrained(classifier_folder)
    feature_extractor.save_pretrained(classifier_folder)
    two_tower_tasks = {"feature-extraction", "ecg-feature-extraction", "zero-shot-ecg-classification"}
    for folder, tasks in ((encoder_folder, two_tower_tasks),
                          (classifier_folder, {"feature-extraction", "ecg-feature-extraction", "ecg-classification"})):  # fmt: skip
        assert (folder / "pipeline_merit.py").is_file()
        assert set(json.loads((folder / "config.json").read_text())["custom_pipelines"]) == tasks

    batch = feature_extractor(str(RECORD), return_tensors="pt")
    with torch.no_grad():
        embedding = pretraining.merit.ecg_model(**batch).pooler_output[0].numpy()
        scores = torch.sigmoid(classifier(**batch).logits[0]).numpy()
    np.save(tmp_path / "embedding.npy", embedding)
    np.save(tmp_path / "scores.npy", scores)
    body = f"""
        import wfdb
        expected = np.load({str(tmp_path / "embedding.npy")!r})
        for task in ("feature-extraction", "ecg-feature-extraction"):
            embed = pipeline(task, model={str(encoder_folder)!r}, trust_remote_code=True, device="cpu")
            assert type(embed).__module__.startswith("transformers_modules"), type(embed).__module__
            np.testing.assert_allclose(embed({str(RECORD)!r}), expected, rtol=1e-5, atol=1e-6)
        signal, fields = wfdb.rdsamp({str(RECORD)!r})
        from_array = embed(signal, sampling_rate=100, lead_names=fields["sig_name"])
        np.testing.assert_allclose(from_array, expected, rtol=1e-5, atol=1e-6)
        classify = pipeline("ecg-classification", model={str(classifier_folder)!r}, trust_remote_code=True)
        out = classify({str(RECORD)!r})
        scores = np.load({str(tmp_path / "scores.npy")!r})
        labels = {LABELS!r}
        order = np.argsort(-scores)
        assert [entry["label"] for entry in out] == [labels[i] for i in order], out
        np.testing.assert_allclose([entry["score"] for entry in out], scores[order], rtol=1e-5)
        assert len(classify({str(RECORD)!r}, top_k=1)) == 1
        print("PIPELINES-OK")
        """
    _run_without_merit_hf(tmp_path, body, "PIPELINES-OK")


def saved_two_tower_folder(tmp_path, tokenizer):
    """A tiny random `MeritForPreTraining` (seed 0) and its processor, saved to `tmp_path / "merit"`."""
    torch.manual_seed(0)
    pretraining = MeritForPreTraining(tiny_merit_config()).eval()
    processor = MeritProcessor(MeritFeatureExtractor.from_model_config(tiny_merit_config().ecg_config), tokenizer)
    folder = tmp_path / "merit"
    pretraining.save_pretrained(folder)
    processor.save_pretrained(folder)
    return pretraining, processor, folder


@pytest.mark.slow
def test_zero_shot_pipeline_from_a_saved_two_tower_folder_without_merit_hf(tmp_path, tokenizer):
    """`zero-shot-ecg-classification` from a saved MeritForPreTraining folder in a fresh process: free-text labels and
    `class_descriptions="superclass"` (read from the folder's zero_shot_prompts.json) score as `zero_shot_classify`
    does here."""
    pretraining, processor, folder = saved_two_tower_folder(tmp_path, tokenizer)
    assert "zero-shot-ecg-classification" in json.loads((folder / "config.json").read_text())["custom_pipelines"]
    assert json.loads((folder / "zero_shot_prompts.json").read_text()) == json.loads(PTBXL_PROMPTS_PATH.read_text())

    free_text = ["sinus rhythm", "atrial fibrillation", "myocardial infarction"]
    superclass = ["NORM", "MI", "CD", "STTC", "HYP"]
    expected = {
        "free": zero_shot_classify(pretraining, processor, str(RECORD), free_text, precision="fp32")["scores"][0],
        "superclass": zero_shot_classify(
            pretraining, processor, str(RECORD), superclass, class_descriptions="superclass", precision="fp32"
        )["scores"][0],
    }
    np.savez(tmp_path / "zero_shot.npz", **expected)
    body = f"""
        expected = np.load({str(tmp_path / "zero_shot.npz")!r})
        classify = pipeline("zero-shot-ecg-classification", model={str(folder)!r}, trust_remote_code=True,
                            device="cpu")
        assert type(classify).__module__.startswith("transformers_modules"), type(classify).__module__
        for key, labels, kwargs in (("free", {free_text!r}, {{"precision": "fp32"}}),
                                    ("superclass", {superclass!r}, {{"class_descriptions": "superclass"}})):
            out = classify({str(RECORD)!r}, candidate_labels=labels, **kwargs)  # "auto" is fp32 on CPU here
            scores = {{entry["label"]: entry["score"] for entry in out}}
            np.testing.assert_allclose([scores[label] for label in labels], expected[key], rtol=1e-5, atol=1e-5)
            assert [entry["score"] for entry in out] == sorted(scores.values(), reverse=True)
        try:
            classify({str(RECORD)!r}, candidate_labels=["NORM"], class_descriptions="no-such-set")
            raise SystemExit("an unknown label set should raise")
        except ValueError as error:
            assert "no-such-set" in str(error), error
        try:  # an item of a list is named by its position
            classify([{str(RECORD)!r}, {str(RECORD) + "_missing"!r}], candidate_labels=["NORM"])
            raise SystemExit("a missing record should raise")
        except ValueError as error:
            assert str(error).startswith("item 1 of the inputs: "), error
        print("ZERO-SHOT-OK")
        """
    _run_without_merit_hf(tmp_path, body, "ZERO-SHOT-OK")


@pytest.mark.slow
def test_zero_shot_pipeline_from_a_saved_folder_with_merit_hf_installed_runs_each_precision_as_merit_hf(
    tmp_path, tokenizer, monkeypatch
):
    """A user with merit_hf installed loads a two-tower folder through its remote code: the folder's pipeline uses
    merit_hf's precision tools, which recognised Transformer blocks with `isinstance` against merit_hf's own classes,
    and the first `pipeline()` call's model has the folder's classes (`transformers_modules...modeling_merit`). So
    int8 quantised nothing (fp32 scores, logged as "converted to int8"), bf16 and "auto" skipped the prepacked, GELU-
    fused path, and a second `pipeline()` call (merit_hf's classes, registered by the first call's import) scored
    differently. Every precision now scores as `zero_shot_classify` does in-package, in both calls."""
    from merit_hf.models.merit.inference_precision import cpu_int8_engines

    # the CPU kernel choices fixed, so that neither process times them differently
    monkeypatch.setenv("MERIT_CPU_ATTENTION", "sdpa")
    monkeypatch.setenv("MERIT_CPU_PREPACK", "on")
    if cpu_int8_engines():
        monkeypatch.setenv("MERIT_CPU_INT8_ENGINE", cpu_int8_engines()[0])
    pretraining, processor, folder = saved_two_tower_folder(tmp_path, tokenizer)
    labels = ["sinus rhythm", "atrial fibrillation", "myocardial infarction"]
    precisions = ("fp32", "bf16", "int8", "auto")
    expected = {
        precision: zero_shot_classify(pretraining, processor, str(RECORD), labels, precision=precision)["scores"][0]
        for precision in precisions
    }
    assert not np.array_equal(expected["int8"], expected["fp32"])  # int8 is told apart from fp32 by its scores
    np.savez(tmp_path / "expected.npz", **expected)
    num_linears = 4 * pretraining.config.ecg_config.num_hidden_layers  # q/k/v, output, fc1, fc2 of each block
    source = str(Path(merit_hf.__file__).resolve().parents[1])  # this checkout's merit_hf, not another install
    script = f"""
        import logging, sys
        sys.path.insert(0, {source!r})
        import numpy as np
        from transformers import pipeline

        class Lines(logging.Handler):
            lines = []
            def emit(self, record):
                self.lines.append(record.getMessage())

        logger = logging.getLogger("merit_hf.models.merit.inference_precision")
        logger.setLevel(logging.DEBUG)
        logger.addHandler(Lines())
        expected = np.load({str(tmp_path / "expected.npz")!r})
        labels = {labels!r}
        for call in range(2):
            classify = pipeline("zero-shot-ecg-classification", model={str(folder)!r}, trust_remote_code=True,
                                device="cpu")
            if call == 0:  # merit_hf is not imported yet: the folder's own classes, merit_hf's precision tools
                assert type(classify.model).__module__.startswith("transformers_modules"), type(classify.model)
            for precision in {precisions!r}:
                out = classify({str(RECORD)!r}, candidate_labels=labels, precision=precision)
                scores = {{entry["label"]: entry["score"] for entry in out}}
                np.testing.assert_array_equal(
                    [scores[label] for label in labels], expected[precision], err_msg=f"call {{call}}, {{precision}}"
                )
            import merit_hf
            from merit_hf.models.merit import inference_precision
            assert merit_hf.__file__.startswith({source!r}), merit_hf.__file__
            encoder = getattr(classify.model, "merit", classify.model).ecg_model
            int8 = inference_precision.prepare_for_inference(encoder, "int8", "cpu")  # the pipeline's, cached
            quantised = [m for m in int8.modules() if m._get_name() == "DynamicQuantizedLinear"]
            assert len(quantised) == {num_linears}, (call, len(quantised))
        said = [line for line in Lines.lines if "for int8 inference" in line]
        assert said and all("{num_linears} linear layers of" in line for line in said), Lines.lines
        assert not any("int8" in line and "no layer quantised" in line for line in Lines.lines), Lines.lines
        print("PRECISIONS-OK")
        """
    run_in_fresh_process(textwrap.dedent(script), tmp_path, "PRECISIONS-OK")


# ----------------------------------------------------------------------------------------------------------------------
# In this process, from saved folders (the pipeline code is the folder's copy, run with trust_remote_code=True)


def _signal(seconds: float, sampling_rate: int, num_leads: int, seed: int = 0) -> np.ndarray:
    """A plausible ECG-like array `(num_samples, num_leads)` in mV: a 1.1 Hz sine per lead plus noise."""
    rng = np.random.default_rng(seed)
    time = np.arange(int(seconds * sampling_rate)) / sampling_rate
    phases = rng.uniform(0, np.pi, num_leads)
    return 0.8 * np.sin(2 * np.pi * 1.1 * time[:, None] + phases) + 0.05 * rng.standard_normal((len(time), num_leads))


def _save(folder, model, feature_extractor):
    model.save_pretrained(folder)
    feature_extractor.save_pretrained(folder)
    return str(folder)


def test_ecg_tasks_take_a_model_in_memory():
    """`ecg-classification` and `ecg-feature-extraction` are registered with transformers, so `pipeline(task,
    model=model, feature_extractor=...)` works on a model in memory as it does on a saved folder."""
    torch.manual_seed(0)
    classifier = MeritForEcgClassification(tiny_merit_config(id2label=LABELS)).eval()
    encoder = MeritEcgModel(tiny_ecg_config()).eval()
    feature_extractor = MeritFeatureExtractor.from_model_config(encoder.config)
    batch = feature_extractor(str(RECORD), return_tensors="pt")
    with torch.no_grad():
        expected_scores = torch.sigmoid(classifier(**batch).logits)[0]
        expected_embedding = encoder(**batch).pooler_output[0]
    scores = pipeline("ecg-classification", model=classifier, feature_extractor=feature_extractor)(str(RECORD))
    index = {label: i for i, label in LABELS.items()}
    assert [entry["label"] for entry in scores] == sorted(
        LABELS.values(), key=lambda label: -expected_scores[index[label]]
    )
    for entry in scores:
        assert entry["score"] == pytest.approx(expected_scores[index[entry["label"]]].item())
    embed = pipeline("ecg-feature-extraction", model=encoder, feature_extractor=feature_extractor)
    torch.testing.assert_close(embed(str(RECORD), return_tensors=True), expected_embedding, rtol=1e-5, atol=1e-6)


def test_pipelines_leave_masked_leads_out(tmp_path):
    """With `missing_leads="mask"`, a 3-lead record's other leads are left out (`lead_mask`), never fed as zeros."""
    torch.manual_seed(0)
    encoder = MeritEcgModel(tiny_ecg_config()).eval()
    feature_extractor = MeritFeatureExtractor(missing_leads="mask")
    embed = pipeline("feature-extraction", model=_save(tmp_path, encoder, feature_extractor), trust_remote_code=True)
    signal, leads = _signal(10, 500, 3), ["I", "II", "III"]
    batch = feature_extractor(signal, sampling_rate=500, lead_names=leads, return_tensors="pt")
    assert batch["lead_mask"].tolist() == [[True] * 3 + [False] * 9]
    with torch.no_grad():
        expected = encoder(**batch).pooler_output[0]
        zeros_fed = encoder(batch["ecg_values"]).pooler_output[0]
    embedding = embed(signal, sampling_rate=500, lead_names=leads, return_tensors=True)
    torch.testing.assert_close(embedding, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(embedding, zeros_fed, atol=1e-3), "the missing leads were fed as zeros"


def test_pipelines_pool_every_window_of_a_long_record(tmp_path):
    """`window="sliding"`: a 60 s record (7 windows) gets the mean of its windows' embeddings (`feature-extraction`)
    and the scores of the mean of its windows' logits (`ecg-classification`), one record at a time or batched."""
    torch.manual_seed(0)
    encoder = MeritEcgModel(tiny_ecg_config()).eval()
    classifier = MeritForEcgClassification(tiny_merit_config(id2label=LABELS)).eval()
    feature_extractor = MeritFeatureExtractor(window="sliding")
    embed = pipeline("feature-extraction", model=_save(tmp_path / "encoder", encoder, feature_extractor),
                     trust_remote_code=True)  # fmt: skip
    classify = pipeline("ecg-classification", model=_save(tmp_path / "classifier", classifier, feature_extractor),
                        trust_remote_code=True)  # fmt: skip
    minute, short = _signal(60, 500, 12, seed=1), _signal(10, 500, 12, seed=2)
    windows = feature_extractor([minute, short], sampling_rate=500, lead_names=LEADS, return_tensors="pt")
    assert windows["record_index"].tolist() == [0] * 7 + [1] * 2
    with torch.no_grad():
        window_embeddings = encoder(windows["ecg_values"]).pooler_output
        window_logits = classifier(windows["ecg_values"]).logits
    expected_embeddings = [window_embeddings[:7].mean(dim=0), window_embeddings[7:].mean(dim=0)]
    expected_scores = [torch.sigmoid(window_logits[:7].mean(dim=0)), torch.sigmoid(window_logits[7:].mean(dim=0))]
    # the first window alone (what the pipelines returned before they pooled) is another embedding
    assert not torch.allclose(window_embeddings[0], expected_embeddings[0], atol=1e-3)
    kwargs = {"sampling_rate": 500, "lead_names": LEADS}
    for batch_size in (1, 2):
        embeddings = embed([minute, short], batch_size=batch_size, return_tensors=True, **kwargs)
        scores = classify([minute, short], batch_size=batch_size, **kwargs)
        for embedding, expected in zip(embeddings, expected_embeddings, strict=True):
            torch.testing.assert_close(embedding, expected, rtol=1e-5, atol=1e-5)
        for out, expected in zip(scores, expected_scores, strict=True):
            by_label = {entry["label"]: entry["score"] for entry in out}
            np.testing.assert_allclose([by_label[LABELS[i]] for i in range(3)], expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("field", "saved", "message"),
    [
        ("sampling_rate", 500, "sampling_rate 500 does not match the model config's sampling_rate 250"),
        ("lead_names", LEADS[::-1], r"lead_names \['V6', .*\] does not match the model config's lead_names \['I', "),
        ("num_samples", 2500, "num_samples 2500 does not match the model config's num_samples 2250"),
    ],
)
def test_a_feature_extractor_that_disagrees_with_the_model_raises(tmp_path, field, saved, message):
    """preprocessor_config.json edited against config.json: the pipelines refuse the folder, naming it, the field and
    both values. Lead names compare as the feature extractor matches them (case-insensitively)."""
    folder = _save(tmp_path, MeritForEcgClassification(tiny_merit_config(id2label=LABELS)), MeritFeatureExtractor())
    config_file = tmp_path / "preprocessor_config.json"
    settings = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**settings, field: saved}))
    for task in ("feature-extraction", "ecg-classification"):
        with pytest.raises(ValueError, match=f"{re.escape(folder)}: the feature extractor's {message}"):
            pipeline(task, model=folder, trust_remote_code=True)
    config_file.write_text(json.dumps({**settings, "lead_names": [lead.upper() for lead in LEADS]}))
    assert pipeline("feature-extraction", model=folder, trust_remote_code=True)(str(RECORD))


def test_a_bad_item_of_a_list_is_named_by_its_position(tokenizer):
    """Each pipeline hands its feature extractor one item at a time, which would call every item "record 0": the error
    names the bad item's position among the inputs, whatever the batch size (a path keeps its own name too)."""
    torch.manual_seed(0)
    config = tiny_merit_config(id2label=LABELS)
    feature_extractor = MeritFeatureExtractor.from_model_config(config.ecg_config)
    processor = MeritProcessor(feature_extractor, tokenizer)
    good, bad = _signal(10, 250, 12, seed=1), _signal(10, 250, 12, seed=2)
    bad[100, 3] = np.nan
    runs = [
        (pipeline("ecg-classification", model=MeritForEcgClassification(config).eval(),
                  feature_extractor=feature_extractor), {}),
        (pipeline("ecg-feature-extraction", model=MeritEcgModel(config.ecg_config).eval(),
                  feature_extractor=feature_extractor), {}),
        (pipeline("zero-shot-ecg-classification", model=MeritForPreTraining(config).eval(), processor=processor),
         {"candidate_labels": ["NORM", "MI"]}),
    ]  # fmt: skip
    for classify, kwargs in runs:
        for batch_size in (1, 2):
            with pytest.raises(ValueError, match=r"^item 1 of the inputs: lead aVR has 1 NaN/inf samples"):
                classify([good, bad, good], sampling_rate=250, lead_names=LEADS, batch_size=batch_size, **kwargs)
        missing = str(RECORD.parent / "99999_lr")
        with pytest.raises(
            ValueError, match=rf"^item 2 of the inputs: {re.escape(missing)}\.hea: WFDB header not found"
        ):
            classify([str(RECORD), str(RECORD), missing], **kwargs)
        with pytest.raises(ValueError, match=r"^record 0: lead aVR has 1 NaN/inf samples"):  # one ECG, not a list
            classify(bad, sampling_rate=250, lead_names=LEADS, **kwargs)


def test_ecg_classification_top_k_follows_text_classification():
    """`top_k=None` (the default): every class; an int >= 1: the k best (all of them when k is larger); anything
    else is refused naming top_k, instead of `[:top_k]` dropping the last class (-1), returning nothing (0) or a bare
    TypeError ("2")."""
    torch.manual_seed(0)
    config = tiny_merit_config(id2label=LABELS)
    classify = pipeline("ecg-classification", model=MeritForEcgClassification(config).eval(),
                        feature_extractor=MeritFeatureExtractor.from_model_config(config.ecg_config))  # fmt: skip
    every = classify(str(RECORD))
    assert sorted(entry["label"] for entry in every) == sorted(LABELS.values())
    assert classify(str(RECORD), top_k=None) == every
    for top_k, count in ((1, 1), (2, 2), (np.int64(2), 2), (3, 3), (10, 3)):
        assert classify(str(RECORD), top_k=top_k) == every[:count]
    for top_k in (0, -1, "2", 1.5, True):
        with pytest.raises(ValueError, match=rf"top_k must be a whole number >= 1 .* got {re.escape(repr(top_k))}"):
            classify(str(RECORD), top_k=top_k)


def test_ecg_classification_applies_the_function_of_the_problem_type():
    """As transformers' text classification: regression heads give their raw outputs (a QTc in ms is no
    probability), single-label a softmax, multi-label a sigmoid per class; `function_to_apply` overrides it."""
    torch.manual_seed(0)
    feature_extractor = MeritFeatureExtractor.from_model_config(tiny_ecg_config())
    batch = feature_extractor(str(RECORD), return_tensors="pt")
    expected = {
        "regression": lambda logits: logits,
        "single_label_classification": lambda logits: logits.softmax(dim=-1),
        "multi_label_classification": torch.sigmoid,
    }
    for problem_type, function in expected.items():
        id2label = {0: "QTc_ms"} if problem_type == "regression" else LABELS
        model = MeritForEcgClassification(tiny_merit_config(id2label=id2label, problem_type=problem_type)).eval()
        with torch.no_grad():
            model.classifier.bias.fill_(400.0)  # a QTc-sized output that a sigmoid would squash to 1.0
            logits = model(**batch).logits[0]
        classify = pipeline("ecg-classification", model=model, feature_extractor=feature_extractor)
        scores = {entry["label"]: entry["score"] for entry in classify(str(RECORD))}
        for index, label in id2label.items():
            assert scores[label] == pytest.approx(function(logits)[index].item(), rel=1e-6), problem_type
        for name, given in (("none", lambda x: x), ("SIGMOID", torch.sigmoid), ("softmax", lambda x: x.softmax(-1))):
            scores = {entry["label"]: entry["score"] for entry in classify(str(RECORD), function_to_apply=name)}
            assert scores[id2label[0]] == pytest.approx(given(logits)[0].item(), rel=1e-6), (problem_type, name)
    with pytest.raises(ValueError, match=r"function_to_apply must be one of \('sigmoid', 'softmax', 'none'\)"):
        classify(str(RECORD), function_to_apply="relu")
