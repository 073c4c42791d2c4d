"""Encoder throughput: ECGs/s for inference and for one pretraining step, with the references every claim is a
ratio against, measured in the same process on the same weights.

Variants of one shape (fp32 on CPU; on a CUDA device fp32 and bf16 autocast, with achieved TFLOP/s and MFU):
- `sdpa`: `MeritEcgModel` / `MeritForPreTraining` as shipped (`attn_implementation="sdpa"`);
- `sdpa+compile` (with `--compile`): the same model under `torch.compile` (inductor, default mode);
- `stmem_einsum`: the same weights with attention written the way the published ECG encoders write it (ST-MEM:
  `einsum` scores, softmax, `einsum`; no fused kernel), registered as an attention function. This is the reference.
- `sdpa+bf16_weights`, `sdpa+fp8` (inference in bf16, with `--precision_variants`, on by default on CUDA): the model
  as `merit_hf.models.merit.inference_precision.prepare_for_inference` runs it for `precision="bf16"` (weights cast, no autocast:
  the default on GPUs) and `"fp8"` (torchao float8 dynamic quantisation of the block linears; needs torchao and a GPU
  of compute capability 8.9+, otherwise the JSON says why it was skipped).
- HuBERT-ECG base: transformers' `HubertModel` with HuBERT-ECG's published base configuration (768 x 12, conv
  feature encoder kernels (10, 3, 3, 2, 2) strides (4, 2, 2, 2, 2), i.e. its `downsampling_factor=5` setting),
  random weights, input 12 leads x 5 s at 100 Hz concatenated to 6000 samples (93 frames).

The variants of one (shape, mode, dtype) run interleaved in one process: every round times each variant once, and
a ratio is the median over rounds of `reference time / variant time`, so drift of the machine (turbo, neighbours)
cancels. FLOPs per ECG come from `torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add). "matmul peak" is
a 4096^3 matmul in the same dtype timed in the same process: the fraction of it a model reaches is its MFU against
what this machine really does. Peak memory is the max RSS of a fresh process that runs only that variant (CPU) or
`torch.cuda.max_memory_allocated` of one step (GPU).

    python benchmarks/encoder_throughput.py                # fp32, every preset -> results/encoder_throughput_<device>.json
    python benchmarks/encoder_throughput.py --dtypes fp32 bf16 --compile --rounds 5   # the run in benchmarks/README.md
    python benchmarks/encoder_throughput.py --dtypes bf16 --modes infer --presets base-p75 small-p125 --rounds 10
        # on a GPU, batch 256: autocast vs bf16 weights vs fp8 vs the einsum reference, and HuBERT-ECG base
        # -> results/encoder_throughput_cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def einsum_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention as ST-MEM writes it: explicit score matrix with einsum, softmax, einsum (the reference)."""
    scores = torch.einsum("bhid,bhjd->bhij", query, key) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = scores.softmax(dim=-1)
    output = torch.einsum("bhij,bhjd->bhid", weights, value)
    return output.transpose(1, 2).contiguous(), weights


def _register_einsum() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS["stmem_einsum"] = einsum_attention


def build(row: str, preset: str, attention: str):
    from transformers import BertConfig, HubertConfig, HubertModel

    from merit_hf import MeritConfig, MeritEcgConfig, MeritEcgModel, MeritForPreTraining

    if row == "hubert_ecg_base":
        config = HubertConfig(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            conv_dim=(512,) * 5,
            conv_kernel=(10, 3, 3, 2, 2),
            conv_stride=(4, 2, 2, 2, 2),
            mask_time_prob=0.0,
        )
        model = HubertModel(config)

        def make_input(batch):
            return {"input_values": torch.randn(batch, 6000)}

        return model, make_input
    ecg_config = MeritEcgConfig.from_preset(preset)
    if row == "merit_encoder":
        model = MeritEcgModel._from_config(ecg_config, attn_implementation=attention)

        def make_input(batch):
            return {"ecg_values": torch.randn(batch, 12, ecg_config.num_samples)}

        return model, make_input
    # pretraining step: both losses, text tower shaped like all-MiniLM-L6-v2 (the quick-start's), reports of 64 tokens
    text = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    config = MeritConfig(ecg_config=ecg_config, text_config=text)
    model = MeritForPreTraining._from_config(config, attn_implementation=attention)

    def make_input(batch):
        return {
            "ecg_values": torch.randn(batch, 12, ecg_config.num_samples),
            "input_ids": torch.randint(1000, 20000, (batch, 64)),
            "attention_mask": torch.ones(batch, 64, dtype=torch.long),
        }

    return model, make_input


def _attention_configs(model) -> list:
    return [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]


def set_attention(model, implementation: str) -> None:
    """Switch every tower of `model` to one attention function, keeping the weights."""
    for config in _attention_configs(model):
        config._attn_implementation = implementation


def _flops_per_ecg(model, inputs, batch) -> float:
    """Forward FLOPs per ECG, counted by the package's one FLOP counter (eager attention: FlopCounterMode does not see
    inside the fused CPU attention kernel, and the arithmetic is the same whichever kernel runs it)."""
    from merit_hf.utils.throughput import count_flops_per_sample

    return count_flops_per_sample(model, lambda rows: model(**rows), inputs, backward=False, max_rows=batch)


def matmul_peak_tflops(device: str, dtype: str, size: int = 4096) -> float:
    """What this machine really does on a large dense matmul in `dtype` (median of 3)."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    synchronize()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e12


def _variants(row: str, compile_model: bool) -> list[str]:
    if row == "hubert_ecg_base":
        return ["sdpa"]
    return ["sdpa", "stmem_einsum"] + (["sdpa+compile"] if compile_model else [])


PRECISION_VARIANTS = {"sdpa+bf16_weights": "bf16", "sdpa+fp8": "fp8"}


def _precision_models(model, device: str) -> tuple[dict, dict]:
    """`{variant: prepared model}` for the inference-precision variants this device can run, and `{variant: why}`
    for those it cannot (fp8 without torchao or FP8 tensor cores)."""
    from merit_hf.models.merit.inference_precision import prepare_for_inference

    prepared, skipped = {}, {}
    for name, precision in PRECISION_VARIANTS.items():
        try:
            prepared[name] = prepare_for_inference(model, precision, device)
        except (ValueError, ImportError) as error:
            skipped[name] = str(error)
    return prepared, skipped


def _step_function(model, inputs, mode: str, device: str, dtype: str):
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16")
    if mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(forward):
            with autocast:
                output = forward(**inputs)
                loss = output.loss if getattr(output, "loss", None) is not None else output.last_hidden_state.mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step(forward):
            with torch.inference_mode(), autocast:
                forward(**inputs)

    return step


def measure_group(
    row, preset, mode, batch, rounds, device, dtype, compile_model=False, precision_variants=False
) -> dict:
    """Every variant of one (shape, mode, dtype), interleaved round by round on the same weights and inputs."""
    _register_einsum()
    torch.manual_seed(0)
    model, make_input = build(row, preset, "sdpa")
    model.to(device)
    inputs = {k: v.to(device) for k, v in make_input(batch).items()}
    flops = _flops_per_ecg(model.eval(), inputs, batch)
    step = _step_function(model, inputs, mode, device, dtype)
    variants = _variants(row, compile_model)
    forwards = dict.fromkeys(variants, model)
    steps = dict.fromkeys(variants, step)
    if "sdpa+compile" in variants:
        forwards["sdpa+compile"] = torch.compile(model)
    skipped = {}
    if precision_variants and mode == "infer" and row == "merit_encoder" and dtype == "bf16":
        prepared, skipped = _precision_models(model, device)
        for name, prepared_model in prepared.items():  # their own dtype: no autocast around them
            variants.append(name)
            forwards[name] = prepared_model
            steps[name] = _step_function(prepared_model, inputs, mode, device, "fp32")
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    compile_seconds = None
    for name in variants:  # warm-up (and compilation) of every variant
        set_attention(model, name.split("+")[0])
        start = time.perf_counter()
        steps[name](forwards[name])
        synchronize()
        if name.endswith("+compile"):
            compile_seconds = time.perf_counter() - start
        steps[name](forwards[name])
        synchronize()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name in variants:
            set_attention(model, name.split("+")[0])
            start = time.perf_counter()
            steps[name](forwards[name])
            synchronize()
            times[name].append(time.perf_counter() - start)
    peak = matmul_peak_tflops(device, dtype)
    gpu_memory = {}
    if device == "cuda":
        for name in variants:
            set_attention(model, name.split("+")[0])
            torch.cuda.reset_peak_memory_stats()
            steps[name](forwards[name])
            synchronize()
            gpu_memory[name] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    step_flops = flops * batch * (3.0 if mode == "train" else 1.0)  # backward costs about twice the forward
    results = []
    for name in variants:
        seconds = statistics.median(times[name])
        tflops = step_flops / seconds / 1e12
        result = {
            "row": row,
            "preset": preset if row != "hubert_ecg_base" else "hubert-ecg-base",
            "variant": name,
            "mode": mode,
            "device": device,
            "dtype": dtype,
            "batch": batch,
            "rounds": rounds,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "gflop_per_ecg_forward": round(flops / 1e9, 3),
            "seconds_per_step_median": round(seconds, 4),
            "ecgs_per_second": round(batch / seconds, 2),
            "achieved_tflops": round(tflops, 4),
            "matmul_peak_tflops": round(peak, 4),
            "fraction_of_matmul_peak": round(tflops / peak, 3),
        }
        if "stmem_einsum" in times and name != "stmem_einsum":
            pairs = [ref / mine for ref, mine in zip(times["stmem_einsum"], times[name])]
            result["vs_einsum_reference"] = round(statistics.median(pairs), 3)
            result["vs_einsum_reference_range"] = [round(min(pairs), 3), round(max(pairs), 3)]
        if name.endswith("+compile"):
            result["compile_seconds"] = round(compile_seconds, 1)
        if name in gpu_memory:
            result["peak_memory_mib"] = gpu_memory[name]
        if name in PRECISION_VARIANTS:
            result["weights"] = PRECISION_VARIANTS[name]
        if "sdpa" in times and name in PRECISION_VARIANTS:
            pairs = [ref / mine for ref, mine in zip(times["sdpa"], times[name])]
            result["vs_sdpa_autocast"] = round(statistics.median(pairs), 3)
        results.append(result)
    return {"results": results, "skipped": skipped}


def measure_cpu_memory(row, preset, variant, mode, batch, dtype) -> dict:
    """Peak RSS of a process that builds one variant and runs three steps of it (nothing else)."""
    _register_einsum()
    torch.manual_seed(0)
    model, make_input = build(row, preset, variant)
    inputs = make_input(batch)
    step = _step_function(model, inputs, mode, "cpu", dtype)
    for _ in range(3):
        step(model)
    return {"peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _in_subprocess(**kwargs) -> dict:
    """Each group and each memory row in a fresh process, so nothing carries over between them."""
    args = [f"--{k}={v}" for k, v in kwargs.items()]
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False, timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny-p75", "small-p125", "base-p75"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each variant once per round)")
    parser.add_argument("--dtypes", nargs="+", default=None, help="fp32 and/or bf16 (autocast); default fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile variant (slow to compile)")
    parser.add_argument(
        "--precision_variants",
        type=int,
        default=None,
        help="1: add bf16-weights and fp8 inference variants in bf16 groups (default: 1 on CUDA, 0 on CPU)",
    )
    parser.add_argument("--skip_hubert", action="store_true", help="leave out the HuBERT-ECG base rows")
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--skip_memory", action="store_true", help="no peak-RSS processes (CPU)")
    parser.add_argument("--output", help="results JSON (default: benchmarks/results/encoder_throughput_<device>.json)")
    parser.add_argument("--single", choices=["group", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--row"), parser.add_argument("--preset"), parser.add_argument("--variant")
    parser.add_argument("--mode"), parser.add_argument("--batch", type=int), parser.add_argument("--dtype")
    parser.add_argument("--compile_model", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--with_precisions", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single == "group":
        result = measure_group(
            args.row,
            args.preset,
            args.mode,
            args.batch,
            args.rounds,
            args.device,
            args.dtype,
            bool(args.compile_model),
            bool(args.with_precisions),
        )
        print(json.dumps(result))
        return result
    if args.single == "memory":
        result = measure_cpu_memory(args.row, args.preset, args.variant, args.mode, args.batch, args.dtype)
        print(json.dumps(result))
        return result

    on_gpu = args.device == "cuda"
    precision_variants = on_gpu if args.precision_variants is None else bool(args.precision_variants)
    dtypes = args.dtypes or (["fp32", "bf16"] if on_gpu else ["fp32"])
    batches = {"infer": 256 if on_gpu else 8, "train": 64 if on_gpu else 4}
    groups = []
    for dtype in dtypes:
        for preset in args.presets:
            for mode in args.modes:
                groups.append(("merit_encoder" if mode == "infer" else "merit_pretraining", preset, mode, dtype))
        if not args.skip_hubert:
            groups += [("hubert_ecg_base", "-", mode, dtype) for mode in args.modes]
    results, skipped = [], {}
    for row, preset, mode, dtype in groups:
        measured = _in_subprocess(
            single="group", row=row, preset=preset, mode=mode, batch=batches[mode], rounds=args.rounds,
            device=args.device, dtype=dtype, compile_model=int(args.compile), with_precisions=int(precision_variants),
        )  # fmt: skip
        for name, why in measured.get("skipped", {}).items():
            skipped[f"{preset}/{name}"] = why
            print(f"{preset:>16} {name}: skipped ({why})", flush=True)
        for result in measured["results"]:
            if not on_gpu and not args.skip_memory and result["variant"] in ("sdpa", "stmem_einsum"):
                result["peak_memory_mib"] = _in_subprocess(
                    single="memory", row=row, preset=preset, variant=result["variant"], mode=mode,
                    batch=batches[mode], dtype=dtype,
                )["peak_memory_mib"]  # fmt: skip
            results.append(result)
            ratio = result.get("vs_einsum_reference")
            print(
                f"{result['preset']:>16} {result['variant']:>17} {mode:>5} {dtype:>4}: "
                f"{result['ecgs_per_second']:8.2f} ECGs/s  {result['gflop_per_ecg_forward']:7.2f} GFLOP/ECG  "
                f"{result['achieved_tflops']:.3f} TFLOP/s ({result['fraction_of_matmul_peak']:.0%} of matmul peak)"
                + (f"  {ratio:.2f}x einsum ref." if ratio else "")
                + (f"  peak {result['peak_memory_mib']:.0f} MiB" if "peak_memory_mib" in result else ""),
                flush=True,
            )
    machine = {
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if on_gpu:
        from merit_hf.utils.throughput import default_peak_tflops

        peak = default_peak_tflops(args.device)
        for result in results:
            if peak and result["dtype"] == "bf16":
                result["mfu_vs_dense_bf16_peak"] = round(result["achieved_tflops"] / peak, 4)
    report = {"machine": machine, "results": results, "cross_ratios": _cross_ratios(results), "skipped": skipped}
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.output) if args.output else RESULTS / f"encoder_throughput_{args.device}.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["cross_ratios"], indent=2))
    print(f"wrote {out}")
    return report


def _cross_ratios(results: list[dict]) -> dict:
    """Ratios across processes: every MERIT variant against the fp32 einsum reference (the issue's reference,
    whatever dtype the variant ran in) and against HuBERT-ECG base in the same dtype."""

    def rate(preset, variant, mode, dtype):
        for r in results:
            if (r["preset"], r["variant"], r["mode"], r["dtype"]) == (preset, variant, mode, dtype):
                return r["ecgs_per_second"]
        return None

    ratios = {}
    for r in results:
        if r["row"] == "hubert_ecg_base" or r["variant"] == "stmem_einsum":
            continue
        reference = rate(r["preset"], "stmem_einsum", r["mode"], "fp32")
        hubert = rate("hubert-ecg-base", "sdpa", r["mode"], r["dtype"])
        ratios[f"{r['preset']}/{r['variant']}/{r['mode']}/{r['dtype']}"] = {
            "vs_fp32_einsum_reference": round(r["ecgs_per_second"] / reference, 2) if reference else None,
            "vs_hubert_ecg_base": round(r["ecgs_per_second"] / hubert, 2) if hubert else None,
        }
    return ratios


if __name__ == "__main__":
    main()
