"""ECG-conditioned report generation: config, processor (placeholders, labels, chat template), model (scatter, count
check, generate), PEFT LoRA (one step, save/reload), the training script end to end, and bad input.

The LM is a tiny Llama with a SentencePiece tokenizer trained here (no download)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from tests.conftest import (
    ACCELERATE_LAUNCH,
    BUNDLED_PTBXL,
    REPO_ROOT,
    TINY_REPORTS,
    run_in_fresh_process,
    tiny_ecg_config,
    with_limb_leads_derived,
)

ECG_CONFIG = {"sampling_rate": 100, "num_samples": 1000, "patch_size": 50}
SPM_VOCAB_SIZE = 64
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_sentencepiece_tokenizer(directory):
    """SentencePiece BPE trained on the tiny reports, wrapped the way that keeps its vocabulary (see env.md §3)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(f"{report}. write the report of this 12-lead ecg." for report in TINY_REPORTS * 8))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "sp"),
        vocab_size=SPM_VOCAB_SIZE,
        model_type="bpe",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        minloglevel=2,
    )
    shutil.copy(directory / "sp.model", directory / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(directory, add_bos_token=True, add_eos_token=False, pad_token="<pad>")
    return tokenizer


def tiny_llama(vocab_size: int, tie_word_embeddings: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A saved tiny causal LM with its tokenizer (what `--language_model` points to)."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = train_sentencepiece_tokenizer(directory / "spm")
    tiny_llama(len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def parts(lm_dir):
    """(model, processor) built from a random tiny encoder and the saved tiny LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merit_hf import MeritEcgModel, MeritFeatureExtractor, MeritForReportGeneration, MeritProcessor

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    ecg_config = tiny_ecg_config(**ECG_CONFIG)
    model = MeritForReportGeneration.from_parts(
        MeritEcgModel(ecg_config), AutoModelForCausalLM.from_pretrained(lm_dir), tokenizer, ecg_tokens_per_lead=2
    )
    processor = MeritProcessor(
        MeritFeatureExtractor.from_model_config(ecg_config), tokenizer, ecg_seq_length=model.config.ecg_seq_length
    )
    return model.eval(), processor


def ecg_batch(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [with_limb_leads_derived(rng.normal(scale=0.3, size=(1000, 12))) for _ in range(count)]


def ecg_kwargs(count: int, seed: int = 0):
    return {"ecgs": ecg_batch(count, seed), "sampling_rate": 100, "lead_names": list(tiny_ecg_config().lead_names)}


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and config
# ----------------------------------------------------------------------------------------------------------------------


def test_sentencepiece_tokenizer_keeps_its_vocabulary(tmp_path):
    import sentencepiece as spm

    tokenizer = train_sentencepiece_tokenizer(tmp_path)
    pieces = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    # The direct constructor LlamaTokenizer(vocab_file=...) silently gives 3 tokens; this wrapping must not.
    assert len(tokenizer) == pieces.get_piece_size() == SPM_VOCAB_SIZE
    assert tokenizer("sinus rhythm", add_special_tokens=False)["input_ids"] == pieces.encode("sinus rhythm")


def test_report_config_derives_and_validates_ecg_seq_length():
    from transformers import LlamaConfig

    from merit_hf import MeritReportConfig

    ecg_config = tiny_ecg_config(**ECG_CONFIG)
    text_config = LlamaConfig(vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=64)
    config = MeritReportConfig(
        ecg_config=ecg_config, text_config=text_config, ecg_token_index=99, ecg_tokens_per_lead=3
    )
    assert config.ecg_seq_length == 12 * 3
    with pytest.raises(ValueError, match=r"MeritReportConfig.ecg_seq_length: is 10 but num_leads x"):
        MeritReportConfig(ecg_config=ecg_config, text_config=text_config, ecg_token_index=99, ecg_seq_length=10)
    with pytest.raises(ValueError, match=r"MeritReportConfig.ecg_token_index: 100 is outside .* 100 tokens"):
        MeritReportConfig(ecg_config=ecg_config, text_config=text_config, ecg_token_index=100)
    with pytest.raises(ValueError, match=r"MeritReportConfig.ecg_tokens_per_lead: must be between 1 and the 20"):
        MeritReportConfig(ecg_config=ecg_config, text_config=text_config, ecg_token_index=1, ecg_tokens_per_lead=21)


@pytest.mark.parametrize("scheme", ["xavier_uniform", "trunc_normal"])
def test_the_projector_follows_the_ecg_init_scheme_and_initializer_range_only_with_trunc_normal(scheme):
    """As `MeritReportConfig.initializer_range` documents; report-generation benchmarks were measured with xavier."""
    from transformers import LlamaConfig

    from merit_hf import MeritForReportGeneration, MeritReportConfig

    torch.manual_seed(0)
    text_config = LlamaConfig(vocab_size=100, hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                              intermediate_size=64)  # fmt: skip
    config = MeritReportConfig(ecg_config=tiny_ecg_config(**ECG_CONFIG, initializer_scheme=scheme),
                               text_config=text_config, ecg_token_index=99, initializer_range=0.001)  # fmt: skip
    linear_1 = MeritForReportGeneration(config).multi_modal_projector.linear_1
    fan_out, fan_in = linear_1.weight.shape
    expected = (2 / (fan_in + fan_out)) ** 0.5 if scheme == "xavier_uniform" else 0.001
    assert linear_1.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert not linear_1.bias.any()


# ----------------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------------


def test_processor_expands_one_placeholder_per_ecg(parts):
    model, processor = parts
    batch = processor(**ecg_kwargs(2), text=[processor.format_prompt()] * 2)
    ecg_id = model.config.ecg_token_index
    assert model.config.ecg_seq_length == 24
    assert (batch["input_ids"] == ecg_id).sum(-1).tolist() == [24, 24]
    assert batch["ecg_values"].shape == (2, 12, 1000)
    # Prompts for generate() are left-padded: the last position is a real token in every row.
    assert (batch["attention_mask"][:, -1] == 1).all()


def test_generation_prompts_longer_than_max_length_are_kept_whole(parts):
    """`max_length` bounds reports: a prompt past it (24 ECG tokens + a chat turn > 16) is neither cut nor refused."""
    model, processor = parts
    processor.tokenizer.chat_template = CHAT_TEMPLATE
    processor.max_length = 16
    prompt = processor.format_prompt("Write the report of this 12-lead ECG.")
    full_ids = processor.tokenizer(processor._expand_ecg_tokens([prompt], None))["input_ids"][0]
    batch = processor(**ecg_kwargs(1), text=[prompt])
    assert len(full_ids) > 16
    assert batch["input_ids"][0].tolist() == full_ids  # the opened assistant turn included
    generated = model.generate(**batch, max_new_tokens=2, min_new_tokens=2)
    assert generated.shape == (1, len(full_ids) + 2) and generated[0, : len(full_ids)].tolist() == full_ids


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (["no placeholder here"], "0 <ecg> placeholders in the text for 1 ECGs"),
        (["<ecg> and <ecg>"], "2 <ecg> placeholders in the text for 1 ECGs"),
    ],
)
def test_processor_rejects_placeholder_count_mismatch(parts, texts, message):
    _, processor = parts
    with pytest.raises(ValueError, match=message):
        processor(**ecg_kwargs(1), text=texts)


def test_processor_rejects_misplaced_placeholders(parts):
    _, processor = parts
    with pytest.raises(
        ValueError, match=r"text 0: 2 <ecg> placeholders; with one prompt per ECG each prompt needs exactly one"
    ):
        processor(**ecg_kwargs(2), text=["<ecg> <ecg> two", "none"])


def test_processor_rejects_empty_reference_report(parts):
    _, processor = parts
    with pytest.raises(ValueError, match=r"report 1: empty reference report '  '"):
        processor(**ecg_kwargs(2), reports=["sinus rhythm", "  "])


def test_processor_rejects_ecg_that_breaks_the_input_contract(parts):
    from merit_hf.models.merit.feature_extraction_merit import EcgInputError

    _, processor = parts
    kwargs = ecg_kwargs(1)
    kwargs["ecgs"][0][:, 3] = np.nan
    with pytest.raises(EcgInputError, match=r"lead aVR"):
        processor(**kwargs, reports=["sinus rhythm"])


def test_labels_mask_prompt_ecg_and_padding(parts):
    model, processor = parts
    reports = ["sinus rhythm normal ecg", "left bundle branch block with a longer report text"]
    batch = processor(**ecg_kwargs(2), reports=reports)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    prompt_ids = processor.tokenizer(processor._expand_ecg_tokens([processor.format_prompt()], None))["input_ids"][0]
    tokenizer = processor.tokenizer
    for row, report in enumerate(reports):
        report_ids = tokenizer(report, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        length = len(prompt_ids) + len(report_ids)
        assert ids[row, : len(prompt_ids)].tolist() == prompt_ids
        assert (labels[row, : len(prompt_ids)] == -100).all()  # prompt, BOS and all ECG tokens
        assert (
            labels[row, len(prompt_ids) : length].tolist() == report_ids == ids[row, len(prompt_ids) : length].tolist()
        )
        assert (labels[row, length:] == -100).all() and (mask[row, length:] == 0).all()  # right padding
    assert not ((ids == model.config.ecg_token_index) & (labels != -100)).any()
    decoded = tokenizer.decode(labels[0][labels[0] != -100], skip_special_tokens=True)
    assert decoded == reports[0]


def test_chat_template_prompt_and_labels(parts):
    model, processor = parts
    processor.tokenizer.chat_template = CHAT_TEMPLATE
    prompt = processor.format_prompt("Describe it.")
    assert prompt == "<|user|>\n<ecg>\nDescribe it.\n<|assistant|>\n"
    batch = processor(**ecg_kwargs(1), text=[prompt], reports=["sinus rhythm"])
    report_ids = processor.tokenizer("sinus rhythm", add_special_tokens=False)["input_ids"]
    kept = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert kept == report_ids + [processor.tokenizer.eos_token_id]
    assert (batch["input_ids"] == model.config.ecg_token_index).sum() == model.config.ecg_seq_length


def test_plain_prompt_choice_survives_save_and_reload(parts, tmp_path):
    """`use_chat_template=False` (report_lora's `--use_chat_template false`) is saved with the processor, so an adapter
    reloaded later prompts the way it was trained."""
    from merit_hf import MeritProcessor

    _, processor = parts
    processor.tokenizer.chat_template = CHAT_TEMPLATE
    plain = MeritProcessor(processor.feature_extractor, processor.tokenizer, use_chat_template=False)
    assert plain.format_prompt("Describe it.") == "<ecg>\nDescribe it.\n"
    plain.save_pretrained(tmp_path)
    assert MeritProcessor.from_pretrained(tmp_path).format_prompt("Describe it.") == "<ecg>\nDescribe it.\n"


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


def test_ecg_tokens_are_scattered_at_placeholders(parts):
    model, processor = parts
    batch = processor(**ecg_kwargs(2), text=[processor.format_prompt()] * 2)
    embeds, features = model.embed_inputs(batch["input_ids"], batch["ecg_values"])
    placeholder = batch["input_ids"] == model.config.ecg_token_index
    assert features.shape == (2, 24, 32)
    torch.testing.assert_close(embeds[placeholder], features.reshape(-1, 32))
    torch.testing.assert_close(embeds[~placeholder], model.get_input_embeddings()(batch["input_ids"])[~placeholder])


def test_get_ecg_features_returns_the_encoder_output_with_the_soft_tokens_as_pooler_output(parts):
    """One return type for `get_ecg_features` in every MERIT class (`BaseModelOutputWithPooling`, as CLIP's and
    LLaVA's `get_image_features`): here `pooler_output` holds the projected soft tokens that `embed_inputs` scatters,
    and `last_hidden_state` the encoder's tokens."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model, processor = parts
    batch = processor(**ecg_kwargs(2), text=[processor.format_prompt()] * 2)
    with torch.no_grad():
        output = model.get_ecg_features(batch["ecg_values"], output_hidden_states=True)
        _, scattered = model.embed_inputs(batch["input_ids"], batch["ecg_values"])
        encoder = model.ecg_model(batch["ecg_values"])
    assert isinstance(output, BaseModelOutputWithPooling)
    assert output.pooler_output.shape == (2, model.config.ecg_seq_length, 32)
    assert torch.equal(output.pooler_output, scattered)
    assert torch.equal(output.last_hidden_state, encoder.last_hidden_state)
    assert len(output.hidden_states) == model.config.ecg_config.num_hidden_layers + 1


def test_soft_tokens_pool_only_the_real_patches_of_a_padded_ecg(parts):
    """With `ecg_attention_mask`, each soft token is the mean of the real patches of its time bin (padding never enters
    the LM); all ones gives the plain mean; a bin of padding only raises, naming the row."""
    model, processor = parts
    batch = processor(**ecg_kwargs(2), text=[processor.format_prompt()] * 2)
    values = batch["ecg_values"]
    config = model.config.ecg_config
    full = torch.ones(2, config.num_samples, dtype=torch.long)
    padded = full.clone()
    padded[1, -300:] = 0  # 6 of 20 patches of 50 samples: the second bin of 10 keeps 4 real patches
    with torch.no_grad():
        plain = model.get_ecg_features(values).pooler_output
        assert torch.equal(model.get_ecg_features(values, full).pooler_output, plain)
        output = model.get_ecg_features(values, padded)
        hidden = output.last_hidden_state.reshape(2, config.num_leads, config.tokens_per_lead, -1)
        patches = hidden[:, :, 1:-1] if config.use_separator_tokens else hidden
        expected_bin = patches[1, :, 10:14].mean(dim=1)  # row 1, second bin: its real patches only
        expected = model.multi_modal_projector(expected_bin)
        torch.testing.assert_close(output.pooler_output[1, 1::2], expected, rtol=1e-5, atol=1e-5)
        padded[1, -600:] = 0  # 12 patches: the second bin is padding only
        with pytest.raises(
            ValueError, match=r"ECG rows \[1\]: a time bin of the 2 soft tokens per lead holds padding"
        ):
            model.get_ecg_features(values, padded)


def test_return_dict_false_gives_a_tuple_as_llava_does(parts):
    """`forward(return_dict=False)` and `config.return_dict=False` give the output's tuple, loss first, as every other
    MERIT class and `LlavaForConditionalGeneration` do; `generate()` still works (it asks for a dict)."""
    model, processor = parts
    batch = processor(**ecg_kwargs(2), reports=TINY_REPORTS[:2])
    with torch.no_grad():
        output = model(**batch)
        as_tuple = model(**batch, return_dict=False)
        assert isinstance(as_tuple, tuple)
        assert torch.equal(as_tuple[0], output.loss) and torch.equal(as_tuple[1], output.logits)
        assert torch.equal(as_tuple[-1], output.ecg_hidden_states)
        model.config.return_dict = False
        assert isinstance(model(**batch), tuple)
        assert torch.equal(model(**batch, return_dict=True).logits, output.logits)
        prompt = processor(**ecg_kwargs(1), text=[processor.format_prompt()])
        assert model.generate(**prompt, max_new_tokens=2, do_sample=False).shape[0] == 1


def test_ecg_inputs_reach_only_the_prefill_step_of_generation(parts):
    """`prepare_inputs_for_generation` passes `ecg_values` / `ecg_attention_mask` / `lead_mask` on the first step (or
    every step without a cache), and masks the missing leads' `<ecg>` positions in every step's attention mask."""
    model, processor = parts
    batch = processor(**ecg_kwargs(1), text=[processor.format_prompt()])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lead_mask = torch.tensor([[True, True] + [False] * 10])
    ecg = {"ecg_values": batch["ecg_values"], "ecg_attention_mask": torch.ones(1, 1000), "lead_mask": lead_mask}
    grown = torch.cat([ids, torch.tensor([[5]])], dim=1)
    grown_mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    first = model.prepare_inputs_for_generation(ids, attention_mask=mask, is_first_iteration=True, **ecg)
    later = model.prepare_inputs_for_generation(grown, attention_mask=grown_mask, is_first_iteration=False, **ecg)
    no_cache = model.prepare_inputs_for_generation(
        grown, attention_mask=grown_mask, is_first_iteration=False, use_cache=False, **ecg
    )
    assert all(first[name] is value for name, value in ecg.items())
    assert not any(name in later for name in ecg)
    assert all(no_cache[name] is value for name, value in ecg.items())
    masked = model.mask_missing_lead_tokens(grown, grown_mask, lead_mask)
    assert torch.equal(later["attention_mask"], masked) and masked.sum() < grown_mask.sum()
    assert torch.equal(first["attention_mask"], masked[:, :-1])


def test_model_count_check_raises_a_clear_error(parts):
    model, processor = parts
    batch = processor(**ecg_kwargs(2), text=[processor.format_prompt()] * 2)
    with pytest.raises(
        ValueError, match=r"input_ids hold 48 <ecg> token positions .* but 3 ECG\(s\) x ecg_seq_length 24"
    ):
        model(input_ids=batch["input_ids"], ecg_values=torch.cat([batch["ecg_values"], batch["ecg_values"][:1]]))
    with pytest.raises(ValueError, match=r"input_ids hold 48 <ecg> token positions but no ecg_values were given"):
        model(input_ids=batch["input_ids"])


def test_generate_returns_the_prompt_then_new_tokens_of_a_manual_greedy_loop(parts):
    """transformers' own `generate` (as LLaVA's): the prompt, then the new tokens, which are those of a greedy loop
    over the full forward pass (ECG scattered every step) although `ecg_values` reach only the prefill step."""
    model, processor = parts
    batch = processor(**ecg_kwargs(1), text=[processor.format_prompt()])
    generated = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    ids = batch["input_ids"]
    assert generated.shape == (1, ids.shape[1] + 5) and torch.equal(generated[:, : ids.shape[1]], ids)
    new = generated[:, ids.shape[1] :]
    expected = []
    for _ in range(5):
        logits = model(input_ids=ids, ecg_values=batch["ecg_values"]).logits[:, -1]
        logits[:, model.config.ecg_token_index] = -float("inf")  # suppressed by the generation config
        logits[:, processor.tokenizer.eos_token_id] = -float("inf")  # min_new_tokens
        token = logits.argmax(-1, keepdim=True)
        expected.append(token.item())
        ids = torch.cat([ids, token], dim=1)
    assert new[0].tolist() == expected


def test_generate_infers_the_padding_mask_of_left_padded_prompts(parts):
    """Without `attention_mask`, padding is found from `pad_token_id` (pad != EOS), as transformers does."""
    model, processor = parts
    prompts = [processor.format_prompt(), "<ecg>\nWrite the report of this 12-lead ECG, sinus rhythm or not.\n"]
    batch = processor(**ecg_kwargs(2), text=prompts)
    assert (batch["attention_mask"][0] == 0).sum() > 0  # row 0 is left-padded
    options = {"max_new_tokens": 4, "min_new_tokens": 4, "output_scores": True, "return_dict_in_generate": True}
    with_mask = model.generate(**batch, **options)
    without_mask = model.generate(input_ids=batch["input_ids"], ecg_values=batch["ecg_values"], **options)
    assert torch.equal(without_mask.sequences, with_mask.sequences)
    for step_without, step_with in zip(without_mask.scores, with_mask.scores):
        torch.testing.assert_close(step_without, step_with, rtol=0, atol=0)


def test_generate_from_embed_inputs_gives_the_new_tokens_of_generate_from_input_ids(parts):
    """`forward` takes `inputs_embeds` from `embed_inputs` (ECG tokens in place), and so does `generate`, as LLaVA's:
    with a batch of left-padded prompts of uneven lengths it writes the same tokens as from `input_ids` + `ecg_values`
    (and returns only them, as transformers does for embeddings)."""
    model, processor = parts
    prompts = [processor.format_prompt(), "<ecg>\nWrite the report of this 12-lead ECG, sinus rhythm or not.\n"]
    batch = processor(**ecg_kwargs(2), text=prompts)
    assert (batch["attention_mask"][0] == 0).sum() > 0  # uneven lengths: row 0 is left-padded
    options = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    from_ids = model.generate(**batch, **options)[:, batch["input_ids"].shape[1] :]
    with torch.no_grad():
        inputs_embeds, _ = model.embed_inputs(batch["input_ids"], batch["ecg_values"])
    from_embeds = model.generate(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"], **options)
    assert torch.equal(from_embeds, from_ids)


def test_generate_never_emits_the_ecg_placeholder(parts, tmp_path):
    """A model built from its config (no generation config from `from_parts`) whose head prefers `<ecg>`: its
    generation config suppresses it (also after save and reload); a caller who clears `suppress_tokens` gets a clear
    error at the step that emitted it, never a report with an ECG-less placeholder."""
    from merit_hf import MeritForReportGeneration

    built, processor = parts
    model = MeritForReportGeneration(built.config).eval()
    model.load_state_dict(built.state_dict())
    ecg_id = model.config.ecg_token_index
    assert model.generation_config.suppress_tokens == [ecg_id] == built.generation_config.suppress_tokens
    model.save_pretrained(tmp_path)
    assert MeritForReportGeneration.from_pretrained(tmp_path).generation_config.suppress_tokens == [ecg_id]
    head = model.language_model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[ecg_id] = 100.0
    model.language_model.lm_head = biased
    batch = processor(**ecg_kwargs(2), text=[processor.format_prompt()] * 2)
    with torch.no_grad():
        last = model(**batch).logits[:, -1]
    assert last.argmax(-1).tolist() == [ecg_id, ecg_id]
    last[:, [ecg_id, processor.tokenizer.eos_token_id]] = -float("inf")  # suppressed, and min_new_tokens
    new = model.generate(**batch, max_new_tokens=4, min_new_tokens=4)[:, batch["input_ids"].shape[1] :]
    assert new.shape == (2, 4) and not (new == ecg_id).any()
    assert new[:, 0].tolist() == last.argmax(-1).tolist()
    with pytest.raises(
        ValueError, match=rf"generate\(\) produced the <ecg> placeholder \(id {ecg_id}\), which has no"
    ):
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, suppress_tokens=None)


def test_missing_leads_soft_tokens_are_left_out_of_the_language_model(parts):
    """A two-lead ECG (`lead_mask`): whatever the missing leads hold, the LM's logits and the generated tokens are
    the same, because the encoder leaves those leads out and their `<ecg>` positions are masked in the LM."""
    model, processor = parts
    processor.feature_extractor.missing_leads = "mask"
    try:
        ecgs = [ecg[:, :2] for ecg in ecg_batch(2)]
        batch = processor(ecgs=ecgs, sampling_rate=100, lead_names=["I", "II"], text=[processor.format_prompt()] * 2)
    finally:
        processor.feature_extractor.missing_leads = "raise"
    lead_mask = batch["lead_mask"]
    assert lead_mask.tolist() == [[True, True] + [False] * 10] * 2
    other = batch["ecg_values"].clone()
    other[:, 2:] = torch.randn_like(other[:, 2:]) * 3
    masked = model.mask_missing_lead_tokens(batch["input_ids"], batch["attention_mask"], lead_mask)
    seen = masked.bool()  # the logits at masked positions are never read (no labels, no next token there)
    with torch.no_grad():
        logits = model(**batch).logits[seen]
        torch.testing.assert_close(logits, model(**{**batch, "ecg_values": other}).logits[seen])
        assert not torch.allclose(logits, model(**{**batch, "lead_mask": None}).logits[seen])
    placeholders = batch["input_ids"] == model.config.ecg_token_index
    per_lead = model.config.ecg_tokens_per_lead
    assert masked[placeholders].reshape(2, 12, per_lead)[:, :2].all()
    assert not masked[placeholders].reshape(2, 12, per_lead)[:, 2:].any()
    options = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    new = model.generate(**batch, **options)
    assert torch.equal(new, model.generate(**{**batch, "ecg_values": other}, **options))


def test_inputs_embeds_with_the_masked_attention_mask_equal_ecg_values_with_lead_mask(parts):
    """`embed_inputs(..., lead_mask=...)` then `inputs_embeds` with `mask_missing_lead_tokens`'s attention mask gives
    the logits and the generated tokens of `input_ids` + `ecg_values` + `lead_mask`; a `lead_mask` that would be
    ignored (no `ecg_values`) raises instead of leaving the missing leads' soft tokens attended."""
    model, processor = parts
    processor.feature_extractor.missing_leads = "mask"
    try:
        ecgs = [ecg_batch(2)[0][:, :2], ecg_batch(2)[1]]  # record 0 has leads I and II only
        prompts = [processor.format_prompt(), "<ecg>\nWrite the report of this 12-lead ECG, sinus rhythm or not.\n"]
        batch = processor(ecgs=ecgs[:1], sampling_rate=100, lead_names=["I", "II"], text=prompts[:1])
        full = processor(**{**ecg_kwargs(1), "ecgs": ecgs[1:]}, text=prompts[1:])
    finally:
        processor.feature_extractor.missing_leads = "raise"
    length = max(batch["input_ids"].shape[1], full["input_ids"].shape[1])

    def left_pad(tensor, value):
        return torch.nn.functional.pad(tensor, (length - tensor.shape[1], 0), value=value)

    pad_id = processor.tokenizer.pad_token_id
    input_ids = torch.cat([left_pad(batch["input_ids"], pad_id), left_pad(full["input_ids"], pad_id)])
    attention_mask = torch.cat([left_pad(batch["attention_mask"], 0), left_pad(full["attention_mask"], 0)])
    ecg_values = torch.cat([batch["ecg_values"], full["ecg_values"]])
    lead_mask = torch.cat([batch["lead_mask"], torch.ones(1, 12, dtype=torch.bool)])
    assert lead_mask[0].sum() == 2 and (attention_mask == 0).any()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "ecg_values": ecg_values,
              "lead_mask": lead_mask}  # fmt: skip
    masked = model.mask_missing_lead_tokens(input_ids, attention_mask, lead_mask)
    with torch.no_grad():
        inputs_embeds, _ = model.embed_inputs(input_ids, ecg_values, lead_mask=lead_mask)
        expected = model(**inputs).logits
        torch.testing.assert_close(model(inputs_embeds=inputs_embeds, attention_mask=masked).logits, expected)
        assert not torch.allclose(model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits, expected)
    options = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    from_ids = model.generate(**inputs, **options)[:, length:]
    assert torch.equal(model.generate(inputs_embeds=inputs_embeds, attention_mask=masked, **options), from_ids)
    message = r"lead_mask was given without ecg_values and would be ignored; .*mask_missing_lead_tokens"
    with pytest.raises(ValueError, match=message):
        model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, lead_mask=lead_mask)
    with pytest.raises(ValueError, match=message):
        model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, lead_mask=lead_mask, **options)


def test_save_pretrained_and_auto_class_reload(parts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model, processor = parts
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_merit_report.MeritForReportGeneration"
    assert {"modeling_merit_report.py", "modeling_merit.py", "configuration_merit.py"} <= {
        p.name for p in tmp_path.iterdir()
    }
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    reprocessor = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "MeritForReportGeneration"
    batch = reprocessor(**ecg_kwargs(2), reports=TINY_REPORTS[:2])
    torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("freeze", [True, False])
def test_the_frozen_encoder_stays_frozen_after_loading(parts, tmp_path, freeze):
    from transformers import AutoModelForCausalLM

    from merit_hf import MeritForReportGeneration

    model, _ = parts
    model.config.freeze_ecg_encoder = freeze
    model.save_pretrained(tmp_path)
    for loaded in (
        MeritForReportGeneration.from_pretrained(tmp_path),
        MeritForReportGeneration.from_pretrained(tmp_path, output_loading_info=True)[0],
        AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True),
    ):
        trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
        built = MeritForReportGeneration(loaded.config)
        assert trainable == {name for name, p in built.named_parameters() if p.requires_grad}
        assert any(name.startswith("ecg_model.") for name in trainable) is not freeze
        assert all(p.requires_grad for p in loaded.multi_modal_projector.parameters())


def rename_safetensors_keys(path, old: str, new: str) -> None:
    """Rewrite a safetensors file with `old` replaced by `new` in its weight names (a checkpoint of an older layout)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
        tensors = {key.replace(old, new): handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    save_file(tensors, path, metadata=metadata)


def test_folder_saved_with_the_old_ecg_encoder_names_loads_bit_identically(parts, tmp_path):
    """A folder written when the encoder was `ecg_encoder` (weights `ecg_encoder.*`) loads into `ecg_model` through
    transformers' key renaming: every tensor equal, the same logits, and a new save writes `ecg_model.*`."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from merit_hf import MeritForReportGeneration

    model, processor = parts
    model.save_pretrained(tmp_path / "old")
    rename_safetensors_keys(tmp_path / "old" / "model.safetensors", "ecg_model.", "ecg_encoder.")
    with safe_open(tmp_path / "old" / "model.safetensors", "pt") as handle:
        names = list(handle.keys())  # noqa: SIM118
    assert any(name.startswith("ecg_encoder.") for name in names)
    assert not any(name.startswith("ecg_model.") for name in names)
    batch = processor(**ecg_kwargs(2), reports=TINY_REPORTS[:2])
    for loader in (MeritForReportGeneration.from_pretrained, AutoModelForCausalLM.from_pretrained):
        reloaded = loader(tmp_path / "old").eval()
        assert type(reloaded) is MeritForReportGeneration
        expected = model.state_dict()
        assert reloaded.state_dict().keys() == expected.keys()
        assert all(torch.equal(tensor, expected[name]) for name, tensor in reloaded.state_dict().items())
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    reloaded.save_pretrained(tmp_path / "new")
    with safe_open(tmp_path / "new" / "model.safetensors", "pt") as handle:
        assert sorted(handle.keys()) == sorted(  # noqa: SIM118
            name.replace("ecg_encoder.", "ecg_model.") for name in names
        )


@pytest.mark.parametrize("prefix", ["ecg_model.", "ecg_encoder."])
def test_the_encoder_and_a_classifier_load_from_a_report_models_folder(parts, tmp_path, prefix):
    """A report model trained with `--freeze_ecg_encoder false` holds a fine-tuned encoder: `MeritEcgModel` and
    `MeritForEcgClassification` (a new head) take it, leaving out the projector and the LM, also from a folder saved
    when the encoder was `ecg_encoder`."""
    from merit_hf import MeritConfig, MeritEcgModel, MeritForEcgClassification

    model, _ = parts
    with torch.no_grad():
        for parameter in model.ecg_model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)  # not what a new encoder's init would give
    model.save_pretrained(tmp_path)
    rename_safetensors_keys(tmp_path / "model.safetensors", "ecg_model.", prefix)
    expected = model.ecg_model.state_dict()
    encoder = MeritEcgModel.from_pretrained(tmp_path)
    assert encoder.state_dict().keys() == expected.keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in encoder.state_dict().items())
    classifier = MeritForEcgClassification.from_pretrained(tmp_path, id2label={0: "NORM", 1: "MI"})
    assert type(classifier.config) is MeritConfig and classifier.config.num_labels == 2
    saved_ecg_config = {**model.config.ecg_config.to_dict(), "dtype": "float32"}
    assert classifier.config.ecg_config.to_dict() == saved_ecg_config
    loaded = classifier.ecg_model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


def test_adapter_saved_with_the_old_ecg_encoder_module_name_loads(parts, tmp_path):
    """An adapter whose trained encoder was saved as `ecg_encoder` (`modules_to_save` and weight names) loads onto
    `ecg_model` with the adapter's encoder weights, giving the adapted model's logits."""
    from peft import get_peft_model

    from merit_hf.training.report_lora import (
        ReportTrainingArguments,
        base_fingerprint,
        load_report_adapter,
        lora_config,
        save_report_adapter,
    )

    model, processor = parts
    model.save_pretrained(tmp_path / "base")
    fingerprint = base_fingerprint(model)
    arguments = ReportTrainingArguments(lora_r=2, lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(model), lora_config(arguments, train_ecg_encoder=True)).eval()
    trained_encoder = peft_model.base_model.model.ecg_model.modules_to_save["default"]
    with torch.no_grad():
        for parameter in trained_encoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    save_report_adapter(
        peft_model, processor, model.generation_config, tmp_path / "adapter", fingerprint, tmp_path / "base"
    )
    config_file = tmp_path / "adapter" / "adapter_config.json"
    adapter_config = json.loads(config_file.read_text())
    assert adapter_config["modules_to_save"] == ["multi_modal_projector", "ecg_model"]
    adapter_config["modules_to_save"] = ["multi_modal_projector", "ecg_encoder"]
    config_file.write_text(json.dumps(adapter_config))
    rename_safetensors_keys(tmp_path / "adapter" / "adapter_model.safetensors", ".ecg_model.", ".ecg_encoder.")

    reloaded, _ = load_report_adapter(tmp_path / "adapter")
    loaded_encoder = reloaded.base_model.model.ecg_model.modules_to_save["default"].state_dict()
    assert all(torch.equal(tensor, loaded_encoder[name]) for name, tensor in trained_encoder.state_dict().items())
    batch = processor(**ecg_kwargs(2), reports=TINY_REPORTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, peft_model(**batch).logits, rtol=0, atol=0)


def test_tied_embeddings_survive_save_and_reload(lm_dir, tmp_path):
    from transformers import AutoTokenizer

    from merit_hf import MeritEcgModel, MeritForReportGeneration

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    model = MeritForReportGeneration.from_parts(
        MeritEcgModel(tiny_ecg_config(**ECG_CONFIG)), tiny_llama(len(tokenizer), tie_word_embeddings=True), tokenizer
    )
    model.save_pretrained(tmp_path)
    reloaded = MeritForReportGeneration.from_pretrained(tmp_path)
    head, embeddings = reloaded.get_output_embeddings().weight, reloaded.get_input_embeddings().weight
    assert head.data_ptr() == embeddings.data_ptr()


# ----------------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------------


def test_lora_targets_only_the_language_model(parts):
    from peft import get_peft_model

    from merit_hf.training.report_lora import ReportTrainingArguments, lora_config

    model, _ = parts
    peft_model = get_peft_model(model, lora_config(ReportTrainingArguments(lora_target_modules=["q_proj", "v_proj"])))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name or "multi_modal_projector" in name for name in trainable)
    assert all(name.startswith("base_model.model.language_model.") for name in trainable if ".lora_" in name)
    assert len([name for name in trainable if ".lora_A." in name]) == 2 * 2  # 2 layers x (q_proj, v_proj)
    assert not any("ecg_model" in name for name in trainable)


def test_one_lora_step_lowers_the_loss_and_adapter_reload_is_identical(parts, tmp_path):
    from peft import PeftModel, get_peft_model

    from merit_hf.training.report_lora import (
        ReportTrainingArguments,
        base_fingerprint,
        load_report_adapter,
        lora_config,
        save_report_adapter,
    )

    model, processor = parts
    model.save_pretrained(tmp_path / "base")
    fingerprint = base_fingerprint(model)
    peft_model = get_peft_model(model, lora_config(ReportTrainingArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0)))
    batch = processor(**ecg_kwargs(4), reports=TINY_REPORTS[:4])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    loss_before = peft_model(**batch).loss
    loss_before.backward()
    optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        loss_after = peft_model(**batch).loss
        logits = peft_model(**batch).logits
    assert loss_after < loss_before.detach()

    prompts = processor(**ecg_kwargs(2, seed=1), text=[processor.format_prompt()] * 2)
    generated = peft_model.generate(**prompts, max_new_tokens=6, do_sample=False)
    save_report_adapter(
        peft_model, processor, model.generation_config, tmp_path / "adapter", fingerprint, tmp_path / "base"
    )
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "generation_config.json"} <= saved
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as handle:
        assert any("multi_modal_projector" in key for key in handle.keys())  # noqa: SIM118

    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "base")

    reloaded, reprocessor = load_report_adapter(tmp_path / "adapter")  # the base found from adapter_config.json
    assert isinstance(reloaded, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits, rtol=0, atol=0)
    assert torch.equal(reloaded.generate(**prompts, max_new_tokens=6, do_sample=False), generated)
    assert reprocessor.ecg_seq_length == processor.ecg_seq_length
    # PEFT's own Auto class, as the README says (the adapter names MERIT's class, imported from an allowed package)
    from peft import AutoPeftModelForCausalLM

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", import_allowlist=["merit_hf"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(auto(**batch).logits, logits, rtol=0, atol=0)


def test_adapter_for_another_or_no_base_model_raises(parts, lm_dir, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merit_hf import MeritEcgModel, MeritForReportGeneration
    from merit_hf.training.report_lora import (
        ReportTrainingArguments,
        base_fingerprint,
        load_report_adapter,
        lora_config,
        save_report_adapter,
    )

    model, processor = parts
    fingerprint = base_fingerprint(model)
    peft_model = get_peft_model(copy.deepcopy(model), lora_config(ReportTrainingArguments(lora_r=2)))
    save_report_adapter(peft_model, processor, model.generation_config, tmp_path, fingerprint)
    # A base built with from_parts has no path: nothing to find the base from, and no Hub look-up of `None`.
    with pytest.raises(ValueError, match=r"adapter_config.json names no base model .*; pass base_model=\.\.\."):
        load_report_adapter(tmp_path)
    torch.manual_seed(1)  # another random encoder: same shapes, other weights
    other = MeritForReportGeneration.from_parts(
        MeritEcgModel(tiny_ecg_config(**ECG_CONFIG)),
        AutoModelForCausalLM.from_pretrained(lm_dir),
        AutoTokenizer.from_pretrained(lm_dir),
        ecg_tokens_per_lead=2,
    )
    with pytest.raises(ValueError, match=r"adapter was saved for another base model \(ecg_encoder_sha256: adapter"):
        load_report_adapter(tmp_path, other)


# ----------------------------------------------------------------------------------------------------------------------
# Training script and reference reports
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_ptbxl_rows():
    """The bundled PTB-XL records at 100 Hz as `merit_hf.data.build_ptbxl` gives them (all folds, ecg_id order)."""
    from merit_hf.training.report_lora import load_ptbxl_rows

    return load_ptbxl_rows(BUNDLED_PTBXL, sampling_rate=100)


@pytest.mark.slow
def test_ptbxl_reference_rule_drops_or_rejects_non_english_reports(bundled_ptbxl_rows):
    from merit_hf.training.report_lora import read_ptbxl_reports

    examples, counts = read_ptbxl_reports(bundled_ptbxl_rows, folds=[9, 10])
    assert examples and counts["de"] > 0
    assert len(examples) == counts["en"]
    first_three, _ = read_ptbxl_reports(bundled_ptbxl_rows, folds=[9, 10], limit=3)
    assert list(first_three["ecg_id"]) == list(examples["ecg_id"])[:3]
    with pytest.raises(ValueError, match=r"PTB-XL ecg_id \d+: report in language '(de|sv)'"):
        read_ptbxl_reports(bundled_ptbxl_rows, folds=[9, 10], non_english="error")


def test_references_are_the_pretraining_reports_of_the_csv_and_the_ecgs_of_the_wfdb_files(bundled_ptbxl_rows):
    """Report generation reads `merit_hf.data`, as pretraining does: the references are the csv's reports with
    whitespace normalised and the curators' `Edit: ...` note cut off (`split_ptbxl_edit_note`), for exactly the records
    of the folds whose report is English or has no language marker, in ecg_id order. The ECG input is the feature
    extractor's on the records as `merit_hf.data.read_ecg_record` reads them (float32, as the datasets store them),
    within float32 rounding of the feature extractor's on the WFDB paths."""
    import pandas as pd

    from merit_hf import MeritFeatureExtractor
    from merit_hf.data import read_ecg_record, report_language, split_ptbxl_edit_note
    from merit_hf.training.report_lora import ReportExamples, read_ptbxl_reports

    folds = [1, 2, 3, 4, 5, 6, 7, 8]
    examples, _ = read_ptbxl_reports(bundled_ptbxl_rows, folds=folds)
    table = pd.read_csv(BUNDLED_PTBXL / "ptbxl_database.csv").sort_values("ecg_id")
    table = table[table["strat_fold"].isin(folds)]
    expected = {
        int(row.ecg_id): split_ptbxl_edit_note(row.report)[0]
        for row in table.itertuples()
        if report_language(split_ptbxl_edit_note(row.report)[0]) in ("en", "und")
    }
    assert [int(example["ecg_id"]) for example in examples] == list(expected)
    assert [example["report"] for example in examples] == list(expected.values())
    assert not any("edit:" in report.lower() for report in expected.values())
    assert expected[317] == "sinus rhythm. normal ecg."  # the csv's report ends "Edit: NORM 100, (NORM 100)"

    feature_extractor = MeritFeatureExtractor.from_model_config(tiny_ecg_config(**ECG_CONFIG))
    records = [str(BUNDLED_PTBXL / filename) for filename in list(examples["filename"])[:3]]
    signals = [read_ecg_record(record, sampling_rate=100, num_samples=1000)["signal"] for record in records]
    ecg_values = ReportExamples(examples.select(range(3)), feature_extractor).ecg_values
    from_signals = feature_extractor(signals, sampling_rate=100, lead_names=list(tiny_ecg_config().lead_names),
                                     return_tensors="pt", crop="center")["ecg_values"]  # fmt: skip
    assert torch.equal(ecg_values, from_signals)
    from_paths = feature_extractor(records, return_tensors="pt", crop="center")["ecg_values"]
    torch.testing.assert_close(ecg_values, from_paths, rtol=0, atol=1e-5)


def test_ptbxl_reports_load_from_a_converted_folder(bundled_ptbxl_rows, tmp_path):
    """A converted PTB-XL folder (`merit_hf.data.convert_ptbxl`, read with `load_ptbxl`) gives the same examples."""
    from merit_hf.data import convert_ptbxl
    from merit_hf.training.report_lora import load_ptbxl_rows, read_ptbxl_reports

    folds = list(range(1, 11))
    english = set(read_ptbxl_reports(bundled_ptbxl_rows, folds, limit=10)[0]["ecg_id"])
    keep = [index for index, ecg_id in enumerate(bundled_ptbxl_rows["ecg_id"]) if ecg_id in english or index < 20]
    rows = bundled_ptbxl_rows.select(keep)
    convert_ptbxl(BUNDLED_PTBXL, tmp_path / "converted", sampling_rate=100, ecg_ids=rows["ecg_id"])
    converted = load_ptbxl_rows(tmp_path / "converted", sampling_rate=100)
    assert converted["ecg_id"] == rows["ecg_id"]
    expected, expected_counts = read_ptbxl_reports(rows, folds)
    examples, counts = read_ptbxl_reports(converted, folds)
    assert examples and counts == expected_counts
    for example, reference in zip(examples.with_format("numpy"), expected.with_format("numpy"), strict=True):
        assert example["report"] == reference["report"] and example["filename"] == reference["filename"]
        np.testing.assert_array_equal(example["signal"], reference["signal"])


def test_the_examples_cache_key_is_the_datas_not_the_path_it_was_read_by(bundled_ptbxl_rows, tmp_path, monkeypatch):
    """The cache key (`rows_fingerprint`) of the same PTB-XL read by an absolute path, a relative one or a link is one
    key, for a PhysioNet folder and a converted one; other data is another key. The `PTB-XL source:` line (the folder
    as given) made every spelling of the path a new key, so the whole cache was rebuilt; it stays in the description."""
    import os

    from merit_hf.data import convert_ptbxl
    from merit_hf.data.ptbxl import described_source
    from merit_hf.training.report_examples import rows_fingerprint
    from merit_hf.training.report_lora import load_ptbxl_rows, read_ptbxl_reports

    def key(rows):
        return rows._fingerprint, rows_fingerprint(read_ptbxl_reports(rows, list(range(1, 9)))[0])

    expected = key(bundled_ptbxl_rows)
    (tmp_path / "link").symlink_to(BUNDLED_PTBXL)
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(BUNDLED_PTBXL)
    assert key(load_ptbxl_rows(relative)) == key(load_ptbxl_rows("link")) == expected
    assert described_source(load_ptbxl_rows("link"))["source"] == "link"  # the folder as given, still described
    assert described_source(bundled_ptbxl_rows)["source"] == str(BUNDLED_PTBXL)

    ecg_ids = bundled_ptbxl_rows["ecg_id"]
    convert_ptbxl(BUNDLED_PTBXL, tmp_path / "converted", sampling_rate=100, ecg_ids=ecg_ids[:30])
    convert_ptbxl(BUNDLED_PTBXL, tmp_path / "fewer", sampling_rate=100, ecg_ids=ecg_ids[:29])
    (tmp_path / "converted_link").symlink_to(tmp_path / "converted")
    converted = key(load_ptbxl_rows(tmp_path / "converted"))
    assert key(load_ptbxl_rows("converted")) == key(load_ptbxl_rows("converted_link")) == converted
    assert len({converted, key(load_ptbxl_rows("fewer")), expected}) == 3


def test_ecg_use_check_tells_an_ecg_blind_model_from_one_that_reads_the_ecg(parts):
    """`ecg_use_check`: the loss with real and with shuffled ECGs is the model's own token-mean loss, equal for both
    when the projector writes zeros whatever the ECG (so the ECG carries nothing), different once it does not."""
    from accelerate import Accelerator

    from merit_hf.models.merit.processing_merit import IGNORE_INDEX
    from merit_hf.training.report_lora import ReportCollator, ReportExamples, ecg_use_check

    model, processor = parts
    lead_names = list(tiny_ecg_config().lead_names)
    examples = [{"signal": signal, "sampling_rate": 100, "lead_names": lead_names, "report": report}
                for signal, report in zip(ecg_batch(4), TINY_REPORTS)]  # fmt: skip
    dataset = ReportExamples(examples, processor.feature_extractor)
    shuffled = dataset.with_shuffled_ecgs(seed=0)
    assert [item["report"] for item in shuffled] == [item["report"] for item in dataset]
    for index in range(len(dataset)):  # every report gets another report's ECG, every ECG is used once
        assert not torch.equal(shuffled[index]["ecg_values"], dataset[index]["ecg_values"])
        assert sum(torch.equal(shuffled[index]["ecg_values"], item["ecg_values"]) for item in dataset) == 1

    accelerator = Accelerator(cpu=True)
    collator = ReportCollator(processor, processor.format_prompt(), condition_on_ecg=True, with_reports=True)
    reads_ecg = ecg_use_check(accelerator, model, dataset, collator, batch_size=3)
    assert reads_ecg["shuffled_minus_real"] != pytest.approx(0.0, abs=1e-6)
    batch = collator([dataset[index] for index in range(4)])
    batch.pop("index")
    with torch.no_grad():
        assert reads_ecg["real_ecg"] == pytest.approx(float(model(**batch).loss), rel=1e-5)  # batches of 3 + 1
    assert reads_ecg["num_report_tokens"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    with torch.no_grad():  # the projector writes zeros: every ECG looks the same to the LM
        model.multi_modal_projector.linear_2.weight.zero_()
        model.multi_modal_projector.linear_2.bias.zero_()
    blind = ecg_use_check(accelerator, model, dataset, collator, batch_size=3)
    assert blind["shuffled_minus_real"] == pytest.approx(0.0, abs=1e-6)
    assert blind["real_ecg_better_fraction"] == 0.5  # every report ties: half, as by chance (was 0.0)

    text_only = ReportCollator(processor, "write the report.\n", condition_on_ecg=False, with_reports=True)
    no_ecg = ecg_use_check(accelerator, model, dataset, text_only, batch_size=3)
    assert set(no_ecg) == {"num_reports", "num_report_tokens", "no_ecg"} and no_ecg["no_ecg"] > 0


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("logging_steps", "0", "--logging_steps: must be at least 1, got 0"),
        ("gradient_accumulation_steps", "0", "--gradient_accumulation_steps: must be at least 1, got 0"),
        ("per_device_train_batch_size", "0", "--per_device_train_batch_size: must be at least 1, got 0"),
        ("per_device_eval_batch_size", "0", "--per_device_eval_batch_size: must be at least 1, got 0"),
        ("max_new_tokens", "0", "--max_new_tokens: must be at least 1, got 0"),
        ("num_beams", "0", "--num_beams: must be at least 1, got 0"),
        ("lora_r", "0", "--lora_r: must be at least 1, got 0"),
        ("lora_epochs", "-1", "--lora_epochs: must be 0 (skip the stage) or more, got -1"),
        ("alignment_epochs", "-1", "--alignment_epochs: must be 0 (skip the stage) or more, got -1"),
        ("warmup_ratio", "1.5", "--warmup_ratio: must be between 0 and 1, got 1.5"),
        ("mixed_precision", "fp8", "--mixed_precision: must be one of ('no', 'bf16', 'fp16'), got 'fp8'"),
        ("max_length", "0", "--max_length: must be at least 1, got 0"),
        ("max_train_reports", "-1", "--max_train_reports: must be None (all) or at least 0, got -1"),
        ("max_eval_reports", "-2", "--max_eval_reports: must be None (all) or at least 0, got -2"),
        ("eval_folds", "8", "--eval_folds: fold(s) [8] are in --train_folds too; the scored reports must be held out"),
        (
            "check_folds",
            "8",
            "--check_folds: fold(s) [8] are in --train_folds too; the checked reports must be held out",
        ),
        ("eval_folds", "11", "--eval_folds: PTB-XL's folds are 1 to 10, got [11]"),
        ("check_folds", "11", "--check_folds: PTB-XL's folds are 1 to 10, got [11]"),
        ("train_folds", "0", "--train_folds: PTB-XL's folds are 1 to 10, got [0]"),
        ("max_grad_norm", "0", "--max_grad_norm: must be more than 0 (None: no clipping), got 0.0"),
        ("max_grad_norm", "-1", "--max_grad_norm: must be more than 0 (None: no clipping), got -1.0"),
        ("repetition_penalty", "0", "--repetition_penalty: must be more than 0 (1: no penalty), got 0.0"),
        ("lora_dropout", "1.5", "--lora_dropout: must be at least 0 and less than 1, got 1.5"),
        ("lora_alpha", "0", "--lora_alpha: must be at least 1, got 0"),
        ("learning_rate", "-1", "--learning_rate: must be 0 or more, got -1.0"),
        ("alignment_learning_rate", "-1", "--alignment_learning_rate: must be 0 or more, got -1.0"),
        ("weight_decay", "-1", "--weight_decay: must be 0 or more, got -1.0"),
        ("ptbxl_sampling_rate", "250", "--ptbxl_sampling_rate: must be one of [100, 500] (PTB-XL's rates), got 250"),
        ("non_english_reports", "foo", "--non_english_reports: must be one of ('drop', 'error'), got 'foo'"),
        (
            "lr_scheduler_type",
            "bogus",
            "--lr_scheduler_type: must be one of ('linear', 'cosine', "
            "'cosine_with_restarts', 'polynomial', 'constant', 'constant_with_warmup', 'inverse_sqrt'), got 'bogus'",
        ),
        ("ecg_tokens_per_lead", "0", "--ecg_tokens_per_lead: must be at least 1, got 0"),
    ],
)
def test_report_lora_refuses_bad_settings_before_loading_anything(tmp_path, flag, value, message):
    """Settings that would divide by zero, index an empty list, slice reports away, select no report, silently break
    training (a gradient clipped to 0 or flipped, LoRA scaled to nothing) or fail only once the LM is loaded or
    trained are refused when the arguments are parsed: before the language model (here a folder that does not exist)
    or any data is read."""
    from merit_hf.training.report_lora import main

    arguments = [str(REPO_ROOT / "configs" / "report_tiny.yaml"), "--language_model", str(tmp_path / "no_lm")]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        main(arguments + ["--output_dir", str(tmp_path / "run"), f"--{flag}", value])
    assert not (tmp_path / "run").exists()


def test_stage_steps_come_from_the_sharded_loader():
    """Step totals count this process's shard of the data (`accelerator.prepare`), not the whole loader: 40 reports
    in batches of 8 are 5 batches on one process, 3 on each of 2 processes (the second pads its last batch)."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from merit_hf.training.report_lora import optimizer_steps

    loader = DataLoader(list(range(40)), batch_size=8)
    shards = [prepare_data_loader(loader, num_processes=2, process_index=rank) for rank in (0, 1)]
    assert [len(shard) for shard in shards] == [3, 3]
    assert optimizer_steps(loader, epochs=1, gradient_accumulation_steps=2) == 3
    assert optimizer_steps(shards[0], epochs=1, gradient_accumulation_steps=2) == 2
    assert optimizer_steps(shards[0], epochs=3, gradient_accumulation_steps=1) == 9


def _train_stage_inputs(parts, count: int = 5):
    """A tiny stage-1 setup: the projector trains, `count` examples with reports of different lengths."""
    from merit_hf.training.report_lora import ReportCollator, ReportExamples

    model, processor = parts
    lead_names = list(tiny_ecg_config().lead_names)
    examples = [{"signal": signal, "sampling_rate": 100, "lead_names": lead_names, "report": report}
                for signal, report in zip(ecg_batch(count), TINY_REPORTS)]  # fmt: skip
    dataset = ReportExamples(examples, processor.feature_extractor)
    collator = ReportCollator(processor, processor.format_prompt(), condition_on_ecg=True, with_reports=True)
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    return model, dataset, collator


def test_train_stage_counts_the_ecgs_of_each_micro_batch_and_logs_the_mean_loss_of_a_step(parts):
    """With gradient accumulation, 5 reports in micro-batches of 2 are 3 micro-batches and 2 optimizer steps (the
    last one partial): 5 ECGs seen, not 2 steps x 2 x 2, and each step's loss is the loss per report token of the
    step's whole batch (what the model computes on those reports at once), not the mean of the micro-batches'."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from merit_hf.training.report_lora import ReportTrainingArguments, _train_stage

    model, dataset, collator = _train_stage_inputs(parts)
    step_losses = []
    with torch.no_grad():  # learning rate 0: the weights stay, so each step's loss can be computed first
        for rows in ([0, 1, 2, 3], [4]):
            batch = collator([dataset[index] for index in rows])
            batch.pop("index")
            step_losses.append(float(model(**batch).loss))
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    training_args = ReportTrainingArguments(gradient_accumulation_steps=2, logging_steps=1, warmup_ratio=0.0)
    loader = DataLoader(dataset, batch_size=2, collate_fn=collator)
    losses, throughput = _train_stage("alignment", accelerator, model, loader, 1, 0.0, training_args)
    assert losses == pytest.approx(step_losses, rel=1e-5)
    assert throughput["ecgs_seen"] == 5 and throughput["steps_measured"] == 2


def test_accumulated_micro_batches_step_on_the_gradient_of_their_whole_batch(parts, monkeypatch):
    """4 reports of different lengths: 2 micro-batches of 2 accumulated give the gradient of one batch of 4 (the mean
    per report token). Each micro-batch's mean loss, averaged, weighted the tokens of the shorter reports more."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from torch.utils.data import DataLoader

    from merit_hf.training.report_lora import ReportTrainingArguments, _train_stage

    model, dataset, collator = _train_stage_inputs(parts, count=4)
    recorded = []

    class RecordingOptimizer(torch.optim.SGD):  # records the gradient each step is taken on
        def __init__(self, params, lr, weight_decay=0.0, fused=None):
            super().__init__(params, lr=lr)

        def step(self, closure=None):
            recorded.append(torch.cat([p.grad.flatten().clone() for g in self.param_groups for p in g["params"]]))

    monkeypatch.setattr(torch.optim, "AdamW", RecordingOptimizer)
    gradients = []
    for accumulation, batch_size in ((1, 4), (2, 2)):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        recorded.clear()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
        training_args = ReportTrainingArguments(gradient_accumulation_steps=accumulation, warmup_ratio=0.0,
                                                max_grad_norm=None)  # fmt: skip
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
        _train_stage("alignment", accelerator, model, loader, 1, 0.0, training_args)
        assert len(recorded) == 1
        gradients.append(recorded[0])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-5, atol=1e-7)


def test_report_lora_with_lora_epochs_0_trains_only_the_projector_and_saves_everything(lm_dir, tmp_path):
    """`--lora_epochs 0` skips stage 2 as `--alignment_epochs 0` skips stage 1: the aligned base, an adapter that
    reloads to it (LoRA starts as a no-op) and the results, which name the skipped stage."""
    from merit_hf import MeritForReportGeneration
    from merit_hf.training.report_lora import RESULTS_FILE, load_report_adapter, main

    output_dir = tmp_path / "run"
    arguments = {"language_model": lm_dir, "ptbxl_dir": BUNDLED_PTBXL, "output_dir": output_dir, "use_cpu": "true",
                 "max_train_reports": 4, "lora_epochs": 0, "do_eval": "false"}  # fmt: skip
    results = main(
        [str(REPO_ROOT / "configs" / "report_tiny.yaml")]
        + [item for name, value in arguments.items() for item in (f"--{name}", str(value))]
    )
    assert results["skipped_stages"] == {"lora": "--lora_epochs 0"}
    with pytest.raises(FileExistsError, match="holds an earlier run"):  # the same command again: refused
        main([str(REPO_ROOT / "configs" / "report_tiny.yaml")]
             + [item for name, value in arguments.items() for item in (f"--{name}", str(value))])  # fmt: skip
    assert "alignment_loss_last" in results and "lora_loss_last" not in results and "lora_throughput" not in results
    assert json.loads((output_dir / RESULTS_FILE).read_text())["skipped_stages"] == {"lora": "--lora_epochs 0"}
    model, processor = load_report_adapter(output_dir / "adapter")
    base = MeritForReportGeneration.from_pretrained(output_dir / "base_model").eval()
    batch = processor(ecgs=ecg_batch(1), sampling_rate=100, lead_names=list(tiny_ecg_config().lead_names),
                      reports=["sinus rhythm"], return_tensors="pt", crop="center")  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits)


def test_the_ecg_use_check_leaves_training_bit_identical(lm_dir, tmp_path):
    """`--check_folds` is a diagnostic: a run with it trains the same model as one without (the same losses and
    adapter weights, bit for bit). Its loaders drew from the global RNG after stage 1, so LoRA started from other
    weights."""
    from safetensors.torch import load_file

    from merit_hf.training.report_lora import main

    flags = {"language_model": lm_dir, "ptbxl_dir": BUNDLED_PTBXL, "use_cpu": "true", "max_train_reports": 4,
             "per_device_train_batch_size": 2, "do_eval": "false", "save_base_model": "false"}  # fmt: skip
    runs = {}
    for name, check in (("without", {}), ("with", {"check_folds": 9, "max_check_reports": 2})):
        values = {**flags, **check, "output_dir": tmp_path / name}
        runs[name] = main(
            [str(REPO_ROOT / "configs" / "report_tiny.yaml")]
            + [item for flag, value in values.items() for item in (f"--{flag}", str(value))]
        )
    assert "lora_ecg_use_check" in runs["with"] and "lora_ecg_use_check" not in runs["without"]
    for key in ("alignment_loss_first", "alignment_loss_last", "lora_loss_first", "lora_loss_last"):
        assert runs["with"][key] == runs["without"][key], key
    weights = {name: load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in runs}
    assert weights["with"].keys() == weights["without"].keys()
    for key, tensor in weights["without"].items():
        assert torch.equal(weights["with"][key], tensor), key


def test_the_no_ecg_baseline_adapter_reloads_with_the_prompt_it_was_trained_with(lm_dir, tmp_path):
    """`--condition_on_ecg false`: the adapter's processor records it, so reloaded, its `format_prompt()` has no
    `<ecg>` (it had one: an ECG went through a projector never aligned) and generation from it reproduces the run's
    predictions.jsonl; an ECG given to it is refused."""
    from merit_hf.training.report_lora import PREDICTIONS_FILE, load_report_adapter, main

    output_dir = tmp_path / "run"
    arguments = {"language_model": lm_dir, "ptbxl_dir": BUNDLED_PTBXL, "output_dir": output_dir, "use_cpu": "true",
                 "max_train_reports": 4, "condition_on_ecg": "false", "compute_meteor": "false"}  # fmt: skip
    main(
        [str(REPO_ROOT / "configs" / "report_tiny.yaml")]
        + [item for name, value in arguments.items() for item in (f"--{name}", str(value))]
    )
    model, processor = load_report_adapter(output_dir / "adapter")
    assert not processor.condition_on_ecg and processor.ecg_token not in processor.format_prompt()
    predictions = [json.loads(line)["generated"] for line in (output_dir / PREDICTIONS_FILE).read_text().splitlines()]
    batch = processor(text=[processor.format_prompt()] * len(predictions), return_tensors="pt")
    new_tokens = model.generate(**batch)[:, batch["input_ids"].shape[1] :]
    assert len(predictions) == 4 and processor.batch_decode(new_tokens, skip_special_tokens=True) == predictions
    with pytest.raises(ValueError, match=r"condition_on_ecg=False"):
        processor(**ecg_kwargs(1), text=[processor.format_prompt()])


def test_report_lora_refuses_an_earlier_run_or_removes_its_outputs_with_overwrite_output_dir(tmp_path):
    """A run into an output_dir holding an earlier run's outputs left them beside its own (a stale predictions.jsonl,
    a base_model/ the new adapter does not belong to). It is refused before anything loads (the LM here is a folder
    that does not exist), naming the folder and the flag; `--overwrite_output_dir true` removes those outputs, and
    nothing else, first."""
    from merit_hf.training.report_lora import PREDICTIONS_FILE, main

    output_dir = tmp_path / "run"
    (output_dir / "base_model").mkdir(parents=True)
    (output_dir / PREDICTIONS_FILE).write_text("{}\n")
    (output_dir / "notes.txt").write_text("not the run's")
    arguments = [str(REPO_ROOT / "configs" / "report_tiny.yaml"), "--language_model", str(tmp_path / "no_lm"),
                 "--output_dir", str(output_dir), "--use_cpu", "true", "--compute_meteor", "false"]  # fmt: skip
    message = (
        f"{output_dir}: holds an earlier run (base_model, predictions.jsonl). Start again with --overwrite_output_dir "
        "true (removes them), or choose another --output_dir."
    )
    with pytest.raises(FileExistsError, match=f"^{re.escape(message)}$"):
        main(arguments)
    assert (output_dir / PREDICTIONS_FILE).is_file()
    with pytest.raises(OSError, match="no_lm"):  # got past the outputs' removal to loading the LM
        main(arguments + ["--overwrite_output_dir", "true"])
    assert sorted(path.name for path in output_dir.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    ("hidden", "flags", "message"),
    [
        (["peft"], {}, "report_lora needs peft, not installed: pip install 'merit_hf[report]'"),
        (
            ["evaluate", "rouge_score"],
            {},
            "report_lora needs evaluate, rouge-score, not installed: pip install 'merit_hf[report]' (or --do_eval "
            "false: no scores, so no evaluate, rouge-score)",
        ),
        (["gguf"], {"gguf_file": "lm.gguf"}, "report_lora needs gguf, not installed: pip install 'merit_hf[report]'"),
    ],
)
def test_report_lora_refuses_missing_packages_before_loading_or_writing_anything(
    tmp_path, monkeypatch, hidden, flags, message
):
    """Without peft a run trained stage 1, wrote base_model/ and then failed; without evaluate (sacrebleu, rouge-score,
    nltk) it trained both stages and generated, then failed scoring, with no predictions.jsonl; a rerun was refused
    for the base_model/ left behind. The missing packages are named, with the install command, before the language
    model (here a folder that does not exist) loads and before the output_dir is made or cleared."""
    from merit_hf.training.report_lora import main

    for module in hidden:
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: import and find_spec say so
    output_dir = tmp_path / "run"
    (output_dir / "base_model").mkdir(parents=True)
    arguments = [str(REPO_ROOT / "configs" / "report_tiny.yaml"), "--language_model", str(tmp_path / "no_lm"),
                 "--output_dir", str(output_dir), "--overwrite_output_dir", "true"]  # fmt: skip
    arguments += [item for name, value in flags.items() for item in (f"--{name}", value)]
    with pytest.raises(ImportError, match=f"^{re.escape(message)}$"):
        main(arguments)
    assert [path.name for path in output_dir.iterdir()] == ["base_model"]  # not cleared by --overwrite_output_dir
    if "evaluate" in hidden:  # the scoring packages are needed only to score
        with pytest.raises(OSError, match="no_lm"):
            main(arguments + ["--do_eval", "false"])


def test_report_lora_refuses_meteor_without_wordnet_before_loading_anything(tmp_path, monkeypatch):
    """METEOR (on by default) needs NLTK's WordNet, which pip does not install: a run without it failed after
    training and generating, pointing to a script of the clone. It is refused first, naming the download command and
    the flag that skips METEOR."""
    import nltk.data

    from merit_hf.training.report_lora import main

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no_nltk_data")])
    output_dir = tmp_path / "run"
    arguments = [str(REPO_ROOT / "configs" / "report_tiny.yaml"), "--language_model", str(tmp_path / "no_lm"),
                 "--output_dir", str(output_dir)]  # fmt: skip
    message = (
        "--compute_meteor: METEOR needs NLTK's WordNet 3.0 (corpora/wordnet on NLTK_DATA), not found: python -m "
        "nltk.downloader wordnet, or --compute_meteor false to skip METEOR"
    )
    with pytest.raises(LookupError, match=f"^{re.escape(message)}$"):
        main(arguments)
    assert not output_dir.exists()
    with pytest.raises(OSError, match="no_lm"):  # without METEOR the run goes on to load the LM
        main(arguments + ["--compute_meteor", "false"])


def test_report_lora_writes_the_predictions_before_scoring_them(lm_dir, tmp_path, monkeypatch):
    """A scoring failure after generation lost the generated reports: predictions.jsonl was written after the
    scores. It is written first now."""
    from merit_hf.evaluation import report_metrics
    from merit_hf.training.report_lora import PREDICTIONS_FILE, main

    def failing_scores(*args, **kwargs):
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(report_metrics, "compute_report_metrics", failing_scores)
    output_dir = tmp_path / "run"
    arguments = {"language_model": lm_dir, "ptbxl_dir": BUNDLED_PTBXL, "output_dir": output_dir, "use_cpu": "true",
                 "max_train_reports": 4, "alignment_epochs": 0, "compute_meteor": "false"}  # fmt: skip
    with pytest.raises(RuntimeError, match="scoring failed"):
        main(
            [str(REPO_ROOT / "configs" / "report_tiny.yaml")]
            + [item for name, value in arguments.items() for item in (f"--{name}", str(value))]
        )
    lines = [json.loads(line) for line in (output_dir / PREDICTIONS_FILE).read_text().splitlines()]
    assert len(lines) == 4 and all(isinstance(line["generated"], str) and line["report"] for line in lines)


def lm_with_generation_settings(lm_dir, directory, **settings):
    """A copy of the tiny LM whose generation_config.json adds `settings` (as instruct LMs ship sampling ones)."""
    shutil.copytree(lm_dir, directory)
    path = directory / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    return directory


def tiny_run_arguments(**flags) -> list[str]:
    return [str(REPO_ROOT / "configs" / "report_tiny.yaml")] + [
        item for name, value in flags.items() for item in (f"--{name}", str(value))
    ]


def test_report_lora_decodes_greedily_with_an_lm_that_samples_and_saves_everything(lm_dir, tmp_path):
    """An LM whose generation_config.json samples (temperature / top_p / top_k, as Qwen2.5- and Llama-3-Instruct
    ship) made the run fail after both stages had trained: transformers refused to save the adapter's greedy config
    that kept them, leaving a half-written adapter/ and no predictions. The run's decoding resets them and keeps its
    own flags; the adapter reloads with them."""
    from transformers import GenerationConfig

    from merit_hf.training.report_lora import PREDICTIONS_FILE, RESULTS_FILE, main

    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.05}
    language_model = lm_with_generation_settings(lm_dir, tmp_path / "lm", **sampling)
    output_dir = tmp_path / "run"
    main(tiny_run_arguments(language_model=language_model, ptbxl_dir=BUNDLED_PTBXL, output_dir=output_dir,
                            use_cpu="true", max_train_reports=4, alignment_epochs=0, compute_meteor="false",
                            repetition_penalty=1.3))  # fmt: skip
    assert (output_dir / PREDICTIONS_FILE).is_file() and (output_dir / RESULTS_FILE).is_file()
    saved = json.loads((output_dir / "adapter" / "generation_config.json").read_text())
    assert not set(sampling) - {"do_sample"} & set(saved)
    assert saved["do_sample"] is False and saved["max_new_tokens"] == 8 and saved["repetition_penalty"] == 1.3
    GenerationConfig.from_pretrained(output_dir / "adapter").validate(strict=True)


def test_report_lora_refuses_lm_generation_settings_it_cannot_save_before_training(lm_dir, tmp_path, monkeypatch):
    """Generation settings that transformers will not save with the run's decoding are refused once the LM is
    loaded, before any data is prepared or any stage trains, naming transformers' objection."""
    from merit_hf.training import report_lora

    def no_training(*args, **kwargs):
        raise AssertionError("a stage trained")

    monkeypatch.setattr(report_lora, "_train_stage", no_training)
    language_model = lm_with_generation_settings(lm_dir, tmp_path / "lm", output_scores=True)
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"(?s)^The language model's generation settings .* cannot be saved with the "
                       r"adapter\. Fix the language model's generation_config\.json\. .*output_scores"):  # fmt: skip
        report_lora.main(tiny_run_arguments(language_model=language_model, ptbxl_dir=BUNDLED_PTBXL,
                                            output_dir=output_dir, use_cpu="true", compute_meteor="false"))  # fmt: skip
    assert not output_dir.exists() or not list(output_dir.iterdir())


def regenerate(model, processor, predictions: list[dict], **generate_kwargs) -> list[str]:
    """The reports `model` writes for the records of predictions.jsonl, in one batch as the run wrote them."""
    from merit_hf.data import read_ecg_record

    records = [read_ecg_record(str(BUNDLED_PTBXL / line["filename"]), sampling_rate=100, num_samples=1000)
               for line in predictions]  # fmt: skip
    batch = processor(ecgs=[record["signal"] for record in records], sampling_rate=100,
                      lead_names=records[0]["lead_names"], text=[processor.format_prompt()] * len(records),
                      return_tensors="pt", crop="center")  # fmt: skip
    new_tokens = model.generate(**batch, **generate_kwargs)[:, batch["input_ids"].shape[1] :]
    return processor.batch_decode(new_tokens, skip_special_tokens=True)


def test_a_run_folder_moved_elsewhere_reloads_its_own_base_and_writes_the_same_reports(lm_dir, tmp_path):
    """adapter_config.json records base_model/ by its absolute path (for PEFT), so a run folder moved or copied failed
    to reload. `load_report_adapter` reads the base_model/ beside the adapter, wherever the folder is now. A run
    with --save_base_model false records no base (it named a folder that never existed): reloading asks for one."""
    from merit_hf.training.report_lora import PREDICTIONS_FILE, load_report_adapter, main

    flags = {"language_model": lm_dir, "ptbxl_dir": BUNDLED_PTBXL, "use_cpu": "true", "max_train_reports": 4,
             "compute_meteor": "false"}  # fmt: skip
    main(tiny_run_arguments(**flags, output_dir=tmp_path / "run"))
    recorded = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str((tmp_path / "run" / "base_model").resolve())
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(tmp_path / "run", moved)  # the recorded folder is gone
    predictions = [json.loads(line) for line in (moved / PREDICTIONS_FILE).read_text().splitlines()]
    model, processor = load_report_adapter(moved / "adapter")
    assert len(predictions) == 4 and regenerate(model, processor, predictions) == [
        line["generated"] for line in predictions
    ]

    main(tiny_run_arguments(**flags, output_dir=tmp_path / "no_base", save_base_model="false", do_eval="false"))
    assert not (tmp_path / "no_base" / "base_model").exists()
    recorded = json.loads((tmp_path / "no_base" / "adapter" / "adapter_config.json").read_text())
    assert not recorded["base_model_name_or_path"]
    with pytest.raises(ValueError, match=r"names no base model .*--save_base_model false.*; pass base_model=\.\.\."):
        load_report_adapter(tmp_path / "no_base" / "adapter")
    # the same seed, encoder and LM: the moved run's base is this run's base too (the fingerprint checks it)
    load_report_adapter(tmp_path / "no_base" / "adapter", base_model=str(moved / "base_model"))


def test_peft_auto_class_writes_the_runs_predictions_with_the_adapters_generation_config(lm_dir, tmp_path):
    """The README's PEFT route: `AutoPeftModelForCausalLM` loads the adapter's weights, but generates with
    base_model/'s generation settings; with the adapter's `generation_config.json` passed to `generate()` it writes
    the reports of predictions.jsonl, as `load_report_adapter` does."""
    from peft import AutoPeftModelForCausalLM
    from transformers import GenerationConfig

    from merit_hf import MeritProcessor
    from merit_hf.training.report_lora import PREDICTIONS_FILE, main

    output_dir = tmp_path / "run"
    main(tiny_run_arguments(language_model=lm_dir, ptbxl_dir=BUNDLED_PTBXL, output_dir=output_dir, use_cpu="true",
                            max_train_reports=4, compute_meteor="false", max_new_tokens=12,
                            repetition_penalty=1.5))  # fmt: skip
    adapter = output_dir / "adapter"
    predictions = [json.loads(line) for line in (output_dir / PREDICTIONS_FILE).read_text().splitlines()]
    model = AutoPeftModelForCausalLM.from_pretrained(adapter, import_allowlist=["merit_hf"]).eval()
    processor = MeritProcessor.from_pretrained(adapter)
    assert model.generation_config.max_new_tokens != 12  # base_model/'s settings, not the run's
    generation_config = GenerationConfig.from_pretrained(adapter)
    assert (generation_config.max_new_tokens, generation_config.repetition_penalty) == (12, 1.5)
    reports = regenerate(model, processor, predictions, generation_config=generation_config)
    assert len(predictions) == 4 and reports == [line["generated"] for line in predictions]


@pytest.mark.slow
def test_report_lora_script_end_to_end(lm_dir, tmp_path):
    from merit_hf.data import read_ecg_record
    from merit_hf.training.report_lora import load_report_adapter, main

    output_dir = tmp_path / "run"
    results = main(
        [
            str(REPO_ROOT / "configs" / "report_tiny.yaml"),
            "--language_model",
            str(lm_dir),
            "--ptbxl_dir",
            str(BUNDLED_PTBXL),
            "--output_dir",
            str(output_dir),
            "--compute_meteor",
            "false",
            "--use_cpu",
            "true",
            "--check_folds",
            "9",
            "--max_check_reports",
            "4",
        ]
    )
    assert results["num_train_reports"] == 16 and results["num_eval_reports"] == 4
    for stage in ("alignment", "lora"):  # the ECG-use check on fold 9 after each stage
        check = results[f"{stage}_ecg_use_check"]
        assert check["num_reports"] == 4 and check["real_ecg"] > 0 and check["shuffled_ecg"] > 0
    assert 1 <= results["eval"]["num_distinct_reports"] <= 4
    assert results["lora_loss_last"] < results["alignment_loss_first"]
    assert 0.0 <= results["eval"]["bleu_4"] <= 1.0 and "rougeL" in results["eval"]
    assert results["generation_speed"]["tokens_per_second"] > 0
    for stage in ("alignment", "lora"):  # throughput totals of each stage (merit_hf.utils.throughput)
        throughput = results[f"{stage}_throughput"]
        assert throughput["ecgs_seen"] == 16 and throughput["flops_per_ecg"] > 0  # 16 reports, 1 epoch
        assert throughput["ecgs_per_second"] * throughput["measured_seconds"] == pytest.approx(throughput["ecgs_seen"])
    adapter = output_dir / "adapter"
    generation_config = json.loads((adapter / "generation_config.json").read_text())
    assert generation_config["max_new_tokens"] == 8
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["modules_to_save"] == ["multi_modal_projector"]
    from safetensors import safe_open

    with safe_open(adapter / "adapter_model.safetensors", "pt") as handle:  # the frozen encoder stays in base_model/
        assert not any(".ecg_model." in key for key in handle.keys())  # noqa: SIM118
    model, processor = load_report_adapter(adapter)
    predictions = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    first = predictions[0]
    record = read_ecg_record(str(BUNDLED_PTBXL / first["filename"]), sampling_rate=100, num_samples=1000)
    batch = processor(ecgs=[record["signal"]], sampling_rate=100, lead_names=record["lead_names"],
                      text=[processor.format_prompt()], return_tensors="pt", crop="center")  # fmt: skip
    new_tokens = model.generate(**batch)[:, batch["input_ids"].shape[1] :]
    assert processor.batch_decode(new_tokens, skip_special_tokens=True)[0] == first["generated"]


@pytest.mark.slow
def test_report_lora_on_two_processes_equals_one_process(lm_dir, tmp_path):
    """`accelerate launch --num_processes 2` (gloo), batch 2 with 2 accumulated micro-batches, against one process
    with batch 8: the same losses, ECG-use checks, generated reports, scores and counts. Three defects made them
    differ or fail: the eval examples' cache key changed once the main process had saved the processor (the run
    stopped: "expected 2 part file(s)"); the shuffled order depended on the number of processes; and each process's
    (and micro-batch's) mean loss weighted its report tokens otherwise than one batch does. The one-process run
    builds its examples in a temporary folder (`--examples_cache_dir ''`), the two processes in a shared cache."""
    import os
    import socket
    import subprocess

    flags = {"language_model": lm_dir, "ptbxl_dir": BUNDLED_PTBXL, "compute_meteor": "false", "use_cpu": "true",
             "check_folds": 9, "max_check_reports": 5, "max_eval_reports": 5, "per_device_eval_batch_size": 2}  # fmt: skip

    def argv(output_dir, **overrides) -> list[str]:
        values = {**flags, "output_dir": output_dir, **overrides}
        return [str(REPO_ROOT / "configs" / "report_tiny.yaml")] + [
            item for name, value in values.items() for item in (f"--{name}", str(value))
        ]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [*ACCELERATE_LAUNCH, "--multi_gpu", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--num_processes", "2", "--num_machines", "1", "--main_process_port",
                str(port), "-m", "merit_hf.training.report_lora"]  # fmt: skip
    two_dir = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)
    done = subprocess.run(
        launcher + argv(two_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                        examples_cache_dir=tmp_path / "cache"),  # fmt: skip
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    from merit_hf.training.report_lora import PREDICTIONS_FILE, RESULTS_FILE, main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = main(argv(tmp_path / "one", per_device_train_batch_size=8, examples_cache_dir=""))
    finally:
        torch.set_num_threads(threads)
    two = json.loads((two_dir / RESULTS_FILE).read_text())
    for stage in ("alignment", "lora"):
        for name in ("loss_first", "loss_last"):
            assert two[f"{stage}_{name}"] == pytest.approx(one[f"{stage}_{name}"], rel=1e-5), f"{stage}_{name}"
        for name in ("real_ecg", "shuffled_ecg"):
            assert two[f"{stage}_ecg_use_check"][name] == pytest.approx(one[f"{stage}_ecg_use_check"][name], rel=1e-5)
        assert two[f"{stage}_throughput"]["ecgs_seen"] == one[f"{stage}_throughput"]["ecgs_seen"] == 16
    assert two["eval"] == json.loads(json.dumps(one["eval"], default=str))  # the same reports, so the same scores
    assert two["generation_speed"]["generated_tokens"] == one["generation_speed"]["generated_tokens"]
    assert (two_dir / PREDICTIONS_FILE).read_text() == (tmp_path / "one" / PREDICTIONS_FILE).read_text()
    assert len(list((tmp_path / "cache").glob("report-examples-*/part-00001-of-00002.arrow"))) == 3


@pytest.mark.slow
def test_report_lora_processes_draw_their_own_dropout_masks(lm_dir, tmp_path):
    """Every process entered each stage with the same RNG state, so LoRA's dropout gave row i of each process's
    batch the same masks. The RNG state at each process's first training forward now differs."""
    import os
    import socket
    import subprocess

    script = tmp_path / "trace.py"
    script.write_text(
        "import hashlib, os, sys, torch\n"
        "from merit_hf import MeritForReportGeneration\n"
        "from merit_hf.training import report_lora\n"
        "forward = MeritForReportGeneration.forward\n"
        "def traced(self, *args, **kwargs):\n"
        "    out = sys.argv[-1] + f\"/rng_{os.environ['RANK']}.txt\"\n"
        "    if self.training and not os.path.exists(out):\n"
        "        open(out, 'w').write(hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest())\n"
        "    return forward(self, *args, **kwargs)\n"
        "MeritForReportGeneration.forward = traced\n"
        "report_lora.main(sys.argv[1:-1])\n"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flags = {"language_model": lm_dir, "ptbxl_dir": BUNDLED_PTBXL, "use_cpu": "true", "do_eval": "false",
             "lora_epochs": 0, "per_device_train_batch_size": 4, "output_dir": tmp_path / "run"}  # fmt: skip
    argv = [*ACCELERATE_LAUNCH, "--multi_gpu", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(port),
            str(script), str(REPO_ROOT / "configs" / "report_tiny.yaml"),
            *[item for name, value in flags.items() for item in (f"--{name}", str(value))], str(tmp_path)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)
    done = subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    states = [(tmp_path / f"rng_{rank}.txt").read_text() for rank in (0, 1)]
    assert len(states[0]) == 40 and states[0] != states[1]


@pytest.mark.slow
def test_report_lora_saves_and_reloads_a_trained_encoder(lm_dir, tmp_path, monkeypatch):
    """`--freeze_ecg_encoder false`: the encoder trained in stage 2 goes into the adapter (PEFT `modules_to_save`), so
    the reloaded model gives the trained model's logits; base_model/ keeps the starting encoder the fingerprint
    names, and a base holding any other encoder is refused."""
    from safetensors import safe_open

    from merit_hf import MeritForReportGeneration
    from merit_hf.training import report_lora

    trained = {}
    save_report_adapter = report_lora.save_report_adapter

    def keep_trained_model(peft_model, *args, **kwargs):
        trained["model"] = peft_model
        save_report_adapter(peft_model, *args, **kwargs)

    monkeypatch.setattr(report_lora, "save_report_adapter", keep_trained_model)
    output_dir = tmp_path / "run"
    arguments = {"language_model": lm_dir, "ptbxl_dir": BUNDLED_PTBXL, "output_dir": output_dir, "use_cpu": "true",
                 "freeze_ecg_encoder": "false", "do_eval": "false"}  # fmt: skip
    report_lora.main(
        [str(REPO_ROOT / "configs" / "report_tiny.yaml")]
        + [item for name, value in arguments.items() for item in (f"--{name}", str(value))]
    )
    adapter = output_dir / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] == ["multi_modal_projector", "ecg_model"]
    start = MeritForReportGeneration.from_pretrained(output_dir / "base_model").ecg_model.state_dict()
    with safe_open(adapter / "adapter_model.safetensors", "pt") as handle:
        assert len([key for key in handle.keys() if ".ecg_model." in key]) == len(start)  # noqa: SIM118

    model, processor = report_lora.load_report_adapter(adapter)
    reloaded = model.base_model.model.ecg_model.modules_to_save["default"].state_dict()
    assert any(not torch.equal(reloaded[name], tensor) for name, tensor in start.items())
    batch = processor(ecgs=[str(BUNDLED_PTBXL / "records100" / "00000" / "00001_lr")], reports=["sinus rhythm"],
                      return_tensors="pt", crop="center")  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, trained["model"].eval()(**batch).logits, rtol=0, atol=0)

    trained_as_base = MeritForReportGeneration.from_pretrained(output_dir / "base_model")
    trained_as_base.ecg_model.load_state_dict(reloaded)
    with pytest.raises(ValueError, match=r"adapter was saved for another base model \(ecg_encoder_sha256: adapter"):
        report_lora.load_report_adapter(adapter, trained_as_base)


def test_mimic_reports_are_joined_and_readable(tmp_path):
    """MIMIC-IV-ECG through `merit_hf.data`: the PhysioNet folder (`build_mimic_iv_ecg`) and its conversion
    (`load_mimic_iv_ecg`, streamed) give the joined report; the study without one is left out."""
    import wfdb

    from merit_hf import MeritFeatureExtractor
    from merit_hf.data import convert_mimic_iv_ecg
    from merit_hf.training.report_lora import ReportExamples, read_mimic_reports

    signal, fields = wfdb.rdsamp(str(BUNDLED_PTBXL / "records500" / "00000" / "00001_hr"))
    record_dir = tmp_path / "files" / "p1000" / "p10000032" / "s40689238"
    record_dir.mkdir(parents=True)
    wfdb.wrsamp(
        "40689238",
        fs=500,
        units=["mV"] * 12,
        sig_name=fields["sig_name"],
        p_signal=signal,
        fmt=["16"] * 12,
        adc_gain=[1000.0] * 12,
        baseline=[0] * 12,
        write_dir=str(record_dir),
    )
    (tmp_path / "record_list.csv").write_text(
        "subject_id,study_id,file_name,ecg_time,path\n"
        "10000032,40689238,40689238,2180-07-23 08:44:00,files/p1000/p10000032/s40689238/40689238\n"
    )
    columns = ",".join(f"report_{index}" for index in range(18))
    statements = ["Sinus rhythm", "Possible right atrial abnormality", "", "Borderline ECG"] + [""] * 14
    (tmp_path / "machine_measurements.csv").write_text(
        f"subject_id,study_id,cart_id,{columns}\n10000032,40689238,6848296,{','.join(statements)}\n"
        f"10000033,40689239,6848296,{',' * 17}\n"
    )
    examples = list(read_mimic_reports(tmp_path).with_format("numpy"))  # a stream, read record by record
    assert [(example["ecg_id"], example["report"]) for example in examples] == [
        (40689238, "Sinus rhythm. Possible right atrial abnormality. Borderline ECG")
    ]
    assert examples[0]["signal"].dtype == np.float32  # as the converted datasets store it
    assert next(iter(read_mimic_reports(tmp_path, limit=1)))["report"] == examples[0]["report"]
    convert_mimic_iv_ecg(tmp_path, tmp_path / "converted")
    converted = list(read_mimic_reports(tmp_path / "converted").with_format("numpy"))
    assert [example["report"] for example in converted] == [examples[0]["report"]]
    np.testing.assert_array_equal(converted[0]["signal"], examples[0]["signal"])
    dataset = ReportExamples(examples, MeritFeatureExtractor.from_model_config(tiny_ecg_config(**ECG_CONFIG)))
    assert dataset[0]["ecg_values"].shape == (12, 1000)


@pytest.mark.slow
def test_report_model_loads_as_remote_code_without_merit_hf(parts, tmp_path):
    """The saved report-generation folder loads with `trust_remote_code=True` in a process that cannot import
    merit_hf, and gives the same logits and the same greedy report."""
    import textwrap

    from tests.test_core_remote_code import BLOCK_MERIT_HF

    model, processor = parts
    folder = tmp_path / "merit-report"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    ecgs = np.stack(ecg_batch(2))
    np.save(tmp_path / "ecgs.npy", ecgs)
    batch = processor(ecgs=list(ecgs), sampling_rate=100, lead_names=list(tiny_ecg_config().lead_names),
                      text=[processor.format_prompt()] * 2)  # fmt: skip
    with torch.no_grad():
        np.save(tmp_path / "logits.npy", model(**batch).logits.numpy())
        np.save(tmp_path / "tokens.npy", model.generate(**batch, max_new_tokens=6, do_sample=False).numpy())
    script = BLOCK_MERIT_HF + textwrap.dedent(
        f"""
        import numpy as np, torch
        from transformers import AutoModelForCausalLM, AutoProcessor
        try:
            import merit_hf  # noqa: F401
            raise SystemExit("merit_hf should not be importable here")
        except ImportError:
            pass
        folder = {str(folder)!r}
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__name__ == "MeritProcessor", type(processor)
        ecgs = np.load({str(tmp_path / "ecgs.npy")!r})
        batch = processor(ecgs=list(ecgs), sampling_rate=100, lead_names={list(tiny_ecg_config().lead_names)!r},
                          text=[processor.format_prompt()] * 2)
        with torch.no_grad():
            logits = model(**batch).logits.numpy()
            tokens = model.generate(**batch, max_new_tokens=6, do_sample=False).numpy()
        np.testing.assert_allclose(logits, np.load({str(tmp_path / "logits.npy")!r}), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(tokens, np.load({str(tmp_path / "tokens.npy")!r}))
        print("REMOTE-OK", type(model).__module__)
        """
    )
    run_in_fresh_process(script, tmp_path, "REMOTE-OK transformers_modules")


def test_generated_lengths_count_the_eos_and_stop_there_even_when_pad_is_eos():
    """Generation speed counts what was generated: each row up to and including its first EOS; where the pad token
    is the EOS token (load_language_model's choice for LMs without one) the EOS is not mistaken for padding."""
    from merit_hf.training.report_lora import generated_lengths

    eos = pad = 2
    new_tokens = torch.tensor([[5, 6, eos, eos, eos], [7, 8, 9, 10, 11], [eos, eos, eos, eos, eos]])
    assert generated_lengths(new_tokens, eos, pad).tolist() == [3, 5, 1]
    assert generated_lengths(new_tokens, [eos, 99], pad).tolist() == [3, 5, 1]  # several EOS ids
    padded = torch.tensor([[5, 6, 3, 0, 0], [7, 0, 0, 0, 0]])  # pad 0, EOS 3, second row cut by max_new_tokens
    assert generated_lengths(padded, 3, 0).tolist() == [3, 1]


def test_report_lora_precision_follows_the_launcher_and_refuses_fp16_on_cpu(monkeypatch):
    """The script's --mixed_precision (default "no") overruled `accelerate launch --mixed_precision bf16`, which then
    trained in fp32 and recorded nothing, and fp16 on CPU trained in fp32 under the name fp16: fine-tuning's rules now."""
    from merit_hf.training.report_lora import report_mixed_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert (
        report_mixed_precision(None, use_cpu=True) == "no" and report_mixed_precision("bf16", use_cpu=True) == "bf16"
    )
    with pytest.raises(ValueError, match="mixed_precision 'fp16' is CUDA autocast with loss scaling; on cpu"):
        report_mixed_precision("fp16", use_cpu=True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert report_mixed_precision(None, use_cpu=True) == "bf16"
    with pytest.raises(
        ValueError, match="--mixed_precision no contradicts `accelerate launch`'s mixed precision 'bf16'"
    ):
        report_mixed_precision("no", use_cpu=True)


def test_an_ecg_config_beside_a_loaded_encoder_is_named_as_unused(tmp_path, caplog):
    """configs/report_tiny.yaml's ecg_config block was silently ignored with --ecg_encoder: the loaded encoder's own
    config wins, and the fields that differ are now named in a warning."""
    from merit_hf import MeritEcgModel
    from merit_hf.training.report_lora import ReportModelArguments, build_report_model
    from tests.conftest import tiny_ecg_config

    MeritEcgModel(tiny_ecg_config()).save_pretrained(tmp_path / "encoder")
    tokenizer = train_sentencepiece_tokenizer(tmp_path / "spm")
    arguments = ReportModelArguments(language_model="unused", ecg_encoder=str(tmp_path / "encoder"),
                                     ecg_config={**ECG_CONFIG, "hidden_size": 48})  # fmt: skip
    with caplog.at_level("WARNING", logger="merit_hf.training.report_lora"):
        model = build_report_model(arguments, tokenizer, tiny_llama(len(tokenizer)))
    assert model.config.ecg_config.hidden_size == tiny_ecg_config().hidden_size
    (message,) = [record.getMessage() for record in caplog.records if record.name == "merit_hf.training.report_lora"]
    assert "ecg_config is for a random-init encoder and is not used with --ecg_encoder" in message
    assert f"hidden_size: ecg_config 48, the encoder's {tiny_ecg_config().hidden_size}" in message
