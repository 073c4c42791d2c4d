"""Model behaviour on tiny configs: loss values against hand computation, masking, attention kernels, save/load,
strict loading, classification, gradient checkpointing and the ablation switches."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForPreTraining, AutoModelForSequenceClassification

from merit_hf import MeritEcgModel, MeritForEcgClassification, MeritForPreTraining, MeritModel, modeling_merit
from merit_hf.models.merit.modeling_merit import contrastive_loss, masked_patch_reconstruction_loss
from tests.conftest import tiny_ecg_config, tiny_merit_config

BATCH = 3


def _inputs(batch=BATCH, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ecg = torch.randn(batch, 12, 2250, generator=generator)
    input_ids = torch.randint(5, 120, (batch, 9), generator=generator)
    noise = torch.rand(batch, 12, 30, generator=generator)
    return ecg, input_ids, noise


# ---------------------------------------------------------------------------------------------------------------------
# Losses against hand computation
# ---------------------------------------------------------------------------------------------------------------------
def test_masked_patch_mse_equals_hand_computation():
    # one ECG, one lead, 3 patches of 2 samples; patches 0 and 2 hidden
    ecg = torch.tensor([[[1.0, 3.0, 0.0, 0.0, 2.0, 2.0]]])
    prediction = torch.tensor([[[[0.0, 3.0], [5.0, 5.0], [2.0, 4.0]]]])
    mask = torch.tensor([[[1.0, 0.0, 1.0]]])
    loss = masked_patch_reconstruction_loss(ecg, prediction, mask, patch_size=2, norm_pix_loss=False)
    # patch 0: ((0-1)^2 + (3-3)^2)/2 = 0.5 ; patch 2: ((2-2)^2 + (4-2)^2)/2 = 2.0 ; mean over hidden = 1.25
    assert loss.item() == pytest.approx(1.25)

    normalised = masked_patch_reconstruction_loss(ecg, prediction, mask, patch_size=2, norm_pix_loss=True)
    # patch 0 target normalised: mean 2, std 1 -> (-1, 1); error ((0+1)^2 + (3-1)^2)/2 = 2.5
    # patch 2 target is constant 2 -> (0, 0) (eps keeps it finite); error (4 + 16)/2 = 10 ; mean = 6.25
    assert normalised.item() == pytest.approx(6.25, rel=1e-4)


def test_masked_patch_mse_ignores_visible_patches():
    ecg = torch.randn(2, 12, 2250)
    prediction = torch.randn(2, 12, 30, 75)
    mask = (torch.rand(2, 12, 30) > 0.5).float()
    loss = masked_patch_reconstruction_loss(ecg, prediction, mask, 75, True)
    visible = mask == 0
    changed = prediction.clone()
    changed[visible] += 100.0
    assert torch.equal(loss, masked_patch_reconstruction_loss(ecg, changed, mask, 75, True))
    hidden_changed = prediction.clone()
    hidden_changed[~visible] += 1.0
    assert masked_patch_reconstruction_loss(ecg, hidden_changed, mask, 75, True) > loss


def test_info_nce_equals_hand_computation():
    ecg = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=-1)
    scale = torch.tensor(2.0)
    loss = contrastive_loss(scale * ecg @ text.t())
    s = 2.0 / math.sqrt(2.0)
    # logits_per_ecg = [[s, 0], [s, 2]]
    row = (-math.log(math.exp(s) / (math.exp(s) + 1)) - math.log(math.exp(2) / (math.exp(s) + math.exp(2)))) / 2
    col = (-math.log(math.exp(s) / (math.exp(s) + math.exp(s))) - math.log(math.exp(2) / (1 + math.exp(2)))) / 2
    assert loss.item() == pytest.approx((row + col) / 2, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Pretraining model
# ---------------------------------------------------------------------------------------------------------------------
def test_pretraining_output_and_loss_composition():
    model = MeritForPreTraining(tiny_merit_config(contrastive_weight=0.5)).eval()
    ecg, input_ids, noise = _inputs()
    out = model(ecg, input_ids=input_ids, noise=noise)
    assert out.logits.shape == (BATCH, 12, 30, 75)
    assert torch.equal(out.mask.sum(-1), torch.full((BATCH, 12), 23.0))  # 30 - int(30 * 0.25) hidden per lead
    expected = masked_patch_reconstruction_loss(ecg, out.logits, out.mask, 75, True)
    assert torch.allclose(out.reconstruction_loss, expected)
    assert torch.allclose(out.loss, out.reconstruction_loss + 0.5 * out.contrastive_loss)
    assert out.logits_per_ecg.shape == (BATCH, BATCH)
    assert torch.allclose(out.logit_scale, torch.tensor(1 / 0.07), rtol=1e-5)


def test_noise_fixes_the_mask_per_lead():
    model = MeritForPreTraining(tiny_merit_config()).eval()
    ecg, input_ids, noise = _inputs()
    first = model(ecg, input_ids=input_ids, noise=noise)
    second = model(ecg, input_ids=input_ids, noise=noise)
    assert torch.equal(first.mask, second.mask) and torch.equal(first.loss, second.loss)
    # the 7 smallest noise values of each lead are the visible patches
    visible = torch.zeros_like(noise)
    visible.scatter_(2, noise.argsort(-1)[..., :7], 1.0)
    assert torch.equal(first.mask, 1 - visible)
    # leads are masked independently
    assert not torch.equal(first.mask[0, 0], first.mask[0, 1])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "present", "absent"),
    [
        ({"contrastive_weight": 0.0}, ["reconstruction_loss", "logits"], ["contrastive_loss", "logits_per_ecg"]),
        ({"reconstruction_weight": 0.0}, ["contrastive_loss"], ["reconstruction_loss", "logits", "mask"]),
        ({"contrastive_input": "masked"}, ["reconstruction_loss", "contrastive_loss"], []),
    ],
)
def test_ablation_switches(overrides, present, absent):
    model = MeritForPreTraining(tiny_merit_config(**overrides))
    ecg, input_ids, noise = _inputs()
    needs_text = overrides.get("contrastive_weight", 1.0) > 0
    out = model(ecg, input_ids=input_ids if needs_text else None, noise=noise)
    for name in present:
        assert out[name] is not None, name
    for name in absent:
        assert out.get(name) is None, name
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_contrastive_branch_needs_text():
    model = MeritForPreTraining(tiny_merit_config())
    with pytest.raises(ValueError, match="contrastive_weight > 0 needs the tokenised reports"):
        model(torch.randn(2, 12, 2250))


def test_logit_scale_is_clamped():
    model = MeritModel(tiny_merit_config())
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.clamped_logit_scale().item() == pytest.approx(100.0, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Encoder details
# ---------------------------------------------------------------------------------------------------------------------
def test_sdpa_and_eager_attention_agree():
    eager = MeritEcgModel._from_config(tiny_ecg_config(), attn_implementation="eager").eval()
    sdpa = MeritEcgModel._from_config(tiny_ecg_config(), attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    ecg = torch.randn(2, 12, 2250)
    mask = torch.ones(2, 2250, dtype=torch.long)
    mask[1, 1500:] = 0
    for kwargs in ({}, {"ecg_attention_mask": mask}):
        a, b = eager(ecg, **kwargs), sdpa(ecg, **kwargs)
        torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=1e-5, rtol=1e-4)


def _ran(kernel: str, function) -> bool:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        function()
    return any(event.name == kernel for event in prof.events())


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_sdpa_on_cpu_in_bf16_runs_the_chosen_kernel_and_agrees_with_fp32(kernel, monkeypatch):
    """bf16 attention on CPU runs the fused SDPA kernel or two bf16 matmuls (whichever the CPU runs faster; here fixed
    through MERIT_CPU_ATTENTION); fp32 always keeps the fused kernel. Both agree with fp32, masks included."""
    monkeypatch.setenv(modeling_merit.CPU_ATTENTION_ENV, kernel)
    model = MeritEcgModel._from_config(tiny_ecg_config(), attn_implementation="sdpa").eval()
    ecg = torch.randn(2, 12, 2250)
    mask = torch.ones(2, 2250, dtype=torch.long)
    mask[1, 1500:] = 0
    fused = "aten::_scaled_dot_product_flash_attention_for_cpu"
    with torch.no_grad():
        assert _ran(fused, lambda: model(ecg))
        for kwargs in ({}, {"ecg_attention_mask": mask}):
            reference = model(ecg, **kwargs).pooler_output
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert _ran(fused, lambda: model(ecg, **kwargs)) == (kernel == "sdpa")  # noqa: B023
                low = model(ecg, **kwargs).pooler_output.float()
            assert F.cosine_similarity(low, reference).min() > 0.99
    pretraining = MeritForPreTraining._from_config(tiny_merit_config(), attn_implementation="sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pretraining(
            ecg, input_ids=torch.randint(5, 100, (2, 16)), attention_mask=torch.ones(2, 16, dtype=torch.long)
        ).loss
    loss.backward()
    grads = [p.grad for p in pretraining.merit.ecg_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("faster", ["sdpa", "matmul"])
def test_bf16_attention_on_cpu_is_the_kernel_timed_faster_once_per_shape(faster, monkeypatch, caplog):
    """Which bf16 kernel wins depends on the CPU (AMX, AVX512-BF16) and torch, so it is timed on the machine at first
    use, once per shape, and logged; the timing is injected here so both outcomes are tested on any CPU."""
    import logging

    monkeypatch.delenv(modeling_merit.CPU_ATTENTION_ENV, raising=False)
    monkeypatch.setattr(modeling_merit, "_cpu_attention_choice", {})
    timings = []

    def timed(dtype, batch_size, num_heads, num_tokens, head_dim):
        timings.append((dtype, batch_size, num_heads, num_tokens, head_dim))
        return {"sdpa": 1.0, "matmul": 2.0} if faster == "sdpa" else {"sdpa": 2.0, "matmul": 1.0}

    monkeypatch.setattr(modeling_merit, "time_cpu_attention_kernels", timed)
    model = MeritEcgModel._from_config(tiny_ecg_config(), attn_implementation="sdpa").eval().to(torch.bfloat16)
    fused = "aten::_scaled_dot_product_flash_attention_for_cpu"
    with torch.no_grad(), caplog.at_level(logging.DEBUG, logger="merit_hf.models.merit.modeling_merit"):
        assert _ran(fused, lambda: model(torch.randn(2, 12, 2250))) == (faster == "sdpa")
        model(torch.randn(3, 12, 2250))  # another batch size: the same choice, not timed again
    config = model.config
    assert timings == [(torch.bfloat16, 2, config.num_attention_heads, timings[0][3], timings[0][4])]
    assert f"CPU torch.bfloat16 attention for {config.num_attention_heads} heads" in caplog.text
    assert f": {faster} (timed:" in caplog.text
    monkeypatch.setenv(modeling_merit.CPU_ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="MERIT_CPU_ATTENTION: must be 'sdpa' or 'matmul', got 'flash'"):
        model(torch.randn(2, 12, 2250))


def test_the_cpu_attention_timer_times_both_kernels():
    seconds = modeling_merit.time_cpu_attention_kernels(torch.bfloat16, 2, 2, 32, 16, repeats=1)
    assert set(seconds) == {"sdpa", "matmul"} and all(0 < value < 10 for value in seconds.values())


def test_a_model_loaded_in_bf16_takes_the_feature_extractors_float32(saved_pretraining):
    """`from_pretrained(..., dtype=torch.bfloat16)` is the usual way to halve memory; the float32 `ecg_values` of the
    feature extractor must work with it and give nearly the fp32 embedding."""
    _, folder = saved_pretraining
    ecg = torch.randn(2, 12, 2250)
    full = MeritModel.from_pretrained(folder).eval()
    half = MeritModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert half.ecg_model.embeddings.patch_projection.weight.dtype == torch.bfloat16
    with torch.no_grad():
        reference = full.get_ecg_features(ecg).pooler_output
        low = half.get_ecg_features(ecg).pooler_output
        encoder_only = MeritEcgModel.from_pretrained(folder, dtype=torch.bfloat16).eval()(ecg).pooler_output
    assert low.dtype == torch.bfloat16
    assert F.cosine_similarity(low.float(), reference).min() > 0.99
    torch.testing.assert_close(encoder_only, half.ecg_model(ecg).pooler_output)


@pytest.mark.slow
def test_models_compile_as_one_graph():
    """`torch.compile(model, fullgraph=True)` traces the encoder (with and without padding) and the whole pretraining
    step without a graph break, and computes what eager computes."""
    encoder = MeritEcgModel(tiny_ecg_config()).eval()
    compiled = torch.compile(encoder, fullgraph=True, backend="eager")
    ecg = torch.randn(2, 12, 2250)
    mask = torch.ones(2, 2250, dtype=torch.long)
    mask[1, 1500:] = 0
    with torch.no_grad():
        for kwargs in ({}, {"ecg_attention_mask": mask}):
            torch.testing.assert_close(compiled(ecg, **kwargs).pooler_output, encoder(ecg, **kwargs).pooler_output)
    model = MeritForPreTraining(tiny_merit_config())
    batch = {
        "ecg_values": ecg,
        "input_ids": torch.randint(5, 100, (2, 16)),
        "attention_mask": torch.ones(2, 16, dtype=torch.long),
        "noise": torch.rand(2, 12, 30),
    }
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(**batch).loss, model(**batch).loss)


def test_padding_is_ignored():
    model = MeritEcgModel(tiny_ecg_config()).eval()
    ecg = torch.randn(1, 12, 2250)
    mask = torch.ones(1, 2250, dtype=torch.long)
    mask[:, 1500:] = 0  # patches 20..29 are padding
    ecg[:, :, 1500:] = 0
    other = ecg.clone()
    other[:, :, 1500:] = 5.0
    a = model(ecg, ecg_attention_mask=mask).pooler_output
    b = model(other, ecg_attention_mask=mask).pooler_output
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, model(ecg).pooler_output)


def test_masking_keeps_the_visible_patches_on_the_signal_of_a_padded_record():
    """Patches made only of padding are hidden before any patch with signal: a record two-thirds long (20 real
    patches of 30) keeps all 7 visible patches per lead on its signal, in the noise's order among the real patches;
    without padding (row 0) the mask is the noise's alone."""
    config = tiny_ecg_config()
    model = MeritEcgModel(config).eval()
    torch.manual_seed(0)
    ecg = torch.randn(2, 12, 2250)
    mask = torch.ones(2, 2250, dtype=torch.long)
    mask[1, 1500:] = 0  # patches 20..29 of row 1 are padding
    noise = torch.rand(2, 12, 30)
    noise[1, :, 20:] = 0.0  # the noise alone would keep padding visible first
    with torch.no_grad():
        output = model(ecg, ecg_attention_mask=mask, noise=noise, apply_masking=True)
    visible = output.mask == 0
    assert (visible.sum(dim=-1) == config.num_visible_patches).all()
    assert not visible[1, :, 20:].any()  # no padding visible
    expected = torch.zeros(12, 20, dtype=torch.bool)  # the 7 smallest noises among the real patches
    expected.scatter_(1, noise[1, :, :20].argsort(dim=-1)[:, : config.num_visible_patches], True)
    assert torch.equal(visible[1, :, :20], expected)
    unpadded = torch.zeros(12, 30, dtype=torch.bool)
    unpadded.scatter_(1, noise[0].argsort(dim=-1)[:, : config.num_visible_patches], True)
    assert torch.equal(visible[0], unpadded)


def test_an_all_padding_record_is_refused_by_name():
    model = MeritEcgModel(tiny_ecg_config()).eval()
    mask = torch.ones(3, 2250, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"ecg_attention_mask: records \[1\] are all padding"):
        model(torch.randn(3, 12, 2250), ecg_attention_mask=mask)
    mask[1, :1] = 1  # one real sample is enough
    assert torch.isfinite(model(torch.randn(3, 12, 2250), ecg_attention_mask=mask).pooler_output).all()


def test_wrong_input_shape_is_explained():
    model = MeritEcgModel(tiny_ecg_config())
    with pytest.raises(ValueError, match=r"ecg_values must have shape \(batch, 12 leads, 2250 samples\) at 250 Hz"):
        model(torch.randn(1, 8, 2250))


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = MeritForPreTraining(tiny_merit_config())
    ecg, input_ids, noise = _inputs()
    model(ecg, input_ids=input_ids, noise=noise).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model.train()
    assert model.merit.ecg_model.layers[0].gradient_checkpointing
    model(ecg, input_ids=input_ids, noise=noise).loss.backward()
    for name, grad in reference.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model_class", [MeritEcgModel, MeritModel, MeritForPreTraining, MeritForEcgClassification])
def test_input_embeddings_are_the_patch_projection_of_the_ecg_encoder(model_class):
    config = tiny_ecg_config() if model_class is MeritEcgModel else tiny_merit_config()
    model = model_class(config)
    encoder = model if model_class is MeritEcgModel else getattr(model, "ecg_model", None) or model.merit.ecg_model
    assert model.get_input_embeddings() is encoder.embeddings.patch_projection
    projection = torch.nn.Linear(75, 32)
    model.set_input_embeddings(projection)
    assert encoder.embeddings.patch_projection is projection


def test_lora_with_reentrant_gradient_checkpointing_trains_the_adapters():
    """The PEFT recipe for a frozen encoder: `enable_input_require_grads()` hooks the patch projection, so reentrant
    checkpointed layers (whose inputs would otherwise need no gradient) pass gradients to the LoRA weights."""
    from peft import LoraConfig, get_peft_model

    classifier = MeritForEcgClassification(tiny_merit_config(num_labels=2))
    classifier.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    classifier.enable_input_require_grads()
    model = get_peft_model(classifier, LoraConfig(r=4, target_modules=["qkv"], init_lora_weights=False))
    model.train()
    model(torch.randn(2, 12, 2250), labels=torch.ones(2, 2)).loss.backward()
    lora = {name: p.grad for name, p in model.named_parameters() if "lora_" in name}
    assert len(lora) == 2 * tiny_merit_config().ecg_config.num_hidden_layers  # A and B of each layer's qkv
    for name, grad in lora.items():
        assert grad is not None and grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------------------------
# Saving and strict loading
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def saved_pretraining(tmp_path):
    model = MeritForPreTraining(tiny_merit_config()).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_save_load_gives_identical_outputs(saved_pretraining):
    model, folder = saved_pretraining
    ecg, input_ids, noise = _inputs()
    reloaded = AutoModelForPreTraining.from_pretrained(folder).eval()
    assert type(reloaded) is MeritForPreTraining
    a, b = model(ecg, input_ids=input_ids, noise=noise), reloaded(ecg, input_ids=input_ids, noise=noise)
    for name in ("loss", "reconstruction_loss", "contrastive_loss", "logits", "mask"):
        assert torch.equal(a[name], b[name]), name


def test_encoder_and_two_towers_load_from_a_pretraining_checkpoint(saved_pretraining):
    model, folder = saved_pretraining
    ecg = torch.randn(2, 12, 2250)
    two_towers = AutoModel.from_pretrained(folder).eval()
    assert type(two_towers) is MeritModel
    torch.testing.assert_close(
        two_towers.get_ecg_features(ecg).pooler_output, model.merit.get_ecg_features(ecg).pooler_output
    )
    encoder = MeritEcgModel.from_pretrained(folder).eval()
    torch.testing.assert_close(encoder(ecg).pooler_output, model.merit.ecg_model(ecg).pooler_output)


def test_classifier_keeps_the_encoder_and_creates_the_head(saved_pretraining):
    model, folder = saved_pretraining
    id2label = {0: "NORM", 1: "MI", 2: "STTC"}
    classifier = MeritForEcgClassification.from_pretrained(folder, id2label=id2label).eval()
    assert classifier.config.num_labels == 3 and classifier.config.problem_type == "multi_label_classification"
    ecg = torch.randn(2, 12, 2250)
    torch.testing.assert_close(classifier.ecg_model(ecg).pooler_output, model.merit.ecg_model(ecg).pooler_output)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    out = classifier(ecg, labels=labels)
    assert out.loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(out.logits, labels).item())
    with pytest.raises(ValueError, match="multi-hot labels of shape"):
        classifier(ecg, labels=torch.tensor([0, 2]))


def test_loaded_models_train_what_built_ones_train(saved_pretraining):
    """transformers puts loaded weights into new parameters that require grad: the fixed sin-cos position tables must
    stay frozen after `from_pretrained` in every class, or fine-tuning trains them."""
    model, folder = saved_pretraining

    def trainable(m):
        return {name for name, p in m.named_parameters() if p.requires_grad}

    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert {name.rpartition(".")[2] for name in frozen} == {"position_embeddings", "decoder_position_embeddings"}
    for cls in (MeritForPreTraining, MeritModel, MeritEcgModel, MeritForEcgClassification):
        loaded = cls.from_pretrained(folder)
        assert trainable(loaded) == trainable(cls(loaded.config)), cls.__name__


def test_missing_weights_raise_instead_of_random_init(saved_pretraining):
    _, folder = saved_pretraining
    weights = load_file(folder / "model.safetensors")
    del weights["merit.ecg_model.layers.0.attention.qkv.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights \['merit.ecg_model.layers.0.attention.qkv.weight'\]"):
        MeritForPreTraining.from_pretrained(folder)
    with pytest.raises(ValueError, match="Refusing to return a model with randomly initialised weights"):
        AutoModel.from_pretrained(folder)


def test_a_saved_classifier_without_its_head_raises_instead_of_a_random_head(saved_pretraining, tmp_path):
    _, folder = saved_pretraining
    id2label = {0: "NORM", 1: "MI"}
    classifier = MeritForEcgClassification.from_pretrained(folder, id2label=id2label)
    torch.nn.init.constant_(classifier.classifier.weight, 0.5)  # stands in for a trained head
    classifier.save_pretrained(tmp_path / "classifier")
    reloaded = MeritForEcgClassification.from_pretrained(tmp_path / "classifier")
    assert torch.equal(reloaded.classifier.weight, classifier.classifier.weight)
    weights = load_file(tmp_path / "classifier" / "model.safetensors")
    del weights["classifier.weight"], weights["classifier.bias"]
    save_file(weights, tmp_path / "classifier" / "model.safetensors", metadata={"format": "pt"})
    match = r"missing weights \['classifier.bias', 'classifier.weight'\].*saved as MeritForEcgClassification"
    with pytest.raises(ValueError, match=match):
        MeritForEcgClassification.from_pretrained(tmp_path / "classifier")
    with pytest.raises(ValueError, match=match):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier")
    # a pretraining folder still gives a new head for a new label set
    assert MeritForEcgClassification.from_pretrained(folder, id2label=id2label).config.num_labels == 2


def test_a_config_that_does_not_fit_the_weights_is_named(tmp_path):
    """transformers' own error for weights of the wrong shape says only "see the report above" (a log that
    verbosity "error" hides): the shapes, and what to check, are in merit_hf's message."""
    import json

    encoder = MeritEcgModel(tiny_ecg_config())
    encoder.save_pretrained(tmp_path / "encoder")
    config_file = tmp_path / "encoder" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    shape = rf"layers.0.mlp.fc1.bias \({config['intermediate_size']},\) in the file, \({2 * config['intermediate_size']},\)"
    with pytest.raises(ValueError, match=shape + ".*check that config.json is the one these weights were saved with"):
        MeritEcgModel.from_pretrained(tmp_path / "encoder")
    config_file.write_text(json.dumps({**config, "model_type": "merit", "ecg_config": config}))
    two_tower = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**two_tower, "model_type": "merit_ecg"}))  # a mislabelled two-tower config
    with pytest.raises(ValueError, match="MeritEcgConfig.ecg_config: belongs to the two-tower MeritConfig"):
        AutoModel.from_pretrained(tmp_path / "encoder")
    config_file.unlink()
    with pytest.raises(OSError, match=r"encoder: no config.json"):
        MeritEcgModel.from_pretrained(tmp_path / "encoder")
    for missing in (tmp_path / "nowhere", "./nowhere/model"):  # not transformers' "Repo id must be in the form ..."
        with pytest.raises(OSError, match=r"nowhere.*: no such folder"):
            MeritEcgModel.from_pretrained(missing)  # (AutoModel reads the config first: transformers' message)

    classifier = MeritForEcgClassification(tiny_merit_config(id2label={0: "A", 1: "B"}))
    classifier.save_pretrained(tmp_path / "classifier")
    with pytest.raises(ValueError, match=r"classifier.bias \(2,\) in the file, \(3,\).*ignore_mismatched_sizes=True"):
        MeritForEcgClassification.from_pretrained(tmp_path / "classifier", id2label={0: "A", 1: "B", 2: "C"})
    new_head = MeritForEcgClassification.from_pretrained(
        tmp_path / "classifier", id2label={0: "A", 1: "B", 2: "C"}, ignore_mismatched_sizes=True
    )
    assert new_head.classifier.weight.shape[0] == 3


def test_unexpected_weights_raise(saved_pretraining):
    _, folder = saved_pretraining
    weights = load_file(folder / "model.safetensors")
    weights["merit.ecg_model.extra_head.weight"] = torch.zeros(2, 2)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected weights \['merit.ecg_model.extra_head.weight'\]"):
        MeritForPreTraining.from_pretrained(folder)


def test_pickle_checkpoints_are_refused(saved_pretraining):
    model, folder = saved_pretraining
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(OSError, match=r"pickled weights \['pytorch_model.bin'\] are refused"):
        MeritForPreTraining.from_pretrained(folder)
    with pytest.raises(ValueError, match="safetensors checkpoints only"):
        MeritForPreTraining.from_pretrained(folder, use_safetensors=False)


def test_truncated_checkpoint_names_the_file(saved_pretraining):
    _, folder = saved_pretraining
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(OSError, match="corrupt or truncated"):
        MeritForPreTraining.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------------
# Fine-tuning and sharing flows a transformers user expects
# ---------------------------------------------------------------------------------------------------------------------
def test_a_fine_tuned_classifier_gets_a_new_label_set_only_when_asked(saved_pretraining, tmp_path):
    _, folder = saved_pretraining
    three = MeritForEcgClassification.from_pretrained(folder, num_labels=3).eval()
    three.save_pretrained(tmp_path / "three")
    five_names = dict(enumerate(["NORM", "IMI", "AMI", "LVH", "LBBB"]))
    with pytest.raises(ValueError, match=r"classifier.bias \(3,\) in the file, \(5,\).*ignore_mismatched_sizes=True"):
        MeritForEcgClassification.from_pretrained(tmp_path / "three", id2label=five_names)
    five = MeritForEcgClassification.from_pretrained(
        tmp_path / "three", id2label=five_names, ignore_mismatched_sizes=True
    )
    assert five.config.num_labels == 5 and five.config.id2label == five_names
    assert five.classifier.weight.shape == (5, 32)
    ecg = torch.randn(2, 12, 2250)
    torch.testing.assert_close(five.eval().ecg_model(ecg).pooler_output, three.ecg_model(ecg).pooler_output)
    # the flag re-creates heads only: an encoder of another shape still raises
    weights = load_file(tmp_path / "three" / "model.safetensors")
    weights["ecg_model.norm.weight"] = torch.ones(7)
    save_file(weights, tmp_path / "three" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"wrong shape: ecg_model\.norm\.weight \(7,\) in the file, \(32,\) in the model"
    ):
        MeritForEcgClassification.from_pretrained(tmp_path / "three", ignore_mismatched_sizes=True)


def test_each_saved_class_lists_the_auto_classes_that_load_its_folder(saved_pretraining, tmp_path):
    import json

    model, folder = saved_pretraining
    auto_map = {
        type(m).__name__: json.loads((m.save_pretrained(tmp_path / type(m).__name__) or tmp_path / type(m).__name__
                                      / "config.json").read_text())["auto_map"]
        for m in (MeritEcgModel.from_pretrained(folder), MeritModel.from_pretrained(folder),
                  MeritForEcgClassification.from_pretrained(folder, num_labels=2))
    }  # fmt: skip
    assert auto_map["MeritEcgModel"] == {
        "AutoConfig": "configuration_merit.MeritEcgConfig",
        "AutoModel": "modeling_merit.MeritEcgModel",
        "AutoModelForSequenceClassification": "modeling_merit.MeritForEcgClassificationFromEncoder",
    }
    assert set(auto_map["MeritModel"]) == {"AutoConfig", "AutoModel", "AutoModelForSequenceClassification"}
    assert auto_map["MeritForEcgClassification"] == {
        "AutoConfig": "configuration_merit.MeritConfig",
        "AutoModel": "modeling_merit.MeritClassifierFolderAutoModel",  # a refusal that says what loads the folder
        "AutoModelForSequenceClassification": "modeling_merit.MeritForEcgClassification",
    }
    # a re-saved encoder keeps its own weight names, not the loading key mapping's inverse
    keys = set(load_file(tmp_path / "MeritEcgModel" / "model.safetensors"))
    assert keys == set(MeritEcgModel(model.config.ecg_config).state_dict())


def test_auto_model_on_a_classifier_folder_says_what_loads_it(saved_pretraining, tmp_path, caplog):
    """A classifier's folder has no text tower: `AutoModel` (a `MeritModel` for a `MeritConfig`) refuses it before
    loading, with no report of 30 "newly initialized" weights first, and says what loads it; so does its remote-code
    `auto_map` entry (tests/test_core_remote_code.py runs it without merit_hf)."""
    _, folder = saved_pretraining
    classifier = MeritForEcgClassification.from_pretrained(folder, num_labels=2).eval()
    classifier.save_pretrained(tmp_path / "classifier")
    message = r"classifier holds a MeritForEcgClassification .* AutoModelForSequenceClassification.from_pretrained"
    caplog.clear()
    with caplog.at_level("WARNING"):
        for load in (AutoModel.from_pretrained, MeritModel.from_pretrained, AutoModelForPreTraining.from_pretrained):
            with pytest.raises(ValueError, match=message):
                load(tmp_path / "classifier")
        with pytest.raises(ValueError, match=message):
            AutoModel.from_pretrained(tmp_path / "classifier", trust_remote_code=True)  # the auto_map entry
    assert "newly initialized" not in caplog.text and "MISSING" not in caplog.text
    encoder = MeritEcgModel.from_pretrained(tmp_path / "classifier").eval()
    ecg = torch.randn(1, 12, 2250)
    with torch.no_grad():
        assert torch.equal(encoder(ecg).pooler_output, classifier.ecg_model(ecg).pooler_output)


def test_the_classifier_loads_an_encoder_only_folder(saved_pretraining, tmp_path):
    from transformers import AutoModelForSequenceClassification

    _, folder = saved_pretraining
    encoder = MeritEcgModel.from_pretrained(folder).eval()
    encoder.save_pretrained(tmp_path / "encoder")
    classifier = MeritForEcgClassification.from_pretrained(
        tmp_path / "encoder", id2label={0: "AFIB", 1: "SR"}, problem_type="single_label_classification"
    ).eval()
    assert classifier.config.num_labels == 2 and classifier.config.problem_type == "single_label_classification"
    ecg = torch.randn(2, 12, 2250)
    torch.testing.assert_close(classifier.ecg_model(ecg).pooler_output, encoder(ecg).pooler_output)
    assert type(AutoModelForSequenceClassification.from_pretrained(folder, num_labels=4)) is MeritForEcgClassification


def test_auto_classifier_loads_encoder_only_and_two_tower_folders(saved_pretraining, tmp_path):
    """`AutoModelForSequenceClassification` on an encoder-only folder (its `auto_map`, as README shows it) gives a
    `MeritForEcgClassification` with the encoder's weights and the caller's head settings, and the attention
    implementation asked for (which the Auto class hands over inside the encoder config); a two-tower folder too."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model, folder = saved_pretraining
    MeritEcgModel.from_pretrained(folder).save_pretrained(tmp_path / "encoder")
    MeritModel.from_pretrained(folder).save_pretrained(tmp_path / "two-towers")
    id2label = {0: "NORM", 1: "MI", 2: "STTC", 3: "CD", 4: "HYP"}
    ecg = torch.randn(2, 12, 2250)
    for source, remote in [("encoder", True), ("encoder", False), ("two-towers", True), ("two-towers", False)]:
        classifier = AutoModelForSequenceClassification.from_pretrained(  # remote code, or merit_hf's registration
            tmp_path / source, trust_remote_code=remote, id2label=id2label, output_hidden_states=True,
            attn_implementation="eager",
        ).eval()  # fmt: skip
        assert type(classifier).__name__ == "MeritForEcgClassification", source
        assert classifier.config.id2label == id2label
        assert classifier.config.problem_type == "multi_label_classification"
        assert classifier.ecg_model.config._attn_implementation == "eager", source
        with torch.no_grad():
            out = classifier(ecg, output_attentions=True)
            expected = model.merit.ecg_model(ecg).pooler_output
            torch.testing.assert_close(classifier.ecg_model(ecg).pooler_output, expected)
        assert out.logits.shape == (2, 5) and len(out.hidden_states) == 3, source
        assert len(out.attentions) == 2, source
    encoder_config = AutoConfig.from_pretrained(tmp_path / "encoder", attn_implementation="eager")
    from_config = AutoModelForSequenceClassification.from_config(encoder_config)
    assert from_config.ecg_model.config._attn_implementation == "eager"


def test_classifier_from_an_encoder_folder_takes_config_kwargs_into_its_config(saved_pretraining, tmp_path):
    """Kwargs that are config attributes go into the new `MeritConfig` (as transformers' `from_pretrained` puts them
    in the loaded config), whatever attribute they are; loading kwargs keep their meaning."""
    _, folder = saved_pretraining
    MeritEcgModel.from_pretrained(folder).save_pretrained(tmp_path / "encoder")
    classifier = MeritForEcgClassification.from_pretrained(
        tmp_path / "encoder", num_labels=2, output_hidden_states=True, output_attentions=True, return_dict=False,
        attn_implementation="eager", dtype=torch.bfloat16,
    )  # fmt: skip
    config = classifier.config
    assert (config.num_labels, config.output_hidden_states, config.output_attentions) == (2, True, True)
    assert config.return_dict is False and config._attn_implementation == "eager"
    assert classifier.dtype == torch.bfloat16
    logits, hidden_states, attentions = classifier.eval()(torch.randn(1, 12, 2250))
    assert logits.shape == (1, 2) and len(hidden_states) == 3 and attentions[0].shape == (1, 4, 384, 384)
    with pytest.raises(ValueError, match="problem_type: must be one of"):
        MeritForEcgClassification.from_pretrained(tmp_path / "encoder", problem_type="multi_label")


def test_loading_from_a_subfolder(saved_pretraining, tmp_path):
    model, folder = saved_pretraining
    model.save_pretrained(tmp_path / "repo" / "pretraining")
    reloaded = MeritForPreTraining.from_pretrained(tmp_path / "repo", subfolder="pretraining")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
    assert type(AutoModel.from_pretrained(tmp_path / "repo", subfolder="pretraining")) is MeritModel
    with pytest.raises(OSError, match="no model.safetensors found"):
        MeritForPreTraining.from_pretrained(tmp_path, subfolder="repo")


def test_output_flags_reach_the_encoder_everywhere(caplog):
    ecg, input_ids, _ = _inputs()
    torch.manual_seed(0)
    config = tiny_merit_config(num_labels=2)
    classifier = MeritForEcgClassification(config).eval()
    classifier.set_attn_implementation("eager")
    out = classifier(ecg, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert out.attentions[0].shape == (BATCH, 4, 384, 384)  # 12 leads x (30 patches + 2 separators)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(BATCH, 4, 384))
    two_towers = MeritModel(config).eval()
    out = two_towers(ecg, input_ids=input_ids, output_hidden_states=True)
    assert len(out.ecg_model_output.hidden_states) == 3 and len(out.text_model_output.hidden_states) == 2
    torch.testing.assert_close(
        F.normalize(out.ecg_model_output.pooler_output, dim=-1), out.ecg_embeds
    )  # the tower output is the projected, not yet normalised, embedding
    assert len(two_towers.get_ecg_features(ecg, output_hidden_states=True).hidden_states) == 3
    assert isinstance(two_towers(ecg, input_ids=input_ids, return_dict=False)[-1], tuple)
    # SDPA cannot return attention weights: said once, and none are made up (an empty tuple, as CLIP in transformers 5)
    sdpa = MeritEcgModel(tiny_ecg_config()).eval()
    with caplog.at_level("WARNING"):
        assert sdpa(ecg, output_attentions=True).attentions == ()
    assert "attn_implementation='eager'" in caplog.text
    with pytest.raises(ValueError, match="MeritForPreTraining returns losses, not hidden_states"):
        MeritForPreTraining(config)(ecg, input_ids=input_ids, output_hidden_states=True)


@pytest.mark.parametrize("model_class", [MeritModel, MeritForPreTraining])
def test_resize_token_embeddings_resizes_the_text_tower(model_class, tmp_path):
    """After tokens are added to the report tokenizer: the text tower's embeddings grow (transformers' generic
    method would try the ECG patch projection, the model's input embeddings), and the size is saved."""
    model = model_class(tiny_merit_config())
    merit = model if model_class is MeritModel else model.merit
    size = merit.text_model.get_input_embeddings().num_embeddings
    embeddings = model.resize_token_embeddings(size + 3)
    assert embeddings is merit.text_model.get_input_embeddings() and embeddings.num_embeddings == size + 3
    assert model.config.text_config.vocab_size == size + 3
    model.save_pretrained(tmp_path / "resized")
    reloaded = model_class.from_pretrained(tmp_path / "resized")
    reloaded_merit = reloaded if model_class is MeritModel else reloaded.merit
    assert reloaded_merit.text_model.get_input_embeddings().num_embeddings == size + 3
    with pytest.raises(ValueError, match="MeritForEcgClassification has no text tower"):
        MeritForEcgClassification(tiny_merit_config()).resize_token_embeddings(size + 3)


def test_set_attn_implementation_on_the_classifier_has_no_text_tower_to_warn_about(caplog):
    """The classifier's `MeritConfig` holds a `text_config` with no model behind it: transformers warned that it set
    it "without finding the associated sub-model ... undefined behavior". The encoder gets the setting, silently."""
    classifier = MeritForEcgClassification(tiny_merit_config(num_labels=2))
    text_config = classifier.config.text_config
    with caplog.at_level("WARNING"):
        classifier.set_attn_implementation("eager")
    assert "without finding the associated sub-model" not in caplog.text
    assert classifier.config._attn_implementation == classifier.ecg_model.config._attn_implementation == "eager"
    assert classifier.config.text_config is text_config
    out = classifier.eval()(torch.randn(1, 12, 2250), output_attentions=True)
    assert len(out.attentions) == 2


def test_two_tower_output_flags_default_to_its_config(tmp_path):
    """As transformers models (and `MeritForEcgClassification`): a flag left `None` is the model config's, set by
    `from_pretrained(..., output_hidden_states=True)` or on `model.config` at runtime; the towers' own configs are
    copies that these never reach. A flag given in the call still wins."""
    ecg, input_ids, noise = _inputs()
    torch.manual_seed(0)
    config = tiny_merit_config()
    MeritModel(config).save_pretrained(tmp_path / "two-towers")
    model = AutoModel.from_pretrained(tmp_path / "two-towers", output_hidden_states=True).eval()
    assert model.config.output_hidden_states and not model.ecg_model.config.output_hidden_states
    assert len(model.get_ecg_features(ecg).hidden_states) == 3
    out = model(ecg, input_ids=input_ids)
    assert len(out.ecg_model_output.hidden_states) == 3 and len(out.text_model_output.hidden_states) == 2
    assert model.get_ecg_features(ecg, output_hidden_states=False).hidden_states is None
    model = MeritModel(config).eval()
    model.set_attn_implementation("eager")
    assert model.get_text_features(input_ids).attentions is None
    model.config.output_attentions = True
    assert len(model.get_ecg_features(ecg).attentions) == 2 and len(model.get_text_features(input_ids).attentions) == 1
    pretraining = MeritForPreTraining(tiny_merit_config(output_hidden_states=True)).eval()
    assert pretraining(ecg, input_ids=input_ids, noise=noise).loss is not None  # losses only, whatever the config


@pytest.mark.slow  # flex attention compiles its kernel: about 20 s on 2 CPU cores with a cold inductor cache
def test_flex_attention_takes_the_padding_and_lead_masks():
    """The key mask is built for the kernel the config names (a BlockMask for flex); a 4D additive mask crashed it."""
    ecg, _, _ = _inputs(batch=2)
    model = MeritEcgModel(tiny_ecg_config()).eval()
    attention_mask = torch.ones(2, 2250, dtype=torch.long)
    attention_mask[1, 1500:] = 0
    lead_mask = torch.ones(2, 12, dtype=torch.bool)
    lead_mask[0, 6:] = False
    outputs = {}
    for implementation in ("eager", "flex_attention"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = model(ecg, ecg_attention_mask=attention_mask, lead_mask=lead_mask).pooler_output
    torch.testing.assert_close(outputs["flex_attention"], outputs["eager"])


@pytest.mark.slow
def test_hidden_states_are_the_embeddings_then_each_layer_before_the_final_norm():
    ecg, _, _ = _inputs()
    model = MeritEcgModel(tiny_ecg_config()).eval()
    attention_mask = torch.ones(BATCH, 2250, dtype=torch.long)
    attention_mask[1, 1500:] = 0  # padding: every layer runs with the same key mask
    with torch.no_grad():
        out = model(ecg, ecg_attention_mask=attention_mask, output_hidden_states=True)
        embeddings, _, _, token_mask = model.embeddings(ecg, out.patch_attention_mask)
        key_mask = torch.where(token_mask.bool(), 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
        expected = [embeddings]
        for layer in model.layers:
            expected.append(layer(expected[-1], key_mask))
    assert len(out.hidden_states) == len(model.layers) + 1
    for index, (got, want) in enumerate(zip(out.hidden_states, expected)):
        torch.testing.assert_close(got, want, msg=f"hidden state {index}")
    torch.testing.assert_close(model.norm(out.hidden_states[-1]), out.last_hidden_state)


@pytest.mark.slow
def test_return_dict_false_in_the_config_gives_tuples_from_every_class():
    ecg, input_ids, noise = _inputs()
    config = tiny_merit_config(return_dict=False, num_labels=2)
    encoder = MeritEcgModel(tiny_ecg_config(return_dict=False)).eval()
    pooled = encoder(ecg)[1]
    assert isinstance(encoder(ecg), tuple) and pooled.shape == (BATCH, 32)
    assert isinstance(MeritForEcgClassification(config).eval()(ecg), tuple)
    pretraining = MeritForPreTraining(config).eval()
    out = pretraining(ecg, input_ids=input_ids, noise=noise)
    assert isinstance(out, tuple) and out[0].ndim == 0  # the loss first
    two_towers = pretraining.merit
    assert isinstance(two_towers(ecg, input_ids=input_ids), tuple)
    assert isinstance(two_towers.get_ecg_features(ecg), tuple)
    features = two_towers.get_ecg_features(ecg, return_dict=True).pooler_output
    torch.testing.assert_close(features, two_towers.get_ecg_features(ecg)[1])
    assert isinstance(pretraining(ecg, input_ids=input_ids, noise=noise, return_dict=True).loss, torch.Tensor)


@pytest.mark.parametrize("contrastive_input", ["full", "masked"])
def test_pretraining_runs_when_the_ecg_config_asks_for_tuples(contrastive_input):
    # torchscript=True on the ECG config also sets return_dict=False; the outer class decides its own output
    ecg, input_ids, noise = _inputs()
    config = tiny_merit_config({"return_dict": False}, contrastive_input=contrastive_input)
    model = MeritForPreTraining(config).eval()
    out = model(ecg, input_ids=input_ids, noise=noise)
    assert out.reconstruction_loss is not None and out.contrastive_loss is not None
    with torch.no_grad():
        model.merit.ecg_model.config.return_dict = True
        expected = model(ecg, input_ids=input_ids, noise=noise)
    torch.testing.assert_close(out.loss, expected.loss)


def test_trainer_sees_that_pretraining_returns_its_loss():
    from transformers.utils import can_return_loss

    assert can_return_loss(MeritForPreTraining) and not can_return_loss(MeritModel)
    ecg, input_ids, noise = _inputs()
    model = MeritForPreTraining(tiny_merit_config()).eval()
    out = model(ecg, input_ids=input_ids, noise=noise, return_loss=False)
    assert out.loss is None and out.reconstruction_loss is not None


def test_a_mistyped_problem_type_is_refused():
    with pytest.raises(ValueError, match="problem_type: must be one of"):
        tiny_merit_config(problem_type="multi_label")
