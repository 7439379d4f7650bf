"""A fake Hugging Face Hub: a real HTTP server speaking the endpoints huggingface_hub 2.4 uses.

    with FakeHub() as hub:                      # 127.0.0.1, a free port, its own thread
        HfApi(endpoint=hub.url, token="hf_x").create_repo("user/m", exist_ok=True)
        hub.files("user/m")                      # {path: bytes} on main
        hub.count("create_repo")                 # requests that reached an endpoint

Endpoints (what `create_repo`, `create_branch`, `upload_folder`, `upload_file`, `repo_info` and
`whoami` call, read from huggingface_hub 2.4's hf_api.py / _commit_api.py / _upload_pipeline.py):

    POST /api/repos/create                       {name, organization, visibility?} -> {url}; 409 if it exists
    POST /api/models/{repo}/branch/{branch}      {startingPoint?} -> {}; 409 if it exists
    POST /api/validate-yaml                      {content, repoType} -> {errors: [], warnings: []}
    POST /api/models/{repo}/preupload/{rev}      {files: [{path, sample, size}]} -> every file "regular"
                                                 (so neither LFS nor Xet is ever used), oid = git sha1
                                                 of the stored file so unchanged files are skipped
    POST /api/models/{repo}/commit/{rev}         NDJSON: header, file (base64), deletedFile, deletedFolder
                                                 -> {commitOid, commitUrl}; lfsFile -> 400
    GET  /api/models/{repo}[/revision/{rev}]     repo_info / model_info -> {id, sha, private, siblings, cardData}
    GET  /api/whoami-v2                          -> {type: user, name}
    GET  /{repo}/resolve/{rev}/{path}            raw file (for hf_hub_download-style reads); rev: a branch or
                                                 the commit it points to

Failure injection: ``fail_all=401`` answers every request with 401; ``valid_tokens={...}``
answers 401 to other tokens (with the Hub's "Invalid credentials" message);
``fail_first={"create_repo": 2}`` answers 503 (or ``(n, status)``) to the first n requests
of an endpoint; ``delay={"commit": 1.0}`` answers an endpoint that many seconds late. Every request is recorded in ``hub.requests`` (method, path, endpoint,
headers with the Authorization value masked, status).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

_REPO_API = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(preupload|commit|branch|revision)/(.+))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(
        self, *, valid_tokens=None, fail_all: int | None = None, fail_first: dict | None = None, user: str = "user",
        delay: dict | None = None,
    ):
        self.valid_tokens = set(valid_tokens) if valid_tokens is not None else None
        self.fail_all = fail_all
        self.fail_first = {k: (v if isinstance(v, tuple) else (v, 503)) for k, v in (fail_first or {}).items()}
        self.user = user
        self.delay = dict(delay or {})
        self.requests: list[dict] = []
        # repo_id -> {"private": bool, "branches": {name: {"files": {path: bytes}, "sha": str}}}
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.tokens_seen: list[str] = []  # raw tokens, for tests that check where a token came from
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._url = ""
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return self._url  # kept after stop() so tests can compare URLs

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self._url = f"http://{host}:{port}"
        serve = lambda: self._server.serve_forever(poll_interval=0.05)  # noqa: E731
        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection
    def count(self, endpoint: str, status: int | None = None) -> int:
        with self.lock:
            return sum(r["endpoint"] == endpoint and status in (None, r["status"]) for r in self.requests)

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> None:
        """A repo that exists before the test, e.g. a base model with its card."""
        with self.lock:
            self.repos[repo_id] = {"private": False, "branches": {"main": {"files": dict(files), "sha": _new_sha()}}}

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            return dict(self.repos[repo_id]["branches"][revision]["files"])

    def write_out(self, repo_id: str, dest: str | Path, revision: str = "main") -> Path:
        dest = Path(dest)
        for path, data in self.files(repo_id, revision).items():
            target = dest / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return dest


def _new_sha() -> str:
    return hashlib.sha1(str(time.time_ns()).encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, payload=None, *, headers: dict | None = None, raw: bytes | None = None) -> None:
        body = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        self._record["status"] = status  # before the client can see the answer (tests count right after)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers=headers)

    def _endpoint(self, method: str, path: str) -> tuple[str, re.Match | None]:
        if path == "/api/repos/create":
            return "create_repo", None
        if path == "/api/validate-yaml":
            return "validate_yaml", None
        if path == "/api/whoami-v2":
            return "whoami", None
        m = _REPO_API.match(path)
        if m:
            kind = m.group(3)
            if kind in ("preupload", "commit"):
                return kind, m
            if kind == "branch":
                return "create_branch", m
            return "repo_info", m
        m = _RESOLVE.match(path)
        if m:
            return "resolve", m
        return "unknown", None

    def _handle(self) -> None:
        hub = self.hub
        path = urlsplit(self.path).path
        endpoint, match = self._endpoint(self.command, path)
        auth = self.headers.get("Authorization") or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        headers = {k: ("Bearer ***" if k.lower() == "authorization" else v) for k, v in self.headers.items()}
        body = self._body()
        record = {"method": self.command, "path": path, "endpoint": endpoint, "headers": headers, "status": None}
        self._record = record
        with hub.lock:
            hub.requests.append(record)
            if token:
                hub.tokens_seen.append(token)
            injected = None
            if hub.fail_all is not None:
                injected = hub.fail_all
            elif endpoint in hub.fail_first and hub.fail_first[endpoint][0] > 0:
                n, status = hub.fail_first[endpoint]
                hub.fail_first[endpoint] = (n - 1, status)
                injected = status
        time.sleep(hub.delay.get(endpoint, 0))
        try:
            if injected == 401:
                self._error(401, "Invalid credentials in Authorization header")
            elif injected is not None:
                self._error(injected, f"injected {injected}")
            elif hub.valid_tokens is not None and token not in hub.valid_tokens:
                self._error(401, "Invalid credentials in Authorization header")
            else:
                getattr(self, "_ep_" + endpoint)(match, body)
        except Exception as e:  # a bug in the fake: say so loudly
            self._error(500, f"fake hub error: {type(e).__name__}: {e}")

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _handle

    # ------------------------------------------------------------------ endpoints
    def _repo(self, repo_id: str):
        return self.hub.repos.get(repo_id)

    def _ep_unknown(self, match, body) -> None:
        self._error(404, f"fake hub: no endpoint for {self.command} {self.path}")

    def _ep_whoami(self, match, body) -> None:
        user = {"type": "user", "name": self.hub.user, "orgs": [], "auth": {"accessToken": {"role": "write"}}}
        self._send(200, user)

    def _ep_validate_yaml(self, match, body) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def _ep_create_repo(self, match, body) -> None:
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        with self.hub.lock:
            if repo_id in self.hub.repos:  # the Hub's 409 carries the url; create_repo(exist_ok) reads it
                msg = "You already created this model repo"
                self._send(409, {"error": msg, "url": f"{self.hub.url}/{repo_id}"}, headers={"X-Error-Message": msg})
                return
            self.hub.repos[repo_id] = {
                "private": payload.get("visibility") == "private",
                "branches": {"main": {"files": {}, "sha": _new_sha()}},
            }
        self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _ep_create_branch(self, match, body) -> None:
        repo_id, branch = match.group(2), unquote(match.group(4))
        with self.hub.lock:
            repo = self._repo(repo_id)
            if repo is None:
                self._error(404, "Repository not found", "RepoNotFound")
                return
            if branch in repo["branches"]:
                self._error(409, "Reference already exists")
                return
            start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
            src = repo["branches"].get(start, repo["branches"]["main"])
            repo["branches"][branch] = {"files": dict(src["files"]), "sha": src["sha"]}
        self._send(200, {})

    def _branch(self, match):
        repo_id, rev = match.group(2), unquote(match.group(4))
        repo = self._repo(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
            return None, None
        if rev not in repo["branches"]:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return None, None
        return repo_id, repo["branches"][rev]

    def _ep_preupload(self, match, body) -> None:
        with self.hub.lock:
            _, branch = self._branch(match)
            if branch is None:
                return
            files = json.loads(body)["files"]
            answer = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_sha1(branch["files"][f["path"]]) if f["path"] in branch["files"] else None,
                }
                for f in files
            ]
        self._send(200, {"files": answer, "commitOid": branch["sha"]})

    def _ep_commit(self, match, body) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        with self.hub.lock:
            repo_id, branch = self._branch(match)
            if branch is None:
                return
            header, added, deleted = {}, [], []
            new_files = dict(branch["files"])
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                elif key == "file":
                    content = value["content"]
                    b64 = value.get("encoding") == "base64"
                    new_files[value["path"]] = base64.b64decode(content) if b64 else content.encode()
                    added.append(value["path"])
                elif key == "deletedFile":
                    new_files.pop(value["path"], None)
                    deleted.append(value["path"])
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for p in [p for p in new_files if p.startswith(prefix)]:
                        new_files.pop(p)
                    deleted.append(value["path"])
                else:
                    self._error(400, f"fake hub does not support {key!r} (LFS/Xet); preupload said 'regular'")
                    return
            branch["files"] = new_files
            branch["sha"] = _new_sha()
            oid = branch["sha"]
            self.hub.commits.append({"repo_id": repo_id, "revision": unquote(match.group(4)), "oid": oid,
                                     "summary": header.get("summary"), "added": added, "deleted": deleted})  # fmt: skip
        commit_url = f"{self.hub.url}/{repo_id}/commit/{oid}"
        self._send(200, {"success": True, "commitOid": oid, "commitUrl": commit_url, "hookOutput": ""})

    def _ep_repo_info(self, match, body) -> None:
        repo_id = match.group(2)
        rev = unquote(match.group(4)) if match.group(3) == "revision" else "main"
        with self.hub.lock:
            repo = self._repo(repo_id)
            if repo is None:
                self._error(404, "Repository not found", "RepoNotFound")
                return
            if rev not in repo["branches"]:
                self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                return
            branch = repo["branches"][rev]
            readme = branch["files"].get("README.md", b"").decode()  # the Hub's cardData: the card's YAML header
            info = {"id": repo_id, "sha": branch["sha"], "private": repo["private"],
                    "siblings": [{"rfilename": p} for p in sorted(branch["files"])],
                    "cardData": yaml.safe_load(readme.split("---")[1]) if readme.startswith("---") else None}  # fmt: skip
        self._send(200, info)

    def _ep_resolve(self, match, body) -> None:
        repo_id, rev, path = match.group(1), unquote(match.group(2)), unquote(match.group(3))
        with self.hub.lock:
            repo = self._repo(repo_id)  # rev: a branch, or the commit a branch points to (from_pretrained asks so)
            branch = repo and (repo["branches"].get(rev) or next((b for b in repo["branches"].values()
                                                                  if b["sha"] == rev), None))
            data, sha = (branch["files"].get(path), branch["sha"]) if branch else (None, None)
        if data is None:
            self._error(404, "Entry not found", "EntryNotFound")
            return
        self._send(200, raw=data, headers={"ETag": f'"{git_sha1(data)}"', "X-Repo-Commit": sha})
