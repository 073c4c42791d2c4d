"""Share MERIT checkpoints and converted datasets on the Hugging Face Hub.

`push_model` and `push_dataset` check that a folder is Hub-ready, optionally render its card from an evaluation
results JSON ([`merit_hf.hub.cards`]), then upload it with `HfApi.upload_folder` (Xet or Git-LFS, whichever the client
picks), to a branch, a pull request, and/or a tag.

Command line:

```bash
python -m merit_hf.hub push quickstart_output/model org/merit-ecg --results results.json --tag v0.1 \
    --dataset org/ptbxl-merit --license apache-2.0
python -m merit_hf.hub push report_adapter org/merit-report-lora --results results.json --base-model org/merit-report
python -m merit_hf.hub push quickstart_output/model org/merit-ecg --create-pr --message "Retrained on fold 1-8"
python -m merit_hf.hub push converted/ptbxl org/ptbxl-merit --repo-type dataset
```

Then, for anyone (merit_hf not needed, the model code travels with the checkpoint):
`AutoModel.from_pretrained("org/merit-ecg", trust_remote_code=True)`. Offline, load the folder itself by path (the
same call with the folder in place of the repo id), or copy a Hugging Face cache filled by `hf download org/merit-ecg`
on a connected machine and set `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

# Pickles (they can run code when loaded) by name: PyTorch's and Lightning's, joblib's (scikit-learn models and scalers),
# the `.pth.tar` of older PyTorch code; also compressed (`scaler.joblib.gz`). Other names are found by content
# ([`pickle_reason`]).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".pth.tar", ".pt.tar", ".ckpt.tar")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
# `PROTO` (0x80) and a protocol from 2 (Python 2.3) to 5: the first two bytes of every pickle written since.
PICKLE_PROTOCOLS = range(2, 6)
# Never uploaded (fnmatch on the path relative to the folder; `*` also matches `/`): hidden files, Python caches, and
# training-run outputs holding optimizer states and pickles: `checkpoints/checkpoint_<step>/` and TensorBoard `runs/`
# (merit_hf.training.pretrain's output_dir), `checkpoint-<step>/` (the Trainer's); and the Trainer's run records beside
# the model, `training_args.bin` (a pickle of TrainingArguments, not weights) and `trainer_state.json`.
DEFAULT_IGNORE_PATTERNS = [
    ".*",
    "**/.*",
    "__pycache__/*",
    "**/__pycache__/*",
    "*.pyc",
    "checkpoints/*",
    "checkpoint-*/*",
    "runs/*",
    "training_args.bin",
    "**/training_args.bin",
    "trainer_state.json",
    "**/trainer_state.json",
]
DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".csv")
# Weights and data, never read by the leak checks (they are not text).
LARGE_FILE_SUFFIXES = (".safetensors", ".parquet", ".arrow", ".npy", ".npz", ".h5", ".dat")
# A Hugging Face access token (`hf_` and 30-odd letters and digits), e.g. pasted into notes or printed in a log.
HUB_TOKEN = re.compile(r"hf_[A-Za-z0-9]{30,}")
# An absolute local path in a Markdown card: `/a/b` (not inside a URL or after a word: `mm/mV`; after a colon it is
# one, as in PEFT's tag `base_model:adapter:/home/me/base`; also as a `file://` URL), `~/a`, `C:\a`.
LOCAL_PATH_IN_TEXT = re.compile(r"(?:file://|(?<![\w/.~-]))(?:/|~/)(?:[\w.+-]+/)+[\w.+-]+|\b[A-Za-z]:\\[^\s`'\")]+")
# Roots under which a path is a user's or a machine's own folder, whatever the text around it: outside Markdown cards
# (code, configs, logs, JSON values) only paths under these are taken as leaks, so that a shebang (`#!/usr/bin/env`),
# an API route (`/v1/chat/completions`) or an example in a comment passes.
USER_ROOTS = ("home", "Users", "root", "tmp", "mnt", "media", "data", "scratch", "work", "opt", "var", "srv")
USER_PATH_IN_TEXT = re.compile(
    rf"(?:file://|(?<![\w/.~-]))/(?:{'|'.join(USER_ROOTS)})/[\w.+-][^\s`'\"<>|,;)\]}}]*"
    r"|(?<![\w/.~-])~/[\w.+-][^\s`'\"<>|,;)\]}]*|\b[A-Za-z]:\\[^\s`'\")]+"
)
# Paths of the operating system, the same on every machine (the remote code reads `/proc/cpuinfo`, scripts start with
# `#!/usr/bin/env`): no leak.
SYSTEM_PATHS = ("/proc/", "/dev/", "/sys/", "/usr/", "/bin/", "/etc/")
# JSON keys whose value names a file or folder: a value of theirs that is an absolute path is a leak wherever it lies.
PATH_KEY = re.compile(r"(?:^|_)(?:name_or_path|path|paths|dir|directory|file|files|root|folder|cache)$")
# Tokenizer vocabularies and merges: their entries are pieces of text (`/s`, `/ >`), never paths, and are not searched
# for paths (only for tokens).
TOKENIZER_DATA_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "merges.txt", "vocab.bpe", ".model", ".tiktoken")
TEXT_SCAN_LIMIT = 64 * 2**20  # bytes; larger pushed files are data (weights, shards) and are not read
# A pushed file above this size that is neither weights nor a tokenizer (a model folder) or data (a dataset folder) is
# refused as an accidental upload: saved embeddings or predictions (`val_embeddings.npy`), a copied dataset, a video.
LARGE_FILE_LIMIT = 10 * 2**20  # bytes
# What a model folder holds above that size: weights and their index, and tokenizers (a Llama or Gemma
# `tokenizer.json` is 9-33 MB; SentencePiece models are `*.model`, tiktoken's `*.tiktoken`).
MODEL_LARGE_FILES = (
    ".safetensors",
    ".safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "vocab.bpe",
    "merges.txt",
    ".model",
    ".tiktoken",
)
# The sentence of PEFT's own card (huggingface_hub's template, which `save_pretrained` writes beside an adapter):
# [`peft_template_card`] recognises that card when nobody edited it.
PEFT_FRAMEWORK_HEADING = "### Framework versions"

logger = logging.getLogger(__name__)


class HubFolderError(ValueError):
    """A folder that would not load after a push. The message names the folder and every problem found."""


class HubPushError(ValueError):
    """A push refused before anything was uploaded (contradictory arguments, a tag that exists, a card that would be
    overwritten), or a step that failed after its commit was made; the message names the repo, and the commit when one
    was made (`commit_oid`, else `None`)."""

    def __init__(self, message: str, commit_oid: str | None = None):
        super().__init__(message)
        self.commit_oid = commit_oid


@dataclass
class PushResult:
    repo_id: str
    repo_type: str
    revision: str
    commit_oid: str
    commit_url: str
    pr_url: str | None = None
    tag: str | None = None
    changed: bool = True  # False: the branch already held exactly these files; no commit, no pull request


# ----------------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------------


MISSING_MODEL_CARD = (
    "README.md (the model card) is missing: push with --results <evaluation JSON> (results= in push_model) to render "
    "it, or render one with merit_hf.hub.cards"
)


def check_model_folder(
    folder: str | os.PathLike, ignore_patterns: list[str] | None = None, *, weights_digest: str | None = None
) -> list[str]:
    """Problems that would stop `from_pretrained(repo, trust_remote_code=True)` after a push; `[]` when none.

    Checks: `config.json` exists; its `auto_map` names code files that are present (users without merit_hf get the
    code from the repo); no file that the push would upload, in any subfolder, is a pickle (they can execute code and
    are refused by merit_hf; [`pickle_problems`]); a PEFT adapter (`adapter_config.json`) comes with its
    `adapter_model.safetensors`; the feature extractor (`preprocessor_config.json`, or a processor's
    `processor_config.json` that holds it) is there, since without it users cannot reproduce the input contract; a
    model card `README.md` exists, its metadata parse with huggingface_hub ([`merit_hf.hub.cards.model_card_problems`]:
    a `license` is a Hub licence identifier, a `model-index` with results parses; `library_name`, `tags` and
    `pipeline_tag` are not required, as the Hub does not require them, and a missing `license` is only logged), and it
    fits the folder ([`card_folder_problems`]: the kind of folder
    and the weights a merit_hf card was rendered for, and the `base_model` of an adapter or report model); no file
    larger than `LARGE_FILE_LIMIT` that is neither weights nor a tokenizer ([`large_file_problems`]); nothing leaks
    ([`leak_problems`]). A `Trainer` output folder passes: its `training_args.bin` and `trainer_state.json` are never
    uploaded (`DEFAULT_IGNORE_PATTERNS`). `ignore_patterns` as in [`push_folder`]. `weights_digest`: the folder's
    [`merit_hf.hub.cards.folder_weights_digest`] when the caller has it already (as [`card_folder_problems`] takes it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    config_path = folder / "config.json"
    adapter_only = (folder / "adapter_config.json").is_file() and not config_path.is_file()
    if not config_path.is_file() and not adapter_only:
        problems.append("config.json is missing (write the folder with save_pretrained)")
    elif config_path.is_file():
        config = json.loads(config_path.read_text())
        references = [entry for value in (config.get("auto_map") or {}).values() for entry in _as_list(value) if entry]
        if not references:
            problems.append("config.json has no auto_map: users without merit_hf could not load it")
        for reference in references:
            module = reference.split("--")[-1].rsplit(".", 1)[0]
            if not (folder / f"{module}.py").is_file():
                problems.append(f"auto_map names {reference} but {module}.py is missing")
    problems += pickle_problems(folder, ignore_patterns)
    if (folder / "adapter_config.json").is_file() and not (folder / "adapter_model.safetensors").is_file():
        problems.append("adapter_config.json without adapter_model.safetensors")
    problems += adapter_base_problems(folder)
    if not adapter_only and not any(folder.glob("*.safetensors")):
        problems.append("no *.safetensors weights")
    if not adapter_only and not _has_feature_extractor(folder):
        problems.append(
            "preprocessor_config.json is missing: save the feature extractor with the model "
            "(Trainer(..., processing_class=feature_extractor) or feature_extractor.save_pretrained(folder))"
        )
    if not (folder / "README.md").is_file():
        problems.append(MISSING_MODEL_CARD)
    else:
        from .cards import model_card_problems

        problems += [f"README.md: {problem}" for problem in model_card_problems(folder / "README.md")]
        problems += card_folder_problems(folder, weights_digest=weights_digest)
    problems += large_file_problems(folder, MODEL_LARGE_FILES, "weights (*.safetensors) nor a tokenizer file",
                                    ignore_patterns)  # fmt: skip
    return problems + leak_problems(folder, ignore_patterns)


def card_folder_problems(folder: str | os.PathLike, *, weights_digest: str | None = None) -> list[str]:
    """A model card `README.md` that does not fit its folder: a card rendered by merit_hf for another kind of folder
    (its hidden `merit_hf card` line, [`merit_hf.hub.cards.card_marker`], against
    [`merit_hf.hub.cards.folder_kind`]: a two-tower card's code fails on a report adapter; a card rendered without a
    folder records no kind and is not compared) or for other tensors (its numbers are of other weights; compared by
    tensor content, [`merit_hf.hub.cards.folder_weights_digest`], so re-sharding the same weights passes); and, whoever wrote the card, a PEFT adapter or report model whose card has no
    `base_model` (the Hub links a model to what it was built on through it). `weights_digest`: the folder's
    [`merit_hf.hub.cards.folder_weights_digest`] when the caller has it already (`push_model`: the card it has just
    rendered for this folder records it), so that the weights are not read again; `None` computes it when needed."""

    from .cards import ADAPTER_KINDS, card_marker, folder_kind, folder_weights_digest

    folder = Path(folder)
    text = (folder / "README.md").read_text(encoding="utf-8")
    kind = folder_kind(folder)
    problems = []
    marker = card_marker(text)
    render = (
        "render it again for this folder (python -m merit_hf.hub push <folder> <repo> --results <results JSON> "
        "--overwrite-card, or python -m merit_hf.hub.cards model ... --model-folder <folder>)"
    )
    if marker is not None and marker[0] is not None and marker[0] != kind:
        problems.append(
            f"README.md is the card of {_a(marker[0])} folder, but this folder holds {_a(kind)} (its code and "
            f"metadata would not work for this folder): {render}"
        )
    elif (
        marker is not None
        and marker[1] is not None
        and marker[1] != (digest := weights_digest or folder_weights_digest(folder))
    ):
        problems.append(
            f"README.md was rendered for other weights (tensors {marker[1]}; this folder's tensors are {digest}): its "
            f"numbers are not of these weights: {render}"
        )
    metadata = card_metadata(text) or {}  # metadata that does not parse: model_card_problems names the error
    if (kind in ADAPTER_KINDS or kind in ("adapter", "report")) and not (
        isinstance(metadata, dict) and metadata.get("base_model")
    ):
        problems.append(
            f"README.md has no base_model, and this folder is a {kind}: name the model it was built on (for an "
            "adapter, the Hub id in adapter_config.json's base_model_name_or_path; push with --base-model)"
        )
    return problems


def large_file_problems(
    folder: str | os.PathLike, allowed: tuple[str, ...], allowed_text: str, ignore_patterns: list[str] | None = None
) -> list[str]:
    """The pushed files larger than `LARGE_FILE_LIMIT` whose names do not end with one of `allowed`: an accidental
    upload (saved embeddings, predictions, a copy of the data), named with its size. Move it out of the folder, or leave
    it out with `ignore_patterns` (`--ignore` on the command line)."""
    folder = Path(folder)
    problems = []
    for name in pushed_files(folder, ignore_patterns):
        size = (folder / name).stat().st_size
        if size > LARGE_FILE_LIMIT and not name.lower().endswith(allowed):
            problems.append(
                f"{name} is {size / 2**20:.1f} MiB and neither {allowed_text} (larger than "
                f"{LARGE_FILE_LIMIT // 2**20} MiB): move it out of the folder, or leave it out with --ignore {name!r} "
                "(ignore_patterns in Python)"
            )
    return problems


def adapter_base_problems(folder: str | os.PathLike) -> list[str]:
    """A PEFT adapter whose base model is named by a local folder (`adapter_config.json`'s `base_model_name_or_path`,
    or the card's `base_model`): `quickstart_output/model` reads as a Hub id, so the pushed adapter would load that
    repo's weights, or a folder of that name in the user's working directory, as its base, without a word. An
    absolute path is refused by [`leak_problems`] as any local path is."""

    from .cards import adapter_config

    folder = Path(folder)
    names = []
    if (config := adapter_config(folder)) is not None:
        names.append(("adapter_config.json's base_model_name_or_path", config.get("base_model_name_or_path")))
    card = folder / "README.md"
    if card.is_file() and (metadata := card_metadata(card.read_text(encoding="utf-8"))):
        bases = metadata.get("base_model")
        names += [("the card's base_model", base) for base in _as_list(bases) if isinstance(base, str)]
    problems = []
    for where, name in names:
        if not name or os.path.isabs(name):
            continue
        if name.startswith(("./", "../", "~")) or (Path.cwd() / name).exists() or (folder.parent / name).exists():
            problems.append(
                f"{where} is the local folder {name!r}: on the Hub it would name a repo of that id (or a user's own "
                "folder of that name) as the adapter's base. Push the base model first and write its Hub id there "
                "(peft: config = PeftConfig.from_pretrained(folder); config.base_model_name_or_path = 'org/name'; "
                "config.save_pretrained(folder); and the card's base_model)"
            )
    return problems


def pickle_problems(folder: str | os.PathLike, ignore_patterns: list[str] | None = None) -> list[str]:
    """The pickles a push would upload: by name (`PICKLE_SUFFIXES`: `.pt`, `.bin`, `.joblib`, `.pth.tar`, ...), then,
    one problem per file, under any other name by content ([`pickle_reason`]). Pickles can run code when loaded,
    and merit_hf loads safetensors only."""
    folder = Path(folder)
    named, other = [], []
    for name in pushed_files(folder, ignore_patterns):
        lower = name.lower()
        for suffix in COMPRESSION_SUFFIXES:
            lower = lower.removesuffix(suffix)
        if lower.endswith(PICKLE_SUFFIXES):
            named.append(name)
        elif reason := pickle_reason(folder / name):
            other.append(
                f"{name} is a pickle ({reason}), which can run code when loaded: save weights with save_pretrained "
                "(safetensors) and other objects as JSON"
            )
    if named:
        other.insert(0, f"pickled weights {named} (merit_hf loads safetensors only; re-save with save_pretrained)")
    return other


def pickle_reason(path: str | os.PathLike) -> str | None:
    """Why the file at `path` is a pickle whatever its name, or `None`. Reads only its first bytes, for a zip its
    directory (and its `.npy` members' headers), for a tar its member headers, and the whole of a file up to
    `TEXT_SCAN_LIMIT` that ends as a pickle ends: it starts with a pickle's `PROTO` header (protocol 2 to 5; a
    safetensors file, whose first 8 bytes are its header's length, is told apart by the `{` that follows them); it is
    a NumPy `.npy` array of Python objects (stored as a pickle), or a zip holding one (`.npz`) or a `.pkl`
    (`torch.save`'s format: `archive/data.pkl`); a tar holding a member named as a pickle or `pickle` (PyTorch's
    legacy `torch.save` format); or it parses, to its last byte, as a pickle of protocol 0 or 1, which have no
    header (`pickle_without_header`)."""
    import tarfile
    import zipfile

    with open(path, "rb") as stream:
        head = stream.read(512)
    if len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS and head[8:9] != b"{":
        return f"it starts with a pickle header, protocol {head[1]}"
    if head.startswith(NPY_MAGIC):
        with open(path, "rb") as stream:
            return "a NumPy array of Python objects, stored as a pickle" if npy_holds_objects(stream) else None
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                inner = [member for member in archive.namelist() if member.lower().endswith((".pkl", ".pickle"))]
                if inner:
                    return f"a zip holding {inner[0]}, as torch.save writes"
                for member in archive.namelist():
                    if member.lower().endswith(".npy"):
                        with archive.open(member) as stream:
                            if npy_holds_objects(stream):
                                return f"a zip holding {member}, a NumPy array of Python objects (a pickle)"
        except (zipfile.BadZipFile, ValueError):
            return None
        return None
    if head[257:262] == b"ustar":
        try:
            with tarfile.open(path, "r:") as archive:
                names = archive.getnames()
        except tarfile.TarError:
            return None
        inner = [m for m in names if m.lower().endswith(PICKLE_SUFFIXES) or Path(m).name == "pickle"]
        return f"a tar holding {inner[0]}" if inner else None
    return pickle_without_header(path)


NPY_MAGIC = b"\x93NUMPY"


def npy_holds_objects(stream) -> bool:
    """Whether the `.npy` array whose file starts at `stream` holds Python objects (dtype `O`, also inside a
    structured dtype): NumPy stores those as a pickle. Reads the header only."""
    import ast
    import struct

    import numpy as np

    try:
        magic = stream.read(8)  # b"\x93NUMPY", major and minor version
        size_format = "<H" if magic[6:7] == b"\x01" else "<I"  # versions 2 and 3 have a 4-byte header length
        (length,) = struct.unpack(size_format, stream.read(struct.calcsize(size_format)))
        header = ast.literal_eval(stream.read(min(length, 2**20)).decode("utf-8"))
        return bool(np.lib.format.descr_to_dtype(header["descr"]).hasobject)
    except (ValueError, TypeError, KeyError, SyntaxError, UnicodeDecodeError, struct.error, OSError):
        return False


def pickle_without_header(path: str | os.PathLike) -> str | None:
    """`"it is a pickle of protocol 0 or 1 (no header)"` when the file, at most `TEXT_SCAN_LIMIT` bytes, ends in
    `STOP` and `pickletools` parses it to its last byte with a consistent stack and memo (no text or data file
    does); nothing is unpickled. Small code-running pickles are usually written this way by hand."""
    import io
    import pickletools

    path = Path(path)
    if not 0 < path.stat().st_size <= TEXT_SCAN_LIMIT:
        return None
    with open(path, "rb") as stream:
        stream.seek(-1, os.SEEK_END)
        if stream.read(1) != b".":  # every pickle ends with STOP: most files are not read further
            return None
        stream.seek(0)
        data = stream.read()
    try:
        *_, (opcode, _, position) = pickletools.genops(data)
        if opcode.name != "STOP" or position != len(data) - 1:
            return None
        pickletools.dis(data, out=io.StringIO())  # checks the stack and memo that genops does not
    except Exception:  # any malformed input: not a pickle  # noqa: BLE001
        return None
    return "it is a pickle of protocol 0 or 1 (no header)"


def leak_problems(folder: str | os.PathLike, ignore_patterns: list[str] | None = None) -> list[str]:
    """What a push would publish by mistake, one problem per file: a Hugging Face token (`hf_` + 30 or more letters
    and digits) in any text file it uploads (notes, logs, configs, tokenizer files), and an absolute local path (it
    shows the author's folder layout, and nobody else can load from it) in a text file it uploads. The rule for paths:

    - a Markdown file (the card): any absolute path (`/a/b`, also as `file:///a/b`, `~/a`, `C:\\a`;
      [`LOCAL_PATH_IN_TEXT`]), except the operating system's own (`SYSTEM_PATHS`: `/proc/`, `/dev/`, `/sys/`, `/usr/`,
      `/bin/`, `/etc/`);
    - any other text file (`train_config.yaml`, `train.log`, `.txt`, `.cfg`, `.toml`, `.py`) and any JSON string value
      (anywhere inside the string: a `save_to_disk` `dataset_info.json` description naming its source): a path under a
      user's or machine's own root (`USER_ROOTS`: `/home/`, `/Users/`, `/root/`, `/tmp/`, `/mnt/`, `/media/`,
      `/data/`, `/scratch/`, `/work/`, `/opt/`, `/var/`, `/srv/`; `~/`, `C:\\`; also after `file://`;
      [`USER_PATH_IN_TEXT`]), so that shebangs, API routes and examples in comments pass;
    - a JSON value of a key that names a file or folder (`PATH_KEY`: `base_model_name_or_path`, `output_dir`,
      `cache_dir`, ...) that is itself an absolute path, under any root;
    - tokenizer vocabularies and merges (`TOKENIZER_DATA_FILES`: `tokenizer.json`, `vocab.json`, `merges.txt`,
      `*.model`, ...) are not searched for paths: their entries (`/s`, `/ >`) are text pieces.

    Binary and data files (`LARGE_FILE_SUFFIXES`, files with NUL bytes or above `TEXT_SCAN_LIMIT`) are not read."""
    folder = Path(folder)
    problems = []
    for name in pushed_files(folder, ignore_patterns):
        path = folder / name
        if name.endswith(LARGE_FILE_SUFFIXES) or path.stat().st_size > TEXT_SCAN_LIMIT:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        text = data.decode("utf-8", errors="replace")
        token = HUB_TOKEN.search(text)
        if token:
            line = text.count("\n", 0, token.start()) + 1
            problems.append(
                f"{name} holds a Hugging Face token (line {line}: {token[0][:7]}...): remove the file or the token "
                "before pushing, and revoke the token at https://huggingface.co/settings/tokens"
            )
        if name.rsplit("/", 1)[-1].lower().endswith(TOKENIZER_DATA_FILES):
            continue
        if name.endswith(".json"):
            try:
                paths = _local_paths_in_json(json.loads(text), "", anywhere=True)
            except json.JSONDecodeError:
                paths = []
            problems += [
                f"{name}: {key} is the local path {value!r} (nobody else can load from it): set it to a Hub id or ''"
                if value == whole
                else f"{name}: {key} names the local path {value!r}: remove it from the text"
                for key, value, whole in paths
            ]
        else:
            pattern = LOCAL_PATH_IN_TEXT if name.lower().endswith(".md") else USER_PATH_IN_TEXT
            found = sorted({path for path in pattern.findall(text) if not _system_path(path)})
            if found:
                problems.append(
                    f"{name} names local paths {found[:5]}: write file names or Hub ids instead, or leave the file "
                    "out of the push"
                )
    return problems


def _system_path(path: str) -> bool:
    return path.removeprefix("file://").startswith(SYSTEM_PATHS)


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _has_feature_extractor(folder: Path) -> bool:
    if (folder / "preprocessor_config.json").is_file():
        return True
    processor = folder / "processor_config.json"
    return processor.is_file() and "feature_extractor" in json.loads(processor.read_text())


def _local_paths_in_json(value, key: str, anywhere: bool = False) -> list[tuple[str, str, str]]:
    """`(key, path, whole value)` for the JSON string values that are an absolute local path (a path-naming key's, or
    any key's with `anywhere=False`), and, with `anywhere`, the paths under `USER_ROOTS` inside any string value."""
    if isinstance(value, dict):
        return [
            found for k, v in value.items() for found in _local_paths_in_json(v, f"{key}.{k}" if key else k, anywhere)
        ]
    if isinstance(value, list):
        return [found for i, v in enumerate(value) for found in _local_paths_in_json(v, f"{key}[{i}]", anywhere)]
    if not isinstance(value, str):
        return []
    last_key = re.sub(r"\[\d+\]$", "", key).rsplit(".", 1)[-1]
    whole = bool(re.match(r"^(/[^/]|~/|[A-Za-z]:[\\/])", value)) and not _system_path(value)
    if whole and (not anywhere or PATH_KEY.search(last_key)):
        return [(key, value, value)]
    if anywhere:
        return [
            (key, path, value) for path in dict.fromkeys(USER_PATH_IN_TEXT.findall(value)) if not _system_path(path)
        ]
    return []


def clear_local_name_or_path(folder: str | os.PathLike) -> list[str]:
    """Set every `_name_or_path` (at any depth: `text_config._name_or_path`) of the folder's `*.json` that holds an
    absolute local path to `""`, in place, and return `"file: key"` for each. transformers writes there where a
    sub-model was loaded from (e.g. a text encoder inside a virtualenv) and never reads it back to load, so the
    local path only tells the world the author's folder layout; `""` is what a config built from scratch holds."""
    cleared = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        keys = [
            key
            for key, _, _ in _local_paths_in_json(config, "")
            if key.split(".")[-1] == "_name_or_path" and "[" not in key
        ]
        for key in keys:
            node = config
            for part in key.split(".")[:-1]:
                node = node[part]
            node["_name_or_path"] = ""
            cleared.append(f"{path.name}: {key}")
        if keys:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if cleared:
        logger.warning("cleared local paths before the push (never read when loading): %s", ", ".join(cleared))
    return cleared


def check_dataset_folder(folder: str | os.PathLike, ignore_patterns: list[str] | None = None) -> list[str]:
    """Problems of a converted dataset folder: it needs data files (Parquet/Arrow/JSONL/CSV) and a card `README.md`
    whose `configs:` all resolve to files in the folder ([`merit_hf.hub.cards.dataset_config_problems`]), or
    `load_dataset(repo, config)` would fail after the push, and whose `dataset_info` splits `datasets` can read
    ([`merit_hf.hub.cards.dataset_info_problems`]). Dataset loading scripts are refused: the Hub no longer runs them,
    and data must not need `trust_remote_code`; so are pickles ([`pickle_problems`]), files larger than
    `LARGE_FILE_LIMIT` that are not data ([`large_file_problems`]), and a card that
    [`merit_hf.hub.cards.dataset_card_problems`] refuses: metadata that does not parse, no `license` (a Hub licence
    identifier; `other` needs `license_name`), `pretty_name` or `tags`, a template's placeholder left in it (the WFDB
    card, whose licence the converter cannot know), no citation or licence statement in its text. Only the files the
    push uploads are checked: `ignore_patterns` as in [`push_folder`] (`--ignore`)."""
    from .cards import dataset_card_problems

    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    pushed = pushed_files(folder, ignore_patterns)
    if not any(name.endswith(DATA_SUFFIXES) for name in pushed):
        problems.append(f"no data files ({', '.join(DATA_SUFFIXES)})")
    if (folder / "README.md").is_file():
        problems.extend(f"README.md: {problem}" for problem in dataset_card_problems(folder / "README.md", folder))
    else:
        problems.append("README.md (the dataset card) is missing")
    scripts = sorted(name for name in pushed if "/" not in name and name.endswith(".py"))
    if scripts:
        problems.append(f"Python files {scripts}: push the converted data, not a loading script")
    problems += large_file_problems(folder, DATA_SUFFIXES, f"data ({', '.join(DATA_SUFFIXES)})", ignore_patterns)
    return problems + pickle_problems(folder, ignore_patterns) + leak_problems(folder, ignore_patterns)


def pushed_files(folder: str | os.PathLike, ignore_patterns: list[str] | None = None) -> list[str]:
    """The files [`push_folder`] uploads, as `/`-separated paths relative to `folder`: every file below it that no
    ignore pattern matches, filtered by huggingface_hub's own `filter_repo_objects` as `upload_folder` does."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.glob("**/*") if path.is_file())
    patterns = DEFAULT_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns
    return list(filter_repo_objects(paths, ignore_patterns=patterns))


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _raise_if(problems: list[str], folder: Path, kind: str) -> None:
    if problems:
        raise HubFolderError(f"{folder}: not a Hub-ready {kind} folder: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------------------------------


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    repo_type: str = "model",
    revision: str | None = None,
    tag: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    ignore_patterns: list[str] | None = None,
) -> PushResult:
    """Upload a folder as one commit (no checks; `push_model` / `push_dataset` check first). The branch then holds
    exactly the folder's files: files of earlier pushes that the folder no longer has are deleted in the same commit
    (except `.gitattributes`, which huggingface_hub always keeps), so no stale file (e.g. an old
    `adapter_config.json`, which `from_pretrained` would follow) outlives a push.

    Args:
        folder: the folder to upload; files matched by `ignore_patterns` are skipped (see [`pushed_files`]).
        repo_id: `"org/name"`; created if missing.
        repo_type: `"model"` or `"dataset"`.
        revision: branch to commit to (created from `main` if missing); `None` is `main`.
        tag: tag the new commit (e.g. `"v0.1"`). Not allowed with `create_pr` (a PR is not released yet). A tag that
            exists already, or is no valid git ref name, is refused before anything is uploaded; if tagging still
            fails after the commit, the error names the commit that was made.
        create_pr: open a pull request against `main` instead of committing to it (not with another `revision`). A
            folder that `main` already holds opens none (`pr_url` `None`, `changed` `False`).
        private: `True` makes the repo private before anything is uploaded, also an existing public one; `False` or
            `None` only apply when the repo is created (an existing private repo is never made public).
        commit_message, token: as in `HfApi.upload_folder`.
        endpoint: Hub URL; `None` reads `HF_ENDPOINT` (default https://huggingface.co).
        ignore_patterns: `None` is `DEFAULT_IGNORE_PATTERNS` (hidden files, caches, `checkpoints/`, `checkpoint-*/`,
            `runs/`).
    """
    if tag and create_pr:
        raise HubPushError("tag and create_pr together: tag the commit after the pull request is merged")
    branch = revision or "main"
    if create_pr and branch != "main":
        raise HubPushError(
            f"create_pr with revision {branch!r}: the Hub opens pull requests against main; drop the revision"
        )
    if repo_type not in ("model", "dataset"):
        raise HubPushError(f"repo_type must be 'model' or 'dataset', got {repo_type!r}")
    for kind, name in (("tag", tag), ("revision", revision)):
        if name and (why := ref_name_problem(name)):
            raise HubPushError(f"{kind} {name!r} is not a valid git ref name ({why})")
    folder = Path(folder)
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    refs = api.list_repo_refs(repo_id, repo_type=repo_type)
    tagged = {ref.name: ref.target_commit for ref in refs.tags}
    if tag in tagged:  # checked before the upload: create_tag's 409 would come after the commit
        raise HubPushError(
            f"{repo_id}: tag {tag!r} already exists (commit {tagged[tag]}); nothing was uploaded. Choose another "
            "tag, or delete this one first (HfApi().delete_tag) if it should move"
        )
    heads = {ref.name: ref.target_commit for ref in refs.branches}
    # create_repo(exist_ok=True) leaves an existing repo's visibility as it is.
    if private and not api.repo_info(repo_id, repo_type=repo_type).private:
        api.update_repo_settings(repo_id, private=True, repo_type=repo_type)
    if branch != "main":
        api.create_branch(repo_id, branch=branch, repo_type=repo_type, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type=repo_type,
        revision=branch,
        create_pr=create_pr,
        commit_message=commit_message or f"Upload {folder.name} with merit_hf",
        # a copy: upload_folder appends its own patterns to the list it is given
        ignore_patterns=list(DEFAULT_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns),
        delete_patterns="*",
    )
    # Nothing changed: huggingface_hub makes no commit (and opens no pull request) and returns the branch's head.
    changed = info.pr_url is not None if create_pr else info.oid != heads.get(branch, heads.get("main"))
    if tag:
        try:
            api.create_tag(repo_id, tag=tag, revision=info.oid, repo_type=repo_type, exist_ok=False)
        except HfHubHTTPError as error:  # e.g. the same tag made by someone else since the check
            made = f"committed {info.oid} to {branch} ({info.commit_url})" if changed else f"{branch} is {info.oid}"
            raise HubPushError(
                f"{repo_id}: {made}, but tagging it {tag!r} failed ({error}). The commit stays; tag it with "
                f"HfApi().create_tag({repo_id!r}, tag=..., revision={info.oid!r}, repo_type={repo_type!r})",
                commit_oid=info.oid,
            ) from error
    return PushResult(
        repo_id=repo_id,
        repo_type=repo_type,
        revision=branch,
        commit_oid=info.oid,
        commit_url=info.commit_url,
        pr_url=info.pr_url,
        tag=tag,
        changed=changed,
    )


def ref_name_problem(name: str) -> str | None:
    """Why `name` cannot be a branch or tag name (git's `check-ref-format` rules: Hub revisions are git refs), or
    `None`."""
    if name.startswith(("-", "/")) or name.endswith(("/", ".", ".lock")) or name == "@":
        return "it cannot start with - or /, end with /, . or .lock, or be @"
    if match := re.search(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|(?:^|/)\.", name):
        return f"{match[0]!r} is not allowed"
    return None


def push_model(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    results: str | os.PathLike | dict | list | None = None,
    card_kwargs: dict | None = None,
    overwrite_card: bool = False,
    **push_kwargs,
) -> PushResult:
    """Push a folder written by `save_pretrained` (model, feature extractor, processor, tokenizer, and for the
    report model its adapter) so that `AutoModel.from_pretrained(repo_id, trust_remote_code=True)` works for users
    who never installed merit_hf.

    With `results` (the evaluation results JSON, its path, or a list of them), the model card `README.md` is first
    rendered into the folder by [`merit_hf.hub.cards.render_model_card`] (`card_kwargs` go to it: `datasets`,
    `base_model`, `license`, `allow_weights_mismatch`), so the card's numbers are the ones our evaluation wrote, and of
    this folder's weights. An existing `README.md` that differs from the rendered card is refused (`HubPushError`,
    nothing changed) unless `overwrite_card=True`. The folder is checked by [`check_model_folder`] before anything is
    sent: nothing is uploaded if a text file holds a Hub token or an absolute local path ([`leak_problems`]); a local
    `_name_or_path` (where a sub-model was loaded from, never read to load) is set to `""` for the upload
    ([`clear_local_name_or_path`]).

    The folder is left as it was, whatever happens: the configs edited for the upload are put back afterwards, and a
    card rendered here is kept only when the push went through (or made its commit before a later step failed); a
    refused or failed push puts the earlier `README.md` back (or removes the new one).

    Example:

    PEFT's `save_pretrained` writes its own template card beside an adapter; that card, unedited
    ([`peft_template_card`]), is replaced without `overwrite_card`.

    ```python
    >>> push_model("quickstart_output/model", "org/merit-ecg", results="results.json", tag="v0.1")  # doctest: +SKIP
    ```"""
    folder = Path(folder)
    card_path = folder / "README.md"
    earlier_card = card_path.read_bytes() if card_path.is_file() else None
    rendered = digest = None
    if results is not None:
        from .cards import card_marker, render_model_card

        rendered = str(render_model_card(results, repo_id=repo_id, model_folder=folder, **(card_kwargs or {})))
        digest = (card_marker(rendered) or (None, None))[1]  # the folder's tensors, read once, for the check below
        replaceable = earlier_card is None or earlier_card == rendered.encode("utf-8") or overwrite_card
        if not replaceable and peft_template_card(earlier_card.decode("utf-8", errors="replace")):
            logger.info("%s is PEFT's unedited template card (written by save_pretrained): replaced", card_path)
            replaceable = True
        if not replaceable:
            peft = "library_name: peft" in earlier_card.decode("utf-8", errors="replace")
            raise HubPushError(
                f"{card_path} exists and differs from the card rendered from the results"
                + (" (PEFT's save_pretrained wrote it, and it has been edited since)" if peft else "")
                + "; nothing was changed or uploaded. Pass overwrite_card=True (--overwrite-card) to replace it, or "
                "push without results to publish it as it is"
            )
    configs = {path: path.read_bytes() for path in folder.glob("*.json")}
    try:
        if rendered is not None:
            with open(card_path, "w", encoding="utf-8", newline="") as stream:  # as ModelCard.save writes it
                stream.write(rendered)
        clear_local_name_or_path(folder)
        problems = check_model_folder(folder, push_kwargs.get("ignore_patterns"), weights_digest=digest)
        _raise_if(problems, folder, "model")
        return push_folder(folder, repo_id, repo_type="model", **push_kwargs)
    except BaseException as error:
        if rendered is not None and getattr(error, "commit_oid", None) is None:  # nothing was committed
            if earlier_card is None:
                card_path.unlink(missing_ok=True)
            else:
                card_path.write_bytes(earlier_card)
        raise
    finally:
        for path, content in configs.items():
            if not path.is_file() or path.read_bytes() != content:
                path.write_bytes(content)


def card_metadata(text: str) -> dict | None:
    """The YAML metadata block at the top of a card's `text` as a mapping, or None when there is none, it does not
    parse, or it is not a mapping."""
    import yaml

    if not text.startswith("---"):
        return None
    parts = text.split("---", 2)
    try:
        metadata = yaml.safe_load(parts[1]) or {}
    except yaml.YAMLError:
        return None
    return metadata if isinstance(metadata, dict) else None


def peft_template_card(text: str) -> bool:
    """Whether `text` is the card PEFT's `save_pretrained` writes beside an adapter, unedited: huggingface_hub's
    default model-card template (`ModelCard.from_template(ModelCardData())`), word for word, followed by PEFT's
    `### Framework versions` block (`- PEFT <version>` lines), under metadata that holds only what PEFT sets
    (`library_name`, `tags`, `base_model`, `pipeline_tag`). Any edit of the text or another metadata key makes it a
    card someone wrote, which only `overwrite_card` replaces."""
    from huggingface_hub import ModelCard, ModelCardData

    if len(text.split("---", 2)) < 3:
        return False
    metadata = card_metadata(text)
    if metadata is None or metadata.get("library_name") != "peft":
        return False
    if set(metadata) - {"library_name", "tags", "base_model", "pipeline_tag"}:
        return False
    body = text.split("---", 2)[2]
    if PEFT_FRAMEWORK_HEADING not in body:
        return False
    body, framework = body.rsplit(PEFT_FRAMEWORK_HEADING, 1)
    if not all(line.startswith("- PEFT ") for line in framework.split("\n") if line.strip()):
        return False
    template = ModelCard.from_template(ModelCardData()).text
    return " ".join(body.split()) == " ".join(template.split())


def push_dataset(folder: str | os.PathLike, repo_id: str, **push_kwargs) -> PushResult:
    """Push a converted dataset folder (Parquet/Arrow shards + its card `README.md`) as a dataset repo; it then
    loads with `datasets.load_dataset(repo_id)`, without any loading script."""
    folder = Path(folder)
    _raise_if(check_dataset_folder(folder, push_kwargs.get("ignore_patterns")), folder, "dataset")
    return push_folder(folder, repo_id, repo_type="dataset", **push_kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    from .cards import add_card_arguments, card_options

    parser = argparse.ArgumentParser(prog="python -m merit_hf.hub", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="check a folder and upload it to a Hub repo")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--repo-type", choices=("model", "dataset"), default="model")
    push.add_argument(
        "--results",
        nargs="+",
        action="extend",
        help="evaluation results JSON(s): render the model card README.md from them first",
    )
    card = push.add_argument_group("model card (with --results; as python -m merit_hf.hub.cards model)")
    add_card_arguments(card)
    card.add_argument(
        "--overwrite-card", action="store_true", help="replace an existing README.md that differs from the new card"
    )
    push.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also leave out files matching PATTERN (repeatable; fnmatch on the path in the folder)",
    )
    push.add_argument("--revision", help="branch (created from main if missing)")
    push.add_argument("--tag", help="tag the new commit, e.g. v0.1")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--message", help="commit message")
    push.add_argument(
        "--private", action="store_true", default=None, help="make the repo private (also an existing public one)"
    )
    push.add_argument("--endpoint", help="Hub URL (default: $HF_ENDPOINT or https://huggingface.co)")
    args = parser.parse_args(argv)

    kwargs = {
        "revision": args.revision,
        "tag": args.tag,
        "create_pr": args.create_pr,
        "commit_message": args.message,
        "private": args.private,
        "endpoint": args.endpoint,
    }
    if args.ignore:
        kwargs["ignore_patterns"] = [*DEFAULT_IGNORE_PATTERNS, *args.ignore]
    options = {key: value for key, value in card_options(args).items() if value}
    if args.overwrite_card:
        options["overwrite_card"] = True
    if args.repo_type == "dataset":
        if args.results or options:
            parser.error(
                "--results and the card options render a model card; dataset cards live beside the dataset scripts"
            )
        result = push_dataset(args.folder, args.repo_id, **kwargs)
    else:
        if options and not args.results:
            parser.error(f"{', '.join(sorted(options))}: card options need --results (the card is rendered from them)")
        overwrite = options.pop("overwrite_card", False)
        results = args.results if args.results is None or len(args.results) > 1 else args.results[0]
        result = push_model(
            args.folder, args.repo_id, results=results, card_kwargs=options, overwrite_card=overwrite, **kwargs
        )
    if not result.changed:
        outcome = (
            "no pull request was opened (pr_url is null)"
            if args.create_pr
            else f"no commit was made (commit_oid is the head of {result.revision})"
        )
        where = f"{result.repo_id} {'main' if args.create_pr else result.revision}"
        print(f"nothing changed: {where} already holds exactly these files, so {outcome}", file=sys.stderr)
    summary = asdict(result)
    print(json.dumps(summary, indent=2))
    return summary


def cli(argv: list[str] | None = None) -> None:
    """`python -m merit_hf.hub` and `python -m merit_hf.hub.push`: `main`, a refused push or a card that cannot be
    rendered as one `error:` line."""
    from .cards import CardError

    try:
        main(argv)
    except (HubFolderError, HubPushError, CardError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    # `python -m merit_hf.hub.push` runs this file a second time, as `__main__`; the imported module's `cli` is the one
    # whose exception classes the rest of the package raises
    from merit_hf.hub.push import cli as _cli

    _cli()
