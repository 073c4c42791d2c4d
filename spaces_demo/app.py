"""MERIT ECG demo: a Gradio Blocks app for clinician-researchers (runs as a Hugging Face Space or locally).

Upload a WFDB record (`.hea` + `.dat`) or pick a bundled real PTB-XL record, and see its leads on an ECG grid (the
window the model reads), zero-shot scores per class, the nearest bundled examples in embedding space, and a generated
report. The app only wires the UI to tested merit_hf functions: `read_wfdb_record` and the feature extractor (the
input contract), `class_prompts`, `encode_class_prompts`, `encode_ecgs` and `similarity_scores` (the steps of
`zero_shot_classify`, with the class embeddings computed once), and `MeritForReportGeneration.generate`.

Run locally (one command, from the repository root; http://127.0.0.1:7860):

    GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 .venv/bin/python spaces_demo/app.py

Settings (environment): `MERIT_MODEL` (folder or Hub id of a MERIT two-tower checkpoint; default the quick-start
output; with neither, the app stops and says to set it: it never picks a Hub model by itself, and loads every model
with merit_hf's own classes, never code from the Hub), `MERIT_REPORT_MODEL` (a report model folder or Hub id, or a report adapter folder
written by `merit_hf.training.report_lora`; unset: the report panel says it is unavailable), `GRADIO_SERVER_NAME`
(default 127.0.0.1; Spaces set 0.0.0.0), `GRADIO_SERVER_PORT` (default 7860). Never launched with `share=True`.

Input policy (stated in the UI): one WFDB record with 1 to 12 of the standard leads (a 12-lead ECG, the 6 limb leads,
a 2-lead Holter, a single-lead device) at 100, 250, 500 or 1000 Hz (the rates of PTB-XL, MIMIC-IV-ECG and the
model), 9 to 60 s long, at most 5 MB (Gradio refuses a larger file; uploads are deleted from its cache within 20
minutes); it is resampled to the model's rate by the feature extractor and the panel says so. Limb leads are derived
from two of I, II, III; leads still missing are left out of the model (`lead_mask`), never fed as zeros, and the
panel lists them. Anything else gets a readable error, and nothing is read outside the upload.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from merit_hf import STANDARD_LEAD_NAMES  # noqa: E402
from merit_hf.models.merit.feature_extraction_merit import (  # noqa: E402
    UNIT_TO_MV,
    EcgInputError,
    read_wfdb_header,
    read_wfdb_record,
)
from merit_hf.models.merit.pipeline_merit import (  # noqa: E402
    class_prompts,
    encode_class_prompts,
    encode_ecgs,
    load_class_descriptions,
    similarity_scores,
)

APP_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = APP_DIR / "examples"
REPO_ROOT = APP_DIR.parent
DEFAULT_MODELS = (REPO_ROOT / "quickstart_output" / "model", REPO_ROOT / "quickstart_output")
SPACE_MODEL = "org/merit-ecg"  # what the Space card declares; the deployed Space sets MERIT_MODEL to it
ACCEPTED_RATES = (100, 250, 500, 1000)
MIN_SECONDS, MAX_SECONDS = 9.0, 60.0
MAX_UPLOAD_BYTES = 5 * 1024 * 1024  # the app's limit on the whole record, and Gradio's on each file
# Gradio's cache keeps a copy of every upload: every 10 minutes, those older than 10 minutes are deleted
UPLOAD_CACHE_SECONDS = (600, 600)
MAX_LEADS = 12
# The demo's zero-shot menu: merit_hf.data.labels.LABEL_SETS without "all" (71 classes do not fit a plot), most
# readable first.
ZERO_SHOT_MENU = ("superclass", "rhythm", "form", "subclass")
MAX_NEW_TOKENS = int(os.environ.get("MERIT_REPORT_MAX_NEW_TOKENS", "64"))
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# `rec (1).dat`: how browsers name a second download of `rec.dat`
BROWSER_COPY = re.compile(r"^(?P<stem>.+?) \((?P<copy>\d+)\)(?P<suffix>\.[A-Za-z]+)$")
RELEASE_HIDDEN_SIZE = 768
GRID_FINE, GRID_BOLD = "#fbd5d5", "#f08080"
PLOT_LIMIT_MV = 4.0
DISCLAIMER = (
    "**Research demo, not a medical device.** Nothing shown here may be used to diagnose, treat or triage anyone. "
    "Zero-shot scores are cosine similarities between the ECG and text descriptions, not probabilities."
)
INPUT_POLICY = (
    "Accepted: one WFDB record (`.hea` + `.dat`, upload both) with 1 to 12 of the standard leads (12-lead, limb "
    f"leads, 2-lead, single-lead) at {', '.join(map(str, ACCEPTED_RATES))} Hz, {MIN_SECONDS:g}-{MAX_SECONDS:g} s and "
    f"at least the model's window (9 s for base-p75, 10 s for the quick-start model), at most "
    f"{MAX_UPLOAD_BYTES // 2**20} MB. It is resampled to the model's rate; limb leads are derived from two of "
    "I, II, III, and leads still missing are left out of the model (not fed as zeros). Uploads are deleted from the "
    f"server within {sum(UPLOAD_CACHE_SECONDS) // 60} minutes."
)


class DemoInputError(ValueError):
    """An upload the demo refuses; the message is shown to the user as is."""


# The library's errors end with the setting that would repair the input (`(nan_policy='interpolate' repairs gaps)`,
# `; flat_lead_policy='zero' or 'drop' reads ...`), which a visitor of the page cannot set: the page leaves them out.
_SETTING = r"(?:pass\s+)?[a-z_]+=(?:True|'[^']*')"
_LIBRARY_HINTS = (
    re.compile(rf"\s*\((?:[^()]|\([^()]*\))*?\b{_SETTING}(?:[^()]|\([^()]*\))*\)"),  # a parenthesis naming one
    re.compile(rf"[.;:]\s*{_SETTING}.*$"),  # a closing clause that starts with a setting
)


def for_visitors(message: str) -> str:
    """`message` of the feature extractor without the library settings it suggests (the demo's own are fixed)."""
    for pattern in _LIBRARY_HINTS:
        message = pattern.sub("", message)
    return message


@dataclass
class DemoModels:
    model: torch.nn.Module
    processor: object
    name: str
    warning: str | None = None
    report_model: torch.nn.Module | None = None
    report_processor: object | None = None
    report_status: str = "No report model configured (set MERIT_REPORT_MODEL): report generation is unavailable."
    # label set of the menu -> class embeddings `(num_classes, projection_dim)` (`menu_class_embeddings`)
    class_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def default_model_path() -> str:
    """`MERIT_MODEL`, else the quick-start output; never a Hub model nobody named (whoever owns that id would
    choose what the app runs)."""
    if os.environ.get("MERIT_MODEL"):
        return os.environ["MERIT_MODEL"]
    local = next((str(path) for path in DEFAULT_MODELS if (path / "config.json").is_file()), None)
    if local is None:
        raise SystemExit(
            f"No model: set MERIT_MODEL to a MERIT checkpoint folder or Hub id (the Space uses {SPACE_MODEL}), or run "
            f"the quick-start (python -m merit_hf.quickstart) to write {DEFAULT_MODELS[0]}."
        )
    return local


def load_models(model_path: str, report_model_path: str | None = None) -> DemoModels:
    """The two-tower model (zero-shot, embeddings) and, if given, the report model (CPU), in eval mode, with the class
    embeddings of the zero-shot menu. The two-tower model runs on a GPU when torch sees one (a local run with a CUDA
    build of torch); the Space's requirements.txt installs the CPU build, so the Space runs on its CPU. Loaded with
    merit_hf's own classes: the Python files a checkpoint carries (its remote code) are never run. The ECG tower runs
    in `precision="auto"` (`merit_hf.models.merit.inference_precision`): bf16 weights on a GPU, the fastest accurate
    path on a CPU."""
    from merit_hf import MeritModel, MeritProcessor

    model = MeritModel.from_pretrained(model_path).eval()
    if torch.cuda.is_available():
        model = model.to("cuda")
    processor = MeritProcessor.from_pretrained(model_path)
    ecg_config = model.config.ecg_config
    warning = None
    if ecg_config.hidden_size < RELEASE_HIDDEN_SIZE:
        warning = (
            f"This model is small (hidden size {ecg_config.hidden_size}, {ecg_config.num_hidden_layers} layers), "
            "a test or quick-start model with random or barely trained weights: **its scores, neighbours and "
            "reports are meaningless**. They only show that the pipeline runs."
        )
    demo_settings(processor.feature_extractor)
    models = DemoModels(
        model=model,
        processor=processor,
        name=str(model_path),
        warning=warning,
        class_embeddings=menu_class_embeddings(model, processor),
    )
    if report_model_path:
        models.report_model, models.report_processor = load_report_model(report_model_path)
        demo_settings(models.report_processor.feature_extractor)
        models.report_status = f"Report model: `{report_model_path}` (greedy decoding, {MAX_NEW_TOKENS} new tokens)."
    return models


def demo_settings(feature_extractor) -> None:
    """The demo's settings on the model's own feature extractor, whatever the folder saved: the central window, one
    per record (`crop="center"`, which `zero_shot_classify` also forces; `window="single"`: the example index and the
    plot have one window per record); limb leads derived from two of I, II, III, and the leads still missing left out
    of the model (`lead_mask`). A 12-lead record is processed exactly as before."""
    feature_extractor.crop = "center"
    feature_extractor.window = "single"
    feature_extractor.derive_limb_leads = True
    feature_extractor.missing_leads = "mask"
    feature_extractor._validate_settings()


def menu_class_embeddings(model, processor) -> dict[str, torch.Tensor]:
    """The class embeddings of each label set of the menu, as `zero_shot_classify` computes them (the shipped PTB-XL
    prompts, the default template), once at start-up: the prompts never change, and the text tower would be most of
    each click's time (a BERT-base text tower takes 0.2-0.8 s per label set on 2 vCPUs, one ECG 0.06 s). Read-only
    afterwards, so concurrent clicks share it."""
    return {
        label_set: encode_class_prompts(
            model,
            processor.tokenizer,
            class_prompts(list(load_class_descriptions(label_set)), class_descriptions=label_set),
            max_length=processor.max_length,
        )
        for label_set in ZERO_SHOT_MENU
    }


def load_report_model(path: str):
    """`(model, processor)` from a report model folder (`save_pretrained`) or a LoRA adapter folder."""
    from merit_hf import MeritForReportGeneration, MeritProcessor

    if (Path(path) / "adapter_config.json").is_file():  # a LoRA adapter folder from merit_hf.training.report_lora
        from merit_hf.training.report_lora import load_report_adapter

        return load_report_adapter(path)
    return MeritForReportGeneration.from_pretrained(path).eval(), MeritProcessor.from_pretrained(path)


# ----------------------------------------------------------------------------------------------------------------------
# Input: uploads are copied into a private folder and checked before any signal is read
# ----------------------------------------------------------------------------------------------------------------------


def _upload_path(item) -> Path:
    return Path(item if isinstance(item, (str, os.PathLike)) else getattr(item, "path", None) or item.name)


def stage_upload(files: list, workdir: Path) -> Path:
    """Copy the uploaded `.hea` + `.dat` into `workdir`; returns the record path (without extension). Only these
    copies are ever read.

    Extensions are matched in any case (`.HEA`, `.Dat`): the header is copied as `<stem>.hea`, which is what wfdb
    opens, and each signal file under the name the header gives it (its signal lines name their data file, e.g.
    `00001_lr.dat` while the upload is `00001_lr.DAT`)."""
    paths = [_upload_path(item) for item in files]
    total = sum(path.stat().st_size for path in paths)
    if total > MAX_UPLOAD_BYTES:
        raise DemoInputError(f"The upload is {total / 2**20:.1f} MB; the demo takes records up to 5 MB.")
    names = {path: upload_name(path) for path in paths}
    headers = sorted((p for p in paths if p.suffix.lower() == ".hea"), key=lambda p: names[p])
    if len(headers) != 1:
        found = ", ".join(p.name for p in headers) if headers else "none"
        raise DemoInputError(f"Upload exactly one WFDB header (.hea) with its .dat file; headers found: {found}.")
    record = workdir / Path(names[headers[0]]).stem
    shutil.copyfile(headers[0], record.with_suffix(".hea"))
    named_in_header = {name.lower(): name for name in _signal_file_names(record.with_suffix(".hea"))}
    for path in paths:
        if path.suffix.lower() == ".dat":
            shutil.copyfile(path, workdir / named_in_header.get(names[path].lower(), names[path]))
    return record


def upload_name(path: Path) -> str:
    """The name an uploaded file is read under: its own, or for a browser's renamed second download (`rec (1).dat`,
    `rec (1).hea`) the original `rec.dat`. Raises `DemoInputError` for anything that is not a WFDB file name."""
    name = path.name
    copy = BROWSER_COPY.match(name)
    if copy:
        name = copy["stem"] + copy["suffix"]
    if Path(name).suffix.lower() not in (".hea", ".dat"):
        raise DemoInputError(
            f"'{path.name}' is not part of a WFDB record: upload the header (.hea) and signal (.dat) files only."
        )
    if not SAFE_NAME.match(name):
        raise DemoInputError(
            f"'{path.name}': a WFDB record's files may only have ASCII letters, digits, '_', '-' and '.' in their "
            "names (wfdb cannot read others); rename the files, and the names inside the .hea, and upload again."
        )
    return name


def check_record(record: Path) -> dict:
    """Read the header only and apply the demo's policy; raises `DemoInputError` with a readable message."""
    header_path = record.with_suffix(".hea")
    for name in _signal_file_names(header_path):
        # wfdb's parser would reject a path with a message about syntax; say what is wrong instead.
        if Path(name).name != name or not SAFE_NAME.match(name):
            raise DemoInputError(
                f"'{header_path.name}' names the signal file '{name}', outside the upload; the demo only reads the "
                "files you upload."
            )
    try:
        header = read_wfdb_header(record)  # the reader's own check: the fields as written, no default substituted
    except EcgInputError as error:
        problem = str(error).replace(f"{record.parent}{os.sep}", "")
        raise DemoInputError(f"'{record.name}.hea' is not a readable WFDB header: {problem}") from error
    for name in sorted({line.file_name for line in header.signals}):
        if Path(name).name != name or not SAFE_NAME.match(name):
            raise DemoInputError(
                f"'{record.name}.hea' names the signal file '{name}', outside the upload; the demo only reads the "
                "files you upload."
            )
        if not (record.parent / name).is_file():
            raise DemoInputError(f"'{record.name}.hea' needs the signal file '{name}', which was not uploaded.")
    if len(header.signals) > MAX_LEADS:
        raise DemoInputError(
            f"'{record.name}' has {len(header.signals)} leads; the demo takes 1 to {MAX_LEADS} of the standard leads "
            "(I, II, III, aVR, aVL, aVF, V1-V6)."
        )
    if header.sampling_rate not in ACCEPTED_RATES:
        raise DemoInputError(
            f"'{record.name}' is sampled at {header.sampling_rate:g} Hz; the demo accepts "
            f"{', '.join(map(str, ACCEPTED_RATES))} Hz (the rates it was checked on)."
        )
    if header.num_samples is not None:
        check_duration(record, header.num_samples / header.sampling_rate)
    return {"sampling_rate": header.sampling_rate, "num_samples": header.num_samples}


def check_duration(record: Path, seconds: float) -> None:
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise DemoInputError(
            f"'{record.name}' lasts {seconds:.1f} s; the demo takes records of {MIN_SECONDS:g} to {MAX_SECONDS:g} s."
        )


def _signal_file_names(header_path: Path) -> list[str]:
    """First field of each signal line of a WFDB header (the signal file), read as text before any parsing. Only a
    binary file is refused here: `read_wfdb_header` judges the text (it reads UTF-8, e.g. a comment in German or a
    unit written µV)."""
    raw = header_path.read_bytes()[:65536]
    if b"\0" in raw:
        raise DemoInputError(f"'{header_path.name}' is not a WFDB header (a binary file, not text).")
    lines = raw.decode("utf-8", errors="replace").splitlines()
    lines = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [line.split()[0] for line in lines[1:]]


def read_record(record: Path) -> dict:
    checked = check_record(record)
    try:
        read = read_wfdb_record(record)
    except EcgInputError as error:  # the message names the record by its private path: keep only the file name
        raise DemoInputError(for_visitors(str(error).replace(f"{record.parent}{os.sep}", ""))) from error
    if checked["num_samples"] is None:  # a header without a length: the signal file's length is the record's
        check_duration(record, len(read["signal"]) / read["sampling_rate"])
    return read


def model_inputs(feature_extractor, record: Path) -> dict:
    """The feature extractor's output for the record, read from its path: the errors then name what an uploader can
    fix (the header's units and ADC gain), not the `units=` argument of a caller with arrays."""
    try:
        return feature_extractor(str(record), return_tensors="pt")
    except EcgInputError as error:  # named by its private path: keep only the record's name
        problem = str(error).replace(f"{record}:", f"'{record.name}':").replace(f"{record.parent}{os.sep}", "")
        raise DemoInputError(for_visitors(problem)) from error


def signal_in_mv(record: dict) -> np.ndarray:
    """`read_wfdb_record`'s signal in mV, converted with the feature extractor's unit table (no unit: mV)."""
    return record["signal"] * np.array([UNIT_TO_MV.get(str(unit).strip().lower(), 1.0) for unit in record["units"]])


def leads_text(count: int) -> str:
    return f"{count} lead{'' if count == 1 else 's'}"


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


def plot_ecg(
    signal_mv: np.ndarray, sampling_rate: float, lead_names: list[str], title: str, start_s: float = 0.0
) -> Figure:
    """The leads of `signal_mv` `(num_samples, num_leads)`, whose first sample is at `start_s` seconds of the record,
    on ECG paper (fine lines every 0.04 s and 0.1 mV, bold every 0.2 s and 0.5 mV, as 25 mm/s and 10 mm/mV paper),
    limb leads left and chest leads right in their standard places (a reduced-lead record leaves the others blank),
    at most +-`PLOT_LIMIT_MV`. A figure of matplotlib's object API, not pyplot: the queue draws two at once in worker
    threads, and pyplot's global figure list is not thread-safe (nor closed when a later step fails)."""
    samples = len(signal_mv)
    seconds = samples / sampling_rate
    time = start_s + np.arange(samples) / sampling_rate
    end_s = start_s + seconds
    rows, columns = 6, 2
    figure = Figure(figsize=(16, 9.5))
    axes = figure.subplots(rows, columns, sharex=True, squeeze=False)
    low = float(np.clip(np.floor(signal_mv.min() * 2) / 2, -PLOT_LIMIT_MV, -1.5))
    high = float(np.clip(np.ceil(signal_mv.max() * 2) / 2, 1.5, PLOT_LIMIT_MV))
    # Grid lines as two line collections per axis: thousands of matplotlib ticks would take seconds to lay out.
    fine_x, bold_x = np.arange(start_s, end_s + 1e-9, 0.04), np.arange(start_s, end_s + 1e-9, 0.2)
    fine_y, bold_y = np.arange(low, high + 1e-9, 0.1), np.arange(low, high + 1e-9, 0.5)
    # each lead in its standard place (I-aVF left, V1-V6 right), whatever order the record stores them in
    standard = {name.lower(): slot for slot, name in enumerate(STANDARD_LEAD_NAMES)}
    slots = [standard.get(name.lower(), index) for index, name in enumerate(lead_names)]
    if len(set(slots)) < len(slots) or max(slots, default=0) >= rows * columns:
        slots = list(range(len(lead_names)))  # not the standard leads: as recorded
    for index, slot in enumerate(slots):
        axes[slot % rows, slot // rows].plot(time, signal_mv[:, index], color="black", linewidth=0.7)
        axes[slot % rows, slot // rows].text(
            start_s + 0.05, high - 0.15, lead_names[index], fontsize=10, fontweight="bold", va="top"
        )
    for index in range(rows * columns):
        axis = axes[index % rows, index // rows]
        axis.vlines(fine_x, low, high, colors=GRID_FINE, linewidth=0.3)
        axis.hlines(fine_y, start_s, end_s, colors=GRID_FINE, linewidth=0.3)
        axis.vlines(bold_x, low, high, colors=GRID_BOLD, linewidth=0.6)
        axis.hlines(bold_y, start_s, end_s, colors=GRID_BOLD, linewidth=0.6)
        axis.set_xlim(start_s, end_s)
        axis.set_ylim(low, high)
        axis.set_facecolor("#fff7f7")
        axis.set_yticks([])
        axis.set_xticks(np.arange(np.ceil(start_s), end_s + 1e-9, 1.0))
        axis.tick_params(length=0, labelbottom=index % rows == rows - 1)
    for axis in axes[-1]:
        axis.set_xlabel("time (s); grid: 0.04 s and 0.1 mV (fine), 0.2 s and 0.5 mV (bold)")
    figure.suptitle(title, fontsize=12)
    figure.subplots_adjust(left=0.02, right=0.99, bottom=0.07, top=0.94, wspace=0.04, hspace=0.12)
    return figure


def zero_shot_table(models: DemoModels, ecg_embedding: torch.Tensor, label_set: str) -> list[list]:
    """The classes of `label_set`, best first: the cosine similarity of the ECG embedding `(1, projection_dim)`
    (`encode_ecgs`) to each class, as `zero_shot_classify` scores it (`multi_label=True`)."""
    descriptions = load_class_descriptions(label_set)
    labels = list(descriptions)
    scores = similarity_scores(models.model, ecg_embedding, models.class_embeddings[label_set])[0]
    order = np.argsort(-scores, kind="stable")
    return [[labels[i], descriptions[labels[i]][0], round(float(scores[i]), 4)] for i in order]


def example_catalogue() -> list[dict]:
    return json.loads((EXAMPLES_DIR / "examples.json").read_text(encoding="utf-8"))


def example_choices() -> list[tuple[str, str]]:
    return [
        (f"PTB-XL {item['ecg_id']}: {item['superclass']}, {_codes_text(item)}", item["record"])
        for item in example_catalogue()
    ]


def _codes_text(item: dict) -> str:
    return "; ".join(code["description"] for code in item["scp_codes"].values())


class ExampleIndex:
    """Embeddings of the bundled examples (computed once per model), for nearest-neighbour search."""

    def __init__(self, models: DemoModels):
        self.items = example_catalogue()
        feature_extractor = models.processor.feature_extractor
        ecg_values = feature_extractor(
            [str(EXAMPLES_DIR / item["record"]) for item in self.items], return_tensors="pt"
        )
        self.embeddings = encode_ecgs(models.model, ecg_values["ecg_values"])

    def nearest(self, query: torch.Tensor, count: int = 3) -> list[list]:
        """The `count` examples nearest to the ECG embedding `query` `(1, projection_dim)` (`encode_ecgs`)."""
        similarity = (query @ self.embeddings.T)[0].cpu().numpy()
        order = np.argsort(-similarity, kind="stable")[:count]
        return [
            [
                f"PTB-XL {self.items[i]['ecg_id']}",
                self.items[i]["superclass"],
                _codes_text(self.items[i]),
                round(float(similarity[i]), 4),
            ]
            for i in order
        ]


def generate_report(models: DemoModels, signal: np.ndarray, record: dict) -> str:
    if models.report_model is None:
        return models.report_status
    processor = models.report_processor
    inputs = processor(
        ecgs=signal,
        text=[processor.format_prompt()],
        sampling_rate=record["sampling_rate"],
        lead_names=record["lead_names"],
        units=record["units"],
        return_tensors="pt",
    )
    with torch.no_grad():
        generated = models.report_model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]  # generate() returns the prompt, then the report
    return processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()


# ----------------------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------------------


def _select_record(index: ExampleIndex, files: list | None, example: str | None, workdir: Path) -> Path:
    """The uploaded record (staged into `workdir`), else the chosen bundled example."""
    if files:
        return stage_upload(files, workdir)
    if example:
        if example not in {item["record"] for item in index.items}:
            raise DemoInputError(f"Unknown example '{example}'.")
        return EXAMPLES_DIR / example
    raise DemoInputError("Upload a WFDB record (.hea + .dat) or pick a bundled example first.")


def analyse(models: DemoModels, index: ExampleIndex, files: list | None, example: str | None, label_set: str):
    """Everything the page shows for one record. Raises `DemoInputError` / `EcgInputError` for bad input."""
    feature_extractor = models.processor.feature_extractor
    with tempfile.TemporaryDirectory(prefix="merit_demo_upload_") as workdir:
        try:
            path = _select_record(index, files, example, Path(workdir))
            record = read_record(path)
            features = model_inputs(feature_extractor, path)
        except OSError as error:  # a file gone or unreadable: name it, never the private folder it was copied to
            name = Path(error.filename).name if error.filename else "the record"
            raise DemoInputError(
                f"'{name}' could not be read ({error.strerror or type(error).__name__}); upload the record's .hea "
                "and .dat files again."
            ) from error
    name = Path(record["record"]).name
    rate = record["sampling_rate"]
    seconds = len(record["signal"]) / rate
    model_rate = feature_extractor.sampling_rate
    window = feature_extractor.num_samples / model_rate
    # the model's window (`crop="center"`) in the record's time; a record is at least one window long
    start = max(0.0, (seconds - window) / 2)
    shown = signal_in_mv(record)[round(start * rate) : round((start + window) * rate)]
    clipped = [lead for lead, peak in zip(record["lead_names"], np.abs(shown).max(axis=0)) if peak > PLOT_LIMIT_MV]
    clip_note = f"; clipped at ±{PLOT_LIMIT_MV:g} mV: {', '.join(clipped)}" if clipped else ""
    described = f"{leads_text(len(record['lead_names']))}, {rate:g} Hz, {seconds:.1f} s"
    figure = plot_ecg(
        shown,
        rate,
        record["lead_names"],
        f"{name}: {described}; the model's window, {start:.1f}-{start + window:.1f} s{clip_note}",
        start_s=start,
    )
    resampled = f"Resampled {rate:g} Hz -> {model_rate} Hz; the" if rate != model_rate else "The"
    ecg_values, lead_mask = features["ecg_values"], features.get("lead_mask")
    status = (
        f"Record `{name}`: {described}. {resampled} model reads the central {window:g} s "
        f"({start:.1f}-{start + window:.1f} s), which the plot shows."
        + (f" Leads beyond ±{PLOT_LIMIT_MV:g} mV are clipped on the plot: {', '.join(clipped)}." if clipped else "")
        + lead_status(feature_extractor.lead_names, record["lead_names"], lead_mask)
    )
    embedding = encode_ecgs(models.model, ecg_values, lead_mask=lead_mask)  # once, for the scores and neighbours
    scores = zero_shot_table(models, embedding, label_set)
    neighbours = index.nearest(embedding)
    report = generate_report(models, record["signal"], record)
    return figure, scores, neighbours, report, status


def lead_status(model_leads: list[str], recorded: list[str], lead_mask: torch.Tensor | None) -> str:
    """What the model made of a record with fewer leads: the limb leads derived, and the leads left out."""
    present = [True] * len(model_leads) if lead_mask is None else lead_mask[0].tolist()
    recorded = {str(lead).strip().lower() for lead in recorded}
    derived = [lead for lead, used in zip(model_leads, present) if used and lead.lower() not in recorded]
    missing = [lead for lead, used in zip(model_leads, present) if not used]
    text = f" Derived from the recorded limb leads: {', '.join(derived)}." if derived else ""
    if missing:
        text += f" Not recorded, left out of the model: {', '.join(missing)}."
    return text


def create_demo(models: DemoModels) -> gr.Blocks:
    index = ExampleIndex(models)
    # The page opens on the first bundled example, computed now, so a visitor sees a result before doing anything.
    first = index.items[0]["record"]
    figure, first_scores, first_neighbours, first_report, first_status = analyse(
        models, index, None, first, "superclass"
    )

    def run(files, example, label_set):
        try:
            figure, scores, neighbours, report, status = analyse(models, index, files, example, label_set)
        except (DemoInputError, EcgInputError) as error:
            raise gr.Error(str(error), print_exception=False) from None
        return figure, scores, neighbours, report, status

    with gr.Blocks(title="MERIT ECG demo", delete_cache=UPLOAD_CACHE_SECONDS) as demo:
        gr.Markdown("# MERIT: 12-lead ECG embeddings, zero-shot scores and reports")
        gr.Markdown(DISCLAIMER)
        gr.Markdown(f"Model: `{models.name}`. {models.report_status}")
        if models.warning:
            gr.Markdown(f"⚠️ {models.warning}", elem_id="model-warning")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="WFDB record (.hea + .dat)", file_count="multiple", file_types=[".hea", ".dat"])
                example = gr.Dropdown(
                    choices=example_choices(),
                    value=first,
                    label="...or a bundled PTB-XL record (CC BY 4.0); an upload takes precedence",
                )
                label_set = gr.Dropdown(choices=list(ZERO_SHOT_MENU), value="superclass", label="Zero-shot classes")
                button = gr.Button("Analyse", variant="primary")
                gr.Markdown(INPUT_POLICY)
                status = gr.Markdown(first_status)
            with gr.Column(scale=3):
                plot = gr.Plot(figure, label="ECG: the window the model reads", elem_id="ecg-plot")
        with gr.Row():
            scores = gr.Dataframe(
                first_scores,
                headers=["class", "description", "score (cosine)"],
                label="Zero-shot scores",
                interactive=False,
            )
            neighbours = gr.Dataframe(
                first_neighbours,
                headers=["example", "class", "PTB-XL statements", "similarity"],
                label="Nearest bundled examples (embedding cosine similarity)",
                interactive=False,
            )
        report = gr.Textbox(
            first_report, label="Generated report (unreviewed machine text)", lines=4, interactive=False
        )
        button.click(
            run,
            inputs=[files, example, label_set],
            outputs=[plot, scores, neighbours, report, status],
            api_name="analyse",
        )
    return demo


def main() -> None:
    models = load_models(default_model_path(), os.environ.get("MERIT_REPORT_MODEL") or None)
    demo = create_demo(models)
    demo.queue(default_concurrency_limit=2).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        share=False,
        show_error=True,
        max_file_size=MAX_UPLOAD_BYTES,
    )


if __name__ == "__main__":
    main()
