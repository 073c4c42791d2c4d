"""Masked ECG modelling on its own: can the encoder + decoder reconstruct hidden patches better than trivial rules?

Reconstruction-only pretraining (`contrastive_weight=0`) of the quick-start ECG tower on the bundled PTB-XL records
(folds 1-8 train, fold 9 validation, 100 Hz, the whole 10 s), with pretraining's optimizer (AdamW, the model's
no-weight-decay groups, cosine schedule with warm-up). The validation reconstruction loss is in normalised-patch
units (`norm_pix_loss`): 1.0 is what predicting every hidden patch's own mean scores. It is compared, on exactly the
same validation masks, with two baselines that need no training:

- **patch mean** (1.0 by construction; computed, as a check of the units);
- **cross-lead copy**: for a hidden patch of lead L, copy the same time span of the visible lead whose signal is most
  correlated with L over the training records (sign-flipped when the correlation is negative), normalised like the
  target; the patch mean where no lead is visible at that time.

    python benchmarks/masked_modelling.py                       # 1000 steps, both init schemes -> results JSON
    python benchmarks/masked_modelling.py --steps 50 --schemes xavier_uniform   # smoke test

Writes `benchmarks/results/masked_modelling_cpu.json`.
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
from transformers import BertConfig, get_scheduler

from merit_hf import MeritConfig, MeritEcgConfig, MeritFeatureExtractor, MeritForPreTraining
from merit_hf.data import build_ptbxl
from merit_hf.models.merit.modeling_merit import patchify
from merit_hf.training.pretrain import masking_noise, parameter_groups

ROOT = Path(__file__).resolve().parents[1]


def ecg_tensors(dataset, feature_extractor) -> tuple[torch.Tensor, list[int]]:
    rows = list(dataset)
    signals = [np.asarray(row["signal"], dtype=np.float32) for row in rows]
    values = feature_extractor(
        signals, sampling_rate=rows[0]["sampling_rate"], lead_names=rows[0]["lead_names"], return_tensors="pt"
    )["ecg_values"]
    return values, [int(row["ecg_id"]) for row in rows]


def normalised_patches(ecg_values: torch.Tensor, patch_size: int, eps: float = 1e-6) -> torch.Tensor:
    """The norm-pix target of `masked_patch_reconstruction_loss`: each patch minus its mean, over its biased std."""
    patches = patchify(ecg_values, patch_size)
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps) ** 0.5


def lead_correlations(ecg_values: torch.Tensor) -> torch.Tensor:
    """`(num_leads, num_leads)` Pearson correlation of the leads over all training samples."""
    flat = ecg_values.transpose(0, 1).reshape(ecg_values.shape[1], -1).double()
    return torch.corrcoef(flat).float()


def baselines(ecg_values: torch.Tensor, mask: torch.Tensor, correlations: torch.Tensor, patch_size: int) -> dict:
    """Mean-squared error on hidden patches of the two rules, in the loss's units. `mask` is 1 where hidden."""
    target = normalised_patches(ecg_values, patch_size)
    hidden = mask.bool()
    mean_rule = (target**2).mean(dim=-1)[hidden].mean().item()
    num_leads = ecg_values.shape[1]
    order = torch.argsort(correlations.abs() - 2 * torch.eye(num_leads), dim=1, descending=True)  # self never first
    prediction = torch.zeros_like(target)
    visible = ~hidden
    assigned = torch.zeros_like(hidden)
    for rank in range(num_leads - 1):
        source = order[:, rank]  # for each lead, its rank-th most correlated other lead
        source_visible = visible[:, source, :]  # (batch, lead, patch): is the source visible at this patch?
        use = hidden & source_visible & ~assigned
        sign = torch.sign(correlations[torch.arange(num_leads), source])[None, :, None, None]
        copied = target[:, source, :, :] * sign
        prediction = torch.where(use[..., None], copied, prediction)
        assigned |= use
    copy_rule = ((prediction - target) ** 2).mean(dim=-1)[hidden].mean().item()
    return {
        "patch_mean": mean_rule,
        "cross_lead_copy": copy_rule,
        "hidden_patches_with_a_visible_lead": assigned[hidden].float().mean().item(),
    }


def train(
    scheme: str,
    decoder_attention: str,
    ecg_config: dict,
    train_values: torch.Tensor,
    train_ids: list[int],
    eval_values: torch.Tensor,
    eval_noise: torch.Tensor,
    args,
) -> dict:
    torch.manual_seed(args.seed)
    config = MeritConfig(
        ecg_config={**ecg_config, "initializer_scheme": scheme, "decoder_attention": decoder_attention},
        text_config=BertConfig(
            vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=16
        ),
        contrastive_weight=0.0,
    )
    device = torch.device(args.device)
    model = MeritForPreTraining(config).to(device)
    model.freeze_unused_parameters()
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.learning_rate, betas=(0.9, 0.95))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    curve = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        model.train()
        index = torch.randint(0, len(train_ids), (args.batch_size,), generator=generator)
        with autocast:
            loss = model(train_values[index].to(device)).reconstruction_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, "train": loss.item(), "validation": evaluate(model, eval_values, eval_noise)})
            print(
                f"  {scheme:>15} {decoder_attention:>9} step {step:5d}  train {loss.item():.4f}  validation {curve[-1]['validation']:.4f}"
            )
    return {"validation_loss": curve[-1]["validation"], "curve": curve, "seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate(model, values: torch.Tensor, noise: torch.Tensor, batch_size: int = 64) -> float:
    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    for first in range(0, len(values), batch_size):
        chunk = slice(first, first + batch_size)
        output = model(values[chunk].to(device), noise=noise[chunk].to(device))
        hidden = output.mask.sum().item()
        total += output.reconstruction_loss.item() * hidden
        count += hidden
    return total / count


def run_name(scheme: str, decoder_attention: str, decoder_attentions: list[str]) -> str:
    """A run's key in the results: the init scheme, plus the decoder variant when more than one is compared."""
    return scheme if len(decoder_attentions) == 1 else f"{scheme}/{decoder_attention}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(ROOT / "data" / "ptbxl_sample"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"), help="its ecg_config is used")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=15)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mask_ratio", type=float, default=None, help="override the config's mask_ratio")
    parser.add_argument("--schemes", nargs="+", default=["xavier_uniform", "trunc_normal"])
    parser.add_argument(
        "--decoder_attention",
        nargs="+",
        default=None,
        choices=["per_lead", "axial"],
        help="decoder variants to run with every scheme (default: the config's own)",
    )
    parser.add_argument(
        "--ptbxl_version", default="1.0.3", choices=["1.0.3", "as_is"], help="as_is: the csv's rows (all 500)"
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "masked_modelling_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ecg_config = yaml.safe_load(Path(args.config).read_text())["ecg_config"]
    if args.mask_ratio is not None:
        ecg_config["mask_ratio"] = args.mask_ratio
    model_config = MeritEcgConfig(**ecg_config)
    feature_extractor = MeritFeatureExtractor.from_model_config(model_config)
    dataset = build_ptbxl(Path(args.data_dir), sampling_rate=100, ptbxl_version=args.ptbxl_version)
    train_values, train_ids = ecg_tensors(dataset["train"], feature_extractor)
    eval_values, eval_ids = ecg_tensors(dataset["validation"], feature_extractor)
    shape = (model_config.num_leads, model_config.num_patches_per_lead)
    eval_noise = masking_noise(eval_ids, (args.seed, -1), shape)
    # The masks the model sees for this noise (smallest noise visible), for the baselines.
    visible = torch.argsort(torch.argsort(eval_noise, dim=-1), dim=-1) < model_config.num_visible_patches
    reference = baselines(eval_values, (~visible).float(), lead_correlations(train_values), model_config.patch_size)
    print(f"{len(train_ids)} train / {len(eval_ids)} validation records; baselines {reference}")
    attentions = args.decoder_attention or [model_config.decoder_attention]
    runs = {
        run_name(scheme, attention, attentions): train(
            scheme, attention, ecg_config, train_values, train_ids, eval_values, eval_noise, args
        )
        for attention in attentions
        for scheme in args.schemes
    }
    result = {
        "benchmark": "masked_modelling",
        "machine": {
            "platform": platform.platform(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "threads": args.threads,
        },
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "ecg_config": ecg_config,
        "records": {"train": len(train_ids), "validation": len(eval_ids)},
        "baselines": reference,
        "runs": runs,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    for name, run in runs.items():
        gap = run["validation_loss"] - reference["cross_lead_copy"]
        print(
            f"{name}: validation {run['validation_loss']:.4f} after {args.steps} steps "
            f"(patch mean {reference['patch_mean']:.4f}, cross-lead copy {reference['cross_lead_copy']:.4f}, "
            f"gap {gap:+.4f}); {run['seconds']:.0f} s"
        )
    assert math.isfinite(reference["cross_lead_copy"])


if __name__ == "__main__":
    main()
