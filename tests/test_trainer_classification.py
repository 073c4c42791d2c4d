"""`transformers.Trainer` with default arguments fine-tunes `MeritForEcgClassification`, reports the project's
metrics, saves the feature extractor, and its output folder passes `hub push`'s checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor, AutoModelForSequenceClassification, Trainer, TrainingArguments

from merit_hf import MeritFeatureExtractor, MeritForEcgClassification, MeritForPreTraining
from merit_hf.data import MeritCollator, build_ptbxl, label_names
from merit_hf.evaluation.metrics import macro_auroc
from merit_hf.hub import check_model_folder
from merit_hf.training.classification import add_trainer_columns, compute_metrics_for
from tests.conftest import BUNDLED_PTBXL, tiny_merit_config

pytestmark = pytest.mark.slow  # a real Trainer run end to end (about 25 s on 2 shared cores)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trainer")
    torch.manual_seed(0)
    pretrained = tmp_path / "pretrained"
    MeritForPreTraining(tiny_merit_config()).save_pretrained(pretrained)
    ptbxl = build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(1, 121))
    names = label_names(ptbxl, "superclass")
    feature_extractor = MeritFeatureExtractor.from_model_config(tiny_merit_config().ecg_config)
    model = MeritForEcgClassification.from_pretrained(
        pretrained, id2label=dict(enumerate(names)), label2id={name: index for index, name in enumerate(names)}
    )
    data = add_trainer_columns(ptbxl, feature_extractor, "superclass")
    arguments = TrainingArguments(  # only what a tiny CPU run needs; remove_unused_columns keeps its default (True)
        str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no", logging_steps=2,
    )  # fmt: skip
    trainer = Trainer(
        model,
        arguments,
        data_collator=MeritCollator(feature_extractor),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=feature_extractor,
        compute_metrics=compute_metrics_for(names),
    )
    before = {name: value.clone() for name, value in model.named_parameters()}
    trainer.train()
    trainer.save_model()
    return trainer, data, names, before, tmp_path / "run"


def test_trainer_trains_with_default_arguments_and_reports_the_project_metrics(trained):
    trainer, data, names, before, _ = trained
    assert trainer.args.remove_unused_columns is True
    assert trainer.state.global_step == 4
    changed = [name for name, value in trainer.model.named_parameters() if not torch.equal(value, before[name])]
    assert "classifier.weight" in changed and any(name.startswith("ecg_model.layers") for name in changed)
    metrics = trainer.evaluate()
    assert {f"eval_auroc_{name}" for name in names} <= set(metrics)
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(np.asarray(data["validation"]["ecg_values"]))).logits.numpy()
    labels = np.asarray(data["validation"]["labels"])
    assert metrics["eval_macro_auroc"] == pytest.approx(macro_auroc(labels, logits), abs=1e-6)
    assert "eval_macro_f1_max_over_thresholds" in metrics


def test_trainer_output_loads_and_passes_the_push_checks(trained):
    trainer, data, names, _, folder = trained
    assert (folder / "preprocessor_config.json").is_file() and (folder / "training_args.bin").is_file()
    problems = check_model_folder(folder)
    assert problems == ["README.md (the model card) is missing: render one with merit_hf.hub.cards"]
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    feature_extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
    assert feature_extractor.to_dict() == trainer.processing_class.to_dict()
    assert [model.config.id2label[index] for index in range(len(names))] == names
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")  # real pickled weights are still refused
    (folder / "preprocessor_config.json").rename(folder / "preprocessor_config.json.away")
    try:
        problems = check_model_folder(folder)
        assert (
            "pickled weights ['pytorch_model.bin'] (merit_hf loads safetensors only; re-save with save_pretrained)"
            in (problems)
        )
        assert any(problem.startswith("preprocessor_config.json is missing") for problem in problems)
    finally:
        (folder / "pytorch_model.bin").unlink()
        (folder / "preprocessor_config.json.away").rename(folder / "preprocessor_config.json")
