"""A local stand-in for the few Hugging Face Hub endpoints an upload uses, for tests (HF_ENDPOINT points at it).

It keeps repositories as commits of {path: bytes}, applies a commit whole or not at all, as the Hub does,
and records every request (method, path, headers, body) so tests can check what was sent. Endpoints:

    POST /api/repos/create                          409 with the url when the repo exists
    POST /api/validate-yaml                         the model card's metadata header
    POST /api/models/{repo}/preupload/{revision}    every file "regular", with the oid it has at that revision
    POST /api/models/{repo}/commit/{revision}       NDJSON: header, then file / deletedFile lines
    POST /api/models/{repo}/branch/{branch}         a branch from main
    GET  /api/models/{repo}[/revision/{revision}]   repo info: head sha and files

Every request needs `Authorization: Bearer <token>`; a wrong or missing token gets 401. The one public endpoint,
huggingface_hub's daily fetch of /api/agent-harnesses, gets 404 (the library then carries on without it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

PUBLIC = {"/api/agent-harnesses"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)

    def head(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)

    def add_commit(self, branch: str, message: str, files: dict[str, bytes]) -> Commit:
        parent = self.branches.get(branch)
        sha = hashlib.sha1(f"{parent}:{message}:{len(self.commits)}".encode()).hexdigest()
        self.commits[sha] = Commit(sha, parent, message, files)
        self.branches[branch] = sha
        return self.commits[sha]


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


class HubServer:
    """`with HubServer(token) as hub:` serves on 127.0.0.1 at hub.url until the block ends."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.drop_commits = 0  # fault injection: the next n commit requests see their connection closed, unanswered
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        head = self.repos[repo_id].head(revision)
        return dict(head.files) if head else {}

    def commits(self, repo_id: str) -> list[Commit]:
        return list(self.repos[repo_id].commits.values())

    # -- request handling ------------------------------------------------------------------------------

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _dispatch(self, method: str) -> None:
                body = self._body()
                path = unquote(urlsplit(self.path).path)
                with hub._lock:
                    hub.requests.append(Request(method, path, {k.lower(): v for k, v in self.headers.items()}, body))
                if path in PUBLIC:
                    return self._send(404, {"error": "not served here"})
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                with hub._lock:
                    status, payload, headers = hub._route(method, path, body)
                if status == 0:  # dropped: the client sees the connection close without an answer
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self._send(status, payload, headers)

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_POST(self) -> None:
                self._dispatch("POST")

        return Handler

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict, dict | None]:
        not_found = (404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, None
            repo = self.repos[repo_id] = Repo(private=req.get("visibility") == "private" or bool(req.get("private")))
            repo.add_commit(
                "main", "initial commit", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            )
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, None
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            match = re.match(r"---\n(.*?)\n---\n", content, re.S)
            try:
                meta = yaml.safe_load(match.group(1)) if match else None
            except yaml.YAMLError as e:
                return 400, {"error": f"invalid YAML: {e}"}, None
            if not isinstance(meta, dict):
                return 400, {"error": "README.md has no metadata header"}, None
            return 200, {"errors": [], "warnings": []}, None
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(preupload|commit|revision|branch)/(.+))?", path)
        if not m or m.group(1) not in self.repos:
            return not_found
        repo_id, action, revision = m.group(1), m.group(2), m.group(3) or "main"
        repo = self.repos[repo_id]
        if method == "GET" and action in (None, "revision"):
            head = repo.head(revision)
            if head is None:
                return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
            return (
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": head.sha,
                    "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(head.files)],
                },
                None,
            )
        if method == "POST" and action == "branch":
            if revision in repo.branches:
                return 409, {"error": "Reference already exists"}, None
            repo.branches[revision] = repo.branches["main"]
            return 200, {}, None
        if method == "POST" and action == "preupload":
            head = repo.head(revision)
            if head is None:
                return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(head.files[f["path"]]) if f["path"] in head.files else None,
                }
                for f in json.loads(body)["files"]
            ]
            return 200, {"files": files, "commitOid": head.sha}, None
        if method == "POST" and action == "commit":
            if repo.head(revision) is None:
                return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
            if self.drop_commits > 0:
                self.drop_commits -= 1
                return 0, {}, None
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = dict(repo.head(revision).files)
            for line in lines:
                if line["key"] == "file":
                    files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                elif line["key"] == "deletedFile":
                    files.pop(line["value"]["path"], None)
                elif line["key"] != "header":
                    return 400, {"error": f"unsupported commit line {line['key']}"}, None
            commit = repo.add_commit(revision, header["summary"], files)
            return (
                200,
                {
                    "commitUrl": f"{self.url}/{repo_id}/commit/{commit.sha}",
                    "commitOid": commit.sha,
                    "pullRequestUrl": None,
                },
                None,
            )
        return 405, {"error": f"{method} {path} is not served here"}, None
