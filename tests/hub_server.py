"""A small Hugging Face Hub served on 127.0.0.1, speaking the HTTP API huggingface_hub's client uses to publish
and download a model repo, so the real client runs unmodified with `HF_ENDPOINT` pointing at it.

Endpoints (as huggingface_hub 1.x / 2.x calls them; `{repo}` is `namespace/name`, revisions URL-quoted):

    GET  /api/whoami-v2                                   whoami
    POST /api/repos/create                                create_repo (visibility, 409 when it exists)
    GET  /api/models/{repo}[/revision/{rev}]              repo_info / model_info (snapshot_download resolves here)
    GET  /api/models/{repo}/refs                          list_repo_refs (create_branch's exist_ok path)
    POST /api/models/{repo}/branch/{branch}               create_branch
    GET  /api/models/{repo}/tree/{rev}[/{path}]           list_repo_tree (snapshot_download, the push diff)
    POST /api/models/{repo}/paths-info/{rev}              get_paths_info
    POST /api/validate-yaml                               create_commit's README.md metadata check
    POST /api/models/{repo}/preupload/{rev}               upload mode (regular / lfs) and the remote oid per file
    POST /{repo}.git/info/lfs/objects/batch               LFS batch: an upload action only for objects not stored
    PUT  /lfs-upload/{oid}                                the LFS object (sha256 and size verified)
    POST /lfs-verify/{oid}                                LFS verify
    POST /api/models/{repo}/commit/{rev}[?create_pr=1]    ndjson commit: file / lfsFile / deletedFile / deletedFolder
    HEAD|GET /{repo}/resolve/{rev}/{path}                 file download (X-Repo-Commit, ETag, Content-Length, Range)

Xet is never announced (no X-Xet-* headers, LFS transfers only); clients upload with `HF_HUB_DISABLE_XET=1`.
Tokens are `Bearer` strings mapped to a user, its organisations and a role (`write` / `read`); writes need `write`
on the namespace (403 otherwise), unknown tokens get 401. A commit is applied all at once or not at all.
Faults for tests: `drop_uploads = N` makes the next N LFS uploads lose their connection half-way through the body,
`drop_oids[oid] = N` the next N uploads of one object.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

# The Hub's default .gitattributes: these patterns are stored with LFS.
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.tflite", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
    "*.pth", "*.rar", "*.safetensors", "*.tar", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
LFS_THRESHOLD = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def pointer(self) -> bytes:
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
        ).encode()

    @property
    def oid(self) -> str:
        """The git object id (of the pointer file for LFS blobs), as the tree listing gives it."""
        return git_blob_sha1(self.pointer() if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else git_blob_sha1(self.data)


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: list[str] = field(default_factory=list)  # refs/pr/N -> commit oid, N = index + 1

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        if rev.startswith("refs/pr/") and rev[8:].isdigit() and 0 < int(rev[8:]) <= len(self.prs):
            return self.commits[self.prs[int(rev[8:]) - 1]]
        if rev.startswith("refs/heads/") and rev[11:] in self.branches:
            return self.commits[self.branches[rev[11:]]]
        return self.commits.get(rev)


@dataclass
class User:
    name: str
    role: str = "write"
    orgs: tuple[str, ...] = ()


class HubState:
    """Everything the server holds, inspectable by tests (under `lock`)."""

    def __init__(self, tokens: dict[str, User]):
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []
        self.lfs_uploads: list[str] = []  # oids of completed LFS uploads, in order
        self.drop_uploads = 0
        self.drop_oids: dict[str, int] = {}  # per object: how many uploads of it to drop
        self.dropped = 0
        self._counter = 0

    def new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, Blob]) -> Commit:
        self._counter += 1
        oid = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{message}\n{self._counter}".encode()).hexdigest()
        commit = Commit(oid, parent, message, files)
        repo.commits[oid] = commit
        return commit

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        with self.lock:
            commit = self.repos[repo_id].resolve(rev)
            return {p: b.data for p, b in commit.files.items()}


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - quiet: tests read `state.requests`
        pass

    # -- plumbing ------------------------------------------------------------------------------------------------

    @property
    def hub(self) -> HubState:
        return self.server.hub

    @property
    def base(self) -> str:
        return f"http://{self.headers.get('Host')}"

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

    def _send(self, status: int, body: bytes | dict | list | None = None, headers: dict | None = None,
              head: bool = False) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        body = body or b""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _user(self, required: bool = True) -> User | None:
        auth = self.headers.get("Authorization") or self.headers.get("authorization")
        if not auth:
            if required:
                raise _HTTPError(401, "Invalid credentials in Authorization header")
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.hub.tokens.get(token)
        if user is None:
            raise _HTTPError(401, "Invalid credentials in Authorization header")
        return user

    def _can_write(self, user: User | None, namespace: str) -> None:
        if user is None:
            raise _HTTPError(401, "Invalid credentials in Authorization header")
        if user.role != "write" or (namespace != user.name and namespace not in user.orgs):
            raise _HTTPError(403, "You don't have the rights to create a model under this namespace"
                             if user.role == "write" else "This token has read access only")

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        user = self._user(required=write)
        repo = self.hub.repos.get(repo_id)
        visible = repo is not None and (
            not repo.private or (user is not None and repo_id.split("/")[0] in (user.name, *user.orgs))
        )
        if not visible:
            raise _HTTPError(404 if user else 401, "Repository not found", "RepoNotFound")
        if write:
            self._can_write(user, repo_id.split("/")[0])
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise _HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        with self.hub.lock:
            self.hub.requests.append((method, url.path))
        try:
            with self.hub.lock if method != "PUT" else _nolock():
                self._route(method, parts, query)
        except _HTTPError as e:
            headers = {"X-Error-Message": " ".join(e.message.split()), **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, {"error": e.message, **e.extra}, headers, head=method == "HEAD")

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self):  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    # -- routes --------------------------------------------------------------------------------------------------

    def _route(self, method: str, p: list[str], q: dict) -> None:
        if p[:2] == ["api", "whoami-v2"] and method == "GET":
            return self._whoami()
        if p[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if p[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if p[:2] == ["api", "models"] and len(p) >= 4:
            repo_id, rest = f"{p[2]}/{p[3]}", p[4:]
            if not rest and method == "GET":
                return self._info(repo_id, "main")
            if rest[:1] == ["revision"] and method == "GET":
                return self._info(repo_id, "/".join(rest[1:]))
            if rest[:1] == ["refs"] and method == "GET":
                return self._refs(repo_id, q)
            if rest[:1] == ["branch"] and method == "POST":
                return self._create_branch(repo_id, "/".join(rest[1:]))
            if rest[:1] == ["tree"] and method == "GET":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]))
            if rest[:1] == ["paths-info"] and method == "POST":
                return self._paths_info(repo_id, "/".join(rest[1:]))
            if rest[:1] == ["preupload"] and method == "POST":
                return self._preupload(repo_id, "/".join(rest[1:]))
            if rest[:1] == ["commit"] and method == "POST":
                return self._commit_endpoint(repo_id, "/".join(rest[1:]), q)
        if len(p) >= 2 and p[1].endswith(".git") and p[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{p[0]}/{p[1][:-4]}")
        if p[:1] == ["lfs-upload"] and method == "PUT":
            return self._lfs_upload(p[1], q)
        if p[:1] == ["lfs-verify"] and method == "POST":
            return self._lfs_verify(p[1])
        if len(p) >= 5 and p[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]), head=method == "HEAD")
        raise _HTTPError(404, f"no route for {method} {self.path}")

    def _whoami(self) -> None:
        user = self._user()
        self._send(200, {
            "type": "user", "name": user.name, "fullname": user.name,
            "orgs": [{"name": o, "type": "org"} for o in user.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": user.role}},
        })

    def _create_repo(self) -> None:
        body = json.loads(self._body() or b"{}")
        user = self._user()
        namespace = body.get("organization") or user.name
        if body.get("type", "model") != "model":
            raise _HTTPError(400, "this test Hub serves model repos only")
        self._can_write(user, namespace)
        repo_id = f"{namespace}/{body['name']}"
        if repo_id in self.hub.repos:
            raise _HTTPError(409, "You already created this model repo", extra={"url": f"{self.base}/{repo_id}"})
        repo = Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
        first = self.hub.new_commit(repo, None, "initial commit", {".gitattributes": Blob(GITATTRIBUTES, False)})
        repo.branches["main"] = first.oid
        self.hub.repos[repo_id] = repo
        self._send(200, {"url": f"{self.base}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        body = json.loads(self._body())
        content = body.get("content", "")
        if content.startswith("---"):
            try:
                meta = yaml.safe_load(content.split("---", 2)[1])
            except yaml.YAMLError as e:
                msg = f"Invalid YAML: {' '.join(str(e).split())}"
                raise _HTTPError(400, msg, extra={"errors": [{"message": msg}]}) from None
            if meta is not None and not isinstance(meta, dict):
                msg = "YAML metadata must be a mapping"
                raise _HTTPError(400, msg, extra={"errors": [{"message": msg}]})
        self._send(200, {"errors": [], "warnings": []})

    def _info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, rev)
        self._send(200, {
            "id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": repo.private,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)], "tags": [], "disabled": False,
        })

    def _refs(self, repo_id: str, q: dict) -> None:
        repo = self._repo(repo_id)
        out = {
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()],
            "converts": [],
            "tags": [],
        }
        if q.get("include_prs", ["0"])[0] in ("1", "true", "True"):
            out["pullRequests"] = [
                {"name": f"refs/pr/{i + 1}", "ref": f"refs/pr/{i + 1}", "targetCommit": c}
                for i, c in enumerate(repo.prs)
            ]
        self._send(200, out)

    def _create_branch(self, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_id, write=True)
        body = json.loads(self._body() or b"{}")
        if branch in repo.branches:
            raise _HTTPError(409, "Reference already exists")
        start = self._commit(repo, body.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        self._send(200, {})

    @staticmethod
    def _entry(path: str, blob: Blob) -> dict:
        entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer())}
        return entry

    def _tree(self, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, rev)
        prefix = f"{path}/" if path else ""
        out, dirs = [], set()
        for p in sorted(commit.files):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):]
            if "/" in rel:
                dirs.add(prefix + rel.split("/")[0])
            out.append(self._entry(p, commit.files[p]))
        out += [{"type": "directory", "oid": "0" * 40, "path": d} for d in sorted(dirs)]
        self._send(200, out)

    def _paths_info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, rev)
        form = parse_qs(self._body().decode())
        paths = form.get("paths", [])
        self._send(200, [self._entry(p, commit.files[p]) for p in paths if p in commit.files])

    def _preupload(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, write=True)
        commit = self._commit(repo, rev)
        body = json.loads(self._body())
        out = []
        for f in body["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = (
                any(fnmatch.fnmatch(f["path"].split("/")[-1], pat) for pat in LFS_PATTERNS)
                or f["size"] >= LFS_THRESHOLD
                or b"\0" in sample
            )
            entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            have = commit.files.get(f["path"])
            if have is not None:
                entry["oid"] = have.etag
            out.append(entry)
        self._send(200, {"files": out, "commitOid": commit.oid})

    def _lfs_batch(self, repo_id: str) -> None:
        self._repo(repo_id, write=True)
        body = json.loads(self._body())
        if body.get("operation") != "upload":
            raise _HTTPError(400, "only uploads")
        objects = []
        for o in body["objects"]:
            entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.hub.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.base}/lfs-upload/{o['oid']}?size={o['size']}"},
                    "verify": {"href": f"{self.base}/lfs-verify/{o['oid']}"},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, oid: str, q: dict) -> None:
        with self.hub.lock:
            drop = self.hub.drop_uploads > 0 or self.hub.drop_oids.get(oid, 0) > 0
            if drop:
                if self.hub.drop_oids.get(oid, 0) > 0:
                    self.hub.drop_oids[oid] -= 1
                else:
                    self.hub.drop_uploads -= 1
                self.hub.dropped += 1
        if drop:  # the connection dies half-way through the body, as a network failure would
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(n // 2)
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid or len(data) != int(q.get("size", [len(data)])[0]):
            raise _HTTPError(400, "LFS object does not match its oid / size")
        with self.hub.lock:
            self.hub.lfs[oid] = data
            self.hub.lfs_uploads.append(oid)
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def _lfs_verify(self, oid: str) -> None:
        body = json.loads(self._body())
        if oid not in self.hub.lfs or len(self.hub.lfs[oid]) != body.get("size"):
            raise _HTTPError(404, "LFS object not found")
        self._send(200, {})

    def _commit_endpoint(self, repo_id: str, rev: str, q: dict) -> None:
        repo = self._repo(repo_id, write=True)
        create_pr = q.get("create_pr", ["0"])[0] == "1"
        parent = self._commit(repo, rev)
        if create_pr and rev not in repo.branches:
            raise _HTTPError(400, "Pull requests target a branch", "RevisionNotFound")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), None)
        if header is None or not header.get("summary"):
            raise _HTTPError(400, "commit header with a summary is required")
        if header.get("parentCommit") and not parent.oid.startswith(header["parentCommit"]):
            raise _HTTPError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(parent.files)
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = self.hub.lfs.get(value["oid"])
                if data is None:
                    raise _HTTPError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = Blob(data, True)
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise _HTTPError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            elif key != "header":
                raise _HTTPError(400, f"unknown commit operation {key}")
        commit = self.hub.new_commit(repo, parent.oid, header["summary"], files)
        pr_url = None
        if create_pr:
            repo.prs.append(commit.oid)
            pr_url = f"{self.base}/{repo_id}/discussions/{len(repo.prs)}"
        else:
            repo.branches[rev] = commit.oid
        self._send(200, {
            "success": True, "commitOid": commit.oid, "commitUrl": f"{self.base}/{repo_id}/commit/{commit.oid}",
            "pullRequestUrl": pr_url, "hookOutput": "",
        })

    def _resolve(self, repo_id: str, rev: str, path: str, head: bool) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, rev)
        blob = commit.files.get(path)
        if blob is None:
            raise _HTTPError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data = blob.data
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.etag}"'
            headers["X-Linked-Size"] = str(len(data))
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            start = int(rng[6:].split("-")[0] or 0)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self._send(206, data[start:], headers)
        if head:
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return None
        self._send(200, data, headers)


class _nolock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: HubState


class HubServer:
    """`with HubServer(tokens) as hub:` serves on 127.0.0.1 (a free port); `hub.url` is the HF_ENDPOINT."""

    def __init__(self, tokens: dict[str, User] | None = None):
        self.state = HubState(tokens or {})
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self.state
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def quote_rev(rev: str) -> str:
    return quote(rev, safe="")
