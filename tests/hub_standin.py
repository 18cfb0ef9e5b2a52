"""A Hugging Face Hub stand-in on loopback for the push tests: the HTTP API that huggingface_hub's
whoami, create_repo, create_branch, repo_info and create_commit call, answering as the Hub does.

    with HubStandin(tokens={"hf_w": User("alice", orgs=("team",))}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_w", "HF_HUB_DISABLE_XET": "1"}
        ...
        hub.commits[-1]  # {"repo", "revision", "message", "files": {path: bytes}, "lfs": {path}}

Endpoints (paths as huggingface_hub 0.36 and 2.x build them):
- GET  /api/whoami-v2                                  401 without a known token
- POST /api/repos/create {name, organization, private | visibility}   409 when it exists
- GET  /api/models/OWNER/NAME[/revision/REV]           repo_info (404 when missing)
- POST /api/validate-yaml {content}                    the card's YAML header parsed by PyYAML
- POST /api/models/OWNER/NAME/branch/BRANCH            409 when it exists
- POST /api/models/OWNER/NAME/preupload/REV            "lfs" for *.safetensors, binary or ≥ 10 MB
- POST /OWNER/NAME.git/info/lfs/objects/batch          basic transfer: PUT /_lfs/OID
- PUT  /_lfs/OID                                       the blob, checked against its sha256
- POST /api/models/OWNER/NAME/commit/REV               NDJSON header / file / lfsFile lines
Write calls need a token whose role is "write" and whose user or organisations own the
namespace (403 otherwise). The Xet upload path is not served: clients run with
HF_HUB_DISABLE_XET=1, which routes large files through the LFS batch API above.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_MIN_SIZE = 10 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    orgs: tuple = ()
    # the whoami token role: "write", "read", or "fineGrained" (here: one without write access,
    # which only the write calls themselves reveal, with 403)
    role: str = "write"


class HubStandin:
    def __init__(self, tokens: dict[str, User]):
        self.tokens = dict(tokens)
        self.repos: dict[str, dict] = {}  # repo id -> {"private", "branches": {name: sha}}
        self.blobs: dict[str, bytes] = {}  # LFS objects by sha256
        self.commits: list[dict] = []
        self.calls: list[tuple[str, str]] = []  # (method, path) of every request
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def files_of(self, repo_id: str) -> dict[str, int]:
        """{path: size} of every file committed to `repo_id` (any branch)."""
        out = {}
        for c in self.commits:
            if c["repo"] == repo_id:
                out.update({p: len(b) for p, b in c["files"].items()})
        return out

    # ---- request handling ----------------------------------------------------------------------
    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # the tests assert on hub.calls instead
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    return self.rfile.read(n)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return b""

            def _send(self, status: int, obj=None):
                data = json.dumps(obj if obj is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _dispatch(self, method: str):
                path = urlparse(self.path).path
                body = self._body()
                with hub._lock:
                    hub.calls.append((method, path))
                    status, obj = hub._route(method, path, body, self.headers)
                self._send(status, obj)

            def do_GET(self):
                self._dispatch("GET")

            def do_POST(self):
                self._dispatch("POST")

            def do_PUT(self):
                self._dispatch("PUT")

        return Handler

    def _user(self, headers) -> User | None:
        auth = headers.get("Authorization") or ""
        return self.tokens.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None

    def _may_write(self, user: User | None, namespace: str):
        """None when `user` may write under `namespace`, else (status, error)."""
        if user is None:
            return 401, {"error": "Invalid credentials in Authorization header"}
        if user.role != "write":
            return 403, {"error": f"This {user.role} token has no write access"}
        if namespace != user.name and namespace not in user.orgs:
            return 403, {"error": f"You don't have the rights to create a model under the "
                                  f"namespace \"{namespace}\""}
        return None

    def _route(self, method: str, path: str, body: bytes, headers):
        user = self._user(headers)
        if method == "GET" and path == "/api/whoami-v2":
            if user is None:
                return 401, {"error": "Invalid credentials in Authorization header"}
            return 200, {"type": "user", "name": user.name,
                         "orgs": [{"name": o, "roleInOrg": "write"} for o in user.orgs],
                         "auth": {"type": "access_token",
                                  "accessToken": {"displayName": "test", "role": user.role}}}
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            namespace = req.get("organization") or (user.name if user else "")
            repo_id = f"{namespace}/{req['name']}"
            denied = self._may_write(user, namespace)
            if denied:
                return denied
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo",
                             "url": f"{self.url}/{repo_id}"}
            private = bool(req.get("private")) or req.get("visibility") == "private"
            self.repos[repo_id] = {"private": private, "branches": {"main": _sha("init")}}
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body)["content"])
        if method == "PUT" and path.startswith("/_lfs/"):
            oid = path.rsplit("/", 1)[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return 400, {"error": "the uploaded content does not match its oid"}
            self.blobs[oid] = body
            return 200, {}
        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if m and method == "POST":
            return self._lfs_batch(m.group(1), json.loads(body), user)
        m = re.fullmatch(r"/api/models/([^/]+)/([^/]+)(?:/(preupload|commit|branch|revision)/(.+))?",
                         path)
        if not m:
            return 404, {"error": f"no route {method} {path}"}
        repo_id, action, rev = f"{m.group(1)}/{m.group(2)}", m.group(3), unquote(m.group(4) or "")
        repo = self.repos.get(repo_id)
        visible = repo is not None and (not repo["private"] or (
            user is not None and (repo_id.split("/")[0] in (user.name, *user.orgs))))
        if not visible:
            return 404, {"error": "Repository not found"}
        if method == "GET" and action in (None, "revision"):
            return 200, {"id": repo_id, "private": repo["private"],
                         "sha": repo["branches"].get(rev or "main")}
        denied = self._may_write(user, repo_id.split("/")[0])
        if denied:
            return denied
        if action == "branch":
            if rev in repo["branches"]:
                return 409, {"error": "Reference already exists"}
            repo["branches"][rev] = repo["branches"]["main"]
            return 200, {}
        if rev not in repo["branches"]:
            return 404, {"error": f"Invalid rev id: {rev}"}
        if action == "preupload":
            return 200, {"files": [{"path": f["path"], "uploadMode": _upload_mode(f),
                                    "shouldIgnore": False, "oid": None}
                                   for f in json.loads(body)["files"]]}
        if action == "commit":
            return self._commit(repo_id, repo, rev, body)
        return 404, {"error": f"no route {method} {path}"}

    def _validate_yaml(self, content: str):
        import yaml
        m = re.match(r"---\n(.*?)\n---\n", content, re.S)
        if not m:
            return 200, {}
        try:
            yaml.safe_load(m.group(1))
        except yaml.YAMLError as e:
            return 400, {"errors": [{"message": str(e)}]}
        return 200, {}

    def _lfs_batch(self, repo_id: str, req: dict, user):
        denied = self._may_write(user, repo_id.split("/")[0])
        if denied:
            return denied
        objects = []
        for o in req["objects"]:
            entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.blobs:
                entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/{o['oid']}", "header": {}}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def _commit(self, repo_id: str, repo: dict, rev: str, body: bytes):
        lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        files, lfs = {}, set()
        for x in lines:
            v = x["value"]
            if x["key"] == "file":
                files[v["path"]] = base64.b64decode(v["content"])
            elif x["key"] == "lfsFile":
                blob = self.blobs.get(v["oid"])
                if blob is None or len(blob) != v["size"]:
                    return 422, {"error": f"LFS object {v['oid']} of {v['path']} was not uploaded"}
                files[v["path"]], _ = blob, lfs.add(v["path"])
        sha = _sha(uuid.uuid4().hex)
        repo["branches"][rev] = sha
        self.commits.append({"repo": repo_id, "revision": rev, "message": header["summary"],
                             "files": files, "lfs": lfs})
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                     "success": True, "pullRequestUrl": None}


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _upload_mode(f: dict) -> str:
    """The Hub's rule: LFS for its .gitattributes patterns (*.safetensors among them), binary
    content (a NUL byte in the sample) and files of 10 MB or more."""
    binary = b"\0" in base64.b64decode(f.get("sample") or "")
    big = f["size"] >= LFS_MIN_SIZE
    return "lfs" if f["path"].endswith(".safetensors") or binary or big else "regular"
