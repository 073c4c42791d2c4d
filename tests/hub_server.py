"""A loopback fake of the Hugging Face Hub HTTP API, for tests that run the *unmodified* huggingface_hub and
transformers client code end to end (create repo, preupload, Xet or Git-LFS upload, commit, download).

It implements the routes that huggingface_hub 2.4 really calls (`../shared/notes/hub.md` §2), plus
`PUT /api/{type}s/{repo}/settings` as `HfApi.update_repo_settings` sends it (visibility only), and
`POST /api/{type}s/{repo}/discussions` + `GET .../discussions/{num}` for pull requests only (`create_pull_request`,
which the Xet upload pipeline calls for `create_pr=True`, then commits to `refs/pr/<num>`), and nothing more. It
listens on 127.0.0.1 only and needs the standard library plus `hf_xet`, which huggingface_hub already depends on.

What it is not: huggingface.co. It has no auth, no permissions, no gated repos, no rate limits, no CDN redirects, no
tree pagination and no model-card schema checks; it decides LFS vs regular upload by file suffix, size and a
binary sample (the real Hub reads `.gitattributes`). Xet goes through xet-core's `local://` file-system CAS (the
backend hf_xet's own tests use), not the Xet HTTP CAS protocol. A test passing here proves that our files survive
the real client code and the Hub's HTTP protocol; it does not prove that huggingface.co accepts them.

How Xet works here: the token routes hand out `casUrl = local://<root>/cas`, so the client's hf_xet chunks,
deduplicates and writes xorbs and shards there. A commit carries only each file's sha256, so the server reads the
uploaded MDB shards (format v2) to map sha256 -> Xet file hash, then serves `X-Xet-Hash` so Xet downloads go through
hf_xet too. A client with Xet off gets plain bytes, rebuilt lazily from the CAS with hf_xet and checked against the
sha256. A commit naming an LFS object that the server never received fails loudly (HTTP 400).

Run by hand: `python tests/hub_server.py --root /tmp/fakehub --port 18765`, then
`HF_ENDPOINT=http://127.0.0.1:18765 HF_TOKEN=hf_fake ...`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import shutil
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".parquet", ".arrow", ".npy", ".npz", ".h5", ".dat")
LFS_MIN_SIZE = 10 * 1024 * 1024
SHARD_HEADER_SIZE = 48
SHARD_ENTRY_SIZE = 48
FLAG_VERIFICATION = 1 << 31
FLAG_METADATA_EXT = 1 << 30


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _xet_hex(raw: bytes) -> str:
    """Xet prints a 32-byte hash as four little-endian u64 words."""
    return "".join(raw[i : i + 8][::-1].hex() for i in range(0, 32, 8))


def read_shard_file_hashes(data: bytes) -> dict[str, str]:
    """sha256 -> Xet file hash for every file entry of an MDB shard (format v2) that carries its sha256."""
    found, position = {}, SHARD_HEADER_SIZE
    while position + SHARD_ENTRY_SIZE <= len(data):
        file_hash = data[position : position + 32]
        flags, num_entries = struct.unpack_from("<II", data, position + 32)
        position += SHARD_ENTRY_SIZE
        if file_hash == b"\xff" * 32:  # bookend: end of the file-info section
            break
        position += SHARD_ENTRY_SIZE * num_entries
        if flags & FLAG_VERIFICATION:
            position += SHARD_ENTRY_SIZE * num_entries
        if flags & FLAG_METADATA_EXT:
            found[_xet_hex(data[position : position + 32])] = _xet_hex(file_hash)
            position += SHARD_ENTRY_SIZE
    return found


@dataclass
class StoredFile:
    size: int
    git_oid: str  # of the content (regular) or of the LFS pointer
    sha256: str | None = None  # LFS files only
    xet_hash: str | None = None

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    files: dict[str, StoredFile]
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)  # number -> title


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.extra = status, message, error_code, extra or {}


class FakeHub:
    """State and storage of the fake Hub; `start()` serves it on 127.0.0.1 in a daemon thread.

    Example:

    ```python
    >>> hub = FakeHub(tmp_path).start()  # doctest: +SKIP
    >>> hub.endpoint  # 'http://127.0.0.1:<port>'  # doctest: +SKIP
    ```"""

    def __init__(self, root: str | Path, port: int = 0, verbose: bool = False):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.lfs_dir = self.root / "lfs"
        self.cas_dir = self.root / "cas"
        for directory in (self.blob_dir, self.lfs_dir, self.cas_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.xet_index: dict[str, str] = {}  # sha256 -> xet file hash
        self.request_log: list[str] = []
        self.lock = threading.RLock()
        self.verbose = verbose
        self._counter = itertools.count()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.server.daemon_threads = True
        self.server.hub = self
        self.thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def cas_url(self) -> str:
        return f"local://{self.cas_dir}"

    def start(self) -> FakeHub:
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- storage -------------------------------------------------------------------------------------------------
    def lfs_path(self, sha256: str) -> Path:
        return self.lfs_dir / sha256

    def read_file(self, stored: StoredFile) -> bytes:
        if not stored.is_lfs:
            return (self.blob_dir / stored.git_oid).read_bytes()
        path = self.lfs_path(stored.sha256)
        if not path.is_file():
            self._rebuild_from_xet(stored, path)
        return path.read_bytes()

    def _rebuild_from_xet(self, stored: StoredFile, path: Path) -> None:
        import hf_xet

        partial = path.with_suffix(".partial")
        session = hf_xet.XetSession()
        with session.new_file_download_group(
            endpoint=self.cas_url, token="fake", token_expiry_unix_secs=int(time.time()) + 3600
        ) as group:
            group.start_download_file(hf_xet.XetFileInfo(stored.xet_hash, stored.size), str(partial))
        if hashlib.sha256(partial.read_bytes()).hexdigest() != stored.sha256:
            raise HubError(500, f"Xet object {stored.xet_hash} does not rebuild to sha256 {stored.sha256}")
        partial.replace(path)

    def refresh_xet_index(self) -> None:
        for shard in self.cas_dir.rglob("*.mdb"):
            self.xet_index.update(read_shard_file_hashes(shard.read_bytes()))

    def stored_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> StoredFile:
        repo = self.get_repo(repo_type, repo_id)
        return repo.commits[self.resolve_revision(repo, revision)].files[path]

    def corrupt(self, repo_id: str, path: str, repo_type: str = "model", offset: int = -64) -> None:
        """Flip bytes of a stored file in place (a negative test: the client does not verify downloads)."""
        stored = self.stored_file(repo_id, path, repo_type=repo_type)
        target = self.lfs_path(stored.sha256) if stored.is_lfs else self.blob_dir / stored.git_oid
        if not target.is_file():
            self.read_file(stored)
        data = bytearray(target.read_bytes())
        for index in range(offset, offset + 32):
            data[index] ^= 0x5A
        target.write_bytes(bytes(data))

    # -- repositories ------------------------------------------------------------------------------------------
    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository Not Found for {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def resolve_revision(self, repo: Repo, revision: str) -> str:
        revision = unquote(revision)
        for name in (revision, revision.removeprefix("refs/heads/")):
            if name in repo.branches:
                return repo.branches[name]
        tag = revision.removeprefix("refs/tags/")
        if tag in repo.tags:
            return repo.tags[tag]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, StoredFile], title: str, message: str):
        seed = json.dumps([parent, title, sorted((p, f.git_oid) for p, f in files.items()), next(self._counter)])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, title, message, files)
        return oid

    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_type, repo_id, private)
        data = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.parquet filter=lfs diff=lfs merge=lfs -text\n"
        initial = {".gitattributes": self._store_regular(data)}
        repo.branches["main"] = self._new_commit(repo, None, initial, "initial commit", "")
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def _store_regular(self, data: bytes) -> StoredFile:
        oid = git_blob_oid(data)
        (self.blob_dir / oid).write_bytes(data)
        return StoredFile(size=len(data), git_oid=oid)

    def _store_lfs_reference(self, sha256: str, size: int) -> StoredFile:
        xet_hash = self.xet_index.get(sha256)
        if xet_hash is None:
            self.refresh_xet_index()
            xet_hash = self.xet_index.get(sha256)
        if xet_hash is None and not self.lfs_path(sha256).is_file():
            raise HubError(400, f"LFS object {sha256} was never uploaded (neither Xet nor LFS)", "LfsObjectMissing")
        return StoredFile(size=size, git_oid=git_blob_oid(lfs_pointer(sha256, size)), sha256=sha256, xet_hash=xet_hash)

    def apply_commit(self, repo: Repo, revision: str, lines: list[dict], create_pr: bool) -> dict:
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        branch = unquote(revision)
        if create_pr:
            number = self.open_pull_request(repo, header.get("summary", ""), revision)
            branch = f"refs/pr/{number}"
        elif branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
        parent = repo.branches[branch]
        files = dict(repo.commits[parent].files)
        for line in lines:
            key, value = line["key"], line.get("value", {})
            if key == "file":
                files[value["path"]] = self._store_regular(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                files[value["path"]] = self._store_lfs_reference(value["oid"], int(value["size"]))
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: f for path, f in files.items() if not path.startswith(prefix)}
        oid = self._new_commit(repo, parent, files, header.get("summary", ""), header.get("description", ""))
        repo.branches[branch] = oid
        url = f"{self.endpoint}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"
        reply = {"commitUrl": f"{url}/commit/{oid}", "commitOid": oid, "success": True}
        if create_pr:
            reply["pullRequestUrl"] = f"{url}/discussions/{number}"
        return reply

    def open_pull_request(self, repo: Repo, title: str, base: str = "main") -> int:
        """A pull request against `base`: its branch `refs/pr/<number>` starts at `base`'s head."""
        number = len(repo.pull_requests) + 1
        repo.pull_requests[number] = title
        repo.branches[f"refs/pr/{number}"] = self.resolve_revision(repo, base)
        return number

    def upload_mode(self, path: str, size: int, sample: bytes) -> str:
        if path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample:
            return "lfs"
        return "regular"


def _json_body(payload) -> bytes:
    return json.dumps(payload).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        if self.hub.verbose:
            super().log_message(format, *args)

    # -- plumbing ----------------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _dispatch(self):
        split = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        parts = [unquote(part) for part in split.path.strip("/").split("/")]
        body = self._read_body() if self.command in ("POST", "PUT") else b""
        self.hub.request_log.append(f"{self.command} {split.path}")
        try:
            with self.hub.lock:
                self._route(parts, query, body)
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.error_code:
                headers["X-Error-Code"] = error.error_code
            self._send(error.status, _json_body({"error": error.message, **error.extra}), headers)

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    def _route(self, parts: list[str], query: dict, body: bytes):
        hub = self.hub
        if parts[:3] == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body))
        if parts[:2] == ["api", "validate-yaml"]:
            return self._send(200, _json_body({"errors": [], "warnings": []}))
        if parts[:2] == ["api", "whoami-v2"]:
            return self._send(200, _json_body({"name": "fake-user", "type": "user", "orgs": [{"name": "org"}]}))
        if parts[0] == "_lfs":
            return self._lfs_object(parts[1], verify=len(parts) > 2, body=body)
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in REPO_TYPES:
            repo_type, repo_id, rest = REPO_TYPES[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:]
            return self._api(hub.get_repo(repo_type, repo_id), rest, query, body)
        repo_type = REPO_TYPES.get(parts[0])
        if repo_type is not None and parts[0] != "models":
            parts = parts[1:]
        repo_type = repo_type or "model"
        if len(parts) >= 3 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
            repo = hub.get_repo(repo_type, f"{parts[0]}/{parts[1].removesuffix('.git')}")
            return self._lfs_batch(repo, json.loads(body))
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = hub.get_repo(repo_type, f"{parts[0]}/{parts[1]}")
            return self._resolve(repo, parts[3], "/".join(parts[4:]))
        raise HubError(404, f"no route for {self.command} {self.path}")

    # -- routes ------------------------------------------------------------------------------------------------
    def _create_repo(self, payload: dict):
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if "/" not in repo_id:
            repo_id = f"fake-user/{repo_id}"
        url = f"{self.hub.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:
            raise HubError(409, "You already created this repo", extra={"url": url})
        # huggingface_hub 2.x sends `visibility`; older clients sent `private`
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.hub.create_repo(repo_type, repo_id, private)
        self._send(200, _json_body({"url": url, "name": repo_id}))

    def _api(self, repo: Repo, rest: list[str], query: dict, body: bytes):
        hub = self.hub
        action = rest[0] if rest else ""
        if action in ("", "revision"):
            commit = repo.commits[hub.resolve_revision(repo, "/".join(rest[1:]) if rest[1:] else "main")]
            return self._send(200, _json_body(self._info(repo, commit)))
        if action == "preupload":
            commit = repo.commits[hub.resolve_revision(repo, "/".join(rest[1:]))]
            files = []
            for item in json.loads(body)["files"]:
                mode = hub.upload_mode(item["path"], item["size"], base64.b64decode(item.get("sample", "")))
                existing = commit.files.get(item["path"])
                oid = None if existing is None else (existing.sha256 if existing.is_lfs else existing.git_oid)
                files.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            return self._send(200, _json_body({"files": files, "commitOid": commit.oid}))
        if action in ("xet-write-token", "xet-read-token"):
            expiry = int(time.time()) + 3600
            headers = {"X-Xet-Cas-Url": hub.cas_url, "X-Xet-Access-Token": "fake", "X-Xet-Token-Expiration": expiry}
            payload = {"casUrl": hub.cas_url, "accessToken": "fake", "exp": expiry}
            return self._send(200, _json_body(payload), {k: str(v) for k, v in headers.items()})
        if action == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            reply = hub.apply_commit(repo, "/".join(rest[1:]), lines, query.get("create_pr") in ("1", "true"))
            return self._send(200, _json_body(reply))
        if action == "branch":
            name = "/".join(rest[1:])
            if name in repo.branches:
                raise HubError(409, f"Reference already exists: {name}")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.branches[name] = hub.resolve_revision(repo, start)
            return self._send(200, _json_body({}))
        if action == "tag":
            payload = json.loads(body)
            if payload["tag"] in repo.tags:
                raise HubError(409, f"Tag already exists: {payload['tag']}")
            repo.tags[payload["tag"]] = hub.resolve_revision(repo, "/".join(rest[1:]))
            return self._send(200, _json_body({}))
        if action == "discussions" and self.command == "POST":  # create_pull_request (the Xet upload pipeline's)
            payload = json.loads(body)
            if not payload.get("pullRequest"):
                raise HubError(400, "only pull requests are implemented here, not discussions")
            return self._send(200, _json_body({"num": hub.open_pull_request(repo, payload.get("title", ""))}))
        if action == "discussions" and len(rest) == 2:  # get_discussion_details, for a pull request
            number = int(rest[1])
            if number not in repo.pull_requests:
                raise HubError(404, f"Discussion {number} not found")
            details = {
                "num": number,
                "title": repo.pull_requests[number],
                "status": "draft",
                "isPullRequest": True,
                "author": {"name": "fake-user"},
                "createdAt": repo.commits[repo.branches[f"refs/pr/{number}"]].date,
                "repo": {"name": repo.repo_id, "type": repo.repo_type},
                "events": [],
                "changes": {"base": "refs/heads/main"},
                "filesWithConflicts": [],
            }
            return self._send(200, _json_body(details))
        if action == "refs":
            return self._send(200, _json_body(self._refs(repo, query.get("include_prs") in ("1", "true"))))
        if action == "settings" and self.command == "PUT":  # update_repo_settings; only visibility is kept
            payload = json.loads(body)
            if "visibility" in payload or "private" in payload:
                repo.private = payload.get("visibility") == "private" or bool(payload.get("private"))
            return self._send(200, _json_body({}))
        if action == "tree":
            commit = repo.commits[hub.resolve_revision(repo, rest[1])]
            return self._send(200, _json_body(self._tree(commit, "/".join(rest[2:]), query.get("recursive"))))
        if action == "commits":
            return self._send(200, _json_body(self._history(repo, hub.resolve_revision(repo, "/".join(rest[1:])))))
        raise HubError(404, f"no API route {action!r}")

    def _info(self, repo: Repo, commit: Commit) -> dict:
        return {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": commit.oid,
            "private": repo.private,
            "lastModified": commit.date,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }

    def _refs(self, repo: Repo, include_prs: bool) -> dict:
        def ref(kind: str, name: str, target: str) -> dict:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": target}

        branches = [ref("heads", n, t) for n, t in repo.branches.items() if not n.startswith("refs/pr/")]
        refs = {"branches": branches, "converts": [], "tags": [ref("tags", n, t) for n, t in repo.tags.items()]}
        if include_prs:
            refs["pullRequests"] = [
                {"name": n, "ref": n, "targetCommit": t} for n, t in repo.branches.items() if n.startswith("refs/pr/")
            ]
        return refs

    def _tree(self, commit: Commit, folder: str, recursive: str | None) -> list[dict]:
        prefix = folder.rstrip("/") + "/" if folder else ""
        entries, folders = [], set()
        for path, stored in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            relative = path[len(prefix) :]
            if "/" in relative and recursive not in ("1", "true", "True"):
                folders.add(prefix + relative.split("/")[0])
                continue
            for depth in range(1, relative.count("/") + 1):
                folders.add(prefix + "/".join(relative.split("/")[:depth]))
            entry = {"type": "file", "oid": stored.git_oid, "size": stored.size, "path": path}
            if stored.is_lfs:
                entry["lfs"] = {"oid": stored.sha256, "size": stored.size, "pointerSize": 134}
            if stored.xet_hash:
                entry["xetHash"] = stored.xet_hash
            entries.append(entry)
        dirs = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in folders
        ]
        return sorted(dirs, key=lambda d: d["path"]) + entries

    def _history(self, repo: Repo, oid: str | None) -> list[dict]:
        history = []
        while oid is not None:
            commit = repo.commits[oid]
            history.append(
                {"id": oid, "title": commit.title, "message": commit.message, "authors": [], "date": commit.date}
            )
            oid = commit.parent
        return history

    def _lfs_batch(self, repo: Repo, payload: dict):
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if not self.hub.lfs_path(item["oid"]).is_file():
                href = f"{self.hub.endpoint}/_lfs/{item['oid']}"
                entry["actions"] = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
            objects.append(entry)
        self._send(
            200, _json_body({"transfer": "basic", "objects": objects}), content_type="application/vnd.git-lfs+json"
        )

    def _lfs_object(self, sha256: str, verify: bool, body: bytes):
        path = self.hub.lfs_path(sha256)
        if verify:
            if not path.is_file():
                raise HubError(404, f"LFS object {sha256} not uploaded")
            return self._send(200, _json_body({"success": True}))
        if hashlib.sha256(body).hexdigest() != sha256:
            raise HubError(400, f"LFS upload does not match its sha256 {sha256}")
        path.write_bytes(body)
        self._send(200, _json_body({}))

    def _resolve(self, repo: Repo, revision: str, path: str):
        hub = self.hub
        oid = hub.resolve_revision(repo, revision)
        stored = repo.commits[oid].files.get(path)
        if stored is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": oid, "ETag": f'"{stored.git_oid}"', "Accept-Ranges": "bytes"}
        if stored.is_lfs:
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(stored.size)})
        if stored.xet_hash:
            token_url = f"{hub.endpoint}/api/{repo.repo_type}s/{repo.repo_id}/xet-read-token/{quote(oid)}"
            headers.update({"X-Xet-Hash": stored.xet_hash, "Link": f'<{token_url}>; rel="xet-auth"'})
        if self.command == "HEAD":
            self.send_response(200)
            for key, value in {**headers, "Content-Length": str(stored.size)}.items():
                self.send_header(key, value)
            self.end_headers()
            return None
        data = hub.read_file(stored)
        return self._send(200, data, headers, content_type="application/octet-stream")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="storage folder (wiped first)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    shutil.rmtree(args.root, ignore_errors=True)
    hub = FakeHub(args.root, port=args.port, verbose=args.verbose)
    print(f"fake Hub at {hub.endpoint} (storage {args.root})", flush=True)
    hub.server.serve_forever()


if __name__ == "__main__":
    main()
