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
    # the weights paragraph aside: without the model folder (not shipped) the weights cannot be checked here
    rendered, shipped = (_section(c.text, "## Evaluation", "## Training").split("\n\n") for c in (card, example))
    (unchecked,) = [paragraph for paragraph in rendered if paragraph.startswith("**Not checked")]
    assert "the card was rendered without the model folder" in unchecked
    (checked,) = [paragraph for paragraph in shipped if paragraph.startswith("Weights: ")]
    fingerprints = {value for file in files for value in read_results(file).model.weights_fingerprint.values()}
    assert all(f"`{fingerprint}`" in checked for fingerprint in fingerprints) and "checked when this card" in checked
    assert [p for p in rendered if p != unchecked] == [p for p in shipped if p != checked]
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
    """The WFDB card is a template (the converter cannot know the records' licence or source): it passed unedited,
    `license: other` and "Replace this section before sharing" included, and is now refused until it is edited."""
    card = REPO_ROOT / "dataset_scripts" / name / "README.md"
    if not card.is_file():
        pytest.skip(f"{card} not written yet (dataset scripts, issue 4)")
    if name != "wfdb":
        assert dataset_card_problems(card) == []
        return
    problems = dataset_card_problems(card)
    assert problems[0].startswith("license is `other` without `license_name`")
    assert [problem.split(":")[0] for problem in problems[1:]] == [
        "the card still holds the template's 'Replace this section before sharing'",
        "the card still holds the template's 'Set the licence and describe the source before you share'",
    ]
    edited = (
        card.read_text()
        .replace("license: other", "license: other\nlicense_name: ludb-terms\nlicense_link: https://x.org/terms")
        .replace("Replace this section before sharing: state", "The records come from LUDB;")
        .replace("**Set the licence and describe the source before you\nshare this card**", "The source is LUDB")
    )
    assert dataset_card_problems(DatasetCard(edited)) == []


def test_licences_are_hub_identifiers():
    """`license: not-a-license` and `license: other` without `license_name` passed every check."""
    from merit_hf.hub.cards import license_problems

    assert license_problems({"license": "apache-2.0"}) == license_problems({"license": ["mit", "cc-by-4.0"]}) == []
    assert license_problems({"license": "other", "license_name": "llama3-community"}) == []
    (unknown,) = license_problems({"license": "not-a-license"})
    assert unknown.startswith("license 'not-a-license' is not a Hub licence identifier")
    (other,) = license_problems({"license": "other"})
    assert other.startswith("license is `other` without `license_name`")
    # identifiers the Hub accepts (https://huggingface.co/docs/hub/repositories-licenses) that the list lacked
    hub_ids = ["apple-amlr", "apple-ascl", "eupl-1.2", "fair-noncommercial-research-license", "grok2-community",
               "h-research", "intel-research", "llama4", "openmdw-1.0"]  # fmt: skip
    assert [license_problems({"license": license_id}) for license_id in hub_ids] == [[]] * len(hub_ids)


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
    "report_adapter": """
        assert type(model).__name__ == "MeritForReportGeneration", type(model)
        assert getattr(model, "_hf_peft_config_loaded", False), "the adapter was not applied"
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
    if kind == "report_adapter":  # save_report_adapter's folder: LoRA + projector, processor, its base named by path
        from peft import get_peft_model

        from merit_hf.training.report_lora import (
            ReportTrainingArguments,
            base_fingerprint,
            lora_config,
            save_report_adapter,
        )

        base_dir = folder.parent / "report_base"
        leads = save_tiny_folder("report", base_dir)
        base = MeritForReportGeneration.from_pretrained(base_dir)
        peft_model = get_peft_model(base, lora_config(ReportTrainingArguments(output_dir=str(folder.parent / "run"))))
        processor = MeritProcessor.from_pretrained(base_dir)
        save_report_adapter(peft_model, processor, base.generation_config, folder, base_fingerprint(base), base_dir)
        return leads
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
        ("report_adapter", "AutoModelForCausalLM"),
    ],
)
def test_each_kind_of_folder_gets_its_own_loading_code(kind, auto_class, results_file, tmp_path):
    """A LoRA classifier's adapter folder (adapter_config.json, no config.json) got the two-tower card's code, and so
    did a report model's adapter folder (`save_report_adapter`: `task_type` null), whose `AutoModel` code fails. Each
    kind now gets its own code and metadata: an adapter's card says `library_name: peft` and names its base model (from
    `adapter_config.json`) and that it needs peft; a classifier is no `feature-extraction` model; no card offers the
    Hub's widget (`inference: false`), which would send text and no ECG."""
    folder = tmp_path / "model"
    folder.mkdir()
    expected = {"encoder": ("transformers", "feature-extraction"), "two_tower": ("transformers", "feature-extraction"),
                "classifier": ("transformers", "other"), "classifier_adapter": ("peft", "other"),
                "report": ("transformers", "text-generation"), "report_adapter": ("peft", "text-generation")}  # fmt: skip
    if kind in ("classifier_adapter", "report_adapter"):
        adapter = {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": "org/merit-ecg"}
        if kind == "report_adapter":  # as save_report_adapter writes it
            adapter = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": "org/merit-report",
                       "auto_mapping": {"base_model_class": "MeritForReportGeneration",
                                        "parent_library": "merit_hf.models.merit.modeling_merit_report"}}  # fmt: skip
        (folder / "adapter_config.json").write_text(json.dumps(adapter))
        card = render_model_card(results_file, CARD_REPO_ID, model_folder=folder)
        code = "\n".join(card_python_blocks(card))
        data = card.data.to_dict()
        assert (data["library_name"], data["pipeline_tag"]) == expected[kind]
        assert data["base_model"] == adapter["base_model_name_or_path"] and data["inference"] is False
        assert "and `peft` (this repository holds a PEFT adapter" in card.text
        assert "get_ecg_features" not in code
        if kind == "classifier_adapter":
            assert (
                f'{auto_class}.from_pretrained("{CARD_REPO_ID}", trust_remote_code=True, id2label={{0: "CD"'
                in code.replace("'", '"')
            )
            assert "merge_and_unload()" in code
        else:
            assert f'{auto_class}.from_pretrained("{CARD_REPO_ID}", trust_remote_code=True)' in code
            assert "generate(" in code and "AutoProcessor" in code
        del adapter["base_model_name_or_path"]
        (folder / "adapter_config.json").write_text(json.dumps(adapter))
        with pytest.raises(CardError, match="an adapter card needs base_model"):
            render_model_card(results_file, CARD_REPO_ID, model_folder=folder)
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
    data = card.data.to_dict()
    assert (data["library_name"], data["pipeline_tag"]) == expected[kind] and data["inference"] is False
    assert "PyTorch, NumPy and SciPy" in card.text and "also needs `wfdb` when its signals" in card.text
    assert "peft" not in card.text.split("## How to use")[1].split("```")[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["encoder", "two_tower", "classifier", "classifier_adapter", "report", "report_adapter"]
)
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


def test_a_report_folder_reads_its_input_contract_from_the_processor_config(results_file, tmp_path):
    """A report model's folder keeps its feature extractor inside `processor_config.json`; the card said "No
    `preprocessor_config.json` was found" although `AutoFeatureExtractor` loads it from there."""
    folder = tmp_path / "merit-report"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "merit_report"}))
    settings = MeritFeatureExtractor(sampling_rate=100, num_samples=1000).to_dict()
    (folder / "processor_config.json").write_text(json.dumps({"feature_extractor": settings}))
    card = render_model_card(results_file, "org/merit-report", model_folder=folder, base_model="org/tiny-llm")
    contract = _section(card.text, "## Input contract", "## Evaluation")
    assert "No feature extractor settings" not in contract
    assert "| sampling rate | 100 Hz" in contract and "| window | 1000 samples (10 s)" in contract


def test_model_index_entries_are_told_apart_by_their_keys_and_leave_shifts_out(tmp_path):
    """A robustness run gave 32 `roc_auc` entries with the keys of the clean PTB-XL test run (shifted inputs filed as
    PTB-XL test results), two label fractions shared every key but the display name, and MERL's optimistic test-split
    F1 was indexed as `f1`."""
    runs = [results_from_our_metrics(fraction) for fraction in (0.1, 1.0)]
    files = [write_results(run, tmp_path / f"probe{index}.json") for index, run in enumerate(runs)]
    robustness = SHIPPED_RESULTS / "robustness_superclass_seed0.json"
    card = render_model_card([*files, robustness], "org/merit-ecg", datasets=["org/ptbxl-merit"])
    results = ModelCard(str(card)).data.eval_results
    keys = [
        (r.task_type, r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type, r.metric_config)
        for r in results
    ]
    assert len(keys) == len(set(keys))
    assert not any("shift=" in r.metric_name for r in results)
    assert len(results) == 2 * 2 + 3  # two probe runs (AUROC, upper bound), the clean robustness run's three
    bounds = [r for r in results if r.metric_name.startswith("macro_f1_max_over_thresholds")]
    assert bounds and {r.metric_type for r in bounds} == {"f1-max-over-thresholds"}
    assert {r.metric_type for r in results if r.metric_name.startswith("macro_f1 ")} == {"f1"}
    assert (
        "| task=robustness, label_set=superclass, label_fraction=1, seed=0, shift=baseline_wander_0db |" in card.text
    )
    assert "the `model-index` metadata leaves them out" in card.text


# ----------------------------------------------------------------------------------------------------------------------
# The card's numbers are of the folder's weights
# ----------------------------------------------------------------------------------------------------------------------
def _saved_two_tower(folder: Path, seed: int) -> Path:
    import torch

    from merit_hf import MeritModel
    from tests.conftest import tiny_merit_config

    torch.manual_seed(seed)
    model = MeritModel(tiny_merit_config())
    model.save_pretrained(folder)
    MeritFeatureExtractor.from_model_config(model.config.ecg_config).save_pretrained(folder)
    return folder


def test_the_probe_records_the_weights_and_the_card_refuses_other_weights(tmp_path, caplog):
    """Any results JSON rendered a card for any folder: a random tiny encoder's card claimed the quick-start model's
    AUROC. The probe now records the evaluated weights' fingerprint; the card checks it against the folder, refuses
    other weights (or, when asked, says so in bold), and says so when a file records none."""
    from merit_hf.data import build_ptbxl
    from merit_hf.evaluation.probe import ProbeArguments, run_linear_probe

    evaluated = _saved_two_tower(tmp_path / "evaluated", seed=0)
    other = _saved_two_tower(tmp_path / "other", seed=1)
    data = build_ptbxl(BUNDLED_PTBXL, ecg_ids=range(1, 201))
    arguments = ProbeArguments(num_bootstrap=0, max_epochs=1)
    results = run_linear_probe(str(evaluated), data, "superclass", baseline=False, arguments=arguments)
    recorded = results.model.weights_fingerprint
    assert set(recorded) == {"ecg_encoder"} and len(recorded["ecg_encoder"]) == 16
    path = write_results(results, tmp_path / "results.json")
    assert read_results(path).model.weights_fingerprint == recorded

    card = render_model_card(path, "org/merit-ecg", model_folder=evaluated)
    assert f"record the fingerprint of the weights they evaluated (`{recorded['ecg_encoder']}`" in card.text
    assert "Not checked" not in card.text and "Warning" not in card.text
    with pytest.raises(CardError, match=r"the results are not of this folder's weights: linear-probe, superclass"):
        render_model_card(path, "org/merit-ecg", model_folder=other)
    flagged = render_model_card(path, "org/merit-ecg", model_folder=other, allow_weights_mismatch=True)
    assert "**Warning: these are not this checkpoint's numbers.**" in flagged.text
    assert f"ecg_encoder `{recorded['ecg_encoder']}`" in flagged.text

    legacy = json.loads(path.read_text())
    del legacy["model"]["weights_fingerprint"]  # as every file written before it was recorded
    with caplog.at_level("WARNING", logger="merit_hf.hub.cards"):
        unchecked = render_model_card(legacy, "org/merit-ecg", model_folder=other)
    assert "**Not checked against these weights:** the results files of `linear-probe, superclass" in unchecked.text
    assert "not checked against the weights" in caplog.text
    without_folder = render_model_card(path, "org/merit-ecg")
    assert "the card was rendered without the model folder" in without_folder.text


def test_zero_shot_and_lora_fine_tuning_record_what_a_card_checks(tmp_path):
    """Zero-shot numbers depend on both towers: a folder whose text tower differs is refused. A LoRA fine-tuning run
    records its saved adapter's and merged encoder's fingerprints, which the adapter's and the merged model's cards
    match."""
    import torch

    from merit_hf import MeritForEcgClassification, MeritModel
    from merit_hf.evaluation.zero_shot import zero_shot_fingerprints
    from merit_hf.hub.cards import check_weights
    from merit_hf.models.fingerprint import weights_fingerprint
    from merit_hf.training.finetune import fine_tuned_identity

    folder = _saved_two_tower(tmp_path / "two_tower", seed=0)
    run = results_from_our_metrics(task="zero-shot")
    run.model.weights_fingerprint = zero_shot_fingerprints(MeritModel.from_pretrained(folder))
    assert len(check_weights([run], folder).matched) == 1
    changed = MeritModel.from_pretrained(folder)
    with torch.no_grad():
        next(changed.text_model.parameters()).add_(1.0)  # the ECG tower as it was, another text tower
    changed.save_pretrained(tmp_path / "changed")
    MeritFeatureExtractor().save_pretrained(tmp_path / "changed")
    ((_, recorded, found),) = check_weights([run], tmp_path / "changed").mismatched
    assert recorded["ecg_encoder"] == found["ecg_encoder"] and recorded["two_tower"] != found["two_tower"]

    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    save_tiny_folder("classifier_adapter", adapter_dir)
    MeritForEcgClassification.from_pretrained(adapter_dir.parent / "base").save_pretrained(merged_dir)
    MeritFeatureExtractor().save_pretrained(merged_dir)
    identity = {"name_or_path": "base", "init": "pretrained", "weights_fingerprint": {"ecg_encoder": "0" * 16}}
    identity = fine_tuned_identity(identity, {"adapter_dir": str(adapter_dir), "merged_dir": str(merged_dir)})
    assert set(identity["weights_fingerprint"]) == {"ecg_encoder", "adapter", "fine_tuned_ecg_encoder"}
    lora = results_from_our_metrics(1.0, task="fine-tune")
    lora.model.weights_fingerprint = identity["weights_fingerprint"]
    assert len(check_weights([lora], adapter_dir).matched) == len(check_weights([lora], merged_dir).matched) == 1
    assert (
        weights_fingerprint(MeritModel.from_pretrained(folder).ecg_model)
        == zero_shot_fingerprints(MeritModel.from_pretrained(folder))["ecg_encoder"]
    )


def test_a_zero_shot_run_is_checked_on_one_load_of_the_folder(tmp_path, monkeypatch):
    """A zero-shot run's two fingerprints were checked on two loads of the folder (its encoder, then its two towers);
    one load gives both, as `zero_shot_fingerprints` records them."""
    from transformers import AutoModel

    from merit_hf import MeritModel
    from merit_hf.evaluation import probe
    from merit_hf.evaluation.zero_shot import zero_shot_fingerprints
    from merit_hf.hub.cards import check_weights

    folder = _saved_two_tower(tmp_path / "two_tower", seed=0)
    run = results_from_our_metrics(task="zero-shot")
    run.model.weights_fingerprint = zero_shot_fingerprints(MeritModel.from_pretrained(folder))
    loads, load_encoder, from_pretrained = [], probe.load_encoder, AutoModel.from_pretrained
    monkeypatch.setattr(probe, "load_encoder", lambda *args: loads.append("load_encoder") or load_encoder(*args))
    monkeypatch.setattr(
        AutoModel,
        "from_pretrained",
        lambda *args, **kwargs: loads.append("AutoModel") or from_pretrained(*args, **kwargs),
    )
    ((_, found),) = check_weights([run], folder).matched
    assert found == run.model.weights_fingerprint and loads == ["AutoModel"]
    probe_run = results_from_our_metrics(1.0)  # a probe run's encoder: loaded as the probe loads it
    probe_run.model.weights_fingerprint = {"ecg_encoder": run.model.weights_fingerprint["ecg_encoder"]}
    loads.clear()
    assert len(check_weights([probe_run], folder).matched) == 1 and loads == ["load_encoder"]


def test_a_run_is_named_with_its_seed_and_its_protocol_line_without_it():
    from merit_hf.hub.cards import run_name

    run = results_from_our_metrics(1.0, task="fine-tune", seed=3)
    run.protocol["finetune_method"] = "lora"
    assert run_name(run) == "fine-tune, lora, superclass, label_fraction=1, seed=3"
    assert run_name(run, with_seed=False) == "fine-tune, lora, superclass, label_fraction=1"
    zero_shot = results_from_our_metrics(task="zero-shot")
    zero_shot.label_fraction = None
    assert run_name(zero_shot) == "zero-shot, superclass, seed=0"
    card = render_model_card([run, zero_shot], "org/merit-ecg")
    assert "- fine-tune, lora, superclass, label_fraction=1: " in card.text
    assert "- zero-shot, superclass: " in card.text


def test_a_sharded_checkpoint_s_fingerprint_opens_each_file_once(tmp_path, monkeypatch):
    """`safetensors_files_fingerprint` opened every file twice (its tensor names, then its tensors)."""
    import safetensors

    from merit_hf import MeritModel
    from merit_hf.models.fingerprint import safetensors_files_fingerprint
    from tests.conftest import tiny_merit_config

    model = MeritModel(tiny_merit_config())
    model.save_pretrained(tmp_path / "whole")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    whole = sorted((tmp_path / "whole").glob("*.safetensors"))
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(whole) == 1 and len(shards) > 1
    opened, safe_open = [], safetensors.safe_open
    monkeypatch.setattr(
        safetensors, "safe_open", lambda path, **kwargs: opened.append(path) or safe_open(path, **kwargs)
    )
    digest = safetensors_files_fingerprint(shards)
    assert sorted(opened) == sorted(map(str, shards))
    assert (
        digest == safetensors_files_fingerprint(whole) == safetensors_files_fingerprint([*reversed(shards), shards[0]])
    )


def test_the_cards_command_line_says_what_is_wrong_in_one_line(tmp_path):
    """A card that cannot be rendered (a report model without --base-model) ended in a CardError traceback."""
    from tests.test_hub_policy import run_module

    results = write_results(results_from_our_metrics(), tmp_path / "results.json")
    folder = tmp_path / "merit-report"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "merit_report"}))
    done = run_module("merit_hf.hub.cards", "model", str(results), "--repo-id", "org/r", "--model-folder",
                      str(folder), "-o", str(tmp_path / "README.md"), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().endswith("error: a report-generation card needs base_model (the language model it "
                                        "was adapted from)")  # fmt: skip


def test_a_classifier_folder_is_told_from_a_two_tower_one_by_its_architectures_or_auto_map():
    """A classifier's `auto_map` now names `AutoModel` too (`MeritClassifierFolderAutoModel`, which refuses and says
    what loads the folder), so "an `AutoModel` entry" no longer meant a two-tower folder: the card showed a classifier
    `AutoModel` code that fails."""
    from merit_hf.hub.cards import model_kind

    classifier_map = {"AutoModelForSequenceClassification": "modeling_merit.MeritForEcgClassification"}
    refusing = {**classifier_map, "AutoModel": "modeling_merit.MeritClassifierFolderAutoModel"}
    two_tower = {**classifier_map, "AutoModel": "modeling_merit.MeritModel"}
    assert model_kind({"model_type": "merit", "auto_map": refusing}) == "classifier"
    assert model_kind({"model_type": "merit", "auto_map": classifier_map}) == "classifier"  # saved before
    assert model_kind({"model_type": "merit", "architectures": ["MeritForEcgClassification"]}) == "classifier"
    assert model_kind({"model_type": "merit", "auto_map": two_tower}) == "two_tower"
    assert model_kind({"model_type": "merit", "architectures": ["MeritForPreTraining"]}) == "two_tower"
    assert (
        model_kind({"model_type": "merit_ecg"}) == "encoder" and model_kind({"model_type": "merit_report"}) == "report"
    )
