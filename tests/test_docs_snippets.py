"""Every Python block of the README runs as written, and what its comments promise holds.

A snippet that raises on its first line, or a comment that promises a number the code no longer gives, is what a
reader copies first. Here each fenced `python` block of README.md is read from the Markdown (so the test follows the
README as it changes) and executed with `exec`, statement by statement, in a working folder where every path the
README names exists: `quickstart_output/model` (a tiny random two-tower model with the quick-start's ECG settings,
feature extractor and a tokenizer trained here), `data/ptbxl_sample` (the bundled records), `ptbxl_merit` and
`mimic_merit` (converted here from real records), `outputs/report-smollm2/adapter` (a tiny report LoRA adapter). The
names a block uses but does not define are the ones its prose gives the reader (`folder`, `signal`, `leads`,
`dataset`, ...): real 500 Hz PTB-XL records and the tiny models, nothing more. Then the claims of its comments are
read from the block and checked against what it computed (`488 records (344/78/66)`, the `record_index` list, ...).

Each block is found by a key, a piece of its code that must occur in exactly one block: a README edit that removes a
block or adds one fails here, naming it, instead of being skipped in silence. Every block runs; none is skipped (the
MIMIC-IV-ECG block reads records written in its PhysioNet layout from real PTB-XL signals, as
tests/test_data_mimic.py does). A README text found wrong is listed in `README_ERRATA` with the text that is right:
the block runs and is checked with the correction, and reports an expected failure until the README is fixed.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import BUNDLED_PTBXL, REPO_ROOT, tiny_merit_config, train_tiny_tokenizer
from tests.test_data_mimic import STUDIES, write_mimic_root

README = REPO_ROOT / "README.md"
# the quick-start's ECG settings (configs/quickstart.yaml): what `quickstart_output/model` holds after the quick-start
QUICKSTART_ECG = {"sampling_rate": 100, "num_samples": 1000, "patch_size": 50, "decoder_attention": "axial"}
RECORDS500 = BUNDLED_PTBXL / "records500" / "00000"


@dataclass(frozen=True)
class DocumentedBlock:
    line: int  # the README line of the block's first code line
    code: str

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def documented_python_blocks(text: str | None = None) -> list[DocumentedBlock]:
    """The fenced `python` blocks of README.md, in order."""
    blocks, fence, start, lines = [], None, 0, []
    for number, line in enumerate((text if text is not None else README.read_text(encoding="utf-8")).splitlines(), 1):
        if line.lstrip().startswith("```"):
            if fence is None:
                fence, start, lines = line.strip()[3:].strip(), number + 1, []
            else:
                if fence == "python":
                    blocks.append(DocumentedBlock(start, "\n".join(lines) + "\n"))
                fence = None
        elif fence is not None:
            lines.append(line)
    return blocks


BLOCKS = documented_python_blocks()


@dataclass
class RanBlock:
    """A block after it ran: its namespace, the value of each expression statement (by its source text), and what it
    printed."""

    block: DocumentedBlock
    namespace: dict[str, Any]
    values: dict[str, Any] = field(default_factory=dict)
    assigned: dict[str, Any] = field(default_factory=dict)  # what each `name = ...` statement bound, by its text
    stdout: str = ""

    def value_of(self, expression: str) -> Any:
        """The value of the one expression statement whose text starts with `expression`."""
        matches = [value for source, value in self.values.items() if source.startswith(expression)]
        assert len(matches) == 1, f"{self.block}: {len(matches)} expression statements start with {expression!r}"
        return matches[0]

    def claim(self, pattern: str) -> re.Match:
        """The block's text matched by `pattern` (a comment's promise); a README edit that drops it fails here."""
        match = re.search(pattern, self.block.code)
        assert match, f"{self.block}: the block no longer holds {pattern!r}; update tests/test_docs_snippets.py"
        return match


def run_block(block: DocumentedBlock, namespace: dict[str, Any]) -> RanBlock:
    """`exec` the block's top-level statements one by one in `namespace`, keeping each bare expression's value (what
    the README shows as `inputs["record_index"]  # [0, 0, ...]`). Tracebacks name README.md and its line numbers."""
    tree = ast.parse(block.code)
    ran = RanBlock(block, namespace)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        for statement in tree.body:
            source = ast.get_source_segment(block.code, statement)
            ast.increment_lineno(statement, block.line - 1)
            if isinstance(statement, ast.Expr):
                code = compile(ast.Expression(statement.value), "README.md", "eval")
                ran.values[source] = eval(code, namespace)  # noqa: S307 - the README's own code
            else:
                exec(compile(ast.Module([statement], type_ignores=[]), "README.md", "exec"), namespace)  # noqa: S102
                if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name):
                    ran.assigned[source] = namespace[statement.targets[0].id]
    ran.stdout = output.getvalue()
    return ran


# ----------------------------------------------------------------------------------------------------------------------
# The working folder: every path the README names
# ----------------------------------------------------------------------------------------------------------------------


def read_500hz(ecg_id: int) -> tuple[np.ndarray, list[str]]:
    import wfdb

    signal, fields = wfdb.rdsamp(str(RECORDS500 / f"{ecg_id:05d}_hr"))
    return signal, list(fields["sig_name"])


@pytest.fixture(scope="module")
def docs_folder(tmp_path_factory) -> Path:
    """A working folder holding what the README's paths name, built from tiny random models and real records."""
    from merit_hf import MeritFeatureExtractor, MeritForPreTraining, MeritProcessor
    from merit_hf.data import convert_mimic_iv_ecg, convert_ptbxl

    root = tmp_path_factory.mktemp("docs")
    (root / "data").mkdir()
    (root / "data" / "ptbxl_sample").symlink_to(BUNDLED_PTBXL, target_is_directory=True)

    torch.manual_seed(0)
    config = tiny_merit_config(QUICKSTART_ECG)
    model_folder = root / "quickstart_output" / "model"
    MeritForPreTraining(config).save_pretrained(model_folder)
    tokenizer = train_tiny_tokenizer(root / "tokenizer")
    feature_extractor = MeritFeatureExtractor.from_model_config(config.ecg_config)
    MeritProcessor(feature_extractor, tokenizer, max_length=64).save_pretrained(model_folder)

    convert_ptbxl(BUNDLED_PTBXL, root / "ptbxl_merit", sampling_rate=100)
    convert_mimic_iv_ecg(write_mimic_root(root / "mimic-iv-ecg"), root / "mimic_merit", records_per_shard=2)
    write_report_adapter(root / "outputs" / "report-smollm2")
    return root


def write_report_adapter(output: Path) -> None:
    """`output/adapter` (and the base model it names in `output/base_model`) as `report_lora` saves them: a tiny
    encoder with the quick-start's ECG settings, a tiny Llama and a LoRA on it (tests/test_report_generation.py)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merit_hf import MeritEcgModel, MeritFeatureExtractor, MeritForReportGeneration, MeritProcessor
    from merit_hf.training.report_lora import (
        ReportTrainingArguments,
        base_fingerprint,
        lora_config,
        save_report_adapter,
    )
    from tests.conftest import tiny_ecg_config
    from tests.test_report_generation import tiny_llama, train_sentencepiece_tokenizer

    lm_folder = output / "language_model"
    tokenizer = train_sentencepiece_tokenizer(lm_folder / "spm")
    tiny_llama(len(tokenizer)).save_pretrained(lm_folder)
    tokenizer.save_pretrained(lm_folder)
    ecg_config = tiny_ecg_config(**QUICKSTART_ECG)
    tokenizer = AutoTokenizer.from_pretrained(lm_folder)
    model = MeritForReportGeneration.from_parts(
        MeritEcgModel(ecg_config), AutoModelForCausalLM.from_pretrained(lm_folder), tokenizer, ecg_tokens_per_lead=2
    ).eval()
    processor = MeritProcessor(
        MeritFeatureExtractor.from_model_config(ecg_config), tokenizer, ecg_seq_length=model.config.ecg_seq_length
    )
    model.save_pretrained(output / "base_model")
    fingerprint = base_fingerprint(model)
    peft_model = get_peft_model(model, lora_config(ReportTrainingArguments(lora_r=2, lora_alpha=4)))
    save_report_adapter(
        peft_model, processor, model.generation_config, output / "adapter", fingerprint, output / "base_model"
    )


@pytest.fixture
def in_docs_folder(docs_folder, monkeypatch) -> Path:
    monkeypatch.chdir(docs_folder)
    return docs_folder


# ----------------------------------------------------------------------------------------------------------------------
# Each block: the names its prose gives the reader, and the checks of its comments
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockCheck:
    key: str  # a piece of code that occurs in exactly one README python block
    given: Callable[[], dict[str, Any]]  # the names its prose gives the reader, built in the working folder
    check: Callable[[RanBlock], None]
    after: str | None = None  # the key of a block it continues (it runs first, in the same namespace)


QUICKSTART_MODEL = "quickstart_output/model"


def given_a_record() -> dict[str, Any]:
    """`folder`, and `signal`, `leads` "as WFDB gives it": a real 500 Hz PTB-XL record."""
    signal, leads = read_500hz(1)
    return {"folder": QUICKSTART_MODEL, "signal": signal, "leads": leads}


def given_nothing() -> dict[str, Any]:
    return {}


def check_using_the_model(ran: RanBlock) -> None:
    shape = tuple(int(size) for size in ran.claim(r"signal: \((\d+), (\d+)\) as WFDB gives it").groups())
    assert ran.namespace["signal"].shape == shape
    model, batch = ran.namespace["model"], ran.namespace["batch"]
    projected, features = ran.namespace["projected"], ran.namespace["features"]
    with torch.no_grad():  # `projected` is the projection of the encoder's pooled output, `features` that output
        pooled = model.ecg_model(**batch).pooler_output
        torch.testing.assert_close(projected, model.ecg_projection(pooled))
    torch.testing.assert_close(features, pooled)
    assert projected.shape == (1, model.config.projection_dim) and torch.isfinite(projected).all()
    assert features.shape == (1, model.config.ecg_config.hidden_size)
    ran.claim(r"\(1, projection_dim\): the ECG-report shared space")
    ran.claim(r"\(1, hidden_size\): the encoder's own pooled features")


def check_precision(ran: RanBlock) -> None:
    ran.claim(r"a converted copy; `model` is left as it is")
    from merit_hf import MeritModel

    model, batch = ran.namespace["model"], ran.namespace["batch"]
    assert not model.training
    as_saved = MeritModel.from_pretrained(QUICKSTART_MODEL).state_dict()
    for name, value in model.state_dict().items():
        assert value.dtype == as_saved[name].dtype and torch.equal(value, as_saved[name]), f"{name} was changed"
    with torch.no_grad():
        reference = model.ecg_model(**batch).pooler_output
    features = ran.namespace["features"]
    assert features.shape == reference.shape
    cosine = torch.nn.functional.cosine_similarity(features.float(), reference).item()
    assert cosine > 0.99, f"the {features.dtype} copy's features are {cosine:.5f} from the model's"


def given_subclass_names() -> dict[str, Any]:
    from merit_hf.data import label_names, load_dataset

    names = label_names(load_dataset("ptbxl", "data/ptbxl_sample"), "subclass")
    return {"folder": QUICKSTART_MODEL, "subclass_names": dict(enumerate(names))}


def check_classifier(ran: RanBlock) -> None:
    import json

    clf = ran.namespace["clf"]
    assert clf.config.id2label == {0: "NORM", 1: "MI", 2: "STTC", 3: "CD", 4: "HYP"}
    saved = Path("merit-ptbxl-super")
    config = json.loads((saved / "config.json").read_text())
    assert "AutoModelForSequenceClassification" in config["auto_map"]
    assert (saved / "modeling_merit.py").is_file()
    reloaded = ran.value_of('AutoModelForSequenceClassification.from_pretrained("merit-ptbxl-super"')  # a new head
    subclass_names = ran.namespace["subclass_names"]
    assert reloaded.config.id2label == subclass_names
    assert reloaded.classifier.out_features == len(subclass_names) != clf.classifier.out_features
    encoder, clf_encoder = reloaded.state_dict(), clf.state_dict()
    for name, value in encoder.items():
        if not name.startswith("classifier."):
            assert torch.equal(value, clf_encoder[name]), f"{name} changed when the head was replaced"


def given_a_dataset_and_a_model() -> dict[str, Any]:
    """`dataset` "in the merit_hf schema" and "any MERIT model or checkpoint": a few bundled records, the quick-start
    folder's two towers."""
    from merit_hf import MeritForPreTraining
    from merit_hf.data import load_dataset

    dataset = load_dataset("ptbxl", "data/ptbxl_sample", split="test").select(range(6))
    return {"dataset": dataset, "model": MeritForPreTraining.from_pretrained(QUICKSTART_MODEL).eval()}


def check_embed_dataset(ran: RanBlock) -> None:
    from merit_hf import MeritFeatureExtractor

    ran.claim(r"returns ecg_id \+ ecg_embedding \(keep_columns= keeps others\)")
    dataset, model, embedded = ran.namespace["dataset"], ran.namespace["model"], ran.namespace["embedded"]
    assert embedded.column_names == ["ecg_id", "ecg_embedding"] and embedded.num_rows == dataset.num_rows
    assert embedded["ecg_id"] == dataset["ecg_id"]
    features = MeritFeatureExtractor.from_pretrained(QUICKSTART_MODEL)(
        np.asarray(dataset[0]["signal"]), sampling_rate=100, lead_names=dataset[0]["lead_names"], return_tensors="pt"
    )
    with torch.no_grad():
        reference = model.merit.ecg_model(**features).pooler_output
    first = torch.tensor(embedded[0]["ecg_embedding"])[None]
    assert first.shape == reference.shape
    assert torch.nn.functional.cosine_similarity(first, reference).item() > 0.99


def given_long_and_reduced_records() -> dict[str, Any]:
    """A one-lead watch recording at 512 Hz (lead I of a real record), a minute of 12 leads (six real 10 s records one
    after the other) and a real 10 s record, all as WFDB gives them."""
    from scipy.signal import resample_poly

    signals = [read_500hz(ecg_id) for ecg_id in range(1, 9)]
    leads = signals[0][1]
    watch_signal = resample_poly(signals[7][0][:, :1], 512, 500, axis=0)
    return {
        "watch_signal": watch_signal,
        "holter_minute": np.concatenate([signal for signal, _ in signals[:6]]),
        "ten_seconds": signals[6][0],
        "leads": leads,
    }


def check_long_and_reduced_records(ran: RanBlock) -> None:
    lead_mask = ran.value_of('inputs["lead_mask"]')
    assert lead_mask.dtype == torch.bool and lead_mask.shape == (1, 12)
    assert lead_mask[0].tolist() == [True] + [False] * 11
    model = ran.namespace["model"]
    assert ran.value_of("model(**inputs).pooler_output").shape == (1, model.config.hidden_size)
    claimed = ast.literal_eval(ran.claim(r"the record of each [\d.]+ s window: (\[[\d, ]+\])").group(1))
    assert ran.value_of('inputs["record_index"]').tolist() == claimed
    fe = ran.namespace["fe"]
    window_seconds = float(ran.claim(r"the record of each ([\d.]+) s window").group(1))
    assert fe.num_samples / fe.sampling_rate == window_seconds
    stride = int(ran.claim(r"window_stride defaults to num_samples, (\d+) here").group(1))
    assert fe.window_stride is None and fe.num_samples == stride
    pooled = ran.value_of("merit_hf.pool_window_embeddings(")
    assert pooled.shape == (2, model.config.hidden_size)


def check_data_loading(ran: RanBlock) -> None:
    loaded = ran.assigned['ptbxl = load_dataset("ptbxl", "data/ptbxl_sample", sampling_rate=100)']
    built = ran.assigned['ptbxl = build_ptbxl("data/ptbxl_sample", sampling_rate=100)']
    ran.claim(r"# the same, explicitly in memory")
    assert {split: rows["ecg_id"] for split, rows in loaded.items()} == {
        split: rows["ecg_id"] for split, rows in built.items()
    }
    labelled = {split: sum(1 for labels in rows["superclass"] if labels) for split, rows in built.items()}
    subset = ran.namespace["ptbxl"]  # a tenth of the training records with a superclass label, the others whole
    assert subset["train"].num_rows == round(0.1 * labelled["train"])
    assert (subset["validation"].num_rows, subset["test"].num_rows) == (labelled["validation"], labelled["test"])
    assert ran.namespace["collator"].num_classes == 5
    # "this process's shards": rank 0 of 8 reads its part of the 6 converted studies, the 8 parts each study once
    from merit_hf.data import load_mimic_iv_ecg

    parts = [[row["ecg_id"] for row in ran.namespace["mimic"]]]
    parts += [
        [row["ecg_id"] for row in load_mimic_iv_ecg("mimic_merit", rank=rank, world_size=8)] for rank in range(1, 8)
    ]
    assert parts[0] and sorted(sum(parts, [])) == sorted(study for _, study in STUDIES)


def check_ptbxl_versions(ran: RanBlock) -> None:
    ptbxl, raw = ran.namespace["ptbxl"], ran.namespace["raw"]
    total, *splits = map(int, ran.claim(r"(\d+) records \((\d+)/(\d+)/(\d+)\)").groups())
    assert [ptbxl[split].num_rows for split in ("train", "validation", "test")] == splits
    assert sum(splits) == total
    raw_total, *raw_splits = map(int, ran.claim(r"raw v1\.0\.1 rows: (\d+) \((\d+)/(\d+)/(\d+)\)").groups())
    assert [raw[split].num_rows for split in ("train", "validation", "test")] == raw_splits
    assert sum(raw_splits) == raw_total
    described = ran.claim(r'print\(ptbxl\["train"\]\.info\.description\)\s*# "(.*)"').group(1)
    pattern = ".*".join(re.escape(part) for part in described.split("..."))
    assert re.fullmatch(pattern, ran.stdout.strip(), flags=re.DOTALL), ran.stdout


def check_trainer(ran: RanBlock) -> None:
    import json

    from transformers import AutoModelForSequenceClassification

    trainer, names = ran.namespace["trainer"], ran.namespace["names"]
    assert trainer.state.global_step > 0
    ran.claim(r"trainer\.save_model\(\)\s*# weights, code, preprocessor_config\.json")
    saved = Path("superclass_ft")
    assert {"model.safetensors", "modeling_merit.py", "preprocessor_config.json"} <= {p.name for p in saved.iterdir()}
    assert "AutoModelForSequenceClassification" in json.loads((saved / "config.json").read_text())["auto_map"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(saved, trust_remote_code=True)
    assert list(reloaded.config.id2label.values()) == names


def check_lora(ran: RanBlock) -> None:
    from merit_hf import MeritForEcgClassification

    peft_model, merged, lora = ran.namespace["peft_model"], ran.namespace["merged"], ran.namespace["lora"]
    ran.claim(r"print_trainable_parameters\(\)\s*# only the adapters and the head train")
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    assert trainable and all(".lora_" in name or ".modules_to_save." in name for name in trainable), trainable
    assert any(".modules_to_save." in name for name in trainable) and any(".lora_A." in name for name in trainable)
    assert ran.namespace["trainer"].state.global_step > 0
    saved = {path.name for path in Path("superclass_lora").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "preprocessor_config.json"} <= saved
    assert "model.safetensors" not in saved  # the adapter, not the base
    ran.claim(r"merged = lora\.merge_and_unload\(\)\s*# a plain MeritForEcgClassification, the same outputs")
    assert type(merged).__name__ == MeritForEcgClassification.__name__
    assert not any("lora" in name for name, _ in merged.named_parameters())
    batch = ran.namespace["data"]["test"].with_format("torch")[:4]
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ecg_values=batch["ecg_values"]).logits,
                                   lora.eval()(ecg_values=batch["ecg_values"]).logits, atol=1e-5, rtol=1e-5)  # fmt: skip


def given_a_two_tower_model() -> dict[str, Any]:
    """What the comment's `merit_hf.zero_shot_classify(model, processor, ecgs, candidate_labels, ...)` names."""
    from merit_hf import MeritForPreTraining, MeritProcessor

    return {
        "model": MeritForPreTraining.from_pretrained(QUICKSTART_MODEL).eval(),
        "processor": MeritProcessor.from_pretrained(QUICKSTART_MODEL),
        "ecgs": "data/ptbxl_sample/records100/00000/00001_lr",
        "candidate_labels": ["NORM", "MI", "CD"],
    }


def check_zero_shot(ran: RanBlock) -> None:
    import merit_hf

    scored = ran.value_of('clf("data/ptbxl_sample/records100/00000/00001_lr"')
    assert sorted(entry["label"] for entry in scored) == ["CD", "MI", "NORM"]
    scores = [entry["score"] for entry in scored]
    assert scores == sorted(scores, reverse=True)
    # the commented alternative, run as written
    alternative = ran.claim(r"# or: (merit_hf\.zero_shot_classify\(.*\))\n").group(1)
    result = eval(alternative, {**ran.namespace, "merit_hf": merit_hf})  # noqa: S307 - the README's own code
    assert np.asarray(result["scores"]).shape == (1, 3)
    ran.claim(r"a template holds exactly one \{\}; literal braces are \{\{ and \}\}")
    arguments = (ran.namespace["model"], ran.namespace["processor"], ran.namespace["ecgs"], ["NORM"])
    with pytest.raises(ValueError, match="template"):
        merit_hf.zero_shot_classify(*arguments, hypothesis_template="an ECG")
    merit_hf.zero_shot_classify(*arguments, hypothesis_template="an ECG {{lead II}} showing {}")


def check_report_generation(ran: RanBlock) -> None:
    inputs, generated = ran.namespace["inputs"], ran.namespace["generated"]
    ran.claim(r"# the prompt, then the report")
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(generated[:, :prompt_length], inputs["input_ids"])
    assert generated.shape[1] > prompt_length
    printed = ast.literal_eval(ran.stdout.strip())
    assert isinstance(printed, list) and len(printed) == 1 and isinstance(printed[0], str)


BLOCK_CHECKS = [
    BlockCheck("projected = model.get_ecg_features(**batch).pooler_output", given_a_record, check_using_the_model),
    BlockCheck(
        "prepare_for_inference(model.ecg_model",
        given_nothing,
        check_precision,
        after="projected = model.get_ecg_features(**batch).pooler_output",
    ),
    BlockCheck('clf.save_pretrained("merit-ptbxl-super")', given_subclass_names, check_classifier),
    BlockCheck("embed_dataset(dataset, model", given_a_dataset_and_a_model, check_embed_dataset),
    BlockCheck('window="sliding"', given_long_and_reduced_records, check_long_and_reduced_records),
    BlockCheck('load_mimic_iv_ecg("mimic_merit"', given_nothing, check_data_loading),
    BlockCheck('ptbxl_version="as_is"', given_nothing, check_ptbxl_versions),
    BlockCheck('TrainingArguments("superclass_ft")', given_nothing, check_trainer),
    BlockCheck(
        "get_peft_model(base, lora_config)", given_nothing, check_lora, after='TrainingArguments("superclass_ft")'
    ),
    BlockCheck('pipeline("zero-shot-ecg-classification"', given_a_two_tower_model, check_zero_shot),
    BlockCheck('load_report_adapter("outputs/report-smollm2/adapter")', given_nothing, check_report_generation),
]


@dataclass(frozen=True)
class Erratum:
    """A README text that this test found wrong, with the text that is right: the test runs and checks the block with
    `right` in place of `wrong`, then reports it as an expected failure until the README is fixed (then this entry
    goes: `test_every_erratum_is_still_in_the_readme` says when)."""

    key: str  # the block's BlockCheck key
    wrong: str
    right: str


README_ERRATA: list[Erratum] = []


def _block_of(key: str) -> DocumentedBlock:
    matches = [block for block in BLOCKS if key in block.code]
    assert len(matches) == 1, f"{len(matches)} README python blocks hold {key!r} (one expected)"
    return matches[0]


def test_the_readme_shows_python_blocks():
    """The extraction itself: a broken reader would make every other test here vacuous."""
    assert len(BLOCKS) >= 10
    assert _block_of("load_report_adapter(").code.startswith("from merit_hf.training.report_lora import")


def test_every_python_block_is_checked():
    """A block added to the README, or a check whose block is gone, fails here naming it."""
    unchecked = [
        f"{block}: {block.code.splitlines()[0]}"
        for block in BLOCKS
        if not any(c.key in block.code for c in BLOCK_CHECKS)
    ]
    assert not unchecked, f"README python blocks without a check in tests/test_docs_snippets.py: {unchecked}"
    for check in BLOCK_CHECKS:
        _block_of(check.key)


def test_every_erratum_is_still_in_the_readme():
    """An erratum whose wrong text the README no longer holds was fixed there: delete it from README_ERRATA."""
    for erratum in README_ERRATA:
        assert erratum.wrong in _block_of(erratum.key).code, f"README.md was fixed: remove the erratum {erratum}"


def _run_chain(check: BlockCheck, corrected: bool) -> list[Erratum]:
    """Run the blocks `check` continues, then its own, in one namespace (with the errata's corrections applied when
    `corrected`), and check its claims; return the errata that applied."""
    chain = [check]
    while chain[0].after is not None:
        chain.insert(0, next(c for c in BLOCK_CHECKS if c.key == chain[0].after))
    namespace: dict[str, Any] = {}
    applied = []
    for link in chain:
        block = _block_of(link.key)
        for erratum in README_ERRATA:
            if corrected and erratum.key == link.key and erratum.wrong in block.code:
                block = DocumentedBlock(block.line, block.code.replace(erratum.wrong, erratum.right))
                applied.append(erratum)
        namespace.update(link.given())
        ran = run_block(block, namespace)
    check.check(ran)
    return applied


@pytest.mark.parametrize("check", BLOCK_CHECKS, ids=lambda check: check.check.__name__.removeprefix("check_"))
def test_readme_python_block(check: BlockCheck, in_docs_folder):
    """The block runs as written, after the blocks it continues, and its comments' claims hold. Where an erratum
    names it, it must fail as written (else the erratum is stale) and pass corrected."""
    chain_keys = {check.key, check.after}
    if not any(erratum.key in chain_keys for erratum in README_ERRATA):
        _run_chain(check, corrected=False)
        return
    try:
        _run_chain(check, corrected=False)
    except Exception:  # noqa: BLE001 - the README's error, which the erratum corrects
        applied = _run_chain(check, corrected=True)
        pytest.xfail(
            "README.md is wrong here; it passes with " + "; ".join(f"{e.right!r} for {e.wrong!r}" for e in applied)
        )
    pytest.fail("README.md runs as written here now: remove its entries from README_ERRATA")


def test_a_wrong_claim_or_a_failing_block_is_caught(in_docs_folder):
    """The checks can fail: a README promising other counts is refused, and a block that raises names its README
    line."""
    check = next(check for check in BLOCK_CHECKS if check.key == 'ptbxl_version="as_is"')
    text = README.read_text(encoding="utf-8")
    wrong = text.replace("488 records (344/78/66)", "488 records (343/79/66)")
    assert wrong != text
    (block,) = [block for block in documented_python_blocks(wrong) if check.key in block.code]
    with pytest.raises(AssertionError):
        check.check(run_block(block, {}))
    with pytest.raises(NameError) as raised:
        run_block(DocumentedBlock(500, "x = 1\nundefined_name\n"), {})
    assert (str(raised.traceback[-1].path), raised.traceback[-1].lineno + 1) == ("README.md", 501)
