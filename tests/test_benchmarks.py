"""The encoder benchmark's measuring code runs (tiny shape, one round): the numbers in benchmarks/README.md come
from it, so it must not rot between the runs that refresh them."""

import sys

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import encoder_throughput  # noqa: E402


@pytest.mark.parametrize("row, mode", [("merit_encoder", "infer"), ("merit_pretraining", "train")])
def test_encoder_throughput_group_measures_every_variant(row, mode):
    results = encoder_throughput.measure_group(row, "tiny-p75", mode, batch=2, rounds=2, device="cpu", dtype="fp32")
    by_variant = {result["variant"]: result for result in results["results"]}
    assert set(by_variant) == {"sdpa", "stmem_einsum"}
    for result in by_variant.values():
        assert result["ecgs_per_second"] > 0 and result["gflop_per_ecg_forward"] > 0
        assert 0 < result["fraction_of_matmul_peak"] < 2  # a model cannot run far above a plain matmul
    assert by_variant["sdpa"]["gflop_per_ecg_forward"] == by_variant["stmem_einsum"]["gflop_per_ecg_forward"]
    assert "vs_einsum_reference" in by_variant["sdpa"] and "vs_einsum_reference" not in by_variant["stmem_einsum"]


def test_einsum_reference_runs_in_every_layer_and_computes_the_same_attention(monkeypatch):
    import torch

    from merit_hf import MeritEcgConfig, MeritEcgModel

    calls = []
    original = encoder_throughput.einsum_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder_throughput, "einsum_attention", counting)
    encoder_throughput._register_einsum()
    model = MeritEcgModel(MeritEcgConfig.from_preset("tiny-p75")).eval()
    ecg = torch.randn(2, 12, model.config.num_samples)
    with torch.no_grad():
        fused = model(ecg).pooler_output
        assert not calls
        encoder_throughput.set_attention(model, "stmem_einsum")
        reference = model(ecg).pooler_output
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(reference, fused, atol=1e-5, rtol=1e-4)


def test_encoder_throughput_measures_bf16_weights_and_says_why_fp8_is_skipped_on_cpu():
    """The GPU run compares autocast, bf16 weights and fp8; on a CPU the same code measures bf16 weights and records
    why fp8 cannot run there."""
    results = encoder_throughput.measure_group(
        "merit_encoder", "tiny-p75", "infer", batch=2, rounds=1, device="cpu", dtype="bf16", precision_variants=True
    )
    by_variant = {result["variant"]: result for result in results["results"]}
    assert set(by_variant) == {"sdpa", "stmem_einsum", "sdpa+bf16_weights"}
    assert (
        by_variant["sdpa+bf16_weights"]["weights"] == "bf16" and "vs_sdpa_autocast" in by_variant["sdpa+bf16_weights"]
    )
    assert "needs a CUDA GPU with FP8 tensor cores" in results["skipped"]["sdpa+fp8"]


def test_cpu_inference_times_every_precision_against_the_references():
    import cpu_inference

    result = cpu_inference.measure_preset("tiny-p75", batch=2, rounds=1, with_hubert=False)
    assert set(result["ecgs_per_second"]) == {
        "einsum_ref/fp32", "merit/fp32", "einsum_ref/bf16-autocast", "einsum_ref/bf16", "merit/bf16-sdpa",
        "merit/bf16-matmul", "einsum_ref/int8", "merit/int8",
    }  # fmt: skip
    assert all(rate > 0 for rate in result["ecgs_per_second"].values())
    assert list(result["bf16_attention_picked_by_the_model"].values())[0] in ("sdpa", "matmul")
    assert all(0.99 < cosine <= 1.0 + 1e-6 for cosine in result["min_cosine_to_fp32_pooled_output"].values())
