"""CPU inference in every precision, against the references, interleaved in one process.

For each preset (default `base-p75` and `small-p125`), inference batch 8, 2 threads, random weights (speed does not
depend on them), one round times every variant once, and a ratio is the median over rounds of the paired ratio
`reference time / variant time`, so drift of a shared machine cancels:

- `merit/<precision>`: `MeritEcgModel` prepared by `merit_hf.models.merit.inference_precision.prepare_for_inference` (fp32, bf16
  weights, int8 dynamic quantisation), as the embedding command line runs it. In fp32 the model times one block with
  and without oneDNN-prepacked linear layers and keeps the faster (the JSON says which). In bf16 both attention kernels are
  timed (`merit/bf16-sdpa`, `merit/bf16-matmul`: the fused SDPA kernel and two bf16 matmuls, fixed through
  `MERIT_CPU_ATTENTION`) and the JSON says which one the model picked by itself on this CPU. In int8 the model
  times PyTorch's two int8 engines on one block and packs itself under the faster (`merit/int8`);
  `merit/int8-x86` and `merit/int8-onednn` are the model packed under each (fbgemm's kernels, oneDNN's).
- `einsum_ref/<precision>`: the same weights with attention written the way ST-MEM writes it (`einsum` scores,
  softmax, `einsum`; `encoder_throughput.einsum_attention`) and plain `nn.Linear` layers, in fp32, bf16 weights
  (cast with `.to()`, without the oneDNN-prepacked linear layers `prepare_for_inference` gives MERIT in bf16 on a
  CPU), bf16 autocast (how ST-MEM's own code runs bf16) and with the same int8 linear layers (packed under the
  quantised engine the model timed and picked, fbgemm's `x86` or oneDNN's `onednn`: the JSON says which). The bf16
  ratio is taken against the faster of its two bf16 forms.
- `hubert_ecg_base/<precision>`: transformers' `HubertModel` with HuBERT-ECG base's configuration
  (`encoder_throughput.build`), fp32 and bf16 weights.
- `matmul_floor/<precision>` (fp32, bf16): the encoder's matrix products alone, unfused (`MatmulFloor`): every
  block's four linear layers (through MERIT's own prepared layers, GELU left out) and attention's two batched
  products, on fixed inputs of the model's shapes, without layer norms, residual additions, GELU or softmax. No
  implementation that computes the same products with these kernels can be faster, so `reference time / floor time`
  bounds the ratio any implementation can reach against the reference on this CPU (the JSON's `ratios`).
- With `--compile`, `<name>/bf16-compiled` for MERIT and the einsum reference: a bf16-weights copy with plain
  `nn.Linear` layers (oneDNN's prepacked ones do not trace) under `torch.compile` (inductor) with its `freezing` on
  (`FrozenCompiled`): inductor then prepacks the weights itself and fuses the layer norms, residual additions and
  GELU into the products around them. Compile seconds are in the JSON; the model is not compiled anywhere else in
  merit_hf (benchmarks/README.md says why).

Also: where a `merit/bf16-sdpa` forward spends its time (`torch.profiler`, by operator group, after the timed rounds)
and what one fp32 exponential of every block's attention scores costs alone; the cosine of each precision's pooled output to fp32 on the same input, the CPU's model name and flags, and
each variant's minor page faults a forward (first touches of memory the C library took from the operating system).
`prepare_for_inference` makes the process keep the memory it frees (`keep_freed_cpu_memory`), and so every variant
of the run, the references included, runs without those faults; `MERIT_CPU_ALLOCATOR=system python
benchmarks/cpu_inference.py` times them with the C library as it is (`results/cpu_inference_amx_system_allocator.json`:
737,307 faults a forward for the fp32 reference at `base-p75`).

    python benchmarks/cpu_inference.py                       # -> benchmarks/results/cpu_inference.json
    python benchmarks/cpu_inference.py --presets tiny-p75 --rounds 2 --output /tmp/smoke.json   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_throughput import _register_einsum, build, set_attention  # noqa: E402
from feature_extraction import minor_faults  # noqa: E402

from merit_hf.models.merit import modeling_merit  # noqa: E402
from merit_hf.models.merit.inference_precision import (  # noqa: E402
    PrepackedLinear,
    _cpu_int8_engine_choice,
    _cpu_prepacking_choice,
    _quantize_int8,
    cpu_capability,
    cpu_int8_engines,
    prepare_for_inference,
)

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {
    "every precision vs the einsum reference in the same precision": 1.0,
    "bf16 vs the einsum reference (fp32)": 1.5,
    "int8 vs the einsum reference (fp32)": 2.0,
}


class MatmulFloor(torch.nn.Module):
    """The matrix products of `model`'s Transformer blocks alone: per block qkv, proj, fc1 (without its GELU) and fc2
    through the model's own layers (oneDNN-prepacked where `prepare_for_inference` prepacked them), and the two
    batched products of attention (scores `q k^T`, output `p v`), each on a fixed contiguous input of its real shape
    and dtype. Layer norms, residual additions, GELU, softmax and the copies between layouts are left out: its time
    is what any implementation spends in these kernels at least."""

    def __init__(self, model, batch: int, tokens: int):
        super().__init__()
        self.model = model
        layer = model.layers[0]
        hidden, heads = layer.attention.proj.in_features, layer.attention.num_heads
        dtype = layer.attention.qkv.weight.dtype
        generator = torch.Generator().manual_seed(0)

        def fixed(*shape):
            return torch.randn(*shape, generator=generator).to(dtype)

        self.hidden = fixed(batch, tokens, hidden)
        self.intermediate = fixed(batch, tokens, layer.mlp.fc1.out_features)
        self.query = fixed(batch, heads, tokens, hidden // heads)
        self.key_transposed = fixed(batch, heads, hidden // heads, tokens)
        self.probabilities = fixed(batch, heads, tokens, tokens)
        self.value = fixed(batch, heads, tokens, hidden // heads)

    @staticmethod
    def _linear(layer, inputs):
        if isinstance(layer, PrepackedLinear) and inputs.dtype == layer.weight.dtype:
            return torch.ops.mkldnn._linear_pointwise(inputs, layer._packed_weight(), layer.bias, "none", [], "")
        return F.linear(inputs, layer.weight, layer.bias)

    def forward(self, ecg_values=None):
        for layer in self.model.layers:
            self._linear(layer.attention.qkv, self.hidden)
            torch.matmul(self.query, self.key_transposed)
            torch.matmul(self.probabilities, self.value)
            self._linear(layer.attention.proj, self.hidden)
            self._linear(layer.mlp.fc1, self.hidden)
            output = self._linear(layer.mlp.fc2, self.intermediate)
        return types.SimpleNamespace(pooler_output=None, last_hidden_state=output)


class FrozenCompiled(torch.nn.Module):
    """`torch.compile(module)` with inductor's `freezing` on for every call, so a recompilation (another input
    shape) freezes too: weights become constants, prepacked for oneDNN by inductor, and the layer norms, residual
    additions and GELU fuse into the kernels around the products. Inference only (`torch.inference_mode`)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.compiled = torch.compile(module)

    def forward(self, **inputs):
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(**inputs)


def _token_count(model, inputs) -> int:
    """How many tokens `model`'s Transformer blocks see for `inputs` (read from the first block's input)."""
    seen = []
    handle = model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        handle.remove()
    return seen[0]


OPERATOR_GROUPS = {  # profiler names -> where a bf16 forward's time goes
    "linear layers (GELU fused into fc1)": ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear"),
    "attention kernel": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm", "aten::_softmax"),
    "residual additions": ("aten::add",),
    "layer norms": ("aten::native_layer_norm",),
}


def _time_breakdown(variant, tokens: int, forwards: int = 3) -> dict:
    """Milliseconds a forward of `variant` spends in each operator group (`torch.profiler`, self CPU time, mean of
    `forwards`), and what one exponential over every block's attention scores costs in fp32 alone (the softmax's
    least work, whatever kernel does it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(forwards):
            _run(variant)
    groups = dict.fromkeys([*OPERATOR_GROUPS, "everything else"], 0.0)
    for event in profiler.key_averages():
        group = next((g for g, names in OPERATOR_GROUPS.items() if event.key in names), "everything else")
        groups[group] += event.self_cpu_time_total / 1e3 / forwards
    model, inputs = variant[0], variant[1]
    heads = model.layers[0].attention.num_heads
    scores = torch.randn(inputs["ecg_values"].shape[0], heads, tokens, tokens)
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        torch.exp(scores)
        seconds.append(time.perf_counter() - start)
    return {
        "ms_per_forward": {group: round(value, 1) for group, value in groups.items()},
        "ms_per_forward_total": round(sum(groups.values()), 1),
        "fp32_exp_of_all_attention_scores_ms": round(statistics.median(seconds) * 1e3 * len(model.layers), 1),
    }


def _variants(preset: str, batch: int, with_hubert: bool, compile_bf16: bool = False) -> tuple[dict, dict]:
    """`{name: (model, inputs, attention, autocast, forced_cpu_attention)}` and the fp32 model's pooled output."""
    _register_einsum()
    torch.manual_seed(0)
    fp32, make_input = build("merit_encoder", preset, "sdpa")
    fp32 = fp32.eval()  # nn.Linear as ST-MEM's code has it
    inputs = make_input(batch)
    models = {precision: prepare_for_inference(fp32, precision, "cpu") for precision in ("fp32", "bf16", "int8")}
    plain_bf16 = copy.deepcopy(fp32).to(torch.bfloat16).eval()
    variants = {
        "einsum_ref/fp32": (fp32, inputs, "stmem_einsum", False, None),
        "merit/fp32": (models["fp32"], inputs, "sdpa", False, None),
        "einsum_ref/bf16-autocast": (fp32, inputs, "stmem_einsum", True, None),
        "einsum_ref/bf16": (plain_bf16, inputs, "stmem_einsum", False, None),
        "merit/bf16-sdpa": (models["bf16"], inputs, "sdpa", False, "sdpa"),
        "merit/bf16-matmul": (models["bf16"], inputs, "sdpa", False, "matmul"),
        "einsum_ref/int8": (models["int8"], inputs, "stmem_einsum", False, None),
        "merit/int8": (models["int8"], inputs, "sdpa", False, None),
    }
    if compile_bf16:
        for name, attention in (("merit", "sdpa"), ("einsum_ref", "stmem_einsum")):
            plain = copy.deepcopy(fp32).to(torch.bfloat16).eval()
            set_attention(plain, attention)  # fixed before tracing: the trace keeps the kernel it saw
            variants[f"{name}/bf16-compiled"] = (FrozenCompiled(plain), inputs, attention, False, None)
    tokens = _token_count(fp32, inputs)
    for precision in ("fp32", "bf16"):
        floor = MatmulFloor(models[precision], batch, tokens)
        variants[f"matmul_floor/{precision}"] = (floor, inputs, "sdpa", False, None)
    for engine in cpu_int8_engines():  # each engine side by side; merit/int8 is the one the model picked
        other = _quantize_int8(copy.deepcopy(fp32), engine).eval()
        variants[f"merit/int8-{engine}"] = (other, inputs, "sdpa", False, None)
    if with_hubert:
        hubert, make_hubert_input = build("hubert_ecg_base", "-", "sdpa")
        hubert_inputs = make_hubert_input(batch)
        variants["hubert_ecg_base/fp32"] = (hubert.eval(), hubert_inputs, "sdpa", False, None)
        variants["hubert_ecg_base/bf16"] = (
            copy.deepcopy(hubert).to(torch.bfloat16).eval(),
            {k: v.to(torch.bfloat16) for k, v in hubert_inputs.items()},
            "sdpa",
            False,
            None,
        )
    return variants, models


def _run(variant) -> torch.Tensor:
    model, inputs, attention, autocast, forced = variant
    if forced:
        os.environ[modeling_merit.CPU_ATTENTION_ENV] = forced
    else:
        os.environ.pop(modeling_merit.CPU_ATTENTION_ENV, None)
    set_attention(model, attention)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = model(**inputs)
    return output.pooler_output if getattr(output, "pooler_output", None) is not None else output.last_hidden_state


def _paired(times: dict, reference: str, name: str) -> dict:
    pairs = [ref / mine for ref, mine in zip(times[reference], times[name])]
    return {"median": round(statistics.median(pairs), 3), "range": [round(min(pairs), 3), round(max(pairs), 3)]}


def measure_preset(preset: str, batch: int, rounds: int, with_hubert: bool = True, compile_bf16: bool = False) -> dict:
    variants, models = _variants(preset, batch, with_hubert, compile_bf16)
    saved_choice = dict(modeling_merit._cpu_attention_choice)
    modeling_merit._cpu_attention_choice.clear()
    _run((models["bf16"], variants["merit/fp32"][1], "sdpa", False, None))  # lets the model time and pick its kernel
    picked = {str(key): value for key, value in modeling_merit._cpu_attention_choice.items()}
    modeling_merit._cpu_attention_choice.update(saved_choice)
    reference_output = _run((variants["einsum_ref/fp32"][0], variants["merit/fp32"][1], "sdpa", False, None)).float()
    cosine = {}  # to the plain fp32 model (nn.Linear, SDPA)
    compile_seconds = {}
    for name in [name for name in variants if name.endswith("-compiled")]:  # the first call compiles
        start = time.perf_counter()
        _run(variants[name])
        compile_seconds[name] = round(time.perf_counter() - start, 1)
    for name in ("merit/fp32", "merit/bf16-sdpa", "merit/bf16-matmul", "merit/int8", *compile_seconds):
        output = _run(variants[name]).float()
        cosine[name] = round(F.cosine_similarity(output, reference_output).min().item(), 6)
    for variant in variants.values():  # warm-up
        _run(variant)
    times: dict[str, list[float]] = {name: [] for name in variants}
    faults: dict[str, list[int]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            faulted = minor_faults()
            start = time.perf_counter()
            _run(variant)
            times[name].append(time.perf_counter() - start)
            faults[name].append(minor_faults() - faulted)
    tokens = _token_count(models["bf16"], variants["merit/fp32"][1])
    breakdown = _time_breakdown(variants["merit/bf16-sdpa"], tokens)
    os.environ.pop(modeling_merit.CPU_ATTENTION_ENV, None)
    rates = {name: round(batch / statistics.median(seconds), 3) for name, seconds in times.items()}
    bf16_reference = max(("einsum_ref/bf16", "einsum_ref/bf16-autocast"), key=lambda name: rates[name])
    bf16_kernel = next(iter(picked.values()), None)
    merit_bf16 = f"merit/bf16-{bf16_kernel}" if bf16_kernel else "merit/bf16-sdpa"
    ratios = {
        "fp32 vs einsum_ref/fp32": _paired(times, "einsum_ref/fp32", "merit/fp32"),
        f"bf16 (as picked: {merit_bf16}) vs {bf16_reference}": _paired(times, bf16_reference, merit_bf16),
        f"bf16 (as picked: {merit_bf16}) vs einsum_ref/fp32": _paired(times, "einsum_ref/fp32", merit_bf16),
        f"bf16 (as picked: {merit_bf16}) vs einsum_ref/bf16-autocast": _paired(
            times, "einsum_ref/bf16-autocast", merit_bf16
        ),
        "int8 vs einsum_ref/int8": _paired(times, "einsum_ref/int8", "merit/int8"),
        "int8 vs einsum_ref/fp32": _paired(times, "einsum_ref/fp32", "merit/int8"),
        "bf16-sdpa vs bf16-matmul": _paired(times, "merit/bf16-matmul", "merit/bf16-sdpa"),
        # the most any implementation using these matrix-product kernels could reach against the reference
        "matmul_floor/fp32 vs einsum_ref/fp32": _paired(times, "einsum_ref/fp32", "matmul_floor/fp32"),
        f"matmul_floor/bf16 vs {bf16_reference}": _paired(times, bf16_reference, "matmul_floor/bf16"),
        "matmul_floor/bf16 vs einsum_ref/bf16-autocast": _paired(
            times, "einsum_ref/bf16-autocast", "matmul_floor/bf16"
        ),
        # how far MERIT is above the floor: floor time / MERIT time
        "merit/fp32 vs matmul_floor/fp32": _paired(times, "matmul_floor/fp32", "merit/fp32"),
        f"{merit_bf16} vs matmul_floor/bf16": _paired(times, "matmul_floor/bf16", merit_bf16),
    }
    if compile_bf16:
        for reference in ("einsum_ref/bf16", "einsum_ref/bf16-autocast", "einsum_ref/bf16-compiled", merit_bf16):
            ratios[f"merit/bf16-compiled vs {reference}"] = _paired(times, reference, "merit/bf16-compiled")
        ratios["einsum_ref/bf16-compiled vs einsum_ref/bf16"] = _paired(
            times, "einsum_ref/bf16", "einsum_ref/bf16-compiled"
        )
    if {"merit/int8-x86", "merit/int8-onednn"} <= set(times):
        ratios["int8-onednn vs int8-x86"] = _paired(times, "merit/int8-x86", "merit/int8-onednn")
    if with_hubert:
        ratios["merit/fp32 vs hubert_ecg_base/fp32"] = _paired(times, "hubert_ecg_base/fp32", "merit/fp32")
        ratios[f"{merit_bf16} vs hubert_ecg_base/bf16"] = _paired(times, "hubert_ecg_base/bf16", merit_bf16)
        ratios["merit/int8 vs hubert_ecg_base/bf16"] = _paired(times, "hubert_ecg_base/bf16", "merit/int8")
    return {
        "preset": preset,
        "batch": batch,
        "rounds": rounds,
        "ecgs_per_second": rates,
        "seconds_per_round": {name: [round(value, 5) for value in seconds] for name, seconds in times.items()},
        "page_faults_per_forward_median": {name: statistics.median(counts) for name, counts in faults.items()},
        "ratios": ratios,
        "bf16_attention_picked_by_the_model": picked,
        "merit_bf16_sdpa_time_breakdown": breakdown,
        "min_cosine_to_fp32_pooled_output": cosine,
        **({"compile_seconds": compile_seconds} if compile_bf16 else {}),
        "merit_bf16_linear_layers_prepacked": sum(isinstance(m, PrepackedLinear) for m in models["bf16"].modules()),
        "merit_fp32_linear_layers_prepacked": sum(isinstance(m, PrepackedLinear) for m in models["fp32"].modules()),
        "int8_engine_picked_by_the_model": models["int8"].merit_int8_engine,
        "int8_engines_timed_by_the_model": {str(key): value for key, value in _cpu_int8_engine_choice.items()},
        "fp32_prepacking_timed_by_the_model": {
            str(key): "prepacked" if value else "nn.Linear" for key, value in _cpu_prepacking_choice.items()
        },
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["base-p75", "small-p125"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip_hubert", action="store_true")
    parser.add_argument(
        "--compile", action="store_true", help="Add MERIT and the reference in bf16 under frozen torch.compile."
    )
    parser.add_argument("--output", default=str(RESULTS / "cpu_inference.json"))
    args = parser.parse_args(argv)
    # the model's own choices are timed in this run, not read from the machine's file of earlier ones (unless
    # MERIT_CPU_CHOICES names one)
    os.environ.setdefault(modeling_merit.CPU_CHOICES_ENV, "off")
    torch.set_num_threads(args.threads)
    results = []
    for preset in args.presets:
        result = measure_preset(
            preset, args.batch, args.rounds, with_hubert=not args.skip_hubert, compile_bf16=args.compile
        )
        results.append(result)
        print(json.dumps(result, indent=2), flush=True)
    report = {
        "machine": {"cpu": cpu_capability().summary(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "targets": TARGETS,
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
