"""Shared fixtures: tiny configs with random weights, a tokenizer trained here, and the real PTB-XL records.

Nothing here downloads anything: the Hub is forced offline and HF_HOME is private to the test session.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="merit_hf_test_hf_home_")
REPO_ROOT = Path(__file__).resolve().parents[1]
_nltk = REPO_ROOT / ".venv" / "nltk_data"
if _nltk.is_dir():
    os.environ.setdefault("NLTK_DATA", str(_nltk))

import pytest  # noqa: E402
import torch  # noqa: E402

RUN_SLOW = os.environ.get("RUN_SLOW", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items):
    """transformers' convention: tests marked `slow` (multi-process, end to end, browser, the loopback Hub) run only
    with `RUN_SLOW=1`. `.ci/run` runs the default suite, then `RUN_SLOW=1 pytest -m slow`."""
    if RUN_SLOW:
        return
    skip = pytest.mark.skip(reason="slow: run with RUN_SLOW=1 (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


BUNDLED_PTBXL = REPO_ROOT / "data" / "ptbxl_sample"
# `accelerate launch` through the interpreter running the tests: its console script is not always beside it (pip's
# scripts on a GPU machine go to another bin/ than /usr/bin/python3's)
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TINY_REPORTS = [
    "sinus rhythm normal ecg",
    "sinus rhythm left ventricular hypertrophy",
    "atrial fibrillation with rapid ventricular response",
    "sinus bradycardia st depression in lateral leads",
    "sinus tachycardia inferior myocardial infarction",
    "left bundle branch block",
    "right bundle branch block incomplete",
    "first degree av block sinus rhythm",
]


def run_in_fresh_process(script: str, tmp_path: Path, marker: str, context: str = "", timeout: int = 240) -> None:
    """Run `script` in a new Python process without this checkout on `PYTHONPATH`, with an empty HF cache and the Hub
    offline (what a user of a saved folder's remote code has); it must exit 0 and print `marker`."""
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "fresh_hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{context}{result.stderr[-3000:]}"
    assert marker in result.stdout, result.stdout[-2000:]


def with_limb_leads_derived(signal):
    """`signal` (num_samples, 12), in the standard lead order, with III, aVR, aVL and aVF computed from I and II as an
    ECG machine derives them: synthetic noise then obeys Einthoven's and Goldberger's laws, which the feature
    extractor checks (`lead_swap_policy`), so a test of something else runs without an `EcgLeadSwapWarning`."""
    signal = signal.copy()
    lead_i, lead_ii = signal[:, 0], signal[:, 1]
    signal[:, 2] = lead_ii - lead_i
    signal[:, 3] = -(lead_i + lead_ii) / 2
    signal[:, 4] = lead_i - lead_ii / 2
    signal[:, 5] = lead_ii - lead_i / 2
    return signal


def tiny_ecg_config(**overrides):
    from merit_hf import MeritEcgConfig

    values = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "decoder_hidden_size": 16,
        "decoder_num_hidden_layers": 1,
        "decoder_num_attention_heads": 2,
        "decoder_intermediate_size": 32,
    }
    values.update(overrides)
    return MeritEcgConfig(**values)


def tiny_text_config(vocab_size: int = 120):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def tiny_merit_config(ecg_overrides: dict | None = None, **overrides):
    from merit_hf import MeritConfig

    return MeritConfig(
        ecg_config=tiny_ecg_config(**(ecg_overrides or {})),
        text_config=tiny_text_config(),
        projection_dim=16,
        **overrides,
    )


def train_tiny_tokenizer(directory: Path, texts=TINY_REPORTS):
    """A WordPiece (BERT-style) tokenizer trained here on a few reports, saved and reloaded the standard way."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend.train_from_iterator(list(texts) * 4, trainers.WordPieceTrainer(vocab_size=120, special_tokens=special))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", backend.token_to_id("[CLS]")), ("[SEP]", backend.token_to_id("[SEP]"))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tokenizer.save_pretrained(directory)
    reloaded = AutoTokenizer.from_pretrained(directory)
    assert len(reloaded) == backend.get_vocab_size(), "tokenizer lost its vocabulary on reload"
    return reloaded


def run_pretraining(argv: list[str]) -> dict:
    """`merit_hf.training.pretrain.main` in this process, with Accelerate's process-wide state reset around it."""
    from accelerate.state import AcceleratorState, GradientState

    from merit_hf.training import pretrain

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return pretrain.main(argv)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.fixture
def tokenizer(tmp_path):
    return train_tiny_tokenizer(tmp_path / "tokenizer")


@pytest.fixture
def ptbxl_dir() -> Path:
    return BUNDLED_PTBXL


@pytest.fixture
def shared_ptbxl_dir() -> Path:
    path = SHARED_DATA / "ptbxl_subset500"
    if not path.is_dir():
        pytest.skip(f"{path} not present (the shared data folder sits beside the checkout)")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_machine_wide_cpu_choices(monkeypatch):
    """Kernel choices timed in a test stay in its process: no test reads or writes `$HF_HOME/merit_hf/cpu_choices.json`
    (tests of that file point `MERIT_CPU_CHOICES` at a temporary one)."""
    monkeypatch.setenv("MERIT_CPU_CHOICES", "off")


@pytest.fixture(autouse=True)
def _c_library_left_as_it_is(monkeypatch):
    """The test process's C library keeps its own allocation settings (`keep_freed_cpu_memory` would make a long
    pytest run keep up to 1 GiB of freed memory); tests of the setting run it in a subprocess."""
    monkeypatch.setenv("MERIT_CPU_ALLOCATOR", "system")
