"""A test double of the Hugging Face Hub HTTP API, on 127.0.0.1, for the real huggingface_hub client.

It implements just what `HfApi.create_repo / create_branch / list_repo_files / create_commit` and
`snapshot_download` call (huggingface_hub 2.4, legacy-LFS or regular uploads; not Xet):

    POST /api/repos/create                              create a model repo (409 if it exists)
    POST /api/models/{repo}/branch/{branch}             create a branch from main (409 if it exists)
    POST /api/validate-yaml                             README front matter check: always fine
    POST /api/models/{repo}/preupload/{rev}             upload mode per file: "lfs" for *.safetensors, *.png
                                                        and binary samples (like the hub's .gitattributes),
                                                        "regular" otherwise; every file "regular" when lfs=False
    POST /{repo}.git/info/lfs/objects/batch             LFS batch API, "basic" transfer: upload + verify actions
    PUT  /_lfs/upload/{oid}                             the upload href: stores the bytes if their sha256 is oid
    POST /_lfs/verify                                   the verify href
    POST /api/models/{repo}/commit/{rev}                ndjson commit: header, file (base64), lfsFile,
                                                        deletedFile, deletedFolder; parentCommit is checked
    GET  /api/models/{repo}[/revision/{rev}]            model info: id, sha, private, siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]         tree listing (recursive or not), with lfs info
    HEAD|GET /{repo}/resolve/{rev}/{path}               file metadata headers (X-Repo-Commit, ETag,
                                                        X-Linked-Etag/-Size for LFS) and content (Range ok)
    GET  /api/agent-harnesses                           huggingface_hub's agent registry: empty

Auth: requests carry `Authorization: Bearer <token>`; `write_token` may write anything, `read_token` only
read; writes without a token get 401, with the read token 403. Private repos answer 401 RepoNotFound to
readers without a token (as the hub does). Errors carry X-Error-Code (RepoNotFound, RevisionNotFound,
EntryNotFound) so the client raises its specific exceptions. Every request is logged in `requests`;
anything not implemented answers 404 and is logged in `unhandled`.
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"
LFS_PATTERNS = ("*.safetensors", "*.png", "*.bin", "*.pt")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        """The git blob id (of the LFS pointer file for LFS blobs, like git)."""
        if not self.lfs:
            return git_blob_sha1(self.data)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
        return git_blob_sha1(pointer.encode())


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # sha -> {path: blob}
    messages: dict[str, str] = field(default_factory=dict)  # sha -> commit summary

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        return rev if rev in self.commits else None


class FakeHub:
    """The double's state and server. `url` is its endpoint; use as a context manager or start()/stop()."""

    def __init__(self, write_token: str = "hf_double_write", read_token: str = "hf_double_read",
                 user: str = "tester", lfs: bool = True):
        self.write_token, self.read_token, self.user, self.lfs = write_token, read_token, user, lfs
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        self._counter = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "FakeHub":
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state helpers for tests --------------------------------------------------------------

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return {p: b.data for p, b in repo.commits[repo.resolve(rev)].items()}

    def head_blobs(self, repo_id: str, rev: str = "main") -> dict[str, Blob]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(rev)]

    def commit(self, repo_id: str, changes: dict[str, bytes | None], rev: str = "main", message: str = "") -> str:
        """Commit directly (as another client would): path -> new bytes, or None to delete."""
        with self.lock:
            repo = self.repos[repo_id]
            tree = dict(repo.commits[repo.branches[rev]])
            for path, data in changes.items():
                if data is None:
                    tree.pop(path, None)
                else:
                    tree[path] = Blob(data, lfs=self._is_lfs(path, data[:512]))
            return self._new_commit(repo, rev, tree, message)

    # -- internals ----------------------------------------------------------------------------

    def _new_commit(self, repo: Repo, branch: str, tree: dict[str, Blob], message: str) -> str:
        self._counter += 1
        sha = hashlib.sha1(f"commit {self._counter} {message}".encode()).hexdigest()
        repo.commits[sha] = tree
        repo.messages[sha] = message
        repo.branches[branch] = sha
        return sha

    def _is_lfs(self, path: str, sample: bytes, size: int = 0) -> bool:
        if not self.lfs:
            return False
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS) or b"\0" in sample or size > 10_000_000


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer has a Content-Length

        def log_message(self, *args):  # quiet
            pass

        # -- plumbing -------------------------------------------------------------------------

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: dict | None = None, content_type: str = "application/json"):
            self._send(status, json.dumps(obj).encode(), headers, content_type=content_type)

        def _error(self, status: int, message: str, code: str | None = None, head: bool = False):
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

        def _can_write(self) -> bool:
            token = self._token()
            if token == hub.write_token:
                return True
            if token == hub.read_token:
                self._error(403, "You don't have the rights to write here")
            else:
                self._error(401, "Invalid credentials in Authorization header")
            return False

        def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and self._token() not in (hub.write_token, hub.read_token)):
                self._error(401 if repo is not None or self._token() is None else 404, "Repository not found",
                            "RepoNotFound", head=head)
                return None
            return repo

        def _commit(self, repo: Repo, rev: str, head: bool = False) -> str | None:
            sha = repo.resolve(rev)
            if sha is None:
                self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound", head=head)
            return sha

        # -- routing --------------------------------------------------------------------------

        def _route(self, method: str) -> None:
            split = urlsplit(self.path)
            parts = [unquote(p) for p in split.path.strip("/").split("/")]
            query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            body = self._body() if method in ("POST", "PUT") else b""
            hub.requests.append((method, split.path))
            with hub.lock:
                handled = self._dispatch(method, parts, query, body)
            if not handled:
                hub.unhandled.append((method, self.path))
                self._error(404, f"not implemented by the test double: {method} {self.path}")

        def _dispatch(self, method: str, parts: list[str], query: dict, body: bytes) -> bool:
            if method == "GET" and parts == ["api", "agent-harnesses"]:
                self._json(200, {"standardEnvVars": [], "harnesses": {}})
            elif method == "POST" and parts == ["api", "repos", "create"]:
                self._create_repo(json.loads(body))
            elif method == "POST" and parts == ["api", "validate-yaml"]:
                self._json(200, {"errors": [], "warnings": []})
            elif parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = "/".join(parts[2:4]), parts[4:]
                if method == "GET" and not rest:
                    self._model_info(repo_id, "main")
                elif method == "GET" and len(rest) == 2 and rest[0] == "revision":
                    self._model_info(repo_id, rest[1])
                elif method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                    self._tree(repo_id, rest[1], "/".join(rest[2:]), query.get("recursive") in ("True", "true", "1"))
                elif method == "POST" and len(rest) == 2 and rest[0] == "branch":
                    self._create_branch(repo_id, rest[1], json.loads(body or b"{}"))
                elif method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                    self._preupload(repo_id, rest[1], json.loads(body))
                elif method == "POST" and len(rest) == 2 and rest[0] == "commit":
                    self._commit_endpoint(repo_id, rest[1], body, query)
                else:
                    return False
            elif method == "POST" and len(parts) == 6 and parts[2:] == ["info", "lfs", "objects", "batch"] \
                    and parts[1].endswith(".git"):
                self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(body))
            elif method == "PUT" and parts[:2] == ["_lfs", "upload"] and len(parts) == 3:
                self._lfs_put(parts[2], body)
            elif method == "POST" and parts == ["_lfs", "verify"]:
                obj = json.loads(body)
                ok = hub.lfs_store.get(obj["oid"]) is not None and len(hub.lfs_store[obj["oid"]]) == obj["size"]
                self._json(200, {"success": True}) if ok else self._error(404, "object not found")
            elif method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head=method == "HEAD")
            else:
                return False
            return True

        def do_GET(self):
            self._route("GET")

        def do_HEAD(self):
            self._route("HEAD")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        def do_DELETE(self):
            self._route("DELETE")

        # -- endpoints ------------------------------------------------------------------------

        def _create_repo(self, payload: dict) -> None:
            if not self._can_write():
                return
            if payload.get("type", "model") != "model":
                return self._error(400, "the double only hosts model repos")
            repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
            if repo_id in hub.repos:  # the hub's 409 carries the url: create_repo(exist_ok=True) returns it
                return self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
            hub.repos[repo_id] = repo
            hub._new_commit(repo, "main", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)}, "initial commit")
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def _create_branch(self, repo_id: str, branch: str, payload: dict) -> None:
            if not self._can_write() or (repo := self._repo(repo_id)) is None:
                return
            if branch in repo.branches:
                return self._error(409, f"Reference already exists: refs/heads/{branch}")
            start = self._commit(repo, payload.get("startingPoint") or "main")
            if start is not None:
                repo.branches[branch] = start
                self._json(200, {})

        def _model_info(self, repo_id: str, rev: str) -> None:
            if (repo := self._repo(repo_id)) is None or (sha := self._commit(repo, rev)) is None:
                return
            siblings = [{"rfilename": p} for p in sorted(repo.commits[sha])]
            self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                             "disabled": False, "gated": False, "siblings": siblings, "tags": [], "downloads": 0,
                             "likes": 0, "lastModified": "2026-01-01T00:00:00.000Z"})

        def _tree(self, repo_id: str, rev: str, path: str, recursive: bool) -> None:
            if (repo := self._repo(repo_id)) is None or (sha := self._commit(repo, rev)) is None:
                return
            prefix = path.strip("/") + "/" if path.strip("/") else ""
            entries, folders = [], set()
            for p, blob in sorted(repo.commits[sha].items()):
                if not p.startswith(prefix):
                    continue
                rest = p[len(prefix):]
                if not recursive and "/" in rest:
                    folders.add(prefix + rest.split("/", 1)[0])
                    continue
                if recursive:
                    parts = rest.split("/")[:-1]
                    folders.update(prefix + "/".join(parts[:i + 1]) for i in range(len(parts)))
                entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": p}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": 134}
                entries.append(entry)
            if prefix and not entries and not folders:
                return self._error(404, f"{path} does not exist", "EntryNotFound")
            entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
            self._json(200, entries)

        def _preupload(self, repo_id: str, rev: str, payload: dict) -> None:
            if not self._can_write() or (repo := self._repo(repo_id)) is None:
                return
            tree = repo.commits.get(repo.resolve(rev) or "", {})
            files = []
            for f in payload["files"]:
                sample = base64.b64decode(f["sample"])
                lfs = hub._is_lfs(f["path"], sample, f["size"])
                old = tree.get(f["path"])
                oid = None if old is None else (old.sha256 if old.lfs else old.oid)
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": oid})
            self._json(200, {"files": files, "commitOid": repo.resolve(rev)})

        def _lfs_batch(self, repo_id: str, payload: dict) -> None:
            if not self._can_write() or self._repo(repo_id) is None:
                return
            if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
                return self._error(400, "the double supports LFS basic uploads only")
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs_store:
                    entry["authenticated"] = True
                    entry["actions"] = {"upload": {"href": f"{hub.url}/_lfs/upload/{obj['oid']}"},
                                        "verify": {"href": f"{hub.url}/_lfs/verify", "header": {}}}
                objects.append(entry)
            self._json(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

        def _lfs_put(self, oid: str, body: bytes) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, "content does not match its oid")
            hub.lfs_store[oid] = body
            self._send(200)

        def _commit_endpoint(self, repo_id: str, rev: str, body: bytes, query: dict) -> None:
            if not self._can_write() or (repo := self._repo(repo_id)) is None:
                return
            if query.get("create_pr"):
                return self._error(400, "the double does not do pull requests")
            if rev not in repo.branches:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            tree = dict(repo.commits[repo.branches[rev]])
            summary = ""
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value.get("summary", "")
                    parent = value.get("parentCommit")
                    if parent is not None and parent != repo.branches[rev]:
                        return self._error(412, "parentCommit is not the head of the branch")
                elif key == "file":
                    if value.get("encoding") != "base64":
                        return self._error(400, "file content must be base64")
                    tree[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    data = hub.lfs_store.get(value["oid"])
                    if data is None:
                        return self._error(422, f"LFS object {value['oid']} was never uploaded")
                    tree[value["path"]] = Blob(data, lfs=True)
                elif key == "deletedFile":
                    if value["path"] not in tree:
                        return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                    del tree[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for p in [p for p in tree if p.startswith(prefix)]:
                        del tree[p]
                else:
                    return self._error(400, f"unknown commit operation {key!r}")
            sha = hub._new_commit(repo, rev, tree, summary)
            self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}",
                             "pullRequestUrl": None})

        def _resolve(self, repo_id: str, rev: str, path: str, head: bool) -> None:
            if (repo := self._repo(repo_id, head)) is None or (sha := self._commit(repo, rev, head)) is None:
                return
            blob = repo.commits[sha].get(path)
            if blob is None:
                return self._error(404, "Entry not found", "EntryNotFound", head=head)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.oid}"', "Accept-Ranges": "bytes"}
            if blob.lfs:
                headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
            data, status = blob.data, 200
            rng = self.headers.get("Range", "")
            if rng.startswith("bytes=") and not head:
                start, _, end = rng[len("bytes="):].partition("-")
                stop = int(end) + 1 if end else len(data)
                data, status = data[int(start or 0):stop], 206
                headers["Content-Range"] = f"bytes {int(start or 0)}-{stop - 1}/{len(blob.data)}"
            self._send(status, data, headers, head=head, content_type="application/octet-stream")

    return Handler
