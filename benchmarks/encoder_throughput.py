"""Encoder throughput: ECGs/s for inference and for one pretraining step, with the references every claim is a
ratio against, measured in the same run.

Rows (fp32 on CPU; on a CUDA device also bf16 autocast, with achieved TFLOP/s):
- merit (SDPA): `MeritEcgModel` / `MeritForPreTraining` as shipped (`attn_implementation="sdpa"`);
- merit (einsum reference): the same weights with attention written the way the published ECG encoders write it
  (ST-MEM: `einsum` scores, softmax, `einsum`; fp32; no fused kernel), registered as an attention function;
- HuBERT-ECG base: transformers' `HubertModel` with HuBERT-ECG's published base configuration (768 x 12, conv
  feature encoder kernels (10, 3, 3, 2, 2) strides (4, 2, 2, 2, 2), i.e. its `downsampling_factor=5` setting),
  random weights, input 12 leads x 5 s at 100 Hz concatenated to 6000 samples (93 frames).

FLOPs per ECG come from `torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add). Peak memory is the peak
resident set size of a fresh process that runs only that row (CPU) or `torch.cuda.max_memory_allocated` (GPU).

    python benchmarks/encoder_throughput.py                      # all rows, writes benchmarks/results/*.json
    python benchmarks/encoder_throughput.py --presets tiny-p75   # one shape
    python benchmarks/encoder_throughput.py --dtypes bf16 --presets small-p125 base-p75   # bf16 autocast on CPU
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
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def einsum_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention as ST-MEM writes it: explicit score matrix with einsum, fp32 softmax, einsum."""
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


def _flops_per_ecg(model, inputs, batch) -> float:
    """Counted on the eager path: FlopCounterMode does not see inside the fused CPU attention kernel, and the
    arithmetic is the same whichever kernel runs it."""
    from torch.utils.flop_counter import FlopCounterMode

    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    saved = [c._attn_implementation for c in configs]
    for config in configs:
        config._attn_implementation = "eager"
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(**inputs)
    finally:
        for config, implementation in zip(configs, saved):
            config._attn_implementation = implementation
    return counter.get_total_flops() / batch


def measure(row: str, preset: str, attention: str, mode: str, batch: int, iters: int, device: str, dtype: str):
    _register_einsum()
    torch.manual_seed(0)
    model, make_input = build(row, preset, attention)
    model.to(device)
    inputs = {k: v.to(device) for k, v in make_input(batch).items()}
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16")
    flops = _flops_per_ecg(model.eval(), inputs, batch)
    if mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with autocast:
                output = model(**inputs)
                loss = output.loss if getattr(output, "loss", None) is not None else output.last_hidden_state.mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                model(**inputs)

    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step()  # warm-up
    step()
    synchronize()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    step_flops = flops * batch * (3.0 if mode == "train" else 1.0)  # backward costs about twice the forward
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "row": row,
        "preset": preset if row != "hubert_ecg_base" else "hubert-ecg-base",
        "attention": attention if row != "hubert_ecg_base" else "sdpa",
        "mode": mode,
        "device": device,
        "dtype": dtype,
        "batch": batch,
        "iters": iters,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "gflop_per_ecg_forward": round(flops / 1e9, 3),
        "seconds_per_step_median": round(seconds, 4),
        "ecgs_per_second": round(batch / seconds, 2),
        "achieved_tflops": round(step_flops / seconds / 1e12, 4),
        "peak_memory_mib": round(peak, 1),
    }


def run_in_subprocess(**kwargs) -> dict:
    """One row per fresh process, so peak memory belongs to that row alone."""
    args = [f"--{k}={v}" for k, v in kwargs.items()]
    done = subprocess.run(
        [sys.executable, __file__, "--single", *args], capture_output=True, text=True, check=False, timeout=3600
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny-p75", "small-p125", "base-p75"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=None, help="fp32 and/or bf16 (autocast); default fp32 on CPU")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row"), parser.add_argument("--preset"), parser.add_argument("--attention")
    parser.add_argument("--mode"), parser.add_argument("--batch", type=int), parser.add_argument("--dtype")
    args = parser.parse_args(argv)
    if args.single:
        result = measure(
            args.row, args.preset, args.attention, args.mode, args.batch, args.iters, args.device, args.dtype
        )
        print(json.dumps(result))
        return result

    on_gpu = args.device == "cuda"
    dtypes = args.dtypes or (["fp32", "bf16"] if on_gpu else ["fp32"])
    batches = {"infer": 256 if on_gpu else 8, "train": 64 if on_gpu else 4}
    rows = []
    for dtype in dtypes:
        for preset in args.presets:
            for mode in ("infer", "train"):
                row = "merit_encoder" if mode == "infer" else "merit_pretraining"
                for attention in ("sdpa", "stmem_einsum"):
                    rows.append((row, preset, attention, mode, dtype))
        for mode in ("infer", "train"):
            rows.append(("hubert_ecg_base", "-", "sdpa", mode, dtype))
    results = []
    for row, preset, attention, mode, dtype in rows:
        result = run_in_subprocess(
            row=row, preset=preset, attention=attention, mode=mode, batch=batches[mode], iters=args.iters,
            device=args.device, dtype=dtype,
        )  # fmt: skip
        results.append(result)
        print(
            f"{result['preset']:>16} {result['attention']:>13} {mode:>5} {dtype:>4}: "
            f"{result['ecgs_per_second']:8.2f} ECGs/s  {result['gflop_per_ecg_forward']:7.2f} GFLOP/ECG  "
            f"{result['achieved_tflops']:.3f} TFLOP/s  peak {result['peak_memory_mib']:.0f} MiB",
            flush=True,
        )
    machine = {
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if on_gpu:
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in machine["device"]), None)
        for result in results:
            if peak and result["dtype"] == "bf16":
                result["mfu_vs_dense_bf16_peak"] = round(result["achieved_tflops"] / peak, 4)
    report = {"machine": machine, "results": results, "ratios": _ratios(results)}
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if dtypes == ["fp32"] or on_gpu else "_" + "_".join(dtypes)
    out = RESULTS / f"encoder_throughput_{args.device}{suffix}.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["ratios"], indent=2))
    print(f"wrote {out}")
    return report


def _ratios(results: list[dict]) -> dict:
    def rate(preset, attention, mode, dtype):
        for r in results:
            if (r["preset"], r["attention"], r["mode"], r["dtype"]) == (preset, attention, mode, dtype):
                return r["ecgs_per_second"]
        return None

    ratios = {}
    for r in results:
        if r["row"] == "hubert_ecg_base" or r["attention"] != "sdpa":
            continue
        key = f"{r['preset']}/{r['mode']}/{r['dtype']}"
        reference = rate(r["preset"], "stmem_einsum", r["mode"], r["dtype"])
        hubert = rate("hubert-ecg-base", "sdpa", r["mode"], r["dtype"])
        ratios[key] = {
            "vs_einsum_reference": round(r["ecgs_per_second"] / reference, 2) if reference else None,
            "vs_hubert_ecg_base": round(r["ecgs_per_second"] / hubert, 2) if hubert else None,
        }
    return ratios


if __name__ == "__main__":
    main()
