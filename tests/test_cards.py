"""Model cards rendered from a results JSON written by our own evaluation code, and the card checks."""

from __future__ import annotations

import json
import re
import runpy
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import DatasetCard, ModelCard

from merit_hf import MeritFeatureExtractor
from merit_hf.evaluation import build_results, classification_metrics, write_results
from merit_hf.evaluation.results import EvaluationResults, read_results
from merit_hf.hub.cards import (
    CardError,
    card_rows,
    dataset_card_problems,
    dataset_config_problems,
    dataset_info_problems,
    load_results,
    main,
    model_card_problems,
    render_model_card,
    write_dataset_card,
)
from tests.conftest import BUNDLED_PTBXL, REPO_ROOT, run_in_fresh_process

LABELS = ["CD", "HYP", "MI", "NORM", "STTC"]
SHIPPED_RESULTS = REPO_ROOT / "benchmarks" / "results" / "evaluation" / "quickstart"
# the runs model_cards/examples/merit-ecg-quickstart.md was rendered from (model_cards/README.md)
EXAMPLE_CARD_RUNS = ("linear-probe_superclass_1_seed0", "zero-shot_superclass_seed0", "linear-probe_rhythm_1_seed0")


def results_from_our_metrics(
    label_fraction: float = 0.1, task: str = "linear-probe", seed: int = 0
) -> EvaluationResults:
    """A results JSON as `merit_hf.evaluation` writes it; the numbers come from its metric code on fixed scores."""
    rng = np.random.default_rng(seed)
    y_true = (rng.random((60, len(LABELS))) < 0.3).astype(int)
    trained = y_true * 0.5 + rng.random(y_true.shape)
    random_init = rng.random(y_true.shape)
    model = {"name_or_path": "org/merit-ecg", "init": "pretrained"}
    model.update(classification_metrics(y_true, trained, LABELS, num_bootstrap=20))
    baseline = {"name_or_path": "random-init", "init": "random (seed 0, same config)"}
    baseline.update(classification_metrics(y_true, random_init, LABELS, num_bootstrap=20))
    return build_results(
        task=task,
        dataset_dict={},
        label_set="superclass",
        label_names=LABELS,
        label_fraction=label_fraction,
        seed=seed,
        protocol={"classifier": "logistic regression on pooler_output", "epochs": 10},
        model=model,
        baseline=baseline,
    )


@pytest.fixture
def results_file(tmp_path) -> Path:
    return write_results(results_from_our_metrics(), tmp_path / "results.json")


@pytest.fixture
def encoder_folder(tmp_path) -> Path:
    folder = tmp_path / "merit-ecg"
    MeritFeatureExtractor().save_pretrained(folder)
    config = {"model_type": "merit", "ecg_config": {"hidden_size": 32, "num_hidden_layers": 2, "patch_size": 75}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_model_card_values_come_from_the_results_json(results_file, encoder_folder):
    results = json.loads(results_file.read_text())
    card = render_model_card(results_file, "org/merit-ecg", model_folder=encoder_folder, datasets=["org/ptbxl-merit"])

    reparsed = ModelCard(str(card))  # what the Hub stores and parses back
    data = reparsed.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "feature-extraction"
    assert data["license"] == "apache-2.0"
    assert {"ecg", "custom_code"} <= set(data["tags"])
    assert data["datasets"] == ["org/ptbxl-merit"]
    assert model_card_problems(reparsed) == []

    index = {result.metric_name.split(" (")[0]: result for result in reparsed.data.eval_results}
    assert set(index) == {"macro_auroc", "macro_f1_max_over_thresholds"}
    for name, result in index.items():
        assert result.metric_value == round(results["model"]["metrics"][name]["value"], 4)
        assert result.dataset_type == "org/ptbxl-merit"
        assert result.dataset_name == "PTB-XL"
        assert result.dataset_config == "superclass"
        assert result.task_type == "multi-label-classification"
    assert index["macro_auroc"].metric_type == "roc_auc"

    text = reparsed.text
    model_auroc = results["model"]["metrics"]["macro_auroc"]
    baseline_auroc = results["baseline"]["metrics"]["macro_auroc"]["value"]
    row = next(
        line for line in text.splitlines() if line.startswith("| task=linear-probe") and "| macro_auroc |" in line
    )
    assert f"{model_auroc['value']:.3f} [{model_auroc['ci_low']:.3f}, {model_auroc['ci_high']:.3f}]" in row
    assert f"| {baseline_auroc:.3f} [" in row
    assert "label_set=superclass" in row and "label_fraction=0.1" in row
    assert "| leads, in this order | I II III aVR aVL aVF V1 V2 V3 V4 V5 V6 |" in text
    assert "250 Hz (any input rate >= 80 Hz is resampled" in text
    assert "| NaN / inf | refused, naming the lead |" in text
    assert "a sample more than 50 mV from its lead's median" in text  # the feature extractor's bounds, as saved
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()  # the range the card states is the package's own
    assert '"transformers>=5.24,<6"' in pyproject and "It needs\n`transformers>=5.24,<6`" in text
    assert 'pipeline("feature-extraction", model="org/merit-ecg", trust_remote_code=True)' in text
    assert "Research use only" in text and "Wagner" in text
    assert 'AutoModel.from_pretrained("org/merit-ecg", trust_remote_code=True)' in text


def test_the_card_says_when_the_loss_weights_were_balanced(results_file, encoder_folder):
    """A gradient-norm-balanced model's card read "reconstruction_weight=1.0, contrastive_weight=1.0", its starting
    weights; the balancing (and the decoder) are now named. A fixed-weight model's line is as before."""
    config = json.loads((encoder_folder / "config.json").read_text())
    config.update(reconstruction_weight=1.0, contrastive_weight=1.0)
    (encoder_folder / "config.json").write_text(json.dumps(config))
    fixed = str(render_model_card(results_file, "org/merit-ecg", model_folder=encoder_folder))
    assert "Loss weights: reconstruction_weight=1.0, contrastive_weight=1.0.\n" in fixed
    config.update(loss_balancing="gradient_norm", loss_balancing_interval=10, loss_balancing_max_ratio=100.0)
    config["ecg_config"]["decoder_attention"] = "axial"
    (encoder_folder / "config.json").write_text(json.dumps(config))
    balanced = str(render_model_card(results_file, "org/merit-ecg", model_folder=encoder_folder))
    assert "patch_size=75, decoder_attention=axial." in balanced
    assert (
        "contrastive_weight=1.0 (loss_balancing=gradient_norm: the reconstruction weight starts there and follows the "
        "two terms' gradient norms into the encoder, re-measured every 10 steps, within 100.0x of it)." in balanced
    )


def test_the_protocol_lines_name_the_label_fraction_and_leave_it_out_of_zero_shot():
    """A zero-shot run's protocol line read "zero-shot, superclass, None:"."""
    card = ModelCard.load(REPO_ROOT / "model_cards" / "examples" / "merit-ecg-quickstart.md").text
    assert "- zero-shot, superclass: scores=" in card and "- linear-probe, rhythm, label_fraction=1: " in card
    assert "None:" not in card


def test_several_runs_pair_each_number_with_its_baseline():
    runs = [results_from_our_metrics(fraction) for fraction in (0.01, 1.0)]
    rows = card_rows(load_results([runs[0], runs[1].to_dict()]))  # a run as an object or as its JSON layout
    assert [row.field("label_fraction") for row in rows] == ["0.01", "1"]
    for row, run in zip(rows, runs, strict=True):
        assert row.baseline is not None and row.baseline.name_or_path == "random-init"
        assert row.baseline.metrics["macro_auroc"].value == run.baseline.metrics["macro_auroc"].value
        assert row.model.metrics["macro_auroc"].value == run.model.metrics["macro_auroc"].value
        assert row.model.metrics["macro_auroc"].value != row.baseline.metrics["macro_auroc"].value


def test_each_seed_is_paired_with_its_own_baseline(encoder_folder, tmp_path):
    runs = [results_from_our_metrics(1.0, seed=seed) for seed in (0, 1)]
    rows = card_rows(runs)
    assert [row.field("seed") for row in rows] == ["0", "1"]
    for row, run in zip(rows, runs, strict=True):
        assert row.baseline.metrics["macro_auroc"].value == run.baseline.metrics["macro_auroc"].value
    files = [write_results(run, tmp_path / f"seed{index}.json") for index, run in enumerate(runs)]
    card = render_model_card(files, "org/merit-ecg", model_folder=encoder_folder)
    names = [metric.metric_name for metric in card.data.eval_results]
    assert len(names) == len(set(names)), "two seeds gave the same model-index metric name"
    rows = [line for line in str(card).splitlines() if line.startswith("| ") and "| macro_auroc |" in line]
    assert len(rows) == 2 and "seed=0" in rows[0] and "seed=1" in rows[1]
    assert f"{runs[1].baseline.metrics['macro_auroc'].value:.3f}" in rows[1]


def test_report_model_card_needs_and_names_its_base_model(results_file, tmp_path):
    folder = tmp_path / "merit-report"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "merit_report"}))
    with pytest.raises(CardError, match="needs base_model"):
        render_model_card(results_file, "org/merit-report", model_folder=folder)
    card = render_model_card(results_file, "org/merit-report", model_folder=folder, base_model="org/tiny-llm")
    assert card.data.base_model == "org/tiny-llm"
    assert card.data.pipeline_tag == "text-generation"
    assert "report-generation" in card.data.tags


def test_results_without_a_trained_model_are_refused(tmp_path):
    results = results_from_our_metrics().to_dict()
    with pytest.raises(CardError, match="the results file has no model"):
        render_model_card({**results, "model": None}, "org/x")
    with pytest.raises(CardError, match=r"not a merit_hf.results/v1 results file \(schema None\)"):
        render_model_card({"task": "linear-probe", "baseline": results["baseline"]}, "org/x")
    (tmp_path / "entry.json").write_text(json.dumps({**results, "model": {"name_or_path": "org/x"}}))
    with pytest.raises(CardError, match=r"entry.json: malformed .*'metrics' mapping"):
        render_model_card(tmp_path / "entry.json", "org/x")
    with pytest.raises(CardError, match="results JSON not found"):
        render_model_card(tmp_path / "missing.json", "org/x")


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end)]


def test_the_shipped_results_files_still_render_the_shipped_example_card():
    """The shipped results files give, number for number, the card that model_cards/examples holds (its model-index
    and its evaluation section; the rest comes from the model folder), and a row's cells are the file's values."""
    example = ModelCard.load(REPO_ROOT / "model_cards" / "examples" / "merit-ecg-quickstart.md")
    files = [SHIPPED_RESULTS / f"{name}.json" for name in EXAMPLE_CARD_RUNS]
    card = render_model_card(files, "org/merit-ecg-quickstart", datasets=["org/ptbxl-merit"])
    assert card.data.to_dict()["model-index"] == example.data.to_dict()["model-index"]
    assert _section(card.text, "## Evaluation", "## Training") == _section(
        example.text, "## Evaluation", "## Training"
    )
    raw = json.loads((SHIPPED_RESULTS / "linear-probe_superclass_1_seed0.json").read_text())

    def cell(metric: dict) -> str:
        return f"{metric['value']:.3f} [{metric['ci_low']:.3f}, {metric['ci_high']:.3f}]"

    model, baseline = raw["model"]["metrics"]["macro_auroc"], raw["baseline"]["metrics"]["macro_auroc"]
    row = "| task=linear-probe, label_set=superclass, label_fraction=1, seed=0 | macro_auroc | "
    assert f"{row}{cell(model)} | {cell(baseline)} | {raw['dataset']['num_records']['test']} |" in card.text


def test_a_run_that_records_its_records_rate_and_feature_extractor_renders_the_rate_not_the_settings(tmp_path):
    """Newer results files record `dataset.sampling_rate` and `protocol.feature_extractor` (the shipped ones do not,
    and render as before): the card says the rate once, and leaves the feature extractor's settings to its
    preprocessing section rather than repeating them in every protocol line."""
    data = json.loads((SHIPPED_RESULTS / "linear-probe_superclass_1_seed0.json").read_text())
    data["dataset"].update(sampling_rate=100, label_threshold=0.0, source="data/ptbxl_sample")
    data["protocol"]["feature_extractor"] = {"sampling_rate": 250, "num_samples": 2250, "normalization": "zscore_lead"}
    (tmp_path / "new.json").write_text(json.dumps(data))
    card = render_model_card(tmp_path / "new.json", "org/merit-ecg-quickstart").text
    assert "Records' sampling rate: 100 Hz (before the feature extractor resamples them)." in card
    assert "feature_extractor=" not in card and "learning_rate=0.001" in card
    shipped = render_model_card(SHIPPED_RESULTS / "linear-probe_superclass_1_seed0.json", "org/x").text
    assert "sampling rate" not in shipped


def test_a_robustness_run_gives_each_shift_its_own_model_and_baseline_rows():
    """Shifts are read from the run's `shifts`, not guessed from names: `baseline_wander_0db` is a shift of the model
    (the name-matching reader of 0.1 took it for a baseline and left its row out)."""
    path = SHIPPED_RESULTS / "robustness_superclass_seed0.json"
    raw = json.loads(path.read_text())
    rows = {row.field("shift"): row for row in card_rows(load_results(path))}
    assert list(rows) == [None, *raw["shifts"]]
    wander = rows["baseline_wander_0db"]
    assert (
        wander.model.metrics["macro_auroc"].value
        == raw["shifts"]["baseline_wander_0db"]["model"]["metrics"]["macro_auroc"]["value"]
    )
    assert (
        wander.baseline.metrics["macro_auroc"].value
        == raw["shifts"]["baseline_wander_0db"]["baseline"]["metrics"]["macro_auroc"]["value"]
    )
    assert (
        wander.setting_text() == "task=robustness, label_set=superclass, label_fraction=1, seed=0, "
        "shift=baseline_wander_0db"
    )
    assert rows[None].model == read_results(path).model


def test_cards_cli_renders_and_checks(results_file, encoder_folder, tmp_path, capsys):
    output = tmp_path / "README.md"
    main(
        [
            "model",
            str(results_file),
            "--repo-id",
            "org/merit-ecg",
            "--model-folder",
            str(encoder_folder),
            "-o",
            str(output),
        ]
    )
    main(["check", str(output)])
    assert capsys.readouterr().out.endswith(": ok\n")


def test_dataset_card_checks(tmp_path):
    bad = tmp_path / "README.md"
    bad.write_text("---\nlicense: cc-by-4.0\n---\n# A dataset\n")
    assert dataset_card_problems(bad) == [
        "metadata 'pretty_name' is missing",
        "metadata 'tags' is missing",
        "no citation of the source data",
        "the text does not state the licence",
    ]


@pytest.mark.parametrize("name", ["ptbxl", "mimic_iv_ecg", "wfdb"])
def test_shipped_dataset_cards_are_complete(name):
    card = REPO_ROOT / "dataset_scripts" / name / "README.md"
    if not card.is_file():
        pytest.skip(f"{card} not written yet (dataset scripts, issue 4)")
    assert dataset_card_problems(card) == []


TWO_CONFIG_CARD = """---
license: cc-by-4.0
pretty_name: Two rates
tags:
- ecg
configs:
- config_name: 100hz
  default: true
  data_files:
  - split: train
    path: 100hz/train-*.parquet
  - split: test
    path: 100hz/test-*.parquet
- config_name: 500hz
  data_files:
  - split: train
    path: 500hz/train-*.parquet
---
# Two rates

Licence CC BY 4.0; cite https://doi.org/10.1038/s41597-020-0495-6.
"""


def _write_rows(path, num_rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"ecg_id": list(range(num_rows))}), path)


def test_dataset_card_configs_need_their_files(tmp_path, capsys):
    template = tmp_path / "template.md"
    template.write_text(TWO_CONFIG_CARD)
    folder = tmp_path / "converted"
    (folder / "100hz").mkdir(parents=True)
    _write_rows(folder / "100hz" / "train-00000-of-00001.parquet", 1490)

    assert dataset_config_problems(template, folder) == [
        f"configs entry '100hz': data_files 100hz/test-*.parquet match no file in {folder}",
        f"configs entry '500hz': data_files 500hz/train-*.parquet match no file in {folder}",
    ]
    # a config without any file is left out of the written card; a partial one stays, for the check to name
    card = write_dataset_card(template, folder)
    assert [config["config_name"] for config in DatasetCard.load(card).data.configs] == ["100hz"]
    assert dataset_card_problems(card, data_folder=folder) == [
        f"configs entry '100hz': data_files 100hz/test-*.parquet match no file in {folder}"
    ]
    _write_rows(folder / "100hz" / "test-00000-of-00001.parquet", 255)
    card = write_dataset_card(template, folder)  # the card gives this folder's rows, not the full data set's
    data = DatasetCard.load(card).data.to_dict()
    assert data["dataset_info"] == [
        {
            "config_name": "100hz",
            "splits": [  # num_bytes: one int64 column, 8 bytes a row, and its validity bitmap, a bit a row
                {"name": "train", "num_bytes": 8 * 1490 + 187, "num_examples": 1490},
                {"name": "test", "num_bytes": 8 * 255 + 32, "num_examples": 255},
            ],
        }
    ]
    assert data["size_categories"] == ["1K<n<10K"]
    assert dataset_card_problems(card, data_folder=folder) == []
    _write_rows(folder / "100hz" / "test-00001-of-00001.parquet", 3)  # more rows than the card says
    assert dataset_card_problems(card, data_folder=folder) == [
        f"dataset_info '100hz' split 'test': num_examples 255, but the files in {folder} hold 258 rows (write the "
        "card with write_dataset_card)"
    ]
    (folder / "100hz" / "test-00001-of-00001.parquet").unlink()
    assert dataset_card_problems(template) == []  # without a data folder: the shipped template is complete
    main(["check", str(card), "--kind", "dataset", "--data-folder", str(folder)])
    assert capsys.readouterr().out == f"{card}: ok\n"
    with pytest.raises(SystemExit, match="configs entry '500hz': data_files 500hz/train-\\*.parquet match no file"):
        main(["check", str(template), "--kind", "dataset", "--data-folder", str(folder)])


def _write_records(path, ecg_ids: list[int], row_group_size: int) -> None:
    """Rows shaped like a conversion's: a float32 signal per record, a report (one missing), a label list."""
    import datasets

    features = datasets.Features(
        {
            "ecg_id": datasets.Value("int32"),
            "signal": datasets.Array2D((20, 12), "float32"),
            "report": datasets.Value("string"),
            "superclass": datasets.List(datasets.ClassLabel(names=LABELS)),
        }
    )
    rng = np.random.default_rng(len(ecg_ids))
    rows = {
        "ecg_id": ecg_ids,
        "signal": rng.standard_normal((len(ecg_ids), 20, 12)).astype("float32").tolist(),
        "report": [None if i == 3 else "sinus rhythm " * (i % 4) for i in range(len(ecg_ids))],
        "superclass": [list(range(i % 3)) for i in range(len(ecg_ids))],
    }
    datasets.Dataset.from_dict(rows, features=features).to_parquet(path, batch_size=row_group_size)


def test_written_dataset_card_loads_without_a_datasets_warning_and_gives_its_own_num_bytes(tmp_path):
    """Without `num_bytes` in its `dataset_info` splits, `datasets.load_dataset(folder)` warned on every load that the
    splits were malformed and ignored the card's counts; the checks said ok."""
    import logging

    import datasets

    template = tmp_path / "template.md"
    template.write_text(TWO_CONFIG_CARD)
    folder = tmp_path / "converted"
    (folder / "100hz").mkdir(parents=True)
    _write_records(folder / "100hz" / "train-00000-of-00002.parquet", list(range(23)), row_group_size=10)
    _write_records(folder / "100hz" / "train-00001-of-00002.parquet", list(range(23, 30)), row_group_size=4)
    _write_records(folder / "100hz" / "test-00000-of-00001.parquet", list(range(30, 38)), row_group_size=8)
    card = write_dataset_card(template, folder)
    stated = {split["name"]: split for split in DatasetCard.load(card).data.to_dict()["dataset_info"][0]["splits"]}
    assert dataset_card_problems(card, data_folder=folder) == []

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    datasets_logger = logging.getLogger("datasets")
    datasets_logger.addHandler(handler)
    try:
        loaded = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "cache_card"))
    finally:
        datasets_logger.removeHandler(handler)
    assert [record.getMessage() for record in records if "dataset_info" in record.getMessage()] == []
    # datasets' own sizes, computed while it builds the same files into its cache without our card
    files = {split: sorted(str(path) for path in (folder / "100hz").glob(f"{split}-*.parquet")) for split in stated}
    plain = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "cache_plain"))
    for split in ("train", "test"):
        assert stated[split]["num_examples"] == loaded[split].num_rows == (30 if split == "train" else 8)
        assert stated[split]["num_bytes"] == plain[split].info.splits[split].num_bytes > 0
        assert loaded[split].info.splits[split].num_bytes == stated[split]["num_bytes"]


def test_dataset_info_splits_without_num_bytes_are_refused(tmp_path):
    card = tmp_path / "README.md"
    card.write_text(
        TWO_CONFIG_CARD.replace(
            "---\n# Two rates",
            "dataset_info:\n- config_name: 100hz\n  splits:\n  - name: train\n    num_examples: 3\n---\n# Two rates",
        )
    )
    problem = (
        "dataset_info '100hz' split 'train' lacks num_bytes: datasets.load_dataset would ignore the card's split "
        "counts (write the card with write_dataset_card)"
    )
    assert dataset_info_problems(card) == [problem]
    assert dataset_card_problems(card) == [problem]
    with pytest.raises(SystemExit, match=re.escape(problem)):
        main(["check", str(card), "--kind", "dataset"])


@pytest.mark.parametrize(
    "script", sorted(str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "dataset_scripts").glob("*/*.py"))
)
def test_dataset_scripts_print_their_help(script, monkeypatch, capsys):
    """`python dataset_scripts/<name>/<script>.py --help` works (argparse formats every help string with `%`)."""
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# The card's "How to use" code runs, for each kind of MERIT folder
# ----------------------------------------------------------------------------------------------------------------------
CARD_REPO_ID = "org/merit-card-test"
CARD_RECORD = "records100/00000/00001_lr"  # the record path the snippets show
CLASS_NAMES = {0: "NORM", 1: "MI", 2: "CD"}
# After the card's code: what each kind's snippets must have given (names the snippets define).
SNIPPET_CHECKS = {
    "encoder": """
        assert type(model).__name__ == "MeritEcgModel", type(model)
        assert type(classifier).__name__ == "MeritForEcgClassification" and classifier.config.num_labels == 5
        """,
    "two_tower": """
        assert type(model).__name__ == "MeritModel", type(model)
        """,
    "classifier": """
        assert type(model).__name__ == "MeritForEcgClassification" and tuple(logits.shape) == (1, 3)
        assert sorted(score["label"] for score in scores) == ["CD", "MI", "NORM"], scores
        """,
    "classifier_adapter": """
        assert type(merged).__name__ == "MeritForEcgClassification" and tuple(logits.shape) == (1, 5), logits.shape
        """,
    "report": """
        assert type(model).__name__ == "MeritForReportGeneration", type(model)
        assert isinstance(report, str), report
        """,
}


def save_tiny_folder(kind: str, folder: Path) -> list[str]:
    """A `save_pretrained` folder of one kind of MERIT model with its feature extractor (and, for the report model,
    its processor); returns the lead names of its feature extractor."""
    import torch

    from merit_hf import (
        MeritEcgModel,
        MeritForEcgClassification,
        MeritForReportGeneration,
        MeritModel,
        MeritProcessor,
    )
    from tests.conftest import tiny_ecg_config, tiny_merit_config

    torch.manual_seed(0)
    if kind == "classifier_adapter":  # the probe command's LoRA output: adapter + head, its base named by path
        from merit_hf.evaluation.probe import ProbeArguments
        from merit_hf.training.classifier_lora import add_lora, save_lora_classifier

        base_dir = folder.parent / "base"
        MeritModel(tiny_merit_config()).save_pretrained(base_dir)
        MeritFeatureExtractor().save_pretrained(base_dir)
        classifier = MeritForEcgClassification.from_pretrained(base_dir, id2label=dict(enumerate(LABELS)))
        peft_model = add_lora(classifier, ProbeArguments(mode="finetune", finetune_method="lora"))
        save_lora_classifier(peft_model, MeritFeatureExtractor(), folder)
        return list(MeritFeatureExtractor().lead_names)
    if kind == "report":
        from tests.test_report_generation import ECG_CONFIG, tiny_llama, train_sentencepiece_tokenizer

        tokenizer = train_sentencepiece_tokenizer(folder.parent / "spm")
        ecg_config = tiny_ecg_config(**ECG_CONFIG)
        model = MeritForReportGeneration.from_parts(
            MeritEcgModel(ecg_config), tiny_llama(len(tokenizer)), tokenizer, ecg_tokens_per_lead=2
        )
        feature_extractor = MeritFeatureExtractor.from_model_config(ecg_config)
        MeritProcessor(feature_extractor, tokenizer, ecg_seq_length=model.config.ecg_seq_length).save_pretrained(
            folder
        )
    else:
        model = {
            "encoder": lambda: MeritEcgModel(tiny_ecg_config()),
            "two_tower": lambda: MeritModel(tiny_merit_config()),
            "classifier": lambda: MeritForEcgClassification(tiny_merit_config(id2label=CLASS_NAMES)),
        }[kind]()
        feature_extractor = MeritFeatureExtractor()
    model.save_pretrained(folder)
    feature_extractor.save_pretrained(folder)
    return list(feature_extractor.lead_names)


def card_python_blocks(card: ModelCard) -> list[str]:
    return re.findall(r"```python\n(.*?)```", _section(card.text, "## How to use", "## Intended use"), flags=re.DOTALL)


@pytest.mark.parametrize(
    ("kind", "auto_class"),
    [
        ("encoder", "AutoModel"),
        ("two_tower", "AutoModel"),
        ("classifier", "AutoModelForSequenceClassification"),
        ("classifier_adapter", "AutoPeftModelForSequenceClassification"),
        ("report", "AutoModelForCausalLM"),
    ],
)
def test_each_kind_of_folder_gets_its_own_loading_code(kind, auto_class, results_file, tmp_path):
    """A LoRA classifier's adapter folder (adapter_config.json, no config.json) got the two-tower card's code."""
    folder = tmp_path / "model"
    folder.mkdir()
    if kind == "classifier_adapter":
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS"}))
        card = render_model_card(results_file, CARD_REPO_ID, model_folder=folder)
        code = "\n".join(card_python_blocks(card))
        assert (
            f'{auto_class}.from_pretrained("{CARD_REPO_ID}", trust_remote_code=True, id2label={{0: "CD"'
            in code.replace("'", '"')
        )
        assert "get_ecg_features" not in code and "merge_and_unload()" in code
        return
    auto_map = {"encoder": {"AutoModel": "x"}, "two_tower": {"AutoModel": "x"},
                "classifier": {"AutoModelForSequenceClassification": "x"}, "report": {}}[kind]  # fmt: skip
    model_type = {"encoder": "merit_ecg", "report": "merit_report"}.get(kind, "merit")
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "auto_map": auto_map}))
    card = render_model_card(results_file, CARD_REPO_ID, model_folder=folder, base_model="org/tiny-llm")
    code = "\n".join(card_python_blocks(card))
    assert f'{auto_class}.from_pretrained("{CARD_REPO_ID}", trust_remote_code=True)' in code
    assert ("get_ecg_features" in code) == (kind == "two_tower")
    assert ("generate(" in code) == (kind == "report")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["encoder", "two_tower", "classifier", "classifier_adapter", "report"])
def test_the_cards_how_to_use_code_runs_without_merit_hf(kind, results_file, tmp_path):
    """The card's Python blocks, run as written in a process that cannot import merit_hf, with the saved tiny folder
    for the repo id, a random 10 s 500 Hz signal and the feature extractor's lead names for `signal` and `leads`, and
    a bundled PTB-XL record for the example path."""
    from tests.test_core_remote_code import BLOCK_MERIT_HF

    folder = tmp_path / "model"
    leads = save_tiny_folder(kind, folder)
    card = render_model_card(results_file, CARD_REPO_ID, model_folder=folder, base_model="org/tiny-llm")
    blocks = card_python_blocks(card)
    assert blocks, "the card shows no Python code"
    code = "\n".join(blocks).replace(CARD_REPO_ID, str(folder)).replace(CARD_RECORD, str(BUNDLED_PTBXL / CARD_RECORD))
    script = (
        BLOCK_MERIT_HF
        + "import numpy as np\n"
        + "signal = np.random.default_rng(0).normal(scale=0.3, size=(5000, 12))\n"
        + f"leads = {leads!r}\n"
        + code
        + textwrap.dedent(SNIPPET_CHECKS[kind])
        + "print('SNIPPETS-OK')\n"
    )
    run_in_fresh_process(script, tmp_path, "SNIPPETS-OK", context=f"{code}\n")


def test_full_and_lora_fine_tuning_of_one_setting_get_rows_of_their_own(encoder_folder, tmp_path):
    """A LoRA fine-tuning run (`protocol.finetune_method`) and a full one of the same setting were two card rows of
    the same name; the LoRA row now says `method=lora`."""
    full, lora = (results_from_our_metrics(1.0, task="fine-tune", seed=seed) for seed in (0, 1))
    full.protocol["finetune_method"], lora.protocol["finetune_method"] = "full", "lora"
    lora.seed = full.seed
    rows = card_rows([full, lora])
    assert [row.field("method") for row in rows] == [None, "lora"]
    assert len({row.setting for row in rows}) == 2
    files = [write_results(run, tmp_path / f"{name}.json") for name, run in (("full", full), ("lora", lora))]
    card = str(render_model_card(files, "org/merit-ecg", model_folder=encoder_folder))
    assert (
        "- fine-tune, lora, superclass, label_fraction=1: " in card
        and "- fine-tune, superclass, label_fraction=1: " in card
    )
