"""One attention call at the ViT-B/75 shape (batch 8, 12 heads, 384 tokens, head size 64), per kernel and dtype:
PyTorch's fused SDPA kernel, the matmul path `MeritEcgAttention` takes for bf16/fp16 on CPU
(`matmul_attention_forward`), and the einsum reference, interleaved over 15 rounds: median, min and max
milliseconds, plus the largest absolute error against a float64 computation.

    python benchmarks/attention_kernels.py        # writes benchmarks/results/attention_kernels_<device>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from merit_hf.models.merit.modeling_merit import matmul_attention_forward

RESULTS = Path(__file__).resolve().parent / "results"


def einsum_reference(query, key, value, scaling):
    scores = torch.einsum("bhid,bhjd->bhij", query, key) * scaling
    return torch.einsum("bhij,bhjd->bhid", scores.softmax(dim=-1), value)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    synchronize = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    module = nn.Module().eval()
    heads, tokens, head_size = 12, 384, 64
    scaling = head_size**-0.5
    torch.manual_seed(0)
    # q, k, v as the model makes them: views into one (batch, tokens, 3, heads, head_size) projection
    qkv64 = torch.randn(args.batch, tokens, 3, heads, head_size, dtype=torch.float64, device=args.device)
    exact = F.scaled_dot_product_attention(*qkv64.permute(2, 0, 3, 1, 4).unbind(0))
    kernels = {
        "sdpa_fused": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scaling),
        "matmul_path": lambda q, k, v: matmul_attention_forward(module, q, k, v, None, scaling)[0].transpose(1, 2),
        "einsum_reference": lambda q, k, v: einsum_reference(q, k, v, scaling),
    }
    rows = []
    with torch.inference_mode():
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            query, key, value = qkv64.to(dtype).permute(2, 0, 3, 1, 4).unbind(0)
            errors, times = {}, {name: [] for name in kernels}
            for name, kernel in kernels.items():
                errors[name] = (kernel(query, key, value).double() - exact).abs().max().item()
            for _ in range(args.rounds):  # interleaved, so that drift of the machine hits every kernel alike
                for name, kernel in kernels.items():
                    synchronize()
                    start = time.perf_counter()
                    kernel(query, key, value)
                    synchronize()
                    times[name].append((time.perf_counter() - start) * 1000)
            for name in kernels:
                rows.append(
                    {
                        "kernel": name,
                        "dtype": dtype_name,
                        "ms_median": round(statistics.median(times[name]), 2),
                        "ms_min": round(min(times[name]), 2),
                        "ms_max": round(max(times[name]), 2),
                        "max_abs_error_vs_float64": float(f"{errors[name]:.2e}"),
                    }
                )
                row = rows[-1]
                print(
                    f"{dtype_name} {name:>17}: {row['ms_median']:7.2f} ms (min {row['ms_min']:.2f}, max "
                    f"{row['ms_max']:.2f})  max |error| {errors[name]:.1e}"
                )
    report = {
        "shape": {"batch": args.batch, "heads": heads, "tokens": tokens, "head_size": head_size},
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"attention_kernels_{args.device}.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
