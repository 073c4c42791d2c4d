"""Inference precision: what 'auto' resolves to on CPUs with and without AMX / AVX512-BF16 / VNNI (capabilities
injected, so CI's CPU does not decide what is tested), the errors for precisions a device cannot run, and what
`prepare_for_inference` does to a model (a converted copy, cached until the weights change; never the original)."""

import logging
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from merit_hf import MeritEcgModel
from merit_hf.models.merit import inference_precision
from merit_hf.models.merit.inference_precision import (
    CPU_PREPACK_ENV,
    CpuCapability,
    PrepackedLinear,
    _quantize_fp8,
    _read_cpuinfo,
    cpu_capability,
    cpu_prepacking_pays,
    cpu_prepacking_works,
    prepare_for_inference,
    resolve_precision,
)
from tests.conftest import tiny_ecg_config

SAPPHIRE_RAPIDS = CpuCapability(
    "Intel(R) Xeon(R) Platinum 8480+",
    frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"}),
    "AVX512",
)
ZEN4 = CpuCapability("AMD EPYC 9654", frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}), "AVX512")
CASCADE_LAKE = CpuCapability("Intel(R) Xeon(R) Gold 6248", frozenset({"avx2", "avx512f", "avx512_vnni"}), "AVX512")
HASWELL = CpuCapability("Intel(R) Xeon(R) CPU E5-2680 v3", frozenset({"avx2", "fma"}), "AVX2")


@pytest.mark.parametrize(
    "capability, expected",
    [(SAPPHIRE_RAPIDS, "bf16"), (ZEN4, "bf16"), (CASCADE_LAKE, "fp32"), (HASWELL, "fp32")],
    ids=["amx", "avx512_bf16", "vnni_only", "neither"],
)
def test_auto_on_cpu_follows_what_the_cpu_reports(capability, expected, caplog):
    with caplog.at_level(logging.DEBUG, logger="merit_hf.models.merit.inference_precision"):
        assert resolve_precision("auto", "cpu", capability=capability) == expected
    assert f"precision 'auto' on cpu -> {expected} ({capability.model_name}" in caplog.text
    for explicit in ("fp32", "bf16", "fp16", "int8"):  # an explicit precision is kept whatever the CPU
        assert resolve_precision(explicit, "cpu", capability=capability) == explicit


def test_auto_on_cuda_is_bf16_weights_where_the_gpu_has_bf16():
    assert resolve_precision("auto", "cuda", cuda_capability=(9, 0)) == "bf16"
    assert resolve_precision("auto", "cuda:1", cuda_capability=(8, 0)) == "bf16"
    assert resolve_precision("auto", "cuda", cuda_capability=(7, 0)) == "fp32"  # V100: no bf16
    assert resolve_precision("fp32", "cuda", cuda_capability=(9, 0)) == "fp32"
    assert resolve_precision("fp8", "cuda", cuda_capability=(9, 0)) == "fp8"
    assert resolve_precision("fp8", "cuda", cuda_capability=(8, 9)) == "fp8"


def test_precisions_a_device_cannot_run_are_named():
    with pytest.raises(
        ValueError, match=r"precision: must be one of \['auto', 'fp32', 'bf16', 'fp16', 'int8', 'fp8'\]"
    ):
        resolve_precision("fp64", "cpu")
    with pytest.raises(
        ValueError, match="precision 'fp8' needs a CUDA GPU with FP8 tensor cores .* this device is cpu"
    ):
        resolve_precision("fp8", "cpu", capability=SAPPHIRE_RAPIDS)
    with pytest.raises(ValueError, match=r"cuda has compute capability 8\.0\. Use 'bf16' there"):
        resolve_precision("fp8", "cuda", cuda_capability=(8, 0))
    with pytest.raises(ValueError, match="precision 'int8' is CPU inference"):
        resolve_precision("int8", "cuda", cuda_capability=(9, 0))
    model = MeritEcgModel(tiny_ecg_config())
    with pytest.raises(ValueError, match="precision 'fp8' needs a CUDA GPU"):
        prepare_for_inference(model, "fp8", "cpu")


def test_fp8_without_torchao_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    with pytest.raises(ImportError, match=r"pip install 'merit_hf\[fp8\]'"):
        _quantize_fp8(MeritEcgModel(tiny_ecg_config()))


def test_the_cpu_is_read_from_proc_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    core = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n"
    cpuinfo.write_text(f"processor\t: 0\n{core}\nprocessor\t: 1\n{core}")
    model_name, flags = _read_cpuinfo(cpuinfo)
    assert model_name == "Intel(R) Xeon(R) Platinum 8480+"
    assert flags == {"fpu", "avx512_bf16", "amx_bf16", "amx_tile"}
    capability = CpuCapability(model_name, flags, "AVX512")
    assert capability.amx_bf16 and capability.native_bf16 and not capability.int8_dot_product
    assert _read_cpuinfo(tmp_path / "absent") is None
    here = cpu_capability()  # this machine, whatever it is
    assert here.summary()["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert resolve_precision("auto", "cpu") in ("bf16", "int8", "fp32")


def test_prepare_returns_a_cached_converted_copy_and_never_touches_the_model(monkeypatch):
    monkeypatch.setenv(CPU_PREPACK_ENV, "off")  # fp32 prepacking is timed; here fixed off, so fp32 needs no copy
    torch.manual_seed(0)
    model = MeritEcgModel(tiny_ecg_config()).train()
    original = {name: value.clone() for name, value in model.state_dict().items()}
    in_training = prepare_for_inference(model, "fp32", "cpu")  # fp32 on CPU already, but in training mode
    assert in_training is not model and not in_training.training and model.training  # left training (dropout on)
    assert {id(t) for t in in_training.parameters()} == {id(t) for t in model.parameters()}  # its weights, shared
    assert prepare_for_inference(model.eval(), "fp32", "cpu") is model  # in eval mode: the model itself
    model.train()
    bf16 = prepare_for_inference(model, "bf16", "cpu")
    assert bf16 is not model and bf16.layers[0].mlp.fc1.weight.dtype == torch.bfloat16 and not bf16.training
    assert prepare_for_inference(model, "bf16", "cpu") is bf16  # cached: a loop of calls converts once
    assert all(torch.equal(value, original[name]) for name, value in model.state_dict().items())
    with torch.no_grad():  # an optimizer step or load_state_dict writes in place: the copy is stale
        model.layers[0].mlp.fc1.weight.add_(1.0)
    fresh = prepare_for_inference(model, "bf16", "cpu")
    assert fresh is not bf16
    torch.testing.assert_close(
        fresh.layers[0].mlp.fc1.weight.float(), model.layers[0].mlp.fc1.weight, atol=0.02, rtol=0.01
    )


@pytest.mark.skipif(not cpu_prepacking_works(torch.float32), reason="this PyTorch build has no oneDNN prepacking")
def test_fp32_on_cpu_prepacks_where_it_pays_in_a_copy_sharing_the_models_weights(monkeypatch):
    """fp32 prepacked (`MERIT_CPU_PREPACK=on`): a copy whose block linears are `PrepackedLinear` on the model's own
    tensors (no second copy of the weights), to float rounding of the model's output; the model is left as it is."""
    monkeypatch.setenv(CPU_PREPACK_ENV, "on")
    torch.manual_seed(0)
    model = MeritEcgModel(tiny_ecg_config()).train()
    fp32 = prepare_for_inference(model, "fp32", "cpu")
    assert fp32 is not model and not fp32.training and model.training
    assert prepare_for_inference(model, "fp32", "cpu") is fp32  # cached
    block, original = fp32.layers[0], model.layers[0]
    assert type(block.mlp.fc1) is PrepackedLinear and block.mlp.fc1.activation == "gelu"
    assert type(original.mlp.fc1) is torch.nn.Linear and type(original.mlp.act) is not torch.nn.Identity
    assert block.mlp.fc1.weight is original.mlp.fc1.weight  # shared, not copied
    assert {id(t) for t in fp32.parameters()} == {id(t) for t in model.parameters()}
    ecg = torch.randn(3, 12, model.config.num_samples)
    with torch.inference_mode():
        expected = model.eval()(ecg).pooler_output
        torch.testing.assert_close(fp32(ecg).pooler_output, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a training step on the model: the next call prepacks the new weights
        model.layers[0].mlp.fc1.weight.mul_(0.5)
    fresh = prepare_for_inference(model, "fp32", "cpu")
    assert fresh is not fp32
    with torch.inference_mode():
        torch.testing.assert_close(fresh(ecg).pooler_output, model(ecg).pooler_output, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(CPU_PREPACK_ENV, "sometimes")
    with pytest.raises(ValueError, match="MERIT_CPU_PREPACK: must be 'on' or 'off', got 'sometimes'"):
        prepare_for_inference(MeritEcgModel(tiny_ecg_config()), "fp32", "cpu")


@pytest.mark.skipif(not cpu_prepacking_works(torch.float32), reason="this PyTorch build has no oneDNN prepacking")
@pytest.mark.parametrize("prepacked_faster", [True, False])
def test_fp32_prepacking_is_timed_once_per_shape_and_the_faster_kept(monkeypatch, caplog, prepacked_faster):
    """Without `MERIT_CPU_PREPACK`, fp32 on a CPU times one block both ways (here the timer is injected, so the
    CPU CI runs on does not decide the outcome), keeps the faster, logs it, and times once per block shape; bf16
    always prepacks, fp16 never."""
    monkeypatch.delenv(CPU_PREPACK_ENV, raising=False)
    monkeypatch.setattr(inference_precision, "_cpu_prepacking_choice", {})
    calls = []

    def timer(block, num_tokens):
        calls.append(num_tokens)
        return {"nn.Linear": 2.0, "prepacked": 1.0 if prepacked_faster else 3.0}

    monkeypatch.setattr(inference_precision, "time_cpu_prepacking", timer)
    model = MeritEcgModel(tiny_ecg_config()).eval()
    with caplog.at_level(logging.DEBUG, logger="merit_hf.models.merit.inference_precision"):
        assert cpu_prepacking_pays(model, torch.float32) is prepacked_faster
        fp32 = prepare_for_inference(model, "fp32", "cpu")
    assert calls == [model.config.num_leads * model.config.tokens_per_lead]  # once, with the model's token count
    assert (fp32 is not model) is prepacked_faster
    assert (type(fp32.layers[0].attention.qkv) is PrepackedLinear) is prepacked_faster
    chosen = "prepacked" if prepacked_faster else "nn.Linear"
    assert f"CPU torch.float32 linear layers for blocks of {model.config.hidden_size} -> " in caplog.text
    assert f"threads: {chosen} (timed:" in caplog.text
    assert cpu_prepacking_pays(model, torch.bfloat16) and not cpu_prepacking_pays(model, torch.float16)
    assert len(calls) == 1
    assert not cpu_prepacking_pays(torch.nn.Linear(4, 4), torch.float32)  # no Transformer block: nothing to pack


@pytest.mark.skipif(not cpu_prepacking_works(torch.float32), reason="this PyTorch build has no oneDNN prepacking")
def test_the_prepacking_timer_times_both_forms_and_leaves_the_block_alone():
    torch.manual_seed(0)
    block = MeritEcgModel(tiny_ecg_config()).layers[0]
    seconds = inference_precision.time_cpu_prepacking(block, num_tokens=8, batch_size=1, repeats=1)
    assert set(seconds) == {"nn.Linear", "prepacked"} and all(0 < value < 60 for value in seconds.values())
    assert type(block.mlp.fc1) is torch.nn.Linear and type(block.mlp.act) is not torch.nn.Identity


@pytest.mark.skipif(not cpu_prepacking_works(), reason="this PyTorch build has no oneDNN linear prepacking")
def test_bf16_on_cpu_prepacks_the_block_linears_and_fuses_the_mlps_gelu():
    """bf16 on a CPU: the block's linear layers run oneDNN-reordered weights (the same result as `nn.Linear`), the
    MLP's GELU inside fc1; the copy still copies, saves, moves and trains like the model it came from."""
    import copy
    import io

    torch.manual_seed(0)
    model = MeritEcgModel(tiny_ecg_config()).eval()
    bf16 = prepare_for_inference(model, "bf16", "cpu")
    block = bf16.layers[0]
    assert all(type(layer) is PrepackedLinear for layer in (block.attention.qkv, block.attention.proj, block.mlp.fc2))
    assert block.mlp.fc1.activation == "gelu" and type(block.mlp.act) is torch.nn.Identity
    assert (
        type(bf16.embeddings.patch_projection) is torch.nn.Linear and type(model.layers[0].mlp.fc1) is torch.nn.Linear
    )
    hidden = torch.randn(2, 7, model.config.hidden_size, dtype=torch.bfloat16)
    with torch.inference_mode():  # each layer alone: what nn.Linear computes (with GELU: to bf16 rounding)
        for layer in (block.attention.qkv, block.attention.proj):
            torch.testing.assert_close(layer(hidden), F.linear(hidden, layer.weight, layer.bias), rtol=0, atol=0)
        fused = block.mlp.fc1(hidden).float()
        unfused = F.gelu(F.linear(hidden, block.mlp.fc1.weight, block.mlp.fc1.bias).float())
        torch.testing.assert_close(fused, unfused, rtol=0.02, atol=0.02)
    ecg = torch.randn(3, 12, model.config.num_samples)
    with torch.inference_mode():
        reference, low = model(ecg).pooler_output, bf16(ecg).pooler_output.float()
    assert F.cosine_similarity(low, reference).min() > 0.999
    copied = copy.deepcopy(bf16)  # oneDNN's reordered weights cannot be copied: made again on first use
    buffer = io.BytesIO()
    torch.save(bf16.state_dict(), buffer)
    assert set(bf16.state_dict()) == set(model.state_dict())
    with torch.inference_mode():
        assert torch.equal(copied(ecg).pooler_output, bf16(ecg).pooler_output)
    with torch.no_grad():  # new weights: reordered again, not the stale copy
        block.attention.proj.weight.mul_(2)
        doubled = block.attention.proj(hidden)
        torch.testing.assert_close(doubled, F.linear(hidden, block.attention.proj.weight, block.attention.proj.bias))
    trained = copy.deepcopy(bf16).float().train()  # fp32 and autograd: plain nn.Linear (+ GELU), gradients flow
    loss = trained(ecg).pooler_output.pow(2).sum()
    loss.backward()
    assert trained.layers[0].mlp.fc1.weight.grad is not None and trained.layers[0].mlp.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_the_model_keeps_its_training_mode_whatever_the_cpu_chooses(monkeypatch, precision):
    """A training loop that scores zero-shot between steps: whether fp32 runs the model itself or a prepacked copy
    depends on the CPU (`cpu_prepacking_pays`), and the model was switched to eval mode (dropout off for the rest of
    training) only where it ran itself. Now it never is, and what runs is in eval mode either way."""
    for prepack in ("on", "off"):
        monkeypatch.setenv(CPU_PREPACK_ENV, prepack)
        model = MeritEcgModel(tiny_ecg_config()).train()
        runner = prepare_for_inference(model, precision, "cpu")
        assert model.training and not runner.training, (precision, prepack)
        assert all(not module.training for module in runner.modules())


def test_an_int8_model_runs_as_int8_or_not_at_all():
    """`prepare_for_inference(int8_copy, "fp32")` returned the int8 copy as 'fp32' (and embed_dataset keyed its
    cache by that name); bf16 or 'auto' failed mid-forward with a dtype error. Only int8 is accepted now."""
    torch.manual_seed(0)
    int8 = prepare_for_inference(MeritEcgModel(tiny_ecg_config()).eval(), "int8", "cpu")
    assert prepare_for_inference(int8, "int8", "cpu") is int8
    for precision in ("fp32", "bf16", "auto"):
        with pytest.raises(ValueError, match=r"MeritEcgModel is already quantised to int8 .* pass the model it was"):
            prepare_for_inference(int8, precision, "cpu")


class Float8Tensor(torch.Tensor):
    """Stands in for torchao 0.18's float8 weight (`torchao.quantization.Float8Tensor`, a tensor subclass that
    `quantize_` puts on each `nn.Linear`; its quantisation needs a GPU of compute capability 8.9+)."""


Float8Tensor.__module__ = "torchao.quantization"


@pytest.mark.parametrize("weights", ["stand-in", "torchao"])
def test_an_fp8_model_runs_as_fp8_or_not_at_all(monkeypatch, weights):
    """torchao keeps `nn.Linear` and swaps its weight, so an fp8 copy was not seen as quantised: asked for "bf16" (or
    "auto" on a GPU) it came back unchanged, still fp8, under the name bf16."""
    torch.manual_seed(0)
    model = MeritEcgModel(tiny_ecg_config()).to(torch.bfloat16).eval()
    linear = next(child for child in model.modules() if isinstance(child, torch.nn.Linear))
    if weights == "torchao":
        pytest.importorskip("torchao")
        from torchao.quantization import PerRow
        from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor as TorchaoFloat8

        weight = TorchaoFloat8.from_hp(linear.weight.detach(), granularity=PerRow())
    else:
        weight = linear.weight.detach().as_subclass(Float8Tensor)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert prepare_for_inference(model, "fp8", "cuda") is model
    for precision, device in (("bf16", "cpu"), ("fp32", "cpu"), ("auto", "cuda"), ("bf16", "cuda")):
        with pytest.raises(ValueError, match=r"MeritEcgModel is already quantised to fp8 .* pass the model it was"):
            prepare_for_inference(model, precision, device)


def test_bf16_on_a_gpu_without_bf16_is_an_error_and_every_choice_is_logged(caplog):
    with pytest.raises(
        ValueError, match=r"precision 'bf16' needs a GPU with bf16 .* cuda has compute capability 7\.5\. Use 'fp16'"
    ):
        resolve_precision("bf16", "cuda", cuda_capability=(7, 5))
    assert resolve_precision("fp16", "cuda", cuda_capability=(7, 5)) == "fp16"
    with caplog.at_level(logging.DEBUG, logger="merit_hf.models.merit.inference_precision"):
        assert resolve_precision("bf16", "cpu", capability=HASWELL) == "bf16"
        assert resolve_precision("bf16", "cpu", capability=ZEN4) == "bf16"
        assert resolve_precision("int8", "cpu", capability=HASWELL) == "int8"
    lines = caplog.text.splitlines()
    assert f"precision 'bf16' on cpu (as asked): {HASWELL.model_name} has no native bf16, it runs emulated" in lines[0]
    assert lines[1].endswith("precision 'bf16' on cpu (as asked)") and lines[2].endswith(
        "precision 'int8' on cpu (as asked)"
    )


def test_int8_quantises_the_block_linears_only_and_stays_close_to_fp32():
    torch.manual_seed(0)
    model = MeritEcgModel(tiny_ecg_config()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # PyTorch's deprecation notice is not passed on to users
        int8 = prepare_for_inference(model, "int8", "cpu")
    block = int8.layers[0]
    for layer in (block.attention.qkv, block.attention.proj, block.mlp.fc1, block.mlp.fc2):
        assert layer._get_name() == "DynamicQuantizedLinear" and layer.weight().dtype == torch.qint8
    assert type(int8.embeddings.patch_projection) is torch.nn.Linear  # the raw signal's projection stays fp32
    assert type(model.layers[0].mlp.fc1) is torch.nn.Linear
    ecg = torch.randn(3, 12, model.config.num_samples)
    with torch.inference_mode():
        reference, low = model(ecg).pooler_output, int8(ecg).pooler_output
    assert F.cosine_similarity(low, reference).min() > 0.99 and not torch.equal(low, reference)


def test_blocks_of_a_folders_own_modeling_file_are_converted_as_merit_hfs(tmp_path, monkeypatch, caplog):
    """A model loaded with `trust_remote_code=True` has the saved folder's classes (same names, another module); the
    blocks were recognised with `isinstance` against merit_hf's, so int8 quantised nothing, bf16 prepacked nothing, and
    both were logged as converted. They convert as merit_hf's classes do now, to the same outputs, and the log line
    counts what was converted."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    monkeypatch.setenv(CPU_PREPACK_ENV, "on")
    monkeypatch.setenv("MERIT_CPU_ATTENTION", "sdpa")
    if inference_precision.cpu_int8_engines():
        monkeypatch.setenv(inference_precision.CPU_INT8_ENGINE_ENV, inference_precision.cpu_int8_engines()[0])
    torch.manual_seed(0)
    model = MeritEcgModel(tiny_ecg_config()).eval()
    model.save_pretrained(tmp_path)
    remote_class = get_class_from_dynamic_module("modeling_merit.MeritEcgModel", str(tmp_path))
    remote = remote_class.from_pretrained(tmp_path).eval()
    assert remote_class is not MeritEcgModel and remote_class.__module__.startswith("transformers_modules")
    num_linears = 4 * model.config.num_hidden_layers
    ecg = torch.randn(2, 12, model.config.num_samples)
    with caplog.at_level(logging.DEBUG, logger="merit_hf.models.merit.inference_precision"):
        int8 = prepare_for_inference(remote, "int8", "cpu")
        quantised = [layer for layer in int8.modules() if layer._get_name() == "DynamicQuantizedLinear"]
        assert len(quantised) == num_linears
        assert (
            f"converted for int8 inference on cpu: {num_linears} linear layers of 2 Transformer blocks" in caplog.text
        )
        with torch.inference_mode():
            expected = prepare_for_inference(model, "int8", "cpu")(ecg).pooler_output
            torch.testing.assert_close(int8(ecg).pooler_output, expected, rtol=0, atol=0)
        if cpu_prepacking_works():
            bf16 = prepare_for_inference(remote, "bf16", "cpu")
            assert sum(isinstance(layer, PrepackedLinear) for layer in bf16.modules()) == num_linears
            assert type(bf16.layers[0].mlp.act) is torch.nn.Identity  # the GELU fused into fc1
            assert f"{num_linears} linear layers of 2 Transformer blocks prepacked for oneDNN (2 with" in caplog.text
            with torch.inference_mode():
                expected = prepare_for_inference(model, "bf16", "cpu")(ecg).pooler_output
                torch.testing.assert_close(bf16(ecg).pooler_output, expected, rtol=0, atol=0)
    assert inference_precision.is_merit_module(remote.layers[0], "MeritEcgLayer")
    assert not inference_precision.is_merit_module(torch.nn.Linear(2, 2), "MeritEcgLayer")


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_int8_or_fp8_of_a_module_without_transformer_blocks_is_an_error(monkeypatch, precision):
    """A module with no block whose linear layers int8 or fp8 quantise (other layers; or blocks not recognised, as a
    folder's own classes were) ran unquantised, logged as converted. It is an error now, naming the module."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    device = "cpu" if precision == "int8" else "cuda"
    head = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.GELU(), torch.nn.Linear(16, 16)).eval()
    with pytest.raises(ValueError, match=rf"precision '{precision}' quantises .* Sequential .* has no Transformer"):
        prepare_for_inference(head, precision, device)
    if precision == "int8":
        # MERIT's projection head runs fp32 beside an int8 encoder (bf16 beside an fp8 one): what the zero-shot
        # pipeline of a folder saved by an earlier merit_hf asks for (remote code), with the encoder's precision
        from merit_hf.models.merit.modeling_merit import MeritProjectionHead

        projection = MeritProjectionHead(32, 16, "gelu").eval()
        assert prepare_for_inference(projection, "int8", "cpu") is projection  # fp32 on the CPU already
    else:  # blocks, but none of their linear layers of sizes torch._scaled_mm takes
        with pytest.raises(ValueError, match="has no linear layer fp8 can take"):
            inference_precision._check_something_to_quantise(MeritEcgModel(tiny_ecg_config(hidden_size=24)), "fp8")


ONEDNN_INT8 = pytest.mark.skipif(
    "onednn" not in torch.backends.quantized.supported_engines, reason="this PyTorch build has no oneDNN int8 engine"
)


@ONEDNN_INT8
@pytest.mark.parametrize("faster", ["x86", "onednn"])
def test_the_int8_engine_is_timed_once_per_shape_and_the_faster_packs_the_model(monkeypatch, caplog, faster):
    """Without `MERIT_CPU_INT8_ENGINE`, int8 quantises one block under each engine and times it (the timer is injected
    here, so CI's CPU does not decide the outcome), packs the model under the faster, logs it, times once per block
    shape, and leaves the caller's global engine as it was."""
    monkeypatch.delenv(inference_precision.CPU_INT8_ENGINE_ENV, raising=False)
    monkeypatch.setattr(inference_precision, "_cpu_int8_engine_choice", {})
    calls = []

    def timer(block, num_tokens):
        calls.append(num_tokens)
        return {engine: 1.0 if engine == faster else 2.0 for engine in inference_precision.cpu_int8_engines()}

    monkeypatch.setattr(inference_precision, "time_cpu_int8_engines", timer)
    global_engine = torch.backends.quantized.engine
    torch.manual_seed(0)
    model = MeritEcgModel(tiny_ecg_config()).eval()
    with caplog.at_level(logging.DEBUG, logger="merit_hf.models.merit.inference_precision"):
        int8 = prepare_for_inference(model, "int8", "cpu")
        again = prepare_for_inference(MeritEcgModel(tiny_ecg_config()).eval(), "int8", "cpu")
    assert calls == [model.config.num_leads * model.config.tokens_per_lead]  # once, with the model's token count
    assert int8.merit_int8_engine == again.merit_int8_engine == faster
    assert torch.backends.quantized.engine == global_engine
    assert f"CPU int8 engine for blocks of {model.config.hidden_size} -> " in caplog.text
    assert f"threads: {faster} (timed:" in caplog.text


@ONEDNN_INT8
def test_an_int8_model_runs_with_the_engine_it_was_packed_under_and_both_engines_agree(monkeypatch):
    """Both engines quantise the same way (per-tensor activations, per-tensor int8 weights): their embeddings agree
    far more closely than either agrees with fp32, and a model packed under oneDNN computes the same whatever the
    global engine is when it runs."""
    torch.manual_seed(0)
    model = MeritEcgModel(tiny_ecg_config()).eval()
    ecg = torch.randn(3, 12, model.config.num_samples)
    outputs = {}
    for engine in ("x86", "onednn"):
        monkeypatch.setenv(inference_precision.CPU_INT8_ENGINE_ENV, engine)
        int8 = inference_precision._convert(model, "int8", torch.device("cpu"))
        assert int8.merit_int8_engine == engine
        with torch.inference_mode():
            outputs[engine] = int8(ecg).pooler_output
            if engine == "onednn":
                with inference_precision._quantized_engine("x86"):
                    assert torch.equal(int8(ecg).pooler_output, outputs[engine])
    with torch.inference_mode():
        reference = model(ecg).pooler_output
    across = F.cosine_similarity(outputs["x86"], outputs["onednn"]).min()
    to_fp32 = min(F.cosine_similarity(output, reference).min() for output in outputs.values())
    assert across > 0.9999 and to_fp32 > 0.99
    # and they are two packings, not one (fbgemm quantises activations with reduce_range, 7 bits): the engine is used
    assert not torch.equal(outputs["x86"], outputs["onednn"])


def test_with_one_int8_engine_to_choose_from_pytorchs_own_engine_packs_the_model(monkeypatch):
    """On a build that offers fewer than two of the engines timed here (ARM builds: qnnpack, perhaps oneDNN), nothing
    is timed and the model is packed under PyTorch's own engine, as before the timing existed."""
    monkeypatch.delenv(inference_precision.CPU_INT8_ENGINE_ENV, raising=False)
    monkeypatch.setattr(inference_precision, "cpu_int8_engines", lambda: ("onednn",))
    monkeypatch.setattr(inference_precision, "time_cpu_int8_engines", lambda *args: pytest.fail("nothing to time"))
    model = MeritEcgModel(tiny_ecg_config()).eval()
    assert inference_precision.cpu_int8_engine(model) == torch.backends.quantized.engine


def test_a_fixed_int8_engine_is_checked(monkeypatch):
    monkeypatch.setenv(inference_precision.CPU_INT8_ENGINE_ENV, "qnnpack")
    with pytest.raises(ValueError, match=r"MERIT_CPU_INT8_ENGINE: must be one of \['x86', 'onednn'\], got 'qnnpack'"):
        prepare_for_inference(MeritEcgModel(tiny_ecg_config()), "int8", "cpu")
    monkeypatch.setattr(inference_precision, "cpu_int8_engines", lambda: ("x86",))
    monkeypatch.setenv(inference_precision.CPU_INT8_ENGINE_ENV, "onednn")
    with pytest.raises(ValueError, match="MERIT_CPU_INT8_ENGINE=onednn: this PyTorch build has no such quantised"):
        prepare_for_inference(MeritEcgModel(tiny_ecg_config()), "int8", "cpu")


@ONEDNN_INT8
def test_the_int8_engine_timer_times_each_engine_and_leaves_the_block_alone():
    torch.manual_seed(0)
    block = MeritEcgModel(tiny_ecg_config()).layers[0]
    seconds = inference_precision.time_cpu_int8_engines(block, num_tokens=8, batch_size=1, repeats=1)
    assert set(seconds) == {"x86", "onednn"} and all(0 < value < 60 for value in seconds.values())
    assert type(block.mlp.fc1) is torch.nn.Linear and block.mlp.fc1.weight.dtype == torch.float32


def test_kernel_choices_are_kept_per_machine_in_a_file_every_process_reads(monkeypatch, tmp_path, caplog):
    """A choice timed in one process is written to `MERIT_CPU_CHOICES` under this machine's key; a new process (here:
    the in-process choices cleared) reads it instead of timing. Another CPU or PyTorch, a stored value that is not a
    choice, or an unreadable file means timing again; "off" keeps choices in the process; an unwritable file only
    costs the timing."""
    import json

    from merit_hf.models.merit import modeling_merit

    path = tmp_path / "choices" / "cpu_choices.json"
    monkeypatch.setenv(inference_precision.CPU_INT8_ENGINE_ENV, "")
    monkeypatch.setenv(modeling_merit.CPU_CHOICES_ENV, str(path))
    timings = []

    def timer(block, num_tokens):
        timings.append(num_tokens)
        return {"nn.Linear": 2.0, "prepacked": 1.0}

    monkeypatch.setattr(inference_precision, "time_cpu_prepacking", timer)
    model = MeritEcgModel(tiny_ecg_config()).eval()

    def choose() -> bool:
        monkeypatch.setattr(inference_precision, "_cpu_prepacking_choice", {})  # a new process
        with caplog.at_level(logging.DEBUG, logger="merit_hf.models.merit.inference_precision"):
            return cpu_prepacking_pays(model, torch.float32)

    monkeypatch.delenv(CPU_PREPACK_ENV, raising=False)
    assert choose() and len(timings) == 1
    stored = json.loads(path.read_text())
    machine = modeling_merit.cpu_machine_key()
    assert list(stored) == [machine] and machine.endswith(f"torch {torch.__version__}")
    (entry,) = stored[machine].values()
    assert entry["choice"] == "prepacked" and set(entry["seconds"]) == {"nn.Linear", "prepacked"}
    caplog.clear()
    assert choose() and len(timings) == 1  # read, not timed
    assert f"prepacked (kept in {path}, timed {entry['timed_at']}" in caplog.text

    (key,) = stored[machine]
    stored[machine][key]["choice"] = "something else"  # not a choice: timed again, then rewritten
    path.write_text(json.dumps(stored))
    assert choose() and len(timings) == 2
    assert json.loads(path.read_text())[machine][key]["choice"] == "prepacked"
    path.write_text("{not json")
    assert choose() and len(timings) == 3 and json.loads(path.read_text())[machine][key]["choice"] == "prepacked"
    monkeypatch.setattr(modeling_merit, "cpu_machine_key", lambda: "another CPU | flags 0 | torch 0")
    assert (
        choose()
        and len(timings) == 4
        and set(json.loads(path.read_text())) == {machine, "another CPU | flags 0 | torch 0"}
    )

    monkeypatch.setenv(modeling_merit.CPU_CHOICES_ENV, "off")
    assert choose() and choose() and len(timings) == 6  # each "process" times
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setenv(modeling_merit.CPU_CHOICES_ENV, str(blocked / "cpu_choices.json"))  # its folder is a file
    assert choose() and len(timings) == 7 and blocked.read_text() == ""


def test_the_machine_key_names_the_cpu_torch_and_a_capped_instruction_set(monkeypatch):
    """A choice timed with AMX on must not be read with oneDNN capped to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`)."""
    from merit_hf.models.merit import modeling_merit

    for name in modeling_merit.CPU_DISPATCH_ENVS:
        monkeypatch.delenv(name, raising=False)
    modeling_merit.cpu_machine_key.cache_clear()
    plain = modeling_merit.cpu_machine_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    modeling_merit.cpu_machine_key.cache_clear()
    try:
        capped = modeling_merit.cpu_machine_key()
    finally:
        modeling_merit.cpu_machine_key.cache_clear()
    assert capped == plain + " | ONEDNN_MAX_CPU_ISA=AVX2" and f"| torch {torch.__version__}" in plain


def test_every_timed_cpu_choice_goes_through_the_machine_file(monkeypatch, tmp_path):
    """The attention kernel, fp32 prepacking and the int8 engine all keep their choice in the same file."""
    import json

    from merit_hf.models.merit import modeling_merit

    path = tmp_path / "cpu_choices.json"
    monkeypatch.setenv(modeling_merit.CPU_CHOICES_ENV, str(path))
    for name in ("CPU_PREPACK_ENV", "CPU_INT8_ENGINE_ENV"):
        monkeypatch.delenv(getattr(inference_precision, name), raising=False)
    monkeypatch.delenv(modeling_merit.CPU_ATTENTION_ENV, raising=False)
    for module, name in (
        (inference_precision, "_cpu_prepacking_choice"),
        (inference_precision, "_cpu_int8_engine_choice"),
        (modeling_merit, "_cpu_attention_choice"),
    ):
        monkeypatch.setattr(module, name, {})
    model = MeritEcgModel(tiny_ecg_config()).eval()
    ecg = torch.randn(2, 12, model.config.num_samples)
    with torch.inference_mode():
        prepare_for_inference(model, "bf16", "cpu")(ecg)  # the attention kernel (bf16 on a CPU)
    cpu_prepacking_pays(model, torch.float32)
    inference_precision.cpu_int8_engine(model)
    kinds = {key.split(" ")[0] for key in json.loads(path.read_text())[modeling_merit.cpu_machine_key()]}
    expected = {"attention", "linear-prepacking"} | (
        {"int8-engine"} if len(inference_precision.cpu_int8_engines()) > 1 else set()
    )
    assert kinds == expected


@pytest.mark.parametrize("precision, prepack", [("bf16", None), ("fp32", "on"), ("int8", None)])
def test_a_model_prepared_or_made_under_inference_mode_runs(monkeypatch, precision, prepack):
    """`prepare_for_inference` called inside `torch.inference_mode()` makes a copy of inference tensors, which keep no
    write counter: the prepacked layers' weight key and the cache signature used to fail with "Inference tensors do
    not track version counter" at the first forward."""
    if prepack:
        monkeypatch.setenv(CPU_PREPACK_ENV, prepack)
    torch.manual_seed(0)
    model = MeritEcgModel(tiny_ecg_config()).eval()
    ecg = torch.randn(2, 12, model.config.num_samples)
    with torch.inference_mode():
        expected = prepare_for_inference(model, precision, "cpu")(ecg).pooler_output
        made_inside = MeritEcgModel(tiny_ecg_config()).eval()
        made_inside.load_state_dict(model.state_dict())
        runner = prepare_for_inference(made_inside, precision, "cpu")
        assert prepare_for_inference(made_inside, precision, "cpu") is runner  # cached
        output = runner(ecg).pooler_output
    assert torch.allclose(output, expected, atol=1e-5)


def test_only_int8_makes_a_records_embedding_depend_on_its_batch():
    """Why 'auto' never picks int8: dynamic quantisation scales activations per batch, so the same record embeds
    differently beside louder records (by far more than fp32's rounding)."""
    torch.manual_seed(0)
    model = MeritEcgModel(tiny_ecg_config()).eval()
    ecg = torch.randn(4, 12, model.config.num_samples)
    ecg[1:] *= 5  # louder batch-mates: a larger activation range
    differences = {}
    for precision in ("fp32", "int8"):
        runner = prepare_for_inference(model, precision, "cpu")
        with torch.inference_mode():
            alone, batched = runner(ecg[:1]).pooler_output, runner(ecg).pooler_output[:1]
        differences[precision] = (alone - batched).abs().max().item()
        assert F.cosine_similarity(alone, batched).item() > 0.999
    assert differences["fp32"] < 1e-5 < differences["int8"]


def test_fp8_hands_torchao_the_block_linears_with_scaled_mm_shapes(monkeypatch):
    """What `precision="fp8"` asks torchao for (torchao itself needs an FP8 GPU, so it is stood in for here): float8
    dynamic quantisation with per-row scales, of the Transformer blocks' linears whose sizes `torch._scaled_mm`
    takes (multiples of 16); the patch projection (75 inputs) and the heads stay bf16."""
    import types

    calls = []
    fake = types.ModuleType("torchao.quantization")
    fake.PerRow = lambda: "per-row"
    fake.Float8DynamicActivationFloat8WeightConfig = lambda granularity: ("float8", granularity)
    fake.quantize_ = lambda module, config, filter_fn: calls.append(
        (config, [name for name, child in module.named_modules() if filter_fn(child, name)])
    )
    monkeypatch.setitem(sys.modules, "torchao.quantization", fake)
    model = MeritEcgModel(tiny_ecg_config(hidden_size=64, intermediate_size=128))
    assert _quantize_fp8(model) is model
    (config, chosen), expected = calls[0], []
    for index in range(model.config.num_hidden_layers):
        expected += [f"layers.{index}.{name}" for name in ("attention.qkv", "attention.proj", "mlp.fc1", "mlp.fc2")]
    assert config == ("float8", "per-row") and chosen == expected


@pytest.mark.parametrize("capability, auto", [((7, 5), torch.float32), ((8, 0), torch.bfloat16)], ids=["t4", "a100"])
def test_the_pipelines_fallback_without_merit_hf_resolves_bf16_as_merit_hf_does(monkeypatch, capability, auto):
    """A Hub folder's pipeline run without merit_hf casts to a dtype itself (`_fallback_precision`). Its "auto" was
    bf16 on every GPU, a T4 or V100 included, where merit_hf picks fp32; and bf16 asked for there ran."""
    from merit_hf.models.merit import pipeline_merit

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert pipeline_merit._fallback_precision("auto", "cuda") == auto
    assert pipeline_merit._fallback_precision("auto", "cpu") == torch.float32
    assert pipeline_merit._fallback_precision("fp16", "cuda") == torch.float16
    if auto == torch.float32:
        with pytest.raises(ValueError, match=r"precision 'bf16' needs a GPU with bf16 .* Use 'fp16' or 'fp32'"):
            pipeline_merit._fallback_precision("bf16", "cuda")
    else:
        assert pipeline_merit._fallback_precision("bf16", "cuda") == torch.bfloat16


@pytest.mark.parametrize("with_merit_hf", [True, False])
def test_zero_shot_scores_of_a_model_in_training_do_not_depend_on_dropout(tmp_path, monkeypatch, with_merit_hf):
    """A model scored between training steps: its text tower ran with dropout (class embeddings differed call to
    call) and, without merit_hf's resolver, so did its ECG tower. Now the scores are the eval-mode model's and the
    model goes on training."""
    from merit_hf import MeritFeatureExtractor, MeritModel, MeritProcessor, zero_shot_classify
    from merit_hf.models.merit import pipeline_merit
    from tests.conftest import tiny_merit_config, train_tiny_tokenizer

    if not with_merit_hf:  # what a Hub folder's pipeline does where merit_hf is not installed
        monkeypatch.setattr(pipeline_merit, "_precision_module", lambda: None)
    config = tiny_merit_config()
    for sub_config in (config.text_config, config.ecg_config):
        sub_config.hidden_dropout_prob = sub_config.attention_probs_dropout_prob = 0.3
    torch.manual_seed(0)
    model = MeritModel(config).train()
    feature_extractor = MeritFeatureExtractor.from_model_config(config.ecg_config)
    processor = MeritProcessor(feature_extractor, train_tiny_tokenizer(tmp_path / "tokenizer"))
    ecg_values = torch.randn(2, config.ecg_config.num_leads, config.ecg_config.num_samples)
    labels = ["sinus rhythm", "myocardial infarction"]

    def scores(merit):
        return zero_shot_classify(merit, processor, ecg_values=ecg_values, candidate_labels=labels, precision="fp32")

    first, second = scores(model)["scores"], scores(model)["scores"]
    assert model.training and all(module.training for module in model.modules())
    expected = scores(model.eval())["scores"]
    np.testing.assert_allclose(first, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(second, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "stored", ['{"MACHINE": "text"}', '{"MACHINE": ["a"]}', '{"MACHINE": {"kind (1,)": "a"}}', "[1, 2]", '"text"']
)
def test_a_choices_file_of_another_shape_is_timed_again_and_rewritten(monkeypatch, tmp_path, stored):
    """Valid JSON that is not {machine: {choice key: entry}} (a hand edit, another program's file) used to raise
    AttributeError / TypeError out of the first forward instead of costing the timing."""
    import json

    from merit_hf.models.merit import modeling_merit

    path = tmp_path / "cpu_choices.json"
    monkeypatch.setenv(modeling_merit.CPU_CHOICES_ENV, str(path))
    machine = modeling_merit.cpu_machine_key()
    path.write_text(stored.replace('"MACHINE"', json.dumps(machine)))
    timings = []

    def timer():
        timings.append(1)
        return {"a": 2.0, "b": 1.0}

    assert modeling_merit.cached_cpu_choice("kind", (1,), ("a", "b"), timer)[0] == "b"
    assert json.loads(path.read_text())[machine]["kind (1,)"]["choice"] == "b"
    assert modeling_merit.cached_cpu_choice("kind", (1,), ("a", "b"), timer)[0] == "b" and len(timings) == 1


def _choose_in_a_process(path, kind, barrier, timings):
    import os
    import time

    from merit_hf.models.merit import modeling_merit

    os.environ[modeling_merit.CPU_CHOICES_ENV] = path
    barrier.wait()

    def timer():
        with timings.get_lock():
            timings.value += 1
        time.sleep(0.3)  # long enough for every other process to reach the file meanwhile
        return {"a": 2.0, "b": 1.0}

    modeling_merit.cached_cpu_choice(kind, (1,), ("a", "b"), timer)


@pytest.mark.skipif(sys.platform == "win32", reason="forks processes")
@pytest.mark.parametrize("same_key", [True, False])
def test_processes_that_start_together_time_a_choice_once_and_lose_no_entry(tmp_path, same_key):
    """The processes of one `accelerate launch` reach the file at once: one times a choice while the others wait for
    it and read it (they used to time it all at once, on a CPU they were loading), and choices timed side by side
    are all kept (each process used to write back the file it had read, dropping the others' entries)."""
    import json
    import multiprocessing

    context = multiprocessing.get_context("fork")
    path = tmp_path / "cpu_choices.json"
    barrier, timings = context.Barrier(4), context.Value("i", 0)
    kinds = ["kind"] * 4 if same_key else [f"kind{index}" for index in range(4)]
    processes = [
        context.Process(target=_choose_in_a_process, args=(str(path), kind, barrier, timings)) for kind in kinds
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert all(process.exitcode == 0 for process in processes)
    (entries,) = json.loads(path.read_text()).values()
    assert sorted(entries) == sorted({f"{kind} (1,)" for kind in kinds})
    assert timings.value == len(set(kinds))
    assert {file.name for file in tmp_path.iterdir()} <= {path.name, f"{path.name}.lock"}  # no temporary left


def test_an_arm_cpus_part_and_features_tell_it_apart(tmp_path):
    """/proc/cpuinfo on aarch64 Linux has no "model name" and no "flags" (it has "CPU part" and "Features"): every ARM
    machine used to share one key, so a Graviton2's choices were read on a Graviton3 (a volume moved to a new
    instance, a shared HF_HOME)."""
    from merit_hf.models.merit.modeling_merit import read_cpuinfo

    def cpuinfo(part: str, features: str):
        path = tmp_path / f"cpuinfo_{part}"
        core = f"BogoMIPS\t: 243.75\nFeatures\t: {features}\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
        path.write_text(f"processor\t: 0\n{core}CPU variant\t: 0x1\nCPU part\t: {part}\nCPU revision\t: 1\n\n")
        return read_cpuinfo(path)

    graviton2, graviton3 = cpuinfo("0xd0c", "fp asimd atomics"), cpuinfo("0xd40", "fp asimd atomics sve bf16")
    assert graviton2[0] and graviton2[0] != graviton3[0]
    assert graviton2[1] == {"fp", "asimd", "atomics"} and "sve" in graviton3[1]


@ONEDNN_INT8
def test_the_copy_prepare_makes_of_an_int8_model_in_training_keeps_its_engine(monkeypatch):
    """An int8 model in training mode (a loop that scores between steps) gets a copy from `prepare_for_inference`;
    deep-copying repacks every int8 layer under the global engine, so a model packed under oneDNN silently ran
    fbgemm's kernels while still saying `merit_int8_engine == "onednn"`."""
    monkeypatch.setenv(inference_precision.CPU_INT8_ENGINE_ENV, "onednn")
    torch.manual_seed(0)
    model = MeritEcgModel(tiny_ecg_config()).eval()
    ecg = torch.randn(3, 12, model.config.num_samples)
    with inference_precision._quantized_engine("x86"), torch.no_grad():
        int8 = prepare_for_inference(model, "int8", "cpu")
        expected = int8(ecg).pooler_output
        copied = prepare_for_inference(int8.train(), "int8", "cpu")
        assert copied is not int8 and copied.merit_int8_engine == "onednn"
        assert torch.equal(copied(ecg).pooler_output, expected)


def test_threads_quantising_under_different_engines_do_not_mix_them(monkeypatch):
    """The quantised engine is one global setting: a thread packing under oneDNN while another packed under x86 got
    x86's packing, labelled onednn, and the caller's engine could be left changed."""
    import threading

    import torch.ao.quantization

    seen = {}
    entered, second_inside, first_done = threading.Event(), threading.Event(), threading.Event()

    def quantize_dynamic(module, names, dtype, inplace):
        if module.engine == "onednn":  # the first thread packs while the second one is inside too, unless it waits
            entered.set()
            second_inside.wait(0.5)
            seen[module.engine] = torch.backends.quantized.engine
            first_done.set()
        else:
            second_inside.set()
            first_done.wait(0.5)
            seen[module.engine] = torch.backends.quantized.engine
        return module

    monkeypatch.setattr(torch.ao.quantization, "quantize_dynamic", quantize_dynamic)
    modules = {engine: torch.nn.Module() for engine in ("onednn", "x86")}
    for engine, module in modules.items():
        module.engine = engine
    global_engine = torch.backends.quantized.engine
    first = threading.Thread(target=inference_precision._quantize_int8, args=(modules["onednn"], "onednn"))
    first.start()
    entered.wait(10)
    inference_precision._quantize_int8(modules["x86"], "x86")
    first.join()
    assert seen == {"onednn": "onednn", "x86": "x86"}
    assert torch.backends.quantized.engine == global_engine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_on_a_gpu_quantises_to_int8_on_the_cpu(monkeypatch):
    """The engine is timed on a CPU copy of one block: timing the GPU model's own block failed (CUDA weights, CPU
    inputs), where before the timing its CPU copy was quantised."""
    monkeypatch.delenv(inference_precision.CPU_INT8_ENGINE_ENV, raising=False)
    monkeypatch.setattr(inference_precision, "_cpu_int8_engine_choice", {})
    model = MeritEcgModel(tiny_ecg_config()).eval().cuda().to(torch.bfloat16)
    int8 = prepare_for_inference(model, "int8", "cpu")
    with torch.no_grad():
        assert int8(torch.randn(2, 12, model.config.num_samples)).pooler_output.shape == (2, model.config.hidden_size)


GLIBC = sys.platform.startswith("linux") and __import__("platform").libc_ver()[0] == "glibc"
FAULTS_SCRIPT = """
import resource, sys
import torch
from merit_hf import MeritEcgModel, MeritEcgConfig
from merit_hf.models.merit.inference_precision import prepare_for_inference

def faults():  # five 48 MiB tensors made and freed: above glibc's largest mmap threshold (32 MiB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(48 * 2**20 // 4)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

before = faults()
model = MeritEcgModel(MeritEcgConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
prepare_for_inference(model, "fp32", "cpu")
faults()  # the heap grows once
print(before, faults())
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
@pytest.mark.skipif(
    inference_precision.allocator_set_by_user() is not None, reason="this environment configures allocation itself"
)
@pytest.mark.parametrize("allocator", ["", "keep", "system"])
def test_preparing_for_the_cpu_keeps_freed_memory_for_reuse_unless_told_not_to(allocator):
    """Under glibc a 48 MiB tensor is fresh pages from the operating system each time (12,288 page faults); once a
    model is prepared for the CPU the process reuses the freed memory instead (`keep_freed_cpu_memory`), unless
    `MERIT_CPU_ALLOCATOR=system`. Run in a subprocess: the setting is the process's."""
    import subprocess

    from tests.conftest import REPO_ROOT

    env = {**__import__("os").environ, "MERIT_CPU_ALLOCATOR": allocator, "PYTHONPATH": str(REPO_ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    before, after = map(int, result.stdout.split())
    assert before > 5 * 12_288 * 0.9  # every tensor faulted in
    if allocator == "system":
        assert after > 5 * 12_288 * 0.9
    else:
        assert after < 12_288 // 4


def test_the_allocator_setting_is_checked_and_asked_for_when_preparing_for_the_cpu(monkeypatch):
    keep = inference_precision.keep_freed_cpu_memory
    calls = []
    monkeypatch.setattr(inference_precision, "keep_freed_cpu_memory", lambda: calls.append(1) or False)
    model = MeritEcgModel(tiny_ecg_config())
    prepare_for_inference(model, "fp32", "cpu")
    assert calls == [1]
    monkeypatch.setenv("MERIT_CPU_ALLOCATOR", "tcmalloc")
    with pytest.raises(ValueError, match="MERIT_CPU_ALLOCATOR='tcmalloc': one of"):
        keep()
    monkeypatch.setenv("MERIT_CPU_ALLOCATOR", "system")
    assert keep() is False


def test_an_allocation_the_user_configured_is_left_alone(monkeypatch):
    """glibc's own malloc variables, a `glibc.malloc` tunable or a preloaded allocator mean the user chose how memory
    is allocated: `keep_freed_cpu_memory` then changes nothing (and says so)."""
    configured = inference_precision.allocator_set_by_user
    assert configured({}) is None
    assert configured({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}) is None
    assert configured({"MALLOC_TRIM_THRESHOLD_": "0"}) == "MALLOC_TRIM_THRESHOLD_ is set"
    assert configured({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}) == "GLIBC_TUNABLES sets glibc.malloc"
    assert configured({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}) == (
        "jemalloc is preloaded (LD_PRELOAD)"
    )
    monkeypatch.setenv("MERIT_CPU_ALLOCATOR", "keep")
    monkeypatch.setenv("LD_PRELOAD", "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(inference_precision.ctypes, "CDLL", lambda *a: pytest.fail("mallopt must not be called"))
    inference_precision._keep_freed_memory_once.cache_clear()
    try:
        assert inference_precision.keep_freed_cpu_memory() is False
    finally:
        inference_precision._keep_freed_memory_once.cache_clear()


def test_the_default_inference_device_is_the_gpu_when_there_is_one(monkeypatch):
    """`inference_device`: a given device as it is; else CUDA where available (unless `use_cpu`), else the CPU."""
    from merit_hf.models.merit.inference_precision import inference_device

    assert inference_device("cpu") == torch.device("cpu") and inference_device(torch.device("meta")).type == "meta"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference_device() == torch.device("cuda") and inference_device(use_cpu=True) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_device() == torch.device("cpu")
