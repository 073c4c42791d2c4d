"""The Hub remote-code path: a folder written by save_pretrained loads with `trust_remote_code=True` in a process
that cannot import merit_hf, and gives the same embeddings; plus the processor for ECG-report pairs."""

import ast
import json
import re
import sys
import textwrap

import numpy as np
import pytest
import torch
import wfdb

from merit_hf import MeritFeatureExtractor, MeritForPreTraining, MeritProcessor
from tests.conftest import run_in_fresh_process, tiny_merit_config

BLOCK_MERIT_HF = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "merit_hf" or name.startswith("merit_hf."):
            raise ImportError("merit_hf is blocked in this process")
sys.meta_path.insert(0, _Block())
"""


@pytest.fixture
def hub_folder(tmp_path, tokenizer):
    model = MeritForPreTraining(tiny_merit_config()).eval()
    processor = MeritProcessor(MeritFeatureExtractor(), tokenizer)
    folder = tmp_path / "merit-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)  # transformers 5 nests the feature extractor in processor_config.json
    processor.feature_extractor.save_pretrained(folder)  # and its own preprocessor_config.json for other tools
    return model, processor, folder


def test_saved_folder_holds_code_and_auto_map(hub_folder):
    _, _, folder = hub_folder
    names = {p.name for p in folder.iterdir()}
    for expected in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "configuration_merit.py",
        "modeling_merit.py",
        "feature_extraction_merit.py",
        "feature_extraction_torch_merit.py",  # the batched path (`device=`), a relative import of the one above
        "processing_merit.py",
    ):
        assert expected in names, expected
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_merit.MeritConfig",
        "AutoModel": "modeling_merit.MeritModel",
        "AutoModelForPreTraining": "modeling_merit.MeritForPreTraining",
        "AutoModelForSequenceClassification": "modeling_merit.MeritForEcgClassification",
    }
    allowed = {"torch", "numpy", "scipy", "transformers", "huggingface_hub", "wfdb"}
    for code_file in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(code_file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative imports stay inside the folder
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    top = name.split(".")[0]
                    assert top in allowed or top in sys.stdlib_module_names, (code_file.name, name)


@pytest.mark.slow
def test_remote_code_round_trip_without_merit_hf(hub_folder, ptbxl_dir, tmp_path):
    model, processor, folder = hub_folder
    record = ptbxl_dir / "records500" / "00000" / "00001_hr"
    signal, fields = wfdb.rdsamp(str(record))
    batch = processor.feature_extractor(signal, sampling_rate=500, lead_names=fields["sig_name"], return_tensors="pt")
    with torch.no_grad():
        expected = model.merit.get_ecg_features(**batch).pooler_output.numpy()
    np.save(tmp_path / "expected.npy", expected)
    script = BLOCK_MERIT_HF + textwrap.dedent(
        f"""
        import numpy as np, torch, wfdb
        from transformers import AutoFeatureExtractor, AutoModel, AutoModelForPreTraining, AutoProcessor
        folder = {str(folder)!r}
        try:
            import merit_hf  # noqa: F401
            raise SystemExit("merit_hf should not be importable here")
        except ImportError:
            pass
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        fe = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        pretraining = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(fe).__name__ == "MeritFeatureExtractor", type(fe)
        assert type(processor).__name__ == "MeritProcessor", type(processor)
        assert type(pretraining).__name__ == "MeritForPreTraining"
        signal, fields = wfdb.rdsamp({str(record)!r})
        batch = fe(signal, sampling_rate=500, lead_names=fields["sig_name"], return_tensors="pt")
        batched = fe(signal, sampling_rate=500, lead_names=fields["sig_name"], return_tensors="pt", device="cpu")
        torch.testing.assert_close(batched["ecg_values"], batch["ecg_values"], rtol=0, atol=1e-4)
        with torch.no_grad():
            emb = model.get_ecg_features(**batch).pooler_output.numpy()
        np.testing.assert_allclose(emb, np.load({str(tmp_path / "expected.npy")!r}), rtol=1e-5, atol=1e-6)
        pairs = processor(ecgs={str(record)!r}, text=["sinus rhythm"], return_tensors="pt")
        assert pairs["ecg_values"].shape == (1, 12, 2250) and pairs["input_ids"].shape[0] == 1
        # fine-tune-and-share: a classifier made from the pretraining folder, saved, loads again from its own folder
        from transformers import AutoModelForSequenceClassification
        classifier = AutoModelForSequenceClassification.from_pretrained(
            folder, trust_remote_code=True, id2label={{0: "NORM", 1: "MI", 2: "CD"}}
        ).eval()
        assert type(classifier).__name__ == "MeritForEcgClassification"
        classifier.save_pretrained({str(tmp_path / "classifier")!r})
        again = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "classifier")!r},
                                                                   trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(**batch).logits, classifier(**batch).logits)
            torch.testing.assert_close(classifier.ecg_model(**batch).pooler_output,
                                       model.ecg_model(**batch).pooler_output)
        assert again.config.id2label == {{0: "NORM", 1: "MI", 2: "CD"}}
        print("REMOTE-OK", model.__class__.__module__)
        """
    )
    run_in_fresh_process(script, tmp_path, "REMOTE-OK transformers_modules")


@pytest.mark.slow
def test_auto_classifier_from_encoder_only_and_two_tower_folders_without_merit_hf(tmp_path):
    """README's fine-tuning start, `AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True,
    id2label=...)`, on an encoder-only (`MeritEcgModel`) and a two-tower folder, in a process without merit_hf: the
    folder's `auto_map` gives a `MeritForEcgClassification` holding the saved encoder and the caller's labels."""
    from merit_hf import MeritEcgModel, MeritForEcgClassification, MeritModel

    two_towers = MeritModel(tiny_merit_config()).eval()
    two_towers.save_pretrained(tmp_path / "two-towers")
    two_towers.ecg_model.save_pretrained(tmp_path / "encoder")
    MeritForEcgClassification.from_pretrained(tmp_path / "encoder", num_labels=2).save_pretrained(tmp_path / "clf")
    ecg = torch.randn(2, 12, 2250, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = MeritEcgModel.from_pretrained(tmp_path / "encoder").eval()(ecg).pooler_output
    torch.save({"ecg": ecg, "pooled": expected}, tmp_path / "expected.pt")
    script = BLOCK_MERIT_HF + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForSequenceClassification
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        id2label = {{0: "NORM", 1: "MI", 2: "CD"}}
        for name in ("encoder", "two-towers"):
            classifier = AutoModelForSequenceClassification.from_pretrained(
                {str(tmp_path)!r} + "/" + name, trust_remote_code=True, id2label=id2label, output_hidden_states=True,
                attn_implementation="eager",
            ).eval()
            assert classifier.ecg_model.config._attn_implementation == "eager", name
            assert type(classifier).__name__ == "MeritForEcgClassification", type(classifier)
            assert type(classifier).__module__.startswith("transformers_modules"), type(classifier).__module__
            assert classifier.config.id2label == id2label, classifier.config.id2label
            with torch.no_grad():
                out = classifier(expected["ecg"])
                torch.testing.assert_close(classifier.ecg_model(expected["ecg"]).pooler_output, expected["pooled"])
            assert out.logits.shape == (2, 3) and len(out.hidden_states) == 3
        # AutoModel on a classifier's folder: its auto_map entry says what loads it (not transformers'
        # "Unrecognized configuration class" with a list of every model type)
        from transformers import AutoModel
        try:
            AutoModel.from_pretrained({str(tmp_path / "clf")!r}, trust_remote_code=True)
            raise SystemExit("AutoModel loaded a classifier folder")
        except ValueError as error:
            assert "holds a MeritForEcgClassification" in str(error), error
            assert "AutoModelForSequenceClassification.from_pretrained" in str(error), error
        print("CLASSIFIERS-OK")
        """
    )
    run_in_fresh_process(script, tmp_path, "CLASSIFIERS-OK")


def test_processor_pairs_ecgs_with_reports(ptbxl_dir, tokenizer):
    processor = MeritProcessor(MeritFeatureExtractor(), tokenizer, max_length=16)
    record = str(ptbxl_dir / "records100" / "00000" / "00001_lr")
    batch = processor(ecgs=[record, record], text=["sinus rhythm normal ecg", "left bundle branch block"])
    assert batch["ecg_values"].shape == (2, 12, 2250)
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"].shape == batch["input_ids"].shape
    decoded = tokenizer.decode(batch["input_ids"][1], skip_special_tokens=True)
    assert decoded == "left bundle branch block"
    with pytest.raises(ValueError, match="text 1: empty report '  '"):
        processor(ecgs=[record, record], text=["sinus rhythm", "  "])


def test_processor_expands_ecg_placeholders(ptbxl_dir, tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<ecg>"]})
    processor = MeritProcessor(MeritFeatureExtractor(), tokenizer, ecg_seq_length=4)
    record = str(ptbxl_dir / "records100" / "00000" / "00001_lr")
    batch = processor(ecgs=[record], text=["<ecg> sinus rhythm"])
    ecg_id = tokenizer.convert_tokens_to_ids("<ecg>")
    assert int((batch["input_ids"] == ecg_id).sum()) == 4
    with pytest.raises(ValueError, match="2 <ecg> placeholders in the text for 1 ECGs"):
        processor(ecgs=[record], text=["<ecg> <ecg> sinus rhythm"])
    with pytest.raises(ValueError, match="0 <ecg> placeholders in the text for 1 ECGs"):
        processor(ecgs=[record], text=["sinus rhythm"])


def test_processor_rejects_ecg_report_count_mismatch(ptbxl_dir, tokenizer):
    processor = MeritProcessor(MeritFeatureExtractor(), tokenizer, max_length=16)
    record = str(ptbxl_dir / "records100" / "00000" / "00001_lr")
    with pytest.raises(ValueError, match=re.escape("2 ECGs for 1 reports; give one report per ECG")):
        processor(ecgs=[record, record], text=["sinus rhythm"])
    with pytest.raises(ValueError, match=re.escape("1 ECGs for 2 reports; give one report per ECG")):
        processor(ecgs=record, text=["sinus rhythm", "left bundle branch block"])
    # A record cut into windows is several rows of ecg_values: the message says so
    sliding = MeritProcessor(MeritFeatureExtractor(window="sliding", window_stride=100), tokenizer, max_length=16)
    message = "1 ECGs cut into 4 windows (the feature extractor's window='sliding') for 1 reports"
    with pytest.raises(ValueError, match=re.escape(message)):
        sliding(ecgs=record, text=["sinus rhythm"])
    batch = sliding(ecgs=record, text=["sinus rhythm"] * 4)
    assert (
        batch["ecg_values"].shape[0] == batch["input_ids"].shape[0] == 4 and batch["record_index"].tolist() == [0] * 4
    )
    # Report generation may put several ECGs in one prompt: there the placeholders are counted instead.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<ecg>"]})
    generation = MeritProcessor(MeritFeatureExtractor(), tokenizer, ecg_seq_length=2)
    batch = generation(ecgs=[record, record], text=["<ecg> then <ecg>"])
    assert batch["ecg_values"].shape == (2, 12, 2250) and batch["input_ids"].shape[0] == 1
    assert int((batch["input_ids"] == tokenizer.convert_tokens_to_ids("<ecg>")).sum()) == 4


def test_processor_refuses_unknown_arguments(ptbxl_dir, tokenizer):
    """`ecg=` for `ecgs=` went into the tokenizer's kwargs and the batch came back without ecg_values; unknown names
    raise, while the tokenizer's arguments (transformers' `TextKwargs`) and the feature extractor's still pass."""
    processor = MeritProcessor(MeritFeatureExtractor(), tokenizer, max_length=16)
    record = str(ptbxl_dir / "records100" / "00000" / "00001_lr")
    with pytest.raises(TypeError, match=re.escape("MeritProcessor() got unexpected arguments ['ecg']")):
        processor(ecg=record, text=["sinus rhythm"])
    with pytest.raises(TypeError, match=re.escape("unexpected arguments ['crop_seed', 'sampling_rates']")):
        processor(ecgs=record, crop_seed=1, sampling_rates=100)
    batch = processor(
        ecgs=record, text=["sinus rhythm"], crop="start", ecg_padding=False, padding_side="left",
        return_token_type_ids=False, images=None, videos=None, audio=None,
    )  # fmt: skip
    assert batch["ecg_values"].shape == (1, 12, 2250) and "token_type_ids" not in batch
