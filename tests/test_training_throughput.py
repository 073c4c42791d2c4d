"""Throughput logging (step time, data wait, ECGs/s, FLOPs, MFU) in the training loops, the DataLoader options, and
activation checkpointing that leaves the pretraining loss and gradients unchanged."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from tests.conftest import BUNDLED_PTBXL, REPO_ROOT, run_pretraining, tiny_text_config, train_tiny_tokenizer

TINY_YAML = REPO_ROOT / "configs" / "tiny.yaml"
INTERVAL_FIELDS = ("seconds_per_step", "data_wait_seconds_per_step", "data_wait_fraction", "ecgs_per_second")


def tiny_pretraining_model(**ecg_overrides):
    from merit_hf import MeritConfig, MeritEcgConfig, MeritForPreTraining

    ecg = MeritEcgConfig(
        sampling_rate=100, num_samples=1000, patch_size=50, hidden_size=32, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=32, **ecg_overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    return MeritForPreTraining(MeritConfig(ecg_config=ecg, text_config=tiny_text_config(), projection_dim=16))


def tiny_batch(batch_size: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "ecg_values": torch.randn(batch_size, 12, 1000, generator=generator),
        "input_ids": torch.randint(5, 120, (batch_size, 9), generator=generator),
        "attention_mask": torch.ones(batch_size, 9, dtype=torch.long),
        "noise": torch.rand(batch_size, 12, 20, generator=generator),
    }


# ----------------------------------------------------------------------------------------------------------------------
# The meter on its own
# ----------------------------------------------------------------------------------------------------------------------
def test_meter_separates_data_wait_from_step_time_and_excludes_evaluation():
    from merit_hf.utils.throughput import ThroughputMeter

    def slow_batches():
        for _ in range(4):
            time.sleep(0.03)
            yield 8

    meter = ThroughputMeter("cpu")
    for samples in meter.timed(slow_batches()):
        time.sleep(0.01)  # the "step"
        meter.step(samples)
        with meter.excluded():
            time.sleep(0.05)  # evaluation: counted nowhere
    interval = meter.interval()
    assert 0.03 <= interval["data_wait_seconds_per_step"] < 0.06
    assert 0.04 <= interval["seconds_per_step"] < 0.09, interval  # 0.03 wait + 0.01 step, not the 0.05 eval
    assert 0.5 < interval["data_wait_fraction"] < 0.9
    assert interval["ecgs_per_second"] * interval["seconds_per_step"] == pytest.approx(8)
    assert "mfu" not in interval and meter.peak_tflops is None  # CPU: no peak, no MFU
    assert "data-bound" in meter.data_bound_message(interval)
    assert meter.data_bound_message(interval) is None  # said once
    totals = meter.totals()
    assert totals["ecgs_seen"] == 32 and totals["steps_measured"] == 4 and totals["limited_by"] == "data"


def test_meter_counts_diagnostics_in_the_step_and_shows_their_share():
    from merit_hf.utils.throughput import ThroughputMeter

    meter = ThroughputMeter("cpu")
    for step in range(4):
        time.sleep(0.01)  # the step
        if step % 2 == 0:
            with meter.diagnostics():
                time.sleep(0.04)  # e.g. the per-term gradient norms, every other step
        meter.step(8)
    interval = meter.interval()
    assert 0.02 <= interval["diagnostics_seconds_per_step"] < 0.04  # 0.08 s over 4 steps
    assert 0.02 + 0.01 <= interval["seconds_per_step"] < 0.06, interval  # counted in the step time, not left out
    assert 0.5 < interval["diagnostics_fraction"] < 0.9
    quiet = ThroughputMeter("cpu")  # no diagnostics: no fields
    quiet.step(8)
    assert "diagnostics_fraction" not in quiet.interval()
    totals = meter.totals()
    assert totals["diagnostics_seconds_per_step"] == pytest.approx(interval["diagnostics_seconds_per_step"])


def test_default_peak_by_gpu_name(monkeypatch):
    """Whole words of the name: "L40" got the L4's peak and "A10G" (not in the table) the A10's."""
    from merit_hf.training import throughput

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                       ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0),
                       ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0),
                       ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 3090", None)):  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert throughput.default_peak_tflops("cuda") == peak, name
    assert throughput.default_peak_tflops("cpu") is None


@pytest.mark.slow
def test_flop_count_is_forward_plus_backward_and_leaves_the_model_as_it_was():
    from merit_hf.utils.throughput import count_flops_per_sample

    model = tiny_pretraining_model().train()
    batch = tiny_batch()
    state = torch.random.get_rng_state()
    training = count_flops_per_sample(model, lambda rows: model(**rows).loss, batch)
    forward = count_flops_per_sample(model, lambda rows: model(**rows).loss, batch, backward=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert model.config.ecg_config._attn_implementation != "eager"  # restored after counting with eager attention
    # Backward costs at most twice the forward (each counted matmul needs the gradient of both inputs, or less). The
    # bound was strict while the forward also computed the similarity matrix a second time, without a backward.
    assert 2.5 * forward < training <= 3.0 * forward
    # Per sample: the same from 2 rows of a batch of 4 as from a batch of 2.
    halves = {k: v[:2] for k, v in batch.items()}
    assert count_flops_per_sample(model, lambda rows: model(**rows).loss, halves) == pytest.approx(training, rel=1e-3)


def test_pretraining_counts_flops_at_the_maximum_report_length_whatever_the_first_batch():
    """Pretraining counts FLOPs per ECG on its first batch with the reports padded to --max_report_length
    (`at_report_length`), as the tokenizer pads: first batches padded to 9 or 13 tokens give the count of 16-token
    reports, so a resumed run, whose first batch is another, reports the same GFLOP per ECG, TFLOP/s and MFU."""
    from types import SimpleNamespace

    from merit_hf.training.pretrain import at_report_length
    from merit_hf.utils.throughput import count_flops_per_sample

    model = tiny_pretraining_model()
    tokenizer = SimpleNamespace(pad_token_id=0, pad_token_type_id=0)
    full = {**tiny_batch(), "input_ids": torch.randint(5, 120, (4, 16)), "attention_mask": torch.ones(4, 16).long()}

    def first_batch(length: int) -> dict[str, torch.Tensor]:
        return {
            **full,
            "input_ids": full["input_ids"][:, :length],
            "attention_mask": full["attention_mask"][:, :length],
        }

    padded = at_report_length(first_batch(9), 16, tokenizer)
    assert torch.equal(padded["input_ids"][:, :9], full["input_ids"][:, :9]) and not padded["input_ids"][:, 9:].any()
    assert padded["attention_mask"].sum() == 4 * 9 and padded["ecg_values"] is full["ecg_values"]
    assert at_report_length(full, 16, tokenizer) is full

    def counted(length: int, max_report_length: int) -> float:
        return count_flops_per_sample(
            model, lambda rows: model(**at_report_length(rows, max_report_length, tokenizer)).loss, first_batch(length)
        )

    at_16 = count_flops_per_sample(model, lambda rows: model(**rows).loss, full)
    assert counted(9, 16) == counted(13, 16) == at_16
    assert counted(9, 9) < at_16  # the text tower's share of the count depends on the length


# ----------------------------------------------------------------------------------------------------------------------
# Activation checkpointing: same loss, same gradients
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("mode", "num_layers"), [("full", None), ("selective", None), ("full", 1)])
def test_activation_checkpointing_keeps_loss_and_gradients(mode, num_layers):
    from merit_hf.training.activation_checkpointing import enable_activation_checkpointing

    batch = tiny_batch()

    def loss_and_gradients(model):
        output = model(**batch)
        output.loss.backward()
        return output.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_gradients(tiny_pretraining_model().train())
    model = tiny_pretraining_model().train()
    chosen = enable_activation_checkpointing(model, mode, num_layers)
    assert chosen == (num_layers if num_layers is not None else 3)
    assert [layer.gradient_checkpointing for layer in model.merit.ecg_model.layers] == [i < chosen for i in range(3)]
    loss, grads = loss_and_gradients(model)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_activation_checkpointing_refuses_unknown_mode_and_layer_count():
    from merit_hf.training.activation_checkpointing import enable_activation_checkpointing

    model = tiny_pretraining_model()
    with pytest.raises(ValueError, match="activation_checkpointing: must be one of"):
        enable_activation_checkpointing(model, "some")
    with pytest.raises(ValueError, match="between 0 and the encoder's 3 layers, got 4"):
        enable_activation_checkpointing(model, "full", 4)


def test_dataloader_options_only_where_they_apply():
    from merit_hf.utils.throughput import dataloader_options

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dataloader_options(0, True, True, 4, cpu) == {"num_workers": 0, "pin_memory": False}
    assert dataloader_options(2, True, True, 4, cuda) == {
        "num_workers": 2, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 4,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# The loops
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretraining_assets(tmp_path_factory):
    from transformers import BertModel

    from merit_hf.data import build_ptbxl

    root = tmp_path_factory.mktemp("throughput_assets")
    tokenizer = train_tiny_tokenizer(root / "text")
    torch.manual_seed(0)
    BertModel(tiny_text_config(vocab_size=len(tokenizer))).save_pretrained(root / "text")
    build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(1, 81)).save_to_disk(str(root / "ptbxl"))
    return {"text": str(root / "text"), "data": str(root / "ptbxl")}


@pytest.mark.slow
def test_pretraining_logs_throughput_per_interval_and_in_totals(pretraining_assets, tmp_path):
    output_dir = tmp_path / "run"
    argv = [str(TINY_YAML), "--text_model_name_or_path", pretraining_assets["text"], "--data_dir",
            pretraining_assets["data"], "--output_dir", str(output_dir), "--max_steps", "6", "--logging_steps", "2",
            "--save_steps", "3", "--eval_steps", "3", "--report_to", "none", "--disable_tqdm", "true",
            "--precompute_ecg_values", "true", "--train_crop", "center",
            "--activation_checkpointing", "selective"]  # fmt: skip
    results = run_pretraining(argv)
    logged = [json.loads(line) for line in (output_dir / "log_history.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [2, 3, 4, 6]  # step 3 evaluates between logging steps: its own line
    evaluation = logged.pop(1)
    assert "eval_loss" in evaluation and set(evaluation) - {"step", "epoch"} == {k for k in evaluation if "eval_" in k}
    for entry in logged:
        assert all(entry[name] > 0 or name.startswith("data_wait") for name in INTERVAL_FIELDS), entry
        assert entry["achieved_tflops"] > 0
        if torch.cuda.is_available():  # the GPU runbook runs this test there: MFU against the GPU's known peak
            assert 0 < entry["mfu"] < 1, entry
        else:
            assert "mfu" not in entry  # no MFU on CPU without --peak_tflops
        assert entry["ecgs_per_second"] * entry["seconds_per_step"] == pytest.approx(8)  # 8 ECGs per step
        # the per-term gradient norms (every logging step by default) are timed as diagnostics
        assert entry["gradient_norm_step"] == entry["step"] and 0 < entry["diagnostics_fraction"] < 1, entry
    totals = results["throughput"]
    assert totals["ecgs_seen"] == 6 * 8 and totals["steps_measured"] == 6
    assert 0 < totals["diagnostics_seconds_per_step"] < totals["seconds_per_step"]
    assert totals["ecgs_per_second"] * totals["measured_seconds"] == pytest.approx(totals["ecgs_seen"])
    # Evaluation and checkpoints are left out: the measured time is below the whole run's.
    assert totals["measured_seconds"] < results["train_runtime_s"]
    assert totals["flops_per_ecg"] > 1e6 and totals["limited_by"] in ("data", "step")
    written = json.loads((output_dir / "train_results.json").read_text())
    assert written["throughput"]["ecgs_seen"] == 48


def test_the_first_interval_and_the_totals_leave_the_set_up_out(pretraining_assets, tmp_path, monkeypatch):
    """The meter's clock started before `prepare`, loading a checkpoint and the trackers' start-up, so the first
    logged interval and the run's totals counted them (3.3 s per step against 1.3 s after it on a 2-process
    resume). It now starts right before the loop's first batch: a slow set-up leaves them as they are."""
    from merit_hf.training import pretrain

    set_up_seconds = 5.0
    start_logging = pretrain.start_logging

    def slow_start_logging(*args, **kwargs):
        time.sleep(set_up_seconds)
        return start_logging(*args, **kwargs)

    monkeypatch.setattr(pretrain, "start_logging", slow_start_logging)
    output_dir = tmp_path / "run"
    argv = [str(TINY_YAML), "--text_model_name_or_path", pretraining_assets["text"], "--data_dir",
            pretraining_assets["data"], "--output_dir", str(output_dir), "--max_steps", "2", "--logging_steps", "1",
            "--save_steps", "2", "--eval_split", "None", "--report_to", "none", "--disable_tqdm", "true"]  # fmt: skip
    results = run_pretraining(argv)
    first = json.loads((output_dir / "log_history.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["seconds_per_step"] < set_up_seconds / 2, first
    assert results["throughput"]["measured_seconds"] < set_up_seconds / 2


@pytest.mark.slow
def test_gradient_norm_logging_steps_sets_what_the_diagnostics_cost(pretraining_assets, tmp_path):
    """`--gradient_norm_logging_steps 0`: no per-term gradient norms and no diagnostics time (fixed loss weights);
    `3` with logging every step: measured on steps 3 and 6 only, each logged once, with the step it was measured on;
    with loss balancing every 2 steps and `0`, the balancer's own measurements are logged (steps 1, 3, 5)."""

    def run(name, *flags):
        output_dir = tmp_path / name
        argv = [str(TINY_YAML), "--text_model_name_or_path", pretraining_assets["text"], "--data_dir",
                pretraining_assets["data"], "--output_dir", str(output_dir), "--max_steps", "6", "--logging_steps",
                "1", "--save_steps", "6", "--max_eval_samples", "8", "--report_to", "none", "--disable_tqdm",
                "true", *flags]  # fmt: skip
        results = run_pretraining(argv)
        logged = [json.loads(line) for line in (output_dir / "log_history.jsonl").read_text().splitlines()]
        return results, logged

    results, logged = run("never", "--gradient_norm_logging_steps", "0")
    assert not any("encoder_grad_norm_reconstruction" in entry or "diagnostics_fraction" in entry for entry in logged)
    assert results["encoder_gradient_norms"] == [] and "diagnostics_fraction" not in results["throughput"]
    results, logged = run("every_third", "--gradient_norm_logging_steps", "3")
    measured = [entry for entry in logged if "encoder_grad_norm_reconstruction" in entry]
    assert [(entry["step"], entry["gradient_norm_step"]) for entry in measured] == [(3, 3), (6, 6)]
    assert [entry["step"] for entry in results["encoder_gradient_norms"]] == [3, 6]
    results, logged = run("balancing", "--gradient_norm_logging_steps", "0", "--loss_balancing", "gradient_norm",
                          "--loss_balancing_interval", "2")  # fmt: skip
    measured = [entry for entry in logged if "encoder_grad_norm_reconstruction" in entry]
    assert [entry["gradient_norm_step"] for entry in measured] == [1, 3, 5]
    assert all(entry["reconstruction_weight"] > 0 for entry in logged)
    # the weight logged is the one the step's loss used (it was the next step's, after a balancing update)
    train = [entry for entry in logged if "train_loss" in entry]
    for entry in train:
        combined = (
            entry["reconstruction_weight"] * entry["train_reconstruction_loss"] + entry["train_contrastive_loss"]
        )
        assert entry["train_loss"] == pytest.approx(combined, rel=1e-5), entry
    assert len({entry["reconstruction_weight"] for entry in train}) > 1  # it did move


@pytest.mark.slow
def test_selective_checkpointing_trains_in_bf16_as_without_it(pretraining_assets, tmp_path):
    """`--activation_checkpointing selective` under bf16 autocast stopped in the first backward (torch refused the
    recomputed weight casts that autocast had cached in the forward, which runs the encoder twice); without autocast's
    cache it trains, with the losses of the run without checkpointing."""

    def run(name, *flags):
        argv = [str(TINY_YAML), "--text_model_name_or_path", pretraining_assets["text"], "--data_dir",
                pretraining_assets["data"], "--output_dir", str(tmp_path / name), "--max_steps", "2", "--save_steps",
                "2", "--eval_split", "None", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
                "--mixed_precision", "bf16", *flags]  # fmt: skip
        return run_pretraining(argv)

    selective = run("selective", "--activation_checkpointing", "selective")
    plain = run("plain")
    assert selective["loss_history"] == pytest.approx(plain["loss_history"], rel=1e-3)


@pytest.mark.slow
def test_pretraining_mfu_against_a_given_peak(pretraining_assets, tmp_path):
    argv = [str(TINY_YAML), "--text_model_name_or_path", pretraining_assets["text"], "--data_dir",
            pretraining_assets["data"], "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--logging_steps",
            "1", "--save_steps", "2", "--max_eval_samples", "8", "--report_to", "none", "--disable_tqdm", "true",
            "--peak_tflops", "0.5", "--dataloader_num_workers", "1", "--feature_extraction_device", "cpu"]  # fmt: skip
    totals = run_pretraining(argv)["throughput"]  # the batched torch feature extractor in the worker
    assert totals["peak_tflops"] == 0.5
    assert totals["mfu"] == pytest.approx(totals["achieved_tflops"] / 0.5)
    assert totals["achieved_tflops"] == pytest.approx(totals["ecgs_per_second"] * totals["flops_per_ecg"] / 1e12)


@pytest.mark.slow
def test_fine_tune_reports_throughput(tmp_path):
    from merit_hf import MeritEcgConfig, MeritEcgModel, MeritFeatureExtractor
    from merit_hf.data import build_ptbxl
    from merit_hf.training.probe import ProbeArguments, fine_tune, probe_rows

    config = MeritEcgConfig(sampling_rate=100, num_samples=1000, patch_size=50, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=4, intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    encoder = MeritEcgModel(config)
    dataset = build_ptbxl(BUNDLED_PTBXL, sampling_rate=100, ecg_ids=range(1, 121))
    rows = probe_rows(dataset, "superclass")
    arguments = ProbeArguments(mode="finetune", batch_size=16, finetune_max_epochs=1)
    *_, training = fine_tune(encoder, MeritFeatureExtractor.from_model_config(config), dataset, "superclass", rows,
                             arguments)  # fmt: skip
    throughput = training["throughput"]
    steps = math.ceil(len(rows["train"]) / 16)
    assert throughput["steps_measured"] == steps and throughput["ecgs_seen"] == len(rows["train"])
    assert throughput["ecgs_per_second"] * throughput["measured_seconds"] == pytest.approx(len(rows["train"]))
    assert throughput["flops_per_ecg"] > 0 and 0 < throughput["data_wait_fraction"] < 1
