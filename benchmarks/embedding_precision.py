"""Are low-precision embeddings good enough? The same encoder embeds the same records in fp32 and in every other
inference precision this device runs (`merit_hf.models.merit.inference_precision`: bf16 weights, bf16 autocast, int8 dynamic
quantisation on CPU, fp8 on Hopper-class GPUs); this reports how close each is to fp32 (cosine per record) and what a
linear probe makes of each (superclass macro AUROC on the test split with its bootstrap CI, same probe protocol and
seed), plus the cosine for a random-init ViT-B/75, whose 12 layers are where rounding would pile up.

    python benchmarks/embedding_precision.py                         # the quick-start model on the bundled records
    python benchmarks/embedding_precision.py --model_name_or_path <checkpoint> --dataset <PTB-XL folder>

Writes `benchmarks/results/embedding_precision_<device>.json` (`--output` to name another file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from merit_hf import MeritEcgConfig, MeritEcgModel, MeritFeatureExtractor
from merit_hf.models.merit.inference_precision import (
    CPU_PREPACK_ENV,
    _cpu_int8_engine_choice,
    cpu_capability,
    prepare_for_inference,
)
from merit_hf.models.merit.modeling_merit import CPU_CHOICES_ENV
from merit_hf.training.probe import (
    SPLITS,
    extract_features,
    load_dataset_dict,
    load_encoder,
    load_feature_extractor,
    run_linear_probe,
)

RESULTS = Path(__file__).resolve().parent / "results"


def cosine_per_record(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def summary(cosines: np.ndarray) -> dict:
    return {
        "records": int(cosines.size),
        "min": round(float(cosines.min()), 6),
        "median": round(float(np.median(cosines)), 6),
        "p01": round(float(np.quantile(cosines, 0.01)), 6),
    }


def precisions_for(device: str) -> list[str]:
    """fp32 first (the reference: plain `nn.Linear`), then every other precision `device` runs; on a CPU also fp32
    with the oneDNN-prepacked linear layers that `prepare_for_inference` picks where they are faster."""
    if device == "cpu":
        return ["fp32", "fp32-prepacked", "bf16", "bf16-autocast", "int8"]
    precisions = ["fp32", "bf16", "bf16-autocast"]
    try:
        import torchao  # noqa: F401

        if torch.cuda.get_device_capability() >= (8, 9):
            precisions.append("fp8")
    except ImportError:
        pass
    return precisions


def embed(encoder, feature_extractor, dataset, device: str, batch_size: int, precision: str) -> np.ndarray:
    if precision == "bf16-autocast":  # how the library ran bf16 before the weights were cast
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            return extract_features(encoder, feature_extractor, dataset, batch_size, device=device)
    prepacking = {"fp32": "off", "fp32-prepacked": "on"}.get(precision)
    if prepacking is not None:  # fix fp32's timed choice: the reference unpacked, the other packed
        os.environ[CPU_PREPACK_ENV] = prepacking
    try:
        runner = prepare_for_inference(encoder, precision.removesuffix("-prepacked"), device)
    finally:
        os.environ.pop(CPU_PREPACK_ENV, None)
    return extract_features(runner, feature_extractor, dataset, batch_size, device=device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default="quickstart_output/model")
    parser.add_argument("--dataset", default="quickstart_output/ptbxl_dataset")
    parser.add_argument("--sampling_rate", type=int, default=100)
    parser.add_argument("--label_set", default="superclass")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/embedding_precision_<device>.json")
    args = parser.parse_args(argv)
    # choices the model times (int8 engine, fp32 prepacking) are made in this run, not read from earlier ones
    os.environ.setdefault(CPU_CHOICES_ENV, "off")

    dataset_dict = load_dataset_dict(args.dataset, args.sampling_rate)
    encoder, name = load_encoder(args.model_name_or_path)
    feature_extractor = load_feature_extractor(args.model_name_or_path, encoder)
    precisions = precisions_for(args.device)
    features = {
        precision: {
            split: embed(encoder, feature_extractor, dataset_dict[split], args.device, args.batch_size, precision)
            for split in SPLITS
        }
        for precision in precisions
    }
    cosines = {
        precision: summary(
            np.concatenate([cosine_per_record(features["fp32"][s], features[precision][s]) for s in SPLITS])
        )
        for precision in precisions[1:]
    }
    probes = {}
    for precision, split_features in features.items():
        results = run_linear_probe(
            encoder, dataset_dict, args.label_set, baseline=False, feature_extractor=feature_extractor,
            features={"model": split_features},
        )  # fmt: skip
        auroc = results["model"]["metrics"]["macro_auroc"]
        probes[precision] = {key: round(auroc[key], 4) for key in ("value", "ci_low", "ci_high")}

    torch.manual_seed(0)
    base = MeritEcgModel(MeritEcgConfig.from_preset("base-p75"))
    base_extractor = MeritFeatureExtractor.from_model_config(base.config)
    test = dataset_dict["test"].select(range(min(64, len(dataset_dict["test"]))))
    base_features = {
        precision: embed(base, base_extractor, test, args.device, 8, precision) for precision in precisions
    }

    report = {
        "machine": {
            "device": torch.cuda.get_device_name()
            if args.device == "cuda"
            else platform.processor() or platform.machine(),
            "cpu": cpu_capability().summary(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "model": name,
        "dataset": args.dataset,
        "int8_engine_timed_by_the_model": {str(key): value for key, value in _cpu_int8_engine_choice.items()},
        "cosine_to_fp32": cosines,
        f"linear_probe_{args.label_set}_test": probes,
        "random_init_base_p75_cosine_to_fp32": {
            precision: summary(cosine_per_record(base_features["fp32"], base_features[precision]))
            for precision in precisions[1:]
        },
    }
    out = Path(args.output) if args.output else RESULTS / f"embedding_precision_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
