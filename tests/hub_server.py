"""A local Hugging Face Hub-compatible HTTP server for tests (stdlib only, in-memory).

It implements the endpoints ``huggingface_hub`` itself calls, with the JSON shapes and headers it parses, so the
real client runs unmodified against it through ``HF_ENDPOINT``:

- ``POST /api/repos/create``, ``POST /api/validate-yaml``
- ``GET /api/models`` (list_models: author, search, sort, limit), ``GET /api/models/{repo}[/revision/{rev}]``
  (model_info, with sizes and LFS info when ``blobs=true``)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``, ``GET /api/models/{repo}/commits/{rev}``
- ``POST /api/models/{repo}/preupload/{rev}``, ``POST /api/models/{repo}/commit/{rev}`` (ndjson: regular files
  base64 inline, LFS files by sha256, deletions, ``parentCommit`` checked)
- ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer, no Xet), ``PUT /__lfs/{oid}``, ``POST /__lfs/verify``
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` / ``X-Linked-Etag`` / ``X-Linked-Size``

Faults are injected per request (``fail``): an HTTP status (429, 500, ...), ``drop`` (read the request, close the
connection without answering), ``drop_after`` (do the work, then close without answering: a lost response) or
``timeout:S`` (hold the request S seconds, do nothing, close: a Hub that stops answering).
Every request is logged (``requests``) so tests can count retries.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.gguf", "*.bin", "*.onnx", "*.onnx_data", "*.npz", "*.pt")
LFS_MIN_SIZE = 1 << 20
GITATTRIBUTES = b"".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n".encode() for p in LFS_PATTERNS)


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def tree_entry(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": path, "size": len(self.data), "oid": git_oid(self.data)}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return entry


@dataclass
class Commit:
    oid: str
    title: str
    message: str
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    gated_allowed: set[str] = field(default_factory=set)
    commits: list[Commit] = field(default_factory=list)  # oldest first, all on main
    tags: dict[str, str] = field(default_factory=dict)
    created: str = ""

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def resolve(self, rev: str | None) -> Commit | None:
        rev = unquote(rev or "main")
        if rev == "main":
            return self.head
        if rev in self.tags:
            rev = self.tags[rev]
        return next((c for c in self.commits if c.oid == rev), None)


@dataclass
class Fault:
    pattern: re.Pattern
    method: str | None
    actions: list[str]


class Reply(Exception):
    """Raised by a handler to answer with an error status."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


class HubState:
    """Repos, LFS objects, faults and the request log; every method is thread-safe."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, str]] = []
        self.lock = threading.RLock()
        self._clock = 0

    # -- helpers for tests ------------------------------------------------------------------------------------
    def now(self) -> str:
        with self.lock:
            self._clock += 1
            stamp = datetime(2025, 1, 1, tzinfo=timezone.utc).timestamp() + self._clock
        return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    def create_repo(self, repo_id: str, files: dict[str, bytes | str | Path] | None = None, *, private: bool = False,
                    gated: bool = False, message: str = "initial commit") -> str:
        """A repo with its first commit (``.gitattributes``), then ``files`` in a second one (as the Hub does)."""
        with self.lock:
            if repo_id in self.repos:
                raise ValueError(f"{repo_id} exists")
            repo = Repo(repo_id, private=private, gated=gated, created=self.now())
            self.repos[repo_id] = repo
            self._commit(repo, {".gitattributes": Blob(GITATTRIBUTES, False)}, set(), "initial commit", "")
            if files:
                return self.push(repo_id, files, message=message)
            return repo.head.oid

    def push(self, repo_id: str, files: dict[str, bytes | str | Path], *, message: str = "update",
             delete: tuple[str, ...] = ()) -> str:
        """A new commit on main (e.g. "a new release appears")."""
        blobs = {}
        for path, content in files.items():
            data = Path(content).read_bytes() if isinstance(content, Path) else (
                content.encode() if isinstance(content, str) else content)
            blobs[path] = Blob(data, is_lfs(path, data))
        with self.lock:
            return self._commit(self.repos[repo_id], blobs, set(delete), message, "").oid

    def tag(self, repo_id: str, name: str, oid: str | None = None) -> None:
        with self.lock:
            repo = self.repos[repo_id]
            repo.tags[name] = oid or repo.head.oid

    def commits(self, repo_id: str) -> list[Commit]:
        with self.lock:
            return list(self.repos[repo_id].commits) if repo_id in self.repos else []

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        with self.lock:
            commit = self.repos[repo_id].resolve(rev)
            return {p: b.data for p, b in commit.files.items()}

    def fail(self, pattern: str, *actions: str | int, method: str | None = None) -> None:
        """The next requests whose path matches ``pattern`` (regex) get ``actions`` in turn: a status code,
        ``"drop"``, ``"drop_after"`` or ``"timeout:SECONDS"`` (hold the request that long without doing anything,
        then close the connection: a client with a shorter timeout gives up first)."""
        with self.lock:
            self.faults.append(Fault(re.compile(pattern), method, [str(a) for a in actions]))

    def count(self, method: str, pattern: str) -> int:
        rx = re.compile(pattern)
        with self.lock:
            return sum(1 for m, p, _ in self.requests if m == method and rx.search(p))

    # -- internals --------------------------------------------------------------------------------------------
    def _commit(self, repo: Repo, add: dict[str, Blob], delete: set[str], title: str, message: str) -> Commit:
        files = dict(repo.commits[-1].files) if repo.commits else {}
        for path in delete:
            files = {p: b for p, b in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
        files.update(add)
        parent = repo.commits[-1].oid if repo.commits else ""
        h = hashlib.sha1(f"{parent}\0{title}\0{message}\0{len(repo.commits)}".encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + files[path].sha256.encode())
        commit = Commit(h.hexdigest(), title, message, self.now(), files)
        repo.commits.append(commit)
        return commit

    def take_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            for fault in self.faults:
                if fault.actions and (fault.method in (None, method)) and fault.pattern.search(path):
                    return fault.actions.pop(0)
        return None


def is_lfs(path: str, data: bytes) -> bool:
    return any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS) or len(data) >= LFS_MIN_SIZE


def _card_data(files: dict[str, Blob]) -> dict | None:
    readme = files.get("README.md")
    if readme is None:
        return None
    import yaml

    m = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.data.decode("utf-8", "replace"), re.S)
    data = yaml.safe_load(m.group(1)) if m else None
    return data if isinstance(data, dict) else None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HubServer"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing ---------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handle(self, method: str) -> None:
        state = self.server.state
        url = urlsplit(self.path)
        path, query = url.path, {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._body() if method in ("POST", "PUT") else b""
        fault = state.take_fault(method, path)
        if fault == "drop":
            state.requests.append((method, path, "drop"))
            return self._drop()
        if fault is not None and fault.startswith("timeout:"):  # a Hub that stops answering: nothing is done
            state.requests.append((method, path, "timeout"))
            time.sleep(float(fault.partition(":")[2]))
            return self._drop()
        if fault is not None and fault.isdigit():
            state.requests.append((method, path, fault))
            return self._send(int(fault), {"error": f"injected {fault}"})
        try:
            status, payload, headers = self.server.route(method, path, query, body, self._token())
        except Reply as r:
            status, payload, headers = r.status, {"error": r.message, **r.extra}, dict(r.headers)
            if r.code:
                headers["X-Error-Code"] = r.code
            headers.setdefault("X-Error-Message", r.message)
        state.requests.append((method, path, "drop" if fault == "drop_after" else str(status)))
        if fault == "drop_after":
            return self._drop()
        self._send(status, payload, headers, head=method == "HEAD")

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def _send(self, status: int, payload: Any, headers: dict | None = None, head: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json")
        headers.setdefault("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)


API_REPO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?P<rest>/(?:revision|tree|commits|preupload|commit)/.*)?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
LFS_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")


class HubServer(ThreadingHTTPServer):
    """``HubServer(token).start()`` listens on 127.0.0.1 (random port); ``url`` is its endpoint."""

    daemon_threads = True

    def __init__(self, token: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState(token)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    # -- auth -------------------------------------------------------------------------------------------------
    def _write_auth(self, token: str | None) -> None:
        if self.state.token is not None and token != self.state.token:
            raise Reply(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str, token: str | None) -> Repo:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and (token is None or token != self.state.token)):
            raise Reply(404 if token else 401, "Repository not found", "RepoNotFound")
        return repo

    def _commit_of(self, repo: Repo, rev: str | None) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise Reply(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # -- routing ----------------------------------------------------------------------------------------------
    def route(self, method: str, path: str, query: dict, body: bytes, token: str | None):
        with self.state.lock:
            if method == "POST" and path == "/api/repos/create":
                return self._create(json.loads(body), token)
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            if method == "GET" and path == "/api/models":
                return self._list(query, token)
            if method == "PUT" and path.startswith("/__lfs/"):
                return self._lfs_put(path.rsplit("/", 1)[-1], body, token)
            if method == "POST" and path == "/__lfs/verify":
                oid = json.loads(body)["oid"]
                if oid not in self.state.lfs:
                    raise Reply(404, "object not found")
                return 200, {}, {}
            if m := LFS_BATCH.match(path):
                self._write_auth(token)
                return self._lfs_batch(self._repo(m["repo"], token), json.loads(body))
            if m := RESOLVE.match(path):
                return self._resolve(m["repo"], m["rev"], unquote(m["file"]), method, token)
            if m := API_REPO.match(path):
                repo = self._repo(m["repo"], token)
                kind, _, rest = (m["rest"] or "/revision/main").lstrip("/").partition("/")
                rev, _, sub = rest.partition("/")
                if method == "GET" and kind == "revision":
                    return self._info(repo, self._commit_of(repo, rest), query.get("blobs") == "True" or
                                      query.get("blobs") == "true")
                if method == "GET" and kind == "tree":
                    return self._tree(self._commit_of(repo, rev), unquote(sub), query.get("recursive") in ("true", "True"))
                if method == "GET" and kind == "commits":
                    head = self._commit_of(repo, rev)
                    upto = repo.commits[: repo.commits.index(head) + 1]
                    return 200, [{"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                                  "authors": [{"user": "tq-bot"}]} for c in reversed(upto)], {}
                if method == "POST" and kind == "preupload":
                    self._write_auth(token)
                    return self._preupload(self._commit_of(repo, rev), json.loads(body))
                if method == "POST" and kind == "commit":
                    self._write_auth(token)
                    return self._commit(repo, unquote(rev), body)
            raise Reply(404, f"no route for {method} {path}")

    def _create(self, payload: dict, token: str | None):
        self._write_auth(token)
        repo_id = f"{payload.get('organization') or 'tq-user'}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.state.repos:
            raise Reply(409, "You already created this model repo", extra={"url": url})
        self.state.create_repo(repo_id, private=payload.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _validate_yaml(self, payload: dict):
        import yaml

        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", payload.get("content", ""), re.S)
        try:
            data = yaml.safe_load(m.group(1)) if m else {}
        except yaml.YAMLError as e:
            return 400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []}, {}
        if not isinstance(data, dict):
            return 400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _model_json(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        card = _card_data(commit.files) or {}
        return {"_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                "sha": commit.oid, "lastModified": repo.head.date, "createdAt": repo.created, "private": repo.private,
                "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": list(card.get("tags") or []), "pipeline_tag": card.get("pipeline_tag"),
                "library_name": card.get("library_name")}

    def _info(self, repo: Repo, commit: Commit, blobs: bool):
        info = self._model_json(repo, commit)
        card = _card_data(commit.files)
        if card:
            info["cardData"] = card
        siblings = []
        for path, blob in sorted(commit.files.items()):
            entry: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry.update(size=len(blob.data), blobId=git_oid(blob.data))
                if blob.lfs:
                    entry["lfs"] = {"sha256": blob.sha256, "size": len(blob.data), "pointerSize": 134}
            siblings.append(entry)
        info["siblings"] = siblings
        info["usedStorage"] = sum(len(b.data) for b in commit.files.values())
        return 200, info, {}

    def _list(self, query: dict, token: str | None):
        out = []
        for repo in self.state.repos.values():
            if repo.private and token != self.state.token:
                continue
            if query.get("author") and repo.repo_id.split("/")[0] != query["author"]:
                continue
            if query.get("search") and query["search"].lower() not in repo.repo_id.lower():
                continue
            out.append(self._model_json(repo, repo.head))
        if query.get("sort") in ("lastModified", "last_modified", "createdAt", "created_at"):
            key = "lastModified" if "odified" in query["sort"] else "createdAt"
            out.sort(key=lambda r: r[key], reverse=query.get("direction") != "1")
        if query.get("limit"):
            out = out[: int(query["limit"])]
        return 200, out, {}

    def _tree(self, commit: Commit, sub: str, recursive: bool):
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries, folders = [], set()
        for path, blob in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):]
            if "/" in rel and not recursive:
                folders.add(prefix + rel.split("/")[0])
                continue
            if recursive:
                parts = rel.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries.append(blob.tree_entry(path))
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
        return 200, entries, {}

    def _preupload(self, commit: Commit, payload: dict):
        files = []
        for f in payload["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = is_lfs(f["path"], b"x" * f["size"] if f["size"] >= LFS_MIN_SIZE else b"") or b"\0" in sample
            existing = commit.files.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else git_oid(existing.data)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        return 200, {"files": files, "commitOid": commit.oid}, {}

    def _lfs_batch(self, repo: Repo, payload: dict):
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs:
                entry["actions"] = {"upload": {"href": f"{self.url}/__lfs/{obj['oid']}", "header": {}},
                                    "verify": {"href": f"{self.url}/__lfs/verify", "header": {}}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, {}

    def _lfs_put(self, oid: str, body: bytes, token: str | None):
        if hashlib.sha256(body).hexdigest() != oid:
            raise Reply(400, "sha256 mismatch")
        self.state.lfs[oid] = body
        return 200, b"", {}

    def _commit(self, repo: Repo, rev: str, body: bytes):
        if rev != "main":
            raise Reply(400, "only main can be committed to in the test server")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        parent = header.get("parentCommit")
        if parent and parent != repo.head.oid:
            raise Reply(412, "A commit has happened since. Please refresh and try again.")
        add, delete = {}, set()
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                data = base64.b64decode(value["content"])
                add[value["path"]] = Blob(data, False)
            elif key == "lfsFile":
                if value["oid"] not in self.state.lfs:
                    raise Reply(422, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                add[value["path"]] = Blob(self.state.lfs[value["oid"]], True)
            elif key in ("deletedFile", "deletedFolder"):
                delete.add(value["path"])
        commit = self.state._commit(repo, add, delete, header["summary"], header.get("description") or "")
        return 200, {"success": True, "commitOid": commit.oid, "commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.oid}",
                     "pullRequestUrl": None, "hookOutput": ""}, {}

    def _resolve(self, repo_id: str, rev: str, file: str, method: str, token: str | None):
        repo = self._repo(repo_id, token)
        if repo.gated and (token is None or token not in repo.gated_allowed):
            raise Reply(403 if token else 401, f"Access to model {repo_id} is restricted and you are not in the "
                        "authorized list. Visit the model page to ask for access.", "GatedRepo")
        commit = self._commit_of(repo, rev)
        blob = commit.files.get(file)
        if blob is None:
            raise Reply(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        etag = blob.sha256 if blob.lfs else git_oid(blob.data)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(blob.data))})
        return 200, blob.data, headers


def wait_until(predicate, timeout: float = 5.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def configure_client(monkeypatch, server: HubServer, home: Path, token: str | None) -> None:
    """Point ``huggingface_hub`` at ``server`` for one test: HF_ENDPOINT, HF_TOKEN, a private HF_HOME (no cache or
    stored token of the user is read or written), no Xet (the server speaks plain LFS), online.

    ``huggingface_hub`` reads these variables once, at import: its ``constants`` are patched as well.
    """
    from huggingface_hub import constants

    home.mkdir(parents=True, exist_ok=True)
    env = {"HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    patched = {"ENDPOINT": server.url, "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
               "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_TOKEN_PATH": str(home / "token"),
               "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"), "HF_HUB_DISABLE_XET": True,
               "HF_HUB_OFFLINE": False, "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"}}
    for key, value in patched.items():
        if hasattr(constants, key):
            monkeypatch.setattr(constants, key, value)
