"""`merit_hf.hub` against a loopback Hub: push, then `from_pretrained("org/merit-ecg")` in a fresh process.

What these tests prove: the **unmodified** huggingface_hub 2.x and transformers client code (create repo, preupload,
Xet upload through hf_xet *or* Git-LFS batch + PUT + verify, the ndjson commit, branches, tags, pull requests,
`hf_hub_download`, `snapshot_download`, `from_pretrained(..., trust_remote_code=True)`) carries our model, feature
extractor, processor, tokenizer, card and a converted dataset through the Hub's HTTP protocol, and that a process
which cannot import merit_hf, with a fresh `HF_HOME`, gets a model whose outputs equal the pushed one. A negative
test corrupts the stored weights on the server and checks that the comparison notices.

What they do not prove: that huggingface.co accepts the upload. The server (`tests/hub_server.py`) is our own fake:
no auth, no gated repos, no rate limits, no CDN redirects, its own LFS rule, and Xet through xet-core's `local://`
file-system CAS instead of the Xet HTTP CAS. Only 127.0.0.1 is contacted.

An opt-in integration test (`RUN_SLOW=1`): it mostly exercises huggingface_hub's own client. Our push policy (what
is uploaded, ignored or refused, and the arguments of every `HfApi` call) is unit-tested against a mocked `HfApi` in
`tests/test_hub_policy.py`, which runs by default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers.utils.hub
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

from merit_hf import MeritFeatureExtractor, MeritModel, MeritProcessor
from merit_hf.hub import (
    HubFolderError,
    check_model_folder,
    push_dataset,
    push_folder,
    push_model,
    pushed_files,
)
from merit_hf.hub.cards import render_model_card
from tests.conftest import BUNDLED_PTBXL, tiny_merit_config
from tests.hub_server import FakeHub
from tests.test_cards import results_from_our_metrics
from tests.test_core_remote_code import BLOCK_MERIT_HF
from tests.test_hub_policy import DATASET_CARD

pytestmark = pytest.mark.slow  # a loopback server, Xet and LFS uploads, fresh processes: about a minute

REPO_ID = "org/merit-ecg"
TOKEN = "hf_fake_token"
RECORD = BUNDLED_PTBXL / "records100" / "00000" / "00001_lr"
REPORT = "sinus rhythm normal ecg"

# Runs in a child process that cannot import merit_hf: the model code must come from the repo (or the cache).
CHILD = (
    BLOCK_MERIT_HF
    + """
import json, sys
import torch
from huggingface_hub import constants
from transformers import AutoModel, AutoProcessor

def outputs(repo_id, cache_dir):
    model = AutoModel.from_pretrained(repo_id, trust_remote_code=True, cache_dir=cache_dir).eval()
    processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True, cache_dir=cache_dir)
    batch = processor(ecgs=sys.argv[2], text=[sys.argv[3]], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    return {"ecg": out.ecg_embeds.tolist(), "text": out.text_embeds.tolist(), "module": type(model).__module__}

results = []
for repo_id, cache_dir, online in json.loads(sys.argv[1]):
    constants.HF_HUB_OFFLINE = not online
    results.append(outputs(repo_id, cache_dir))
print("RESULT" + json.dumps(results))
"""
)


def reference_outputs(model: MeritModel, processor: MeritProcessor) -> dict:
    batch = processor(ecgs=str(RECORD), text=[REPORT], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    return {"ecg": out.ecg_embeds.tolist(), "text": out.text_embeds.tolist()}


def same_outputs(expected: dict, got: dict) -> bool:
    return all(np.allclose(expected[key], got[key], atol=1e-6, rtol=0) for key in ("ecg", "text"))


def load_in_fresh_process(jobs: list[tuple[str, Path, bool]], endpoint: str | None, workdir: Path) -> list[dict]:
    """`from_pretrained` in one new process that cannot import merit_hf, for each `(repo_id, cache_dir, online)`
    (offline jobs set `HF_HUB_OFFLINE` first, so they read only what the cache holds)."""
    env = {**os.environ, "HF_HOME": str(workdir / "child_hf_home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TOKEN", None)
    if endpoint is not None:
        env.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0")
    jobs_json = json.dumps([(repo_id, str(cache_dir), online) for repo_id, cache_dir, online in jobs])
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), jobs_json, str(RECORD), REPORT],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT"))


@pytest.fixture
def model_folder(tmp_path, tokenizer):
    model = MeritModel(tiny_merit_config()).eval()
    feature_extractor = MeritFeatureExtractor.from_model_config(model.config.ecg_config)
    processor = MeritProcessor(feature_extractor, tokenizer)
    folder = tmp_path / "merit-ecg-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    feature_extractor.save_pretrained(folder)
    render_card(folder)
    return model, processor, folder


def render_card(folder: Path) -> None:
    """The folder's card, rendered again whenever its weights change (the push refuses a card of other weights)."""
    card = render_model_card(results_from_our_metrics(), REPO_ID, model_folder=folder, datasets=["org/ptbxl-merit"])
    card.save(folder / "README.md")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The loopback Hub, with this process's huggingface_hub pointed at it (CI keeps HF_HUB_OFFLINE=1 elsewhere)."""
    hub = FakeHub(tmp_path / "fake_hub_storage").start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)  # both are read at import, hence patched here
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    # transformers' HfApi singleton (from_pretrained resolves revisions with it) keeps the first endpoint it saw
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    yield hub
    hub.stop()


@pytest.mark.slow
def test_push_xet_and_lfs_then_from_pretrained_in_fresh_process(model_folder, fake_hub, tmp_path, monkeypatch):
    model, processor, folder = model_folder
    repos = {"xet": REPO_ID, "lfs": REPO_ID + "-lfs"}
    for upload, repo_id in repos.items():
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", upload == "lfs")
        if upload == "lfs":
            # New bytes (logit_scale does not touch the compared embeddings): the server dedups by content across
            # repos, as the real Hub does, so identical weights would be linked to the Xet copy.
            with torch.no_grad():
                model.logit_scale.fill_(2.0)
            model.save_pretrained(folder)
            render_card(folder)
        requests_before = len(fake_hub.request_log)
        result = push_model(folder, repo_id, tag="v0.1", token=TOKEN, endpoint=fake_hub.endpoint)

        stored = fake_hub.stored_file(repo_id, "model.safetensors")
        assert stored.is_lfs
        assert (stored.xet_hash is not None) == (upload == "xet"), f"{upload}: the upload took the other path"
        lfs_batch = f"POST /{repo_id}.git/info/lfs/objects/batch"
        assert (lfs_batch in fake_hub.request_log[requests_before:]) == (upload == "lfs")
        refs = HfApi(endpoint=fake_hub.endpoint).list_repo_refs(repo_id)
        assert [(tag.name, tag.target_commit) for tag in refs.tags] == [("v0.1", result.commit_oid)]

        # Xet off on the way down: Xet-pushed files come back as plain bytes rebuilt from the CAS.
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        snapshot = Path(snapshot_download(repo_id, revision="v0.1", cache_dir=tmp_path / f"snapshot_{upload}"))
        pushed = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert pushed <= {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
        for name in pushed:
            assert (snapshot / name).read_bytes() == (folder / name).read_bytes(), f"{upload}: {name}"

    # Xet on in the child: the Xet-pushed weights come down through hf_xet, the LFS-pushed ones over HTTP.
    xet_cache, lfs_cache = tmp_path / "fresh_cache_xet", tmp_path / "fresh_cache_lfs"
    jobs = [(repos["xet"], xet_cache, True), (repos["xet"], xet_cache, False), (repos["lfs"], lfs_cache, True)]
    loaded = load_in_fresh_process(jobs, fake_hub.endpoint, tmp_path)
    expected = reference_outputs(model, processor)
    for (repo_id, _, online), got in zip(jobs, loaded, strict=True):
        assert got["module"].startswith("transformers_modules."), "the model code did not come from the Hub"
        assert same_outputs(expected, got), f"{repo_id} (online={online}) differs from the pushed model"


@pytest.mark.slow
def test_corrupted_weights_on_the_server_are_noticed(model_folder, fake_hub, tmp_path, monkeypatch):
    """huggingface_hub does not verify downloads: only comparing outputs catches a broken round trip."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    model, processor, folder = model_folder
    push_model(folder, REPO_ID, token=TOKEN, endpoint=fake_hub.endpoint)
    fake_hub.corrupt(REPO_ID, "model.safetensors", offset=-4096)  # inside the tensor data, after the header

    reloaded = MeritModel.from_pretrained(REPO_ID, cache_dir=tmp_path / "cache_after_corruption").eval()
    got = reference_outputs(reloaded, processor)
    assert not same_outputs(reference_outputs(model, processor), got)


@pytest.mark.slow
@pytest.mark.parametrize("upload", ["xet", "lfs"])
def test_pull_request_branch_and_tag(model_folder, fake_hub, tmp_path, monkeypatch, upload):
    """With Xet on (the default), huggingface_hub opens the pull request with `create_pull_request`
    (`POST .../discussions`), then commits to `refs/pr/1`; with Xet off, one commit with `?create_pr=1` does both."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", upload == "lfs")
    model, _, folder = model_folder
    first = push_model(folder, REPO_ID, tag="v0.1", token=TOKEN, endpoint=fake_hub.endpoint)
    unchanged = push_model(folder, REPO_ID, create_pr=True, token=TOKEN, endpoint=fake_hub.endpoint)
    assert (unchanged.changed, unchanged.pr_url, unchanged.commit_oid) == (False, None, first.commit_oid)
    assert fake_hub.get_repo("model", REPO_ID).pull_requests == {}  # no empty pull request was opened
    with torch.no_grad():
        model.logit_scale.fill_(1.0)
    model.save_pretrained(folder)
    render_card(folder)

    requests_before = len(fake_hub.request_log)
    proposal = push_model(folder, REPO_ID, create_pr=True, token=TOKEN, endpoint=fake_hub.endpoint)
    assert proposal.pr_url == f"{fake_hub.endpoint}/org/merit-ecg/discussions/1" and proposal.changed
    opened = f"POST /api/models/{REPO_ID}/discussions" in fake_hub.request_log[requests_before:]
    assert opened == (upload == "xet"), f"{upload}: the pull request took the other path"
    branch = push_model(folder, REPO_ID, revision="v2", token=TOKEN, endpoint=fake_hub.endpoint, commit_message="v2")

    refs = HfApi(endpoint=fake_hub.endpoint).list_repo_refs(REPO_ID, include_pull_requests=True)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": first.commit_oid, "v2": branch.commit_oid}
    assert [(pr.ref, pr.target_commit) for pr in refs.pull_requests] == [("refs/pr/1", proposal.commit_oid)]

    def weights(revision: str) -> bytes:
        path = hf_hub_download(REPO_ID, "model.safetensors", revision=revision, cache_dir=tmp_path / "downloads")
        return Path(path).read_bytes()

    assert weights("main") == weights("v0.1") != weights("v2") == weights("refs/pr/1")
    assert weights("v2") == (folder / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="tag and create_pr"):
        push_model(folder, REPO_ID, create_pr=True, tag="v3", token=TOKEN, endpoint=fake_hub.endpoint)


def test_an_existing_tag_is_refused_before_the_upload(model_folder, fake_hub, monkeypatch):
    """`push --tag v0.1` when v0.1 exists used to commit to main, then fail on the tag with a raw 409 traceback."""
    import runpy

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    _, _, folder = model_folder
    first = push_model(folder, REPO_ID, tag="v0.1", token=TOKEN, endpoint=fake_hub.endpoint)
    (folder / "NOTES.md").write_text("a change that must not reach main\n")
    command = ["merit_hf.hub", "push", str(folder), REPO_ID, "--tag", "v0.1", "--endpoint", fake_hub.endpoint]
    monkeypatch.setattr(sys, "argv", command)
    with pytest.raises(SystemExit) as error:
        runpy.run_module("merit_hf.hub", run_name="__main__")
    assert str(error.value) == (
        f"error: {REPO_ID}: tag 'v0.1' already exists (commit {first.commit_oid}); nothing was uploaded. Choose "
        "another tag, or delete this one first (HfApi().delete_tag) if it should move"
    )
    repo = fake_hub.get_repo("model", REPO_ID)
    assert repo.branches == {"main": first.commit_oid} and repo.tags == {"v0.1": first.commit_oid}
    assert not [request for request in fake_hub.request_log if "/commit/" in request][1:]  # only the first push


def test_refuses_folders_that_would_not_load(model_folder, tmp_path):
    _, _, folder = model_folder
    assert check_model_folder(folder) == []
    (folder / "modeling_merit.py").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    (folder / "heads").mkdir()
    (folder / "heads" / "probe.pt").write_bytes(b"pickle")
    with pytest.raises(HubFolderError) as error:
        push_model(folder, REPO_ID, endpoint="http://127.0.0.1:9")  # fails before any request
    message = str(error.value)
    assert "auto_map names modeling_merit.MeritModel but modeling_merit.py is missing" in message
    assert "pickled weights ['heads/probe.pt', 'pytorch_model.bin']" in message


def add_training_run_outputs(folder: Path) -> None:
    """What a pretraining output_dir (`checkpoints/checkpoint-<step>/`, `runs/`) or a Trainer one holds beside it."""
    for name in ("checkpoints/checkpoint-20/optimizer.bin", "checkpoint-5/rng_state.pth", "runs/events.out.1"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"\x80\x04pickle")
    (folder / "checkpoints" / "checkpoint-20" / "trainer_state.json").write_text("{}")


@pytest.mark.slow
def test_repush_leaves_exactly_the_folder(model_folder, fake_hub, tmp_path, monkeypatch):
    """A stale adapter_config.json from an earlier push would make `AutoModel.from_pretrained(repo)` follow the
    adapter; training-run outputs (optimizer states, pickles) are never uploaded."""
    from transformers import AutoModel

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    model, processor, folder = model_folder
    add_training_run_outputs(folder)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "org/llm"}')
    (folder / "adapter_model.safetensors").write_bytes(b"not read")
    (folder / "notes").mkdir()
    (folder / "notes" / "old.txt").write_text("from the first push")
    render_card(folder)  # the card records the folder's weight files, adapter_model.safetensors included
    push_model(folder, REPO_ID, token=TOKEN, endpoint=fake_hub.endpoint)
    api = HfApi(endpoint=fake_hub.endpoint)
    assert "adapter_config.json" in pushed_files(folder) and "notes/old.txt" in pushed_files(folder)
    assert not [path for path in api.list_repo_files(REPO_ID) if path.startswith(("checkpoint", "runs/"))]

    for name in ("adapter_config.json", "adapter_model.safetensors", "notes/old.txt"):
        (folder / name).unlink()
    render_card(folder)
    push_model(folder, REPO_ID, token=TOKEN, endpoint=fake_hub.endpoint, commit_message="encoder only")
    assert sorted(api.list_repo_files(REPO_ID)) == sorted([".gitattributes", *pushed_files(folder)])
    assert "notes/old.txt" not in pushed_files(folder) and "config.json" in pushed_files(folder)

    reloaded = AutoModel.from_pretrained(REPO_ID, trust_remote_code=True, cache_dir=tmp_path / "cache").eval()
    assert same_outputs(reference_outputs(model, processor), reference_outputs(reloaded, processor))


@pytest.mark.slow
def test_private_is_applied_to_an_existing_public_repo(model_folder, fake_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    _, _, folder = model_folder
    api = HfApi(endpoint=fake_hub.endpoint)
    push_model(folder, REPO_ID, token=TOKEN, endpoint=fake_hub.endpoint)
    push_model(folder, REPO_ID + "-new", private=True, token=TOKEN, endpoint=fake_hub.endpoint)
    assert (api.model_info(REPO_ID).private, api.model_info(REPO_ID + "-new").private) == (False, True)

    (folder / "notes.txt").write_text("not for the public")
    requests_before = len(fake_hub.request_log)
    push_model(folder, REPO_ID, private=True, token=TOKEN, endpoint=fake_hub.endpoint)
    assert api.model_info(REPO_ID).private
    requests = fake_hub.request_log[requests_before:]
    # made private before the new files are committed
    assert requests.index(f"PUT /api/models/{REPO_ID}/settings") < requests.index(
        f"POST /api/models/{REPO_ID}/commit/main"
    )
    push_model(folder, REPO_ID, private=None, token=TOKEN, endpoint=fake_hub.endpoint)  # None never publishes
    assert api.model_info(REPO_ID).private


def test_pull_request_with_a_branch_is_refused_before_any_request(model_folder, fake_hub):
    _, _, folder = model_folder
    with pytest.raises(ValueError, match="create_pr with revision 'dev': the Hub opens pull requests against main"):
        push_model(folder, REPO_ID, create_pr=True, revision="dev", token=TOKEN, endpoint=fake_hub.endpoint)
    assert fake_hub.request_log == [] and fake_hub.repos == {}


def test_push_folder_does_not_grow_the_ignore_list(tmp_path, fake_hub, monkeypatch):
    """upload_folder appends its own patterns to the list it is given; ours must stay as it is."""
    from merit_hf.hub import DEFAULT_IGNORE_PATTERNS

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    before = list(DEFAULT_IGNORE_PATTERNS)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hello")
    push_folder(tmp_path / "folder", "org/notes", token=TOKEN, endpoint=fake_hub.endpoint)
    assert before == DEFAULT_IGNORE_PATTERNS


def test_push_converted_dataset(fake_hub, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    folder = tmp_path / "ptbxl-merit"
    rows = {"ecg_id": [1, 2, 3], "report": ["sinus rhythm", "afib", "lvh"], "signal": np.ones((3, 2, 4)).tolist()}
    datasets.Dataset.from_dict(rows).to_parquet(folder / "data" / "test-00000-of-00001.parquet")
    with pytest.raises(HubFolderError, match="README.md \\(the dataset card\\) is missing"):
        push_dataset(folder, "org/ptbxl-merit", token=TOKEN, endpoint=fake_hub.endpoint)
    (folder / "README.md").write_text(DATASET_CARD)
    push_dataset(folder, "org/ptbxl-merit", token=TOKEN, endpoint=fake_hub.endpoint)

    snapshot = Path(snapshot_download("org/ptbxl-merit", repo_type="dataset", cache_dir=tmp_path / "dataset_cache"))
    reloaded = datasets.Dataset.from_parquet(str(snapshot / "data" / "test-00000-of-00001.parquet"))
    assert reloaded.to_dict() == rows


def test_command_line_renders_the_card_and_pushes(model_folder, fake_hub, tmp_path, monkeypatch, capsys):
    from merit_hf.evaluation import write_results
    from merit_hf.hub import main

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    _, _, folder = model_folder
    (folder / "README.md").unlink()
    results = write_results(results_from_our_metrics(), tmp_path / "results.json")
    summary = main(
        [
            "push",
            str(folder),
            "org/cli-model",
            "--results",
            str(results),
            "--tag",
            "v1",
            "--endpoint",
            fake_hub.endpoint,
        ]
    )
    assert summary["tag"] == "v1" and json.loads(capsys.readouterr().out)["commit_oid"] == summary["commit_oid"]
    card = Path(hf_hub_download("org/cli-model", "README.md", revision="v1", cache_dir=tmp_path / "cli_cache"))
    assert card.read_text() == (folder / "README.md").read_text()
    assert "model-index" in card.read_text()


@pytest.mark.slow
def test_transformers_push_to_hub_reaches_the_same_server(model_folder, fake_hub, tmp_path, monkeypatch):
    """`model.push_to_hub` / `processor.push_to_hub` (transformers' own upload path) on the loopback Hub."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model, processor, _ = model_folder
    model.push_to_hub("org/merit-ecg-transformers", commit_message="push_to_hub")
    processor.push_to_hub("org/merit-ecg-transformers")
    files = set(HfApi(endpoint=fake_hub.endpoint).list_repo_files("org/merit-ecg-transformers"))
    assert {"config.json", "model.safetensors", "modeling_merit.py", "processor_config.json"} <= files

    reloaded = MeritModel.from_pretrained("org/merit-ecg-transformers", cache_dir=tmp_path / "cache").eval()
    assert same_outputs(reference_outputs(model, processor), reference_outputs(reloaded, processor))


@pytest.mark.slow
def test_save_pretrained_with_push_to_hub_uploads_the_zero_shot_prompts(model_folder, fake_hub, tmp_path, monkeypatch):
    """`save_pretrained(push_to_hub=True)` uploads what it writes into the folder, the prompt file of the folder's
    zero-shot pipeline included (transformers uploads inside its own `save_pretrained`, before that file existed)."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model, _, _ = model_folder
    model.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="org/merit-ecg-saved", commit_message="save")
    api = HfApi(endpoint=fake_hub.endpoint)
    files = set(api.list_repo_files("org/merit-ecg-saved"))
    assert {"config.json", "model.safetensors", "modeling_merit.py", "pipeline_merit.py"} <= files
    assert "zero_shot_prompts.json" in files
    prompts = hf_hub_download("org/merit-ecg-saved", "zero_shot_prompts.json", cache_dir=tmp_path / "cache")
    assert Path(prompts).read_text() == (tmp_path / "saved" / "zero_shot_prompts.json").read_text()
    assert api.list_repo_commits("org/merit-ecg-saved")[0].title == "save"


@pytest.mark.slow
def test_save_pretrained_with_push_to_hub_keeps_the_revision(model_folder, fake_hub, tmp_path, monkeypatch):
    """`save_pretrained(push_to_hub=True, revision=...)` commits to that branch, with `push_to_hub`'s other
    arguments (`commit_description`), and leaves `main` alone."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model, _, _ = model_folder
    api = HfApi(endpoint=fake_hub.endpoint)
    api.create_repo("org/merit-ecg-branch")
    api.create_branch("org/merit-ecg-branch", branch="dev")
    model.save_pretrained(
        tmp_path / "saved",
        push_to_hub=True,
        repo_id="org/merit-ecg-branch",
        revision="dev",
        commit_message="to dev",
        commit_description="the dev branch only",
    )
    assert {"config.json", "model.safetensors", "modeling_merit.py"} <= set(
        api.list_repo_files("org/merit-ecg-branch", revision="dev")
    )
    assert "model.safetensors" not in api.list_repo_files("org/merit-ecg-branch")  # main
    assert api.list_repo_commits("org/merit-ecg-branch", revision="dev")[0].title == "to dev"
