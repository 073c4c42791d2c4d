"""Our push policy, against a mocked `HfApi` (autospec: every call must match huggingface_hub's real signatures).

What we decide, and test here: which files a push uploads and which it never does, the folders it refuses before any
request (pickles, missing code or feature extractor or card, Hub tokens, local paths), the local `_name_or_path` it
clears, the model card it renders from a results JSON, and the arguments of each `HfApi` call (one `upload_folder`
commit that deletes stale files, branch, pull request, tag, privacy). What huggingface_hub does with those calls on
the wire is its own business; `tests/test_hub_roundtrip.py` runs the real client against a loopback Hub
(`RUN_SLOW=1`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects

from merit_hf import MeritFeatureExtractor, MeritModel
from merit_hf.hub import (
    DEFAULT_IGNORE_PATTERNS,
    HubFolderError,
    HubPushError,
    PushResult,
    main,
    push_dataset,
    push_folder,
    push_model,
    pushed_files,
)
from merit_hf.hub import push as push_module
from tests.conftest import REPO_ROOT, tiny_merit_config
from tests.test_cards import results_from_our_metrics

REPO_ID = "org/merit-ecg"
ENDPOINT = "http://hub.invalid"
TOKEN = "hf_test"
COMMIT = "c0ffee" * 6 + "c0de"
PARENT = "ba5e" * 10  # main's head before the push
# What a Trainer or pretraining output_dir holds beside the model, and what editors and Python leave behind.
RUN_OUTPUTS = [
    ".git/config",
    ".ipynb_checkpoints/notes.txt",
    "__pycache__/modeling_merit.cpython-311.pyc",
    "checkpoints/checkpoint-20/optimizer.bin",
    "checkpoints/checkpoint-20/trainer_state.json",
    "checkpoint-5/rng_state.pth",
    "runs/events.out.tfevents.1",
    "training_args.bin",
    "trainer_state.json",
    "eval/trainer_state.json",
    "eval/.DS_Store",
]


@pytest.fixture
def hf_api():
    """`merit_hf.hub.push.HfApi` replaced by an autospec mock; `hf_api.return_value` is the client instance."""
    with mock.patch.object(push_module, "HfApi", autospec=True) as api_class:
        api = api_class.return_value
        api.upload_folder.return_value = SimpleNamespace(
            oid=COMMIT, commit_url=f"{ENDPOINT}/{REPO_ID}/commit/{COMMIT}", pr_url=None
        )
        api.repo_info.return_value = SimpleNamespace(private=False)
        api.list_repo_refs.return_value = refs(main=PARENT)
        yield api_class


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "model"
    model = MeritModel(tiny_merit_config())
    model.save_pretrained(folder)
    MeritFeatureExtractor.from_model_config(model.config.ecg_config).save_pretrained(folder)
    return folder


@pytest.fixture
def model_folder(saved_model, tmp_path) -> Path:
    """A Hub-ready model folder (weights, code, feature extractor, card), a fresh copy per test."""
    folder = tmp_path / "merit-ecg"
    folder.mkdir()
    for path in saved_model.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "README.md").write_text(HAND_WRITTEN_CARD)
    return folder


# The least a model card needs to pass the push check (`model_card_problems`): what the Hub reads to file it.
CARD_METADATA = "library_name: transformers\nlicense: apache-2.0\npipeline_tag: feature-extraction\ntags:\n- ecg\n"
HAND_WRITTEN_CARD = f"---\n{CARD_METADATA}---\n# MERIT\nUnits: mV, 10 mm/mV.\n"


# The least a dataset card needs to pass the push check (`dataset_card_problems`).
DATASET_CARD = (
    "---\nlicense: cc-by-4.0\npretty_name: PTB-XL (merit_hf)\ntags:\n- ecg\n---\n# PTB-XL\n"
    "Licence: CC BY 4.0. Cite Wagner et al. (2020), https://doi.org/10.1038/s41597-020-0495-6.\n"
)


def refs(tags: dict[str, str] | None = None, **branches: str) -> SimpleNamespace:
    """What `HfApi.list_repo_refs` returns: branches and tags, each a name and its commit."""
    entries = lambda mapping: [SimpleNamespace(name=n, target_commit=c) for n, c in mapping.items()]  # noqa: E731
    return SimpleNamespace(branches=entries(branches), tags=entries(tags or {}))


def write(folder: Path, name: str, data: bytes = b"\x80\x04pickle") -> None:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def call_names(api) -> list[str]:
    return [name for name, _, _ in api.mock_calls]


# ----------------------------------------------------------------------------------------------------------------------
# What is uploaded
# ----------------------------------------------------------------------------------------------------------------------
def test_push_model_is_one_upload_folder_commit_that_leaves_exactly_the_folder(model_folder, hf_api):
    result = push_model(model_folder, REPO_ID, token=TOKEN, endpoint=ENDPOINT)
    api = hf_api.return_value
    hf_api.assert_called_once_with(endpoint=ENDPOINT, token=TOKEN)
    assert call_names(api) == ["create_repo", "list_repo_refs", "upload_folder"]  # no branch, tag or settings call
    api.create_repo.assert_called_once_with(REPO_ID, repo_type="model", private=None, exist_ok=True)
    upload = api.upload_folder.call_args.kwargs
    assert upload == {
        "repo_id": REPO_ID,
        "folder_path": model_folder,
        "repo_type": "model",
        "revision": "main",
        "create_pr": False,
        "commit_message": "Upload merit-ecg with merit_hf",
        "ignore_patterns": DEFAULT_IGNORE_PATTERNS,
        "delete_patterns": "*",  # files of earlier pushes that the folder no longer has go in the same commit
    }
    assert upload["ignore_patterns"] is not DEFAULT_IGNORE_PATTERNS  # upload_folder appends to the list it gets
    assert result == PushResult(
        repo_id=REPO_ID,
        repo_type="model",
        revision="main",
        commit_oid=COMMIT,
        commit_url=f"{ENDPOINT}/{REPO_ID}/commit/{COMMIT}",
        pr_url=None,
        tag=None,
        changed=True,
    )


def test_training_run_outputs_are_never_uploaded(model_folder, hf_api):
    model_files = sorted(path.name for path in model_folder.iterdir())
    for name in RUN_OUTPUTS:
        write(model_folder, name)
    write(model_folder, "notes/eval.txt", b"kept: any other file is uploaded")
    assert pushed_files(model_folder) == sorted([*model_files, "notes/eval.txt"])
    push_model(model_folder, REPO_ID, endpoint=ENDPOINT)  # the pickles among them are not refused: not uploaded
    # huggingface_hub, given the patterns we pass, skips the same files as our checks did
    upload = hf_api.return_value.upload_folder.call_args.kwargs
    every_file = sorted(p.relative_to(model_folder).as_posix() for p in model_folder.rglob("*") if p.is_file())
    assert list(filter_repo_objects(every_file, ignore_patterns=upload["ignore_patterns"])) == pushed_files(
        model_folder
    )


def test_custom_ignore_patterns_reach_both_the_checks_and_the_upload(model_folder, hf_api):
    write(model_folder, "heads/probe.pt")
    with pytest.raises(HubFolderError, match=r"pickled weights \['heads/probe.pt'\]"):
        push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
    patterns = [*DEFAULT_IGNORE_PATTERNS, "heads/*"]
    push_model(model_folder, REPO_ID, endpoint=ENDPOINT, ignore_patterns=patterns)
    assert hf_api.return_value.upload_folder.call_args.kwargs["ignore_patterns"] == patterns


def test_repeated_pushes_do_not_grow_the_ignore_list(tmp_path, hf_api):
    before = list(DEFAULT_IGNORE_PATTERNS)
    hf_api.return_value.upload_folder.side_effect = lambda **kwargs: (
        kwargs["ignore_patterns"].append(".git/*"),  # what upload_folder does
        SimpleNamespace(oid=COMMIT, commit_url="", pr_url=None),
    )[1]
    write(tmp_path / "folder", "notes.txt", b"hello")
    for _ in range(2):
        push_folder(tmp_path / "folder", "org/notes", endpoint=ENDPOINT)
    assert before == DEFAULT_IGNORE_PATTERNS


# ----------------------------------------------------------------------------------------------------------------------
# Branch, pull request, tag, privacy
# ----------------------------------------------------------------------------------------------------------------------
def test_tag_names_the_new_commit_after_the_upload(model_folder, hf_api):
    result = push_model(model_folder, REPO_ID, tag="v0.1", commit_message="Release", endpoint=ENDPOINT)
    api = hf_api.return_value
    assert call_names(api) == ["create_repo", "list_repo_refs", "upload_folder", "create_tag"]
    assert api.upload_folder.call_args.kwargs["commit_message"] == "Release"
    api.create_tag.assert_called_once_with(REPO_ID, tag="v0.1", revision=COMMIT, repo_type="model", exist_ok=False)
    assert result.tag == "v0.1"


def test_revision_is_a_branch_created_before_the_upload(model_folder, hf_api):
    result = push_model(model_folder, REPO_ID, revision="v2", endpoint=ENDPOINT)
    api = hf_api.return_value
    assert call_names(api) == ["create_repo", "list_repo_refs", "create_branch", "upload_folder"]
    api.create_branch.assert_called_once_with(REPO_ID, branch="v2", repo_type="model", exist_ok=True)
    assert api.upload_folder.call_args.kwargs["revision"] == "v2" and result.revision == "v2"


def test_create_pr_opens_a_pull_request_against_main(model_folder, hf_api):
    api = hf_api.return_value
    api.upload_folder.return_value = SimpleNamespace(oid=COMMIT, commit_url="", pr_url=f"{ENDPOINT}/discussions/1")
    result = push_model(model_folder, REPO_ID, create_pr=True, endpoint=ENDPOINT)
    upload = api.upload_folder.call_args.kwargs
    assert (upload["create_pr"], upload["revision"]) == (True, "main")
    assert result.pr_url == f"{ENDPOINT}/discussions/1"
    assert "create_tag" not in call_names(api)


def test_an_existing_tag_is_refused_before_anything_is_uploaded(model_folder, hf_api):
    api = hf_api.return_value
    api.list_repo_refs.return_value = refs(tags={"v0.1": PARENT}, main=PARENT)
    with pytest.raises(HubPushError) as error:
        push_model(model_folder, REPO_ID, tag="v0.1", private=True, endpoint=ENDPOINT)
    assert str(error.value) == (
        f"{REPO_ID}: tag 'v0.1' already exists (commit {PARENT}); nothing was uploaded. Choose another tag, or "
        "delete this one first (HfApi().delete_tag) if it should move"
    )
    assert call_names(api) == ["create_repo", "list_repo_refs"]  # no upload, no settings change, no branch


def test_a_tag_that_fails_after_the_commit_names_the_commit(model_folder, hf_api):
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import HfHubHTTPError

    api = hf_api.return_value
    reply = httpx2.Response(409, request=httpx2.Request("POST", f"{ENDPOINT}/api/models/{REPO_ID}/tag/{COMMIT}"))
    # the same tag, made by someone else since the check
    api.create_tag.side_effect = HfHubHTTPError("409 Conflict: Tag already exists: v0.1", response=reply)
    with pytest.raises(HubPushError) as error:
        push_model(model_folder, REPO_ID, tag="v0.1", endpoint=ENDPOINT)
    assert str(error.value) == (
        f"{REPO_ID}: committed {COMMIT} to main ({ENDPOINT}/{REPO_ID}/commit/{COMMIT}), but tagging it 'v0.1' "
        "failed (409 Conflict: Tag already exists: v0.1). The commit stays; tag it with "
        f"HfApi().create_tag('{REPO_ID}', tag=..., revision='{COMMIT}', repo_type='model')"
    )


def test_an_unchanged_folder_opens_no_pull_request_and_says_so(model_folder, hf_api, capsys):
    api = hf_api.return_value
    # what upload_folder returns when every file is unchanged: main's head, no pull request
    api.upload_folder.return_value = SimpleNamespace(oid=PARENT, commit_url="", pr_url=None)
    summary = main(["push", str(model_folder), REPO_ID, "--create-pr", "--endpoint", ENDPOINT])
    assert (summary["pr_url"], summary["changed"]) == (None, False)
    err = capsys.readouterr().err
    assert err == (
        f"nothing changed: {REPO_ID} main already holds exactly these files, so no pull request was opened "
        "(pr_url is null)\n"
    )
    summary = main(["push", str(model_folder), REPO_ID, "--endpoint", ENDPOINT])
    assert (summary["commit_oid"], summary["changed"]) == (PARENT, False)
    assert capsys.readouterr().err == (
        f"nothing changed: {REPO_ID} main already holds exactly these files, so no commit was made (commit_oid is "
        "the head of main)\n"
    )
    api.upload_folder.return_value = SimpleNamespace(oid=COMMIT, commit_url="", pr_url=f"{ENDPOINT}/discussions/1")
    assert main(["push", str(model_folder), REPO_ID, "--create-pr", "--endpoint", ENDPOINT])["changed"]
    assert capsys.readouterr().err == ""


def test_the_command_line_reports_a_refused_push_without_a_traceback(model_folder, hf_api, monkeypatch):
    import runpy
    import sys

    hf_api.return_value.list_repo_refs.return_value = refs(tags={"v0.1": PARENT}, main=PARENT)
    monkeypatch.setattr(sys, "argv", ["merit_hf.hub", "push", str(model_folder), REPO_ID, "--tag", "v0.1"])
    with pytest.raises(SystemExit, match=rf"^error: {REPO_ID}: tag 'v0.1' already exists"):
        runpy.run_module("merit_hf.hub", run_name="__main__")
    monkeypatch.setattr(
        sys, "argv", ["merit_hf.hub", "push", str(model_folder), REPO_ID, "--create-pr", "--tag", "v1"]
    )
    with pytest.raises(SystemExit, match="^error: tag and create_pr together"):
        runpy.run_module("merit_hf.hub", run_name="__main__")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"create_pr": True, "tag": "v1"}, "tag and create_pr together: tag the commit after the pull request"),
        ({"create_pr": True, "revision": "dev"}, "create_pr with revision 'dev': the Hub opens pull requests against"),
        ({"repo_type": "space"}, "repo_type must be 'model' or 'dataset', got 'space'"),
        ({"tag": "v0.1 final"}, "tag 'v0.1 final' is not a valid git ref name \\(' ' is not allowed\\)"),
        ({"tag": "v1..2"}, "tag 'v1..2' is not a valid git ref name"),
        ({"revision": "dev/"}, "revision 'dev/' is not a valid git ref name \\(it cannot start with"),
    ],
)
def test_contradictory_arguments_are_refused_before_any_request(model_folder, hf_api, kwargs, message):
    with pytest.raises(ValueError, match=message):
        push_folder(model_folder, REPO_ID, endpoint=ENDPOINT, **kwargs)
    hf_api.assert_not_called()


def test_private_makes_an_existing_public_repo_private_before_the_upload(model_folder, hf_api):
    api = hf_api.return_value
    push_model(model_folder, REPO_ID, private=True, endpoint=ENDPOINT)
    assert call_names(api) == ["create_repo", "list_repo_refs", "repo_info", "update_repo_settings", "upload_folder"]
    api.create_repo.assert_called_once_with(REPO_ID, repo_type="model", private=True, exist_ok=True)
    api.update_repo_settings.assert_called_once_with(REPO_ID, private=True, repo_type="model")

    api.reset_mock()
    api.repo_info.return_value = SimpleNamespace(private=True)
    push_model(model_folder, REPO_ID, private=True, endpoint=ENDPOINT)  # already private: no settings call
    assert call_names(api) == ["create_repo", "list_repo_refs", "repo_info", "upload_folder"]

    for private in (None, False):  # never publishes an existing private repo, nor asks
        api.reset_mock()
        push_model(model_folder, REPO_ID, private=private, endpoint=ENDPOINT)
        assert call_names(api) == ["create_repo", "list_repo_refs", "upload_folder"]


# ----------------------------------------------------------------------------------------------------------------------
# Refused before any request
# ----------------------------------------------------------------------------------------------------------------------
def test_pickles_missing_code_and_missing_feature_extractor_are_refused(model_folder, hf_api):
    (model_folder / "modeling_merit.py").unlink()
    (model_folder / "preprocessor_config.json").unlink()
    write(model_folder, "pytorch_model.bin")
    write(model_folder, "heads/probe.pt")
    with pytest.raises(HubFolderError) as error:
        push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
    message = str(error.value)
    assert message.startswith(f"{model_folder}: not a Hub-ready model folder: ")
    assert "auto_map names modeling_merit.MeritModel but modeling_merit.py is missing" in message
    assert "pickled weights ['heads/probe.pt', 'pytorch_model.bin']" in message
    assert "preprocessor_config.json is missing: save the feature extractor with the model" in message
    hf_api.assert_not_called()


def safetensors_whose_first_bytes_look_like_a_pickle_header() -> bytes:
    """A valid safetensors file whose header length, its first 8 bytes, begins `80 03` like a protocol-3 pickle."""
    import struct

    from safetensors.numpy import load, save

    for pad in range(4096):
        data = save({"w": np.zeros(2, dtype="float32")}, metadata={"pad": "x" * pad})
        if data[:2] == b"\x80\x03":
            assert struct.unpack("<Q", data[:8])[0] == 0x380 and load(data)["w"].tolist() == [0.0, 0.0]
            return data
    raise AssertionError("no padding gives a header length of 0x380")


def test_pickles_are_refused_by_name_and_by_content(model_folder, hf_api, tmp_path):
    import io
    import pickle
    import tarfile

    write(model_folder, "model.pth.tar")
    write(model_folder, "scaler.joblib", b"\x1f\x8bjoblib's zlib")
    write(model_folder, "extra/scaler.joblib.gz")
    write(model_folder, "heads/PROBE.PT")
    write(model_folder, "heads/probe.weights", pickle.dumps({"bias": [0.0]}, protocol=4))
    write(model_folder, "state.dat", pickle.dumps([1, 2], protocol=2))
    torch.save({"w": torch.zeros(2)}, model_folder / "probe.model")  # a zip holding archive/data.pkl
    legacy = io.BytesIO()
    with tarfile.open(fileobj=legacy, mode="w") as archive:  # PyTorch's legacy format: a tar with a `pickle` member
        member = tarfile.TarInfo("pickle")
        member.size = 4
        archive.addfile(member, io.BytesIO(b"\x80\x02N."))
    write(model_folder, "old/model.tar", legacy.getvalue())
    write(model_folder, "run.cfg", b"cos\nsystem\n(S'echo hi'\ntR.")  # protocol 0 by hand: runs a shell command
    write(model_folder, "labels.dat", pickle.dumps({"NORM": [1, 2.5]}, protocol=1))  # no header either
    np.save(model_folder / "thresholds.npy", np.array([{"NORM": 0.5}], dtype=object), allow_pickle=True)
    np.savez(model_folder / "classes.npz", names=np.array(["NORM", None], dtype=object))
    with pytest.raises(HubFolderError) as error:
        push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
    problems = str(error.value).removeprefix(f"{model_folder}: not a Hub-ready model folder: ").split("; ")
    code = "which can run code when loaded: save weights with save_pretrained (safetensors) and other objects as JSON"
    assert problems == [
        "pickled weights ['extra/scaler.joblib.gz', 'heads/PROBE.PT', 'model.pth.tar', 'scaler.joblib'] (merit_hf "
        "loads safetensors only",
        "re-save with save_pretrained)",
        f"classes.npz is a pickle (a zip holding names.npy, a NumPy array of Python objects (a pickle)), {code}",
        f"heads/probe.weights is a pickle (it starts with a pickle header, protocol 4), {code}",
        f"labels.dat is a pickle (it is a pickle of protocol 0 or 1 (no header)), {code}",
        f"old/model.tar is a pickle (a tar holding pickle), {code}",
        f"probe.model is a pickle (a zip holding probe/data.pkl, as torch.save writes), {code}",
        f"run.cfg is a pickle (it is a pickle of protocol 0 or 1 (no header)), {code}",
        f"state.dat is a pickle (it starts with a pickle header, protocol 2), {code}",
        f"thresholds.npy is a pickle (a NumPy array of Python objects, stored as a pickle), {code}",
    ]
    hf_api.assert_not_called()


def test_safetensors_json_text_parquet_images_and_npz_are_not_pickles(model_folder, hf_api):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write(model_folder, "heads/probe.safetensors", safetensors_whose_first_bytes_look_like_a_pickle_header())
    write(model_folder, "probe.json", b'{"classes": ["NORM"]}')
    write(model_folder, "notes.txt", "Units: mV \u2014 \x80 is not a header in UTF-8 text\n".encode())
    write(model_folder, "figures/roc.png", b"\x89PNG\r\n\x1a\n" + bytes(64))
    np.savez(model_folder / "thresholds.npz", thresholds=np.ones(5))  # a zip of .npy arrays
    np.save(model_folder / "classes.npy", np.array(["NORM", "MI"]))  # strings, not objects
    write(model_folder, "summary.txt", b"Sinus rhythm. Normal ECG.")  # ends as a pickle ends
    write(model_folder, "stop.txt", b".")
    pq.write_table(pa.table({"ecg_id": [1, 2]}), model_folder / "eval.parquet")
    push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
    hf_api.return_value.upload_folder.assert_called_once()


def test_a_folder_without_card_or_weights_is_refused(model_folder, hf_api):
    (model_folder / "README.md").unlink()
    (model_folder / "model.safetensors").unlink()
    with pytest.raises(HubFolderError) as error:
        push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
    assert "no *.safetensors weights" in str(error.value)
    assert push_module.MISSING_MODEL_CARD in str(error.value)
    hf_api.assert_not_called()


def test_a_token_or_a_local_path_is_refused(model_folder, hf_api):
    token = "hf_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE"
    write(model_folder, "logs/train.log", f"step 1\nHF_TOKEN={token}\n".encode())
    with pytest.raises(HubFolderError, match=r"logs/train.log holds a Hugging Face token \(line 2: hf_aB3d\.\.\.\)"):
        push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
    (model_folder / "logs" / "train.log").unlink()
    (model_folder / "README.md").write_text(
        f"---\n{CARD_METADATA}---\n# MERIT\nPrompts in /home/me/merit/prompts.json\n"
    )
    with pytest.raises(HubFolderError, match=r"README.md names local paths \['/home/me/merit/prompts.json'\]"):
        push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
    (model_folder / "README.md").write_text(HAND_WRITTEN_CARD)
    config = json.loads((model_folder / "preprocessor_config.json").read_text())
    (model_folder / "preprocessor_config.json").write_text(json.dumps({**config, "prompts": "/home/me/p.json"}))
    with pytest.raises(HubFolderError, match=r"preprocessor_config.json: prompts is the local path '/home/me/p.json'"):
        push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
    hf_api.assert_not_called()


def test_a_local_name_or_path_is_cleared_before_the_upload(model_folder, hf_api):
    config = json.loads((model_folder / "config.json").read_text())
    config["text_config"]["_name_or_path"] = "/home/me/.venv/lib/python3.11/site-packages/minilm/model"
    (model_folder / "config.json").write_text(json.dumps(config))
    uploaded = {}
    hf_api.return_value.upload_folder.side_effect = lambda **kwargs: (
        uploaded.update(json.loads((kwargs["folder_path"] / "config.json").read_text())),
        SimpleNamespace(oid=COMMIT, commit_url="", pr_url=None),
    )[1]
    (model_folder / "README.md").rename(model_folder / "card.md")  # a refused folder is left as it was
    before = (model_folder / "config.json").read_bytes()
    with pytest.raises(HubFolderError, match="README.md"):
        push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
    assert (model_folder / "config.json").read_bytes() == before
    (model_folder / "card.md").rename(model_folder / "README.md")
    push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
    assert uploaded["text_config"]["_name_or_path"] == ""
    assert uploaded["ecg_config"] == config["ecg_config"]


def test_a_trainer_output_folder_passes_and_its_run_records_stay_home(model_folder, hf_api):
    write(model_folder, "training_args.bin")
    (model_folder / "trainer_state.json").write_text('{"log_history": []}')
    push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
    assert not {"training_args.bin", "trainer_state.json"} & set(pushed_files(model_folder))
    hf_api.return_value.upload_folder.assert_called_once()


# ----------------------------------------------------------------------------------------------------------------------
# Cards
# ----------------------------------------------------------------------------------------------------------------------
def test_results_render_the_model_card_before_the_upload(model_folder, hf_api, tmp_path):
    from merit_hf.evaluation import write_results

    results = write_results(results_from_our_metrics(), tmp_path / "results.json")
    (model_folder / "README.md").unlink()
    card_at_upload = []
    hf_api.return_value.upload_folder.side_effect = lambda **kwargs: (
        card_at_upload.append((kwargs["folder_path"] / "README.md").read_text()),
        SimpleNamespace(oid=COMMIT, commit_url="", pr_url=None),
    )[1]
    push_model(
        model_folder, REPO_ID, results=results, card_kwargs={"datasets": ["org/ptbxl-merit"]}, endpoint=ENDPOINT
    )
    (card,) = card_at_upload
    assert card == (model_folder / "README.md").read_text()
    assert "model-index" in card and f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in card
    assert "org/ptbxl-merit" in card


def test_a_push_with_results_reads_the_folder_s_tensors_once(model_folder, hf_api, tmp_path, monkeypatch):
    """A push that rendered its card hashed the folder's tensors twice (for the card's marker, then for the check of
    that marker against the folder); an adapter's card hashed the adapter twice more (for the results' weights check,
    then for the marker)."""
    from merit_hf.evaluation import write_results
    from merit_hf.models import fingerprint

    hashed, files_fingerprint = [], fingerprint.safetensors_files_fingerprint

    def counting_fingerprint(paths) -> str:
        paths = list(paths)
        hashed.append(sorted(Path(path).name for path in paths))
        return files_fingerprint(paths)

    adapter = adapter_folder(tmp_path, peft_card())
    run = results_from_our_metrics()
    run.model.weights_fingerprint = {
        "adapter": fingerprint.safetensors_fingerprint(adapter / "adapter_model.safetensors")
    }
    monkeypatch.setattr(fingerprint, "safetensors_files_fingerprint", counting_fingerprint)
    results = write_results(results_from_our_metrics(), tmp_path / "results.json")
    push_model(model_folder, REPO_ID, results=results, overwrite_card=True, endpoint=ENDPOINT)
    assert hashed == [["model.safetensors"]]
    assert (
        f"tensors={files_fingerprint([model_folder / 'model.safetensors'])} -->"
        in (model_folder / "README.md").read_text()
    )
    hashed.clear()
    push_model(adapter, "org/merit-lora", results=write_results(run, tmp_path / "adapter.json"), endpoint=ENDPOINT)
    assert hashed == [["adapter_model.safetensors"]]
    card = (adapter / "README.md").read_text()
    assert f"tensors={run.model.weights_fingerprint['adapter']} -->" in card and "checked when this card" in card


def test_dataset_push_needs_data_and_a_card_whose_configs_resolve(tmp_path, hf_api):
    folder = tmp_path / "ptbxl-merit"
    write(folder, "loader.py", b"import datasets\n")
    write(folder, "label_encoder.pkl")
    with pytest.raises(HubFolderError) as error:
        push_dataset(folder, "org/ptbxl-merit", endpoint=ENDPOINT)
    message = str(error.value)
    assert "no data files (.parquet, .arrow, .jsonl, .csv)" in message
    assert "README.md (the dataset card) is missing" in message
    assert "Python files ['loader.py']: push the converted data, not a loading script" in message
    assert "pickled weights ['label_encoder.pkl']" in message
    (folder / "loader.py").unlink()
    (folder / "label_encoder.pkl").unlink()
    write(folder, "data/test-00000-of-00001.parquet", b"PAR1")
    (folder / "README.md").write_text(
        "---\nlicense: cc-by-4.0\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        "    path: data/train-*.parquet\n---\n# PTB-XL\n"
    )
    with pytest.raises(HubFolderError, match=r"data/train-\*\.parquet"):
        push_dataset(folder, "org/ptbxl-merit", endpoint=ENDPOINT)
    hf_api.assert_not_called()
    (folder / "README.md").write_text(DATASET_CARD)
    push_dataset(folder, "org/ptbxl-merit", tag="v1", endpoint=ENDPOINT)
    api = hf_api.return_value
    api.create_repo.assert_called_once_with("org/ptbxl-merit", repo_type="dataset", private=None, exist_ok=True)
    assert api.upload_folder.call_args.kwargs["repo_type"] == "dataset"
    api.create_tag.assert_called_once_with("org/ptbxl-merit", tag="v1", revision=COMMIT, repo_type="dataset",
                                           exist_ok=False)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
def test_command_line_passes_every_option(model_folder, hf_api, capsys):
    summary = main(["push", str(model_folder), REPO_ID, "--revision", "dev", "--tag", "v1", "--message", "m",
                    "--private", "--endpoint", ENDPOINT])  # fmt: skip
    hf_api.assert_called_once_with(endpoint=ENDPOINT, token=None)
    api = hf_api.return_value
    api.create_repo.assert_called_once_with(REPO_ID, repo_type="model", private=True, exist_ok=True)
    upload = api.upload_folder.call_args.kwargs
    assert (upload["revision"], upload["commit_message"], upload["create_pr"]) == ("dev", "m", False)
    assert summary["tag"] == "v1" and json.loads(capsys.readouterr().out) == summary


def test_command_line_refuses_a_card_for_a_dataset_and_has_no_cache_command(tmp_path, hf_api):
    with pytest.raises(SystemExit):
        main(["push", str(tmp_path), "org/d", "--repo-type", "dataset", "--results", "r.json"])
    with pytest.raises(SystemExit):  # offline use goes through the library: from_pretrained(folder)
        main(["cache", str(tmp_path), "org/d"])
    hf_api.assert_not_called()


def run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m module args` in a new process, this checkout's `src` first on its path, the Hub offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize(
    ("module", "usage"),
    [
        ("merit_hf.hub.push", "usage: python -m merit_hf.hub "),
        ("merit_hf.cards", "usage: python -m merit_hf.hub.cards "),
    ],
)
def test_module_paths_run_the_command_line(module, usage, tmp_path):
    """`python -m merit_hf.hub.push` (and the 0.1 alias `python -m merit_hf.cards`) is the documented command, not a
    silent exit 0 that leaves a CI script believing it pushed."""
    done = run_module(module, "--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith(usage), done.stdout + done.stderr[-2000:]
    if module == "merit_hf.hub.push":
        done = run_module(module, "push", str(tmp_path), REPO_ID, cwd=tmp_path)
        assert done.returncode == 1, done.stdout + done.stderr[-2000:]
        assert f"error: {tmp_path}: not a Hub-ready model folder: config.json is missing" in done.stderr
        assert "Traceback" not in done.stderr


def test_docstring_examples_name_the_quickstart_model_folder():
    """The quick-start saves the model to `<output_dir>/model`; `quickstart_output` itself has no config.json and a
    push of it is refused (a card rendered for it has no input contract)."""
    from merit_hf.hub import cards
    from merit_hf.quickstart import QuickstartArguments

    folder = f"{QuickstartArguments().output_dir}/model"
    texts = (push_module.__doc__, push_module.push_model.__doc__, cards.__doc__)
    named = [match.group(1) for text in texts for match in re.finditer(r"(quickstart_output[^\s\"]*)", text)]
    assert len(named) == 4 and set(named) == {folder}, named


def test_the_mock_follows_huggingface_hub_signatures(hf_api):
    """autospec: a call our code might make with a wrong keyword fails here as it would against the real client."""
    with pytest.raises(TypeError):
        hf_api.return_value.upload_folder(repo_id=REPO_ID, folder="x")
    assert isinstance(hf_api.return_value, HfApi)


def test_an_adapter_whose_base_is_a_local_folder_is_refused(tmp_path, hf_api, monkeypatch):
    """The README's LoRA fine-tune writes base_model_name_or_path "quickstart_output/model" (and PEFT's card the tag
    base_model:adapter:quickstart_output/model): it passed, and on the Hub it names a repo of that id, or a user's own
    folder of that name, as the base. A Hub id that is no local folder passes."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart_output" / "model").mkdir(parents=True)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write(adapter, "adapter_model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    card = "---\nbase_model: {base}\nlibrary_name: peft\n---\n# adapter\n"
    for base, refused in (("quickstart_output/model", True), ("./model", True), ("org/merit-ecg", False)):
        (adapter / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "base_model_name_or_path": base})
        )
        (adapter / "README.md").write_text(card.format(base=base))
        problems = [problem for problem in push_module.check_model_folder(adapter) if "local folder" in problem]
        if refused:
            assert problems == [
                f"{where} is the local folder {base!r}: on the Hub it would name a repo of that id (or a user's own "
                "folder of that name) as the adapter's base. Push the base model first and write its Hub id there "
                "(peft: config = PeftConfig.from_pretrained(folder); config.base_model_name_or_path = 'org/name'; "
                "config.save_pretrained(folder); and the card's base_model)"
                for where in ("adapter_config.json's base_model_name_or_path", "the card's base_model")
            ]
        else:
            assert problems == []


# ----------------------------------------------------------------------------------------------------------------------
# The card fits the folder, and the push leaves the folder as it was
# ----------------------------------------------------------------------------------------------------------------------
def test_the_push_command_takes_the_card_options_and_reports_a_card_error_in_one_line(
    model_folder, hf_api, tmp_path, monkeypatch
):
    """`push --results` had no --base-model, --dataset or --license (cards rendered through it had no `datasets:` and
    always apache-2.0), and a card that could not be rendered ended in a CardError traceback."""
    import runpy

    from merit_hf.evaluation import write_results

    results = [write_results(results_from_our_metrics(f), tmp_path / f"r{f}.json") for f in (0.1, 1.0)]
    (model_folder / "README.md").unlink()
    main(["push", str(model_folder), REPO_ID, "--results", *map(str, results), "--dataset", "org/ptbxl-merit",
          "--license", "cc-by-nc-4.0", "--base-model", "org/merit-ecg-base", "--endpoint", ENDPOINT])  # fmt: skip
    card = ModelCard.load(model_folder / "README.md")
    assert card.data.datasets == ["org/ptbxl-merit"] and card.data.license == "cc-by-nc-4.0"
    assert card.data.base_model == "org/merit-ecg-base"
    assert {r.dataset_type for r in card.data.eval_results} == {"org/ptbxl-merit"}
    assert {r.metric_config for r in card.data.eval_results} == {
        "task=linear-probe, label_fraction=0.1, seed=0",
        "task=linear-probe, label_fraction=1, seed=0",
    }
    with pytest.raises(SystemExit):  # card options without results: nothing to render
        main(["push", str(model_folder), REPO_ID, "--base-model", "org/x", "--endpoint", ENDPOINT])

    config = json.loads((model_folder / "config.json").read_text())
    (model_folder / "config.json").write_text(json.dumps({**config, "model_type": "merit_report"}))
    monkeypatch.setattr(sys, "argv", ["merit_hf.hub", "push", str(model_folder), REPO_ID, "--results",
                                      str(results[0]), "--overwrite-card"])  # fmt: skip
    with pytest.raises(SystemExit, match="^error: a report-generation card needs base_model"):
        runpy.run_module("merit_hf.hub", run_name="__main__")


def test_an_existing_card_is_not_overwritten_and_a_refused_push_puts_it_back(model_folder, hf_api, tmp_path):
    """`push --results` replaced a hand-written README.md without a word, and a push refused after the card was
    rendered left the new card in place of the old one."""
    from merit_hf.evaluation import write_results

    results = write_results(results_from_our_metrics(), tmp_path / "results.json")
    with pytest.raises(HubPushError, match=r"README.md exists and differs from the card rendered from the results"):
        push_model(model_folder, REPO_ID, results=results, endpoint=ENDPOINT)
    assert (model_folder / "README.md").read_text() == HAND_WRITTEN_CARD

    write(model_folder, "optimizer.pt")  # refused by the check, after the card was rendered
    with pytest.raises(HubFolderError, match="pickled weights"):
        push_model(model_folder, REPO_ID, results=results, overwrite_card=True, endpoint=ENDPOINT)
    assert (model_folder / "README.md").read_text() == HAND_WRITTEN_CARD
    (model_folder / "README.md").unlink()
    with pytest.raises(HubFolderError, match="pickled weights"):
        push_model(model_folder, REPO_ID, results=results, endpoint=ENDPOINT)
    assert not (model_folder / "README.md").exists()
    hf_api.assert_not_called()

    (model_folder / "optimizer.pt").unlink()
    (model_folder / "README.md").write_text(HAND_WRITTEN_CARD)
    push_model(model_folder, REPO_ID, results=results, overwrite_card=True, endpoint=ENDPOINT)
    assert "model-index" in (model_folder / "README.md").read_text()
    push_model(model_folder, REPO_ID, results=results, endpoint=ENDPOINT)  # the same card again: nothing to refuse


def test_configs_are_put_back_when_the_upload_fails(model_folder, hf_api):
    """The local `_name_or_path` cleared for the upload stayed cleared when the upload failed (restored only when the
    check refused the folder); the folder is now left as it was whatever happens."""
    config = json.loads((model_folder / "config.json").read_text())
    config["text_config"]["_name_or_path"] = "/home/me/.venv/lib/python3.11/site-packages/minilm/model"
    (model_folder / "config.json").write_text(json.dumps(config))
    before = (model_folder / "config.json").read_bytes()
    hf_api.return_value.upload_folder.side_effect = ConnectionError("the Hub went away")
    with pytest.raises(ConnectionError):
        push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
    assert (model_folder / "config.json").read_bytes() == before
    hf_api.return_value.upload_folder.side_effect = None
    push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
    assert (model_folder / "config.json").read_bytes() == before


def test_local_paths_in_any_pushed_text_file_and_large_stray_files_are_refused(model_folder, hf_api):
    """Only `.json` and `.md` files were searched for local paths: a `train_config.yaml` or `train.log` naming
    `/home/alice/...` passed, and so did a 16 MB `val_embeddings.npy`."""
    for name, text in (
        ("train_config.yaml", "output_dir: /home/alice/secret_project/run1\n"),
        ("logs/train.log", "step 1 saved to /data/alice/run1/ckpt\n"),
        ("notes.txt", "weights copied from C:\\Users\\alice\\merit\n"),
        ("setup.cfg", "[paths]\ncache = ~/merit/cache\n"),
        ("train.py", "DATA = '/scratch/alice/ptbxl'\n"),
        ("README.md", f"---\n{CARD_METADATA}- base_model:adapter:/home/alice/base\n---\n# MERIT\n"),  # PEFT's tag
    ):
        write(model_folder, name, text.encode())
        with pytest.raises(HubFolderError, match=rf"{re.escape(name)} names local paths"):
            push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
        (model_folder / name).unlink()
    (model_folder / "README.md").write_text(HAND_WRITTEN_CARD)
    assert "/proc/cpuinfo" in (model_folder / "modeling_merit.py").read_text()  # the OS's own paths pass

    np.save(model_folder / "val_embeddings.npy", np.zeros((4096, 1024), np.float32))  # 16 MiB
    with pytest.raises(HubFolderError, match=r"val_embeddings.npy is 16.0 MiB and neither weights \(\*.safetensors\)"):
        push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
    hf_api.assert_not_called()
    push_model(model_folder, REPO_ID, endpoint=ENDPOINT, ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, "*.npy"])
    (model_folder / "val_embeddings.npy").unlink()
    write(model_folder, "tokenizer.json", b"{" + b" " * (11 * 2**20) + b"}")  # a large tokenizer is part of the model
    push_model(model_folder, REPO_ID, endpoint=ENDPOINT)


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        (CARD_METADATA.replace("apache-2.0", "not-a-license"), "README.md: license 'not-a-license' is not a Hub"),
        (
            CARD_METADATA + "model-index: [{name: x, results: [{task: {}}]}]\n",
            "README.md: the card's metadata does not parse",
        ),  # fmt: skip
    ],
)
def test_the_card_metadata_is_checked_before_the_upload(model_folder, hf_api, metadata, problem):
    """The push only checked that README.md existed: metadata the Hub needs, or a licence it does not know, passed."""
    (model_folder / "README.md").write_text(f"---\n{metadata}---\n# MERIT\n")
    with pytest.raises(HubFolderError, match=re.escape(problem)):
        push_model(model_folder, REPO_ID, endpoint=ENDPOINT)
    hf_api.assert_not_called()


def test_a_card_for_another_kind_of_folder_or_other_weights_is_refused(model_folder, hf_api, tmp_path):
    """A two-tower card (AutoModel code, no base_model) passed the check in a report adapter's folder, and a card
    rendered for one folder's weights could be pushed with others."""
    from merit_hf.hub.cards import render_model_card

    card = render_model_card(results_from_our_metrics(), REPO_ID, model_folder=model_folder)
    card.save(model_folder / "README.md")
    assert push_module.check_model_folder(model_folder) == []
    adapter = tmp_path / "report_adapter"
    adapter.mkdir()
    write(adapter, "adapter_model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": "org/merit-report",
        "auto_mapping": {"base_model_class": "MeritForReportGeneration"}}))  # fmt: skip
    card.save(adapter / "README.md")
    problems = push_module.check_model_folder(adapter)
    assert any(p.startswith("README.md is the card of a two_tower folder, but this folder holds a report_adapter")
               for p in problems), problems  # fmt: skip
    assert any(p.startswith("README.md has no base_model, and this folder is a report_adapter") for p in problems)

    other = tmp_path / "other"
    other.mkdir()
    for path in model_folder.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one weight changed
    weights.write_bytes(bytes(data))
    with pytest.raises(HubFolderError, match=r"README.md was rendered for other weights \(tensors [0-9a-f]{16}"):
        push_model(other, REPO_ID, endpoint=ENDPOINT)
    hf_api.assert_not_called()


def test_an_unedited_dataset_card_template_is_refused(tmp_path, hf_api):
    """A WFDB conversion keeps the template card (`license: other`, "Replace this section before sharing"): it passed
    the dataset push check, and the data would have been published without a licence."""
    import datasets

    from merit_hf.hub.cards import write_dataset_card

    folder = tmp_path / "wfdb-merit"
    datasets.Dataset.from_dict({"ecg_id": [0, 1]}).to_parquet(folder / "data" / "records-00000-of-00001.parquet")
    write_dataset_card(REPO_ROOT / "dataset_scripts" / "wfdb" / "README.md", folder)
    with pytest.raises(HubFolderError) as error:
        push_dataset(folder, "org/wfdb-merit", endpoint=ENDPOINT)
    assert "README.md: license is `other` without `license_name`" in str(error.value)
    assert "README.md: the card still holds the template's 'Replace this section before sharing'" in str(error.value)
    hf_api.assert_not_called()


# ----------------------------------------------------------------------------------------------------------------------
# Review findings: what the Hub accepts passes, leaks are found where they are
# ----------------------------------------------------------------------------------------------------------------------
def test_ignore_patterns_reach_the_dataset_folder_check(tmp_path, hf_api):
    """The dataset refusal said `--ignore 'val_embeddings.npy'`, but the dataset check never got the patterns."""
    folder = tmp_path / "ptbxl-merit"
    write(folder, "data/test-00000-of-00001.parquet", b"PAR1")
    (folder / "README.md").write_text(DATASET_CARD)
    np.save(folder / "val_embeddings.npy", np.zeros((3 * 2**20,), np.float32))  # 12 MiB
    write(folder, "notes/loader.py", b"DATA = '/home/alice/ptbxl'\n")
    with pytest.raises(HubFolderError, match=r"val_embeddings.npy is 12.0 MiB .* --ignore 'val_embeddings.npy'"):
        push_dataset(folder, "org/ptbxl-merit", endpoint=ENDPOINT)
    hf_api.assert_not_called()
    patterns = [*DEFAULT_IGNORE_PATTERNS, "val_embeddings.npy", "notes/*"]
    assert push_module.check_dataset_folder(folder, patterns) == []
    push_dataset(folder, "org/ptbxl-merit", endpoint=ENDPOINT, ignore_patterns=patterns)
    main(["push", str(folder), "org/ptbxl-merit", "--repo-type", "dataset", "--endpoint", ENDPOINT,
          "--ignore", "val_embeddings.npy", "--ignore", "notes/*"])  # fmt: skip
    assert hf_api.return_value.upload_folder.call_count == 2


def trainer_card() -> str:
    """The card `Trainer.create_model_card` writes after a run without evaluation (`model-index` with no results)."""
    from transformers.modelcard import TrainingSummary

    summary = TrainingSummary(model_name="merit-ecg-finetuned", finetuned_from="org/merit-ecg", tasks=None,
                              dataset=None, eval_results={}, hyperparameters={"learning_rate": 1e-4})  # fmt: skip
    return summary.to_model_card()


def peft_card(base: str = "org/merit-ecg") -> str:
    """What PEFT's `save_pretrained` writes beside an adapter (`PeftModel.create_or_update_model_card`): the default
    template of huggingface_hub, its metadata, and its `Framework versions` block."""
    from huggingface_hub import ModelCardData

    card = ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    card.data["tags"] = [f"base_model:adapter:{base}", "lora", "transformers"]
    card.data["base_model"] = base
    card.text = "\n".join([*card.text.splitlines(), "### Framework versions\n\n- PEFT 0.21.2"])
    return str(card)


@pytest.mark.parametrize(
    "card",
    [
        "---\nlicense: mit\n---\n# My MERIT\n",  # a hand-written card: no library_name, tags or pipeline_tag
        "---\ntags:\n- ecg\n---\n# My MERIT\n",  # no licence: a warning
        "trainer",
        "peft",
    ],
)
def test_cards_the_hub_accepts_pass_the_push_check(model_folder, hf_api, card, caplog):
    """A card was refused for lacking `library_name`, `tags` or `pipeline_tag`, none of which the Hub requires, and a
    Trainer card for its `model-index` without results (`results: []`)."""
    from merit_hf.hub.cards import model_card_problems

    text = {"trainer": trainer_card, "peft": peft_card}.get(card, lambda: card)()
    if card == "trainer":
        assert "results: []" in text
    (model_folder / "README.md").write_text(text)
    assert model_card_problems(model_folder / "README.md") == []
    with caplog.at_level("WARNING", logger="merit_hf.hub.cards"):
        assert push_module.check_model_folder(model_folder) == []
    assert ("names no license" in caplog.text) == ("license" not in text.split("---")[1])
    push_model(model_folder, REPO_ID, endpoint=ENDPOINT)


def test_the_weights_marker_is_of_the_tensors_not_of_the_files(model_folder, hf_api, tmp_path):
    """The card recorded a digest of the weight files' bytes: the same weights re-saved with other sharding were
    refused as "rendered for other weights"."""
    from merit_hf.hub.cards import card_marker, folder_weights_digest, render_model_card

    card = render_model_card(results_from_our_metrics(), REPO_ID, model_folder=model_folder)
    card.save(model_folder / "README.md")
    digest = card_marker(str(card))[1]
    assert digest is not None and push_module.check_model_folder(model_folder) == []
    model = MeritModel.from_pretrained(model_folder)
    (model_folder / "model.safetensors").unlink()
    model.save_pretrained(model_folder, max_shard_size="20KB")
    assert len(list(model_folder.glob("*.safetensors"))) > 1
    assert folder_weights_digest(model_folder) == digest
    assert push_module.check_model_folder(model_folder) == []
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    for path in model_folder.glob("*.safetensors"):
        path.unlink()
    model.save_pretrained(model_folder)
    (problem,) = push_module.check_model_folder(model_folder)
    assert problem.startswith(f"README.md was rendered for other weights (tensors {digest}; this folder's tensors")


def adapter_folder(tmp_path: Path, card: str | None) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path / "classifier_adapter"
    folder.mkdir()
    save_file({"lora_A.weight": torch.zeros(2, 4)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": "org/merit-ecg"}))  # fmt: skip
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


def test_peft_s_own_template_card_is_replaced_without_overwrite_card(tmp_path, hf_api):
    """Every adapter folder holds PEFT's template README.md, so `push <adapter> --results ...` always needed
    `--overwrite-card`, with a message that did not say who wrote that README."""
    from merit_hf.evaluation import write_results

    results = write_results(results_from_our_metrics(), tmp_path / "results.json")
    folder = adapter_folder(tmp_path, peft_card())
    assert push_module.peft_template_card(peft_card())
    push_model(folder, "org/merit-lora", results=results, endpoint=ENDPOINT)
    assert "<!-- merit_hf card: kind=classifier_adapter" in (folder / "README.md").read_text()

    edited = peft_card().replace("[More Information Needed]", "Alice, for the ECG group", 1)
    assert not push_module.peft_template_card(edited)
    assert not push_module.peft_template_card(
        peft_card().replace("library_name: peft", "library_name: peft\nlicense: mit")
    )
    (folder / "README.md").write_text(edited)
    with pytest.raises(
        HubPushError, match=r"README.md exists and differs .* \(PEFT's save_pretrained wrote it, and it"
    ):
        push_model(folder, "org/merit-lora", results=results, endpoint=ENDPOINT)
    assert (folder / "README.md").read_text() == edited
    push_model(folder, "org/merit-lora", results=results, overwrite_card=True, endpoint=ENDPOINT)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("tools/convert.py", "#!/usr/bin/env python\n# matches /ab/cd/12 and /etc/hosts\n"),
        ("notes.txt", "POST /v1/chat/completions and GET /api/models/org\n"),
        (
            "tokenizer.json",
            json.dumps({"model": {"vocab": [["/s", -9.1], ["/usr/x", -2.0]], "merges": ["/ s", "Ġ /", "/ >"]}}),
        ),  # fmt: skip
        ("vocab.json", json.dumps({"/s": 1, "/home/x/y": 2})),
        ("merges.txt", "#version: 0.2\n/ s\n/ >\n"),
        ("config_extra.json", json.dumps({"route": "/v1/chat/completions", "example": "a/b/c"})),
    ],
)
def test_text_that_is_no_local_path_passes(model_folder, hf_api, name, text):
    """Shebangs, API routes, examples in comments and tokenizer vocabularies and merges were taken as local paths."""
    write(model_folder, name, text.encode())
    assert push_module.leak_problems(model_folder) == []


@pytest.mark.parametrize(
    ("name", "text", "found"),
    [
        ("notes.txt", "the weights are at file:///home/me/x\n", "file:///home/me/x"),
        ("run.py", "#!/usr/bin/env python\nROOT = '/work/alice/ptbxl'\n", "/work/alice/ptbxl"),
        (
            "train/dataset_info.json",
            json.dumps({"description": 'PTB-XL labels\nPTB-XL source: {"source": "/work/main/data/ptbxl_sample"}'}),
            "/work/main/data/ptbxl_sample",
        ),
        ("run_config.json", json.dumps({"output_dir": "/lustre/alice/run1"}), "/lustre/alice/run1"),
        ("README.md", f"---\n{CARD_METADATA}---\nsee file:///home/me/x\n", "file:///home/me/x"),
    ],
)
def test_local_paths_anywhere_in_text_and_json_strings_are_found(model_folder, hf_api, name, text, found):
    """A path inside a JSON string (a `save_to_disk` `dataset_info.json` description) and a `file://` URL passed."""
    write(model_folder, name, text.encode())
    (problem,) = push_module.leak_problems(model_folder)
    assert problem.startswith(name) and found in problem, problem


@pytest.mark.parametrize(
    "name",
    [
        "qwen.tiktoken",
        "tokenizer_config.json",
        "added_tokens.json",
        "special_tokens_map.json",
        "vocab.bpe",
        "model.safetensors.index.json",
    ],  # fmt: skip
)
def test_large_tokenizer_files_and_the_weights_index_are_part_of_the_model(model_folder, hf_api, name):
    with open(model_folder / name, "wb") as stream:  # sparse 11 MiB
        stream.truncate(11 * 2**20)
    assert push_module.large_file_problems(model_folder, push_module.MODEL_LARGE_FILES, "weights") == []


def test_a_card_rendered_without_the_folder_records_no_kind(tmp_path, hf_api, saved_model, model_folder):
    """A card rendered without --model-folder was labelled a two_tower card, and the push refused it for an encoder
    ("the card of a two_tower folder, but this folder holds a encoder")."""
    from merit_hf.hub.cards import card_marker, render_model_card

    card = str(render_model_card(results_from_our_metrics(), REPO_ID))
    assert card_marker(card) == (None, None) and "<!-- merit_hf card -->" in card
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    for path in model_folder.iterdir():
        (encoder / path.name).write_bytes(path.read_bytes())
    config = json.loads((encoder / "config.json").read_text())
    (encoder / "config.json").write_text(json.dumps({**config, "model_type": "merit_ecg"}))
    (encoder / "README.md").write_text(card)
    assert not [p for p in push_module.check_model_folder(encoder) if "is the card of" in p]
    assert push_module._a("encoder") == "an encoder" and push_module._a("two_tower") == "a two_tower"
